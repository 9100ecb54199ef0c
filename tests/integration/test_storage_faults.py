"""storage.py against a misbehaving S3: the moto server behind tests/faultproxy.py.

The fast tests force one kind of fault at a time (a body cut off mid-stream, a short range
read, 5xx and SlowDown beyond botocore's own attempts, dropped connections, an outage longer or
shorter than the retry budget, a 404) and check the bytes or the error. The slow one is the
acceptance test of issue 12: a `lladav data build` joining the session's Ray cluster through
the proxy, with seeded faults of every kind and a 20 s outage from the first shard marker on,
commits the same bytes as a clean build.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import boto3
import pytest
import yaml
from PIL import Image

from lladav import storage
from lladav.digest import pretty_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from faultproxy import KINDS, FaultProxy  # noqa: E402

SECRET = "not-a-real-secret-0123456789"


def _direct(s3_server: str):
    """A client that bypasses the proxy (to plant or change objects behind a reader's back)."""
    return boto3.session.Session().client("s3", endpoint_url=s3_server)


@pytest.fixture
def proxy(s3_server, s3_bucket, monkeypatch):
    """A FaultProxy in front of moto, with this process's storage pointed at it."""
    with FaultProxy(s3_server) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)  # moto does not check signatures
        yield p


def _plant(s3_server: str, uri: str, data: bytes) -> None:
    bucket, _, key = uri[len("s3://"):].partition("/")
    _direct(s3_server).put_object(Bucket=bucket, Key=key, Body=data)


def _ranges(proxy: FaultProxy, key: str) -> list[str | None]:
    return [r.range for r in proxy.requests("GET", key)]


# ---- fast: one fault kind at a time -------------------------------------------------------------

def test_a_stream_cut_off_twice_resumes_and_returns_the_exact_bytes(proxy, s3_server, s3_bucket):
    uri = f"{s3_bucket}/big.bin"
    payload = random.Random(0).randbytes(3 * 2**20 + 17)
    _plant(s3_server, uri, payload)
    proxy.queue("truncate", "GET", times=2)  # the first GET and the first resume both break
    with storage.open_read(uri) as f:
        assert f.read() == payload
    assert proxy.counts["truncate"] == 2
    # One plain GET, then Range GETs from the byte each broken body reached, never from 0.
    ranges = _ranges(proxy, "big.bin")
    assert ranges[0] is None and len(ranges) == 3, ranges
    starts = [int(re.fullmatch(r"bytes=(\d+)-", r).group(1)) for r in ranges[1:]]
    assert 0 < starts[0] < starts[1] < len(payload), starts


def test_a_resumed_stream_refuses_an_object_that_changed(proxy, s3_server, s3_bucket):
    uri = f"{s3_bucket}/changing.bin"
    _plant(s3_server, uri, b"a" * (3 * 2**20))
    proxy.queue("truncate", "GET")  # cut after 1.5 MiB
    with pytest.raises(storage.StorageError, match=r"changing\.bin.*changed"):
        with storage.open_read(uri) as f:
            assert f.read(2**20) == b"a" * 2**20
            _plant(s3_server, uri, b"b" * (3 * 2**20))
            f.read()


def test_a_short_range_read_is_retried_and_a_short_object_is_not(proxy, s3_server, s3_bucket):
    uri = f"{s3_bucket}/records.json"
    payload = random.Random(1).randbytes(100_000)
    _plant(s3_server, uri, payload)
    proxy.queue("truncate", "GET")
    assert storage.read_range(uri, 1000, 50_000) == payload[1000:51_000]
    assert proxy.counts["truncate"] == 1
    assert _ranges(proxy, "records.json") == ["bytes=1000-50999"] * 2
    # The object itself is shorter than asked for: an error at once, not a retry.
    with pytest.raises(storage.StorageError, match="records.json.*shorter"):
        storage.read_range(uri, len(payload) - 10, 20)
    past_the_end = f"bytes={len(payload) - 10}-{len(payload) + 9}"
    assert _ranges(proxy, "records.json").count(past_the_end) == 1


def test_5xx_slowdown_and_drops_beyond_botocores_attempts_are_retried(proxy, s3_bucket):
    uri = f"{s3_bucket}/k.bin"
    # botocore makes 3 attempts per call; 4 faults in a row need our own retry layer.
    proxy.queue("slowdown", "PUT", times=4)
    storage.write_bytes(uri, b"payload")
    proxy.queue("error500", "HEAD", times=4)
    assert storage.exists(uri)
    proxy.queue("drop", "GET", times=4)
    assert storage.read_bytes(uri) == b"payload"
    proxy.queue("error500", "GET", times=4)
    assert storage.list_uris(s3_bucket) == [uri]
    assert {k: proxy.counts[k] for k in KINDS} == {"slowdown": 4, "error500": 8, "drop": 4,
                                                   "truncate": 0}


def test_an_outage_shorter_than_the_budget_is_ridden_out(proxy, s3_server, s3_bucket):
    uri = f"{s3_bucket}/k.bin"
    _plant(s3_server, uri, b"payload")
    proxy.outage(3)
    assert storage.read_bytes(uri) == b"payload"
    assert proxy.counts["outage"] > 0


def test_an_outage_longer_than_the_budget_fails_naming_the_uri(proxy, s3_server, s3_bucket,
                                                               monkeypatch):
    uri = f"{s3_bucket}/dir/k.bin"
    _plant(s3_server, uri, b"payload")
    monkeypatch.setenv(storage.RETRY_ENV, "1")
    proxy.outage(600)
    with pytest.raises(storage.StorageError) as raised:
        storage.read_bytes(uri)
    message = str(raised.value)
    assert message.startswith(f"{uri}: open failed after ")
    assert int(re.search(r"after (\d+) attempts", message).group(1)) >= 2
    assert storage.RETRY_ENV in message and "Connection" in message  # the last cause
    assert SECRET not in message
    assert proxy.counts["outage"] >= 2


def test_not_found_and_other_4xx_are_not_retried(proxy, s3_bucket):
    with pytest.raises(FileNotFoundError, match="absent.bin"):
        storage.read_bytes(f"{s3_bucket}/absent.bin")
    assert len(proxy.requests("GET", "absent.bin")) == 1
    assert not storage.exists(f"{s3_bucket}/absent.bin")
    assert len(proxy.requests("HEAD", "absent.bin")) == 1
    with pytest.raises(FileNotFoundError, match="no-such-bucket-xyz"):
        storage.read_bytes("s3://no-such-bucket-xyz/k")
    assert len(proxy.requests("GET", "no-such-bucket-xyz")) == 1


def test_retry_budget_and_worker_env_come_from_the_environment(monkeypatch):
    for name in storage.WORKER_ENV:
        monkeypatch.delenv(name, raising=False)
    assert storage.retry_budget() == storage.DEFAULT_RETRY_S >= 60
    monkeypatch.setenv(storage.RETRY_ENV, "soon")
    with pytest.raises(storage.StorageError, match="LLADAV_STORAGE_RETRY_S='soon'"):
        storage.retry_budget()
    monkeypatch.setenv(storage.RETRY_ENV, "30")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://s3.internal:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_PROFILE", "not-storage-config")
    assert storage.retry_budget() == 30
    assert storage.worker_env() == {storage.RETRY_ENV: "30", "AWS_SECRET_ACCESS_KEY": SECRET,
                                    "AWS_ENDPOINT_URL": "http://s3.internal:9000"}


_WORKER_ENV_PROBE = """
import json, os, ray
from lladav.ray_cluster import ensure_ray
ensure_ray()
probe = ray.remote(lambda names: {n: os.environ.get(n) for n in names})
print(json.dumps(ray.get(probe.remote(["AWS_ENDPOINT_URL", "LLADAV_STORAGE_RETRY_S"]))))
"""


def test_ensure_ray_hands_storage_env_to_the_workers_of_an_existing_cluster(ray_cluster,
                                                                             s3_server):
    # The session cluster's workers were started with AWS_ENDPOINT_URL=<moto>; a job joining
    # it with another endpoint must have its tasks see that one.
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
           storage.RETRY_ENV: "77"}
    run = subprocess.run([sys.executable, "-c", _WORKER_ENV_PROBE], env=env, capture_output=True,
                         text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", storage.RETRY_ENV: "77"}


# ---- slow: the acceptance test ----------------------------------------------------------------

def _write_corpus(root: Path, n: int = 40) -> list[str]:
    """LLaVA JSON with n records and n small PNGs (seeded noise); returns the texts."""
    rng = random.Random(12)
    (root / "images").mkdir(parents=True)
    colours = ["red", "green", "blue", "yellow"]
    records, texts = [], []
    for i in range(n):
        width = 24 + 4 * (i % 3)
        image = Image.frombytes("RGB", (width, 24), rng.randbytes(width * 24 * 3))
        buf = io.BytesIO()
        image.save(buf, "PNG")
        (root / "images" / f"{i:03d}.png").write_bytes(buf.getvalue())
        question = f"<image>\nWhat colour is mostly in picture {i}?"
        answer = f"Mostly {colours[i % 4]}, with some {colours[(i + 1) % 4]} noise."
        records.append({"id": f"rec-{i:03d}", "image": f"images/{i:03d}.png",
                        "conversations": [{"from": "human", "value": question},
                                          {"from": "gpt", "value": answer}]})
        texts += [question, answer]
    (root / "data.json").write_text(json.dumps(records, indent=1))
    return texts


def _objects(prefix: str) -> dict[str, bytes]:
    return {u[len(prefix):]: storage.read_bytes(u) for u in storage.list_uris(prefix)}


def _cli_build(recipe: Path, out: str, env: dict[str, str]) -> float:
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "lladav.cli", "data", "build", str(recipe),
                          "--out", out, "--num-workers", "2"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return time.monotonic() - start


def _comparable_mixture_json(clean: bytes, faulted: bytes) -> bytes:
    """`faulted`, or, when the checkout's lladav/ changed between the two builds (others edit
    a shared checkout), `faulted` with the clean build's code version and the plan digest made
    from it: those differ by design, every other byte must not."""
    a, b = json.loads(clean), json.loads(faulted)
    if a["code_version"] == b["code_version"]:
        return faulted
    warnings.warn(f"lladav/ changed between the builds ({a['code_version']} vs "
                  f"{b['code_version']}); mixture.json compared without its code identity")
    return pretty_json({**b, "code_version": a["code_version"], "plan_digest": a["plan_digest"]})


@pytest.mark.slow
def test_a_build_through_faults_and_an_outage_equals_a_clean_build(tmp_path, s3_server, s3_bucket,
                                                                   ray_cluster):
    from lladav.data.tokenizer import train_tokenizer

    texts = _write_corpus(tmp_path / "corpus")
    train_tokenizer(texts, tmp_path / "tokenizer", vocab_size=400)
    for folder in ("corpus", "tokenizer"):
        for f in sorted((tmp_path / folder).rglob("*")):
            if f.is_file():
                storage.write_file(f"{s3_bucket}/{folder}/{f.relative_to(tmp_path / folder)}", f)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "faults", "tokenizer": f"{s3_bucket}/tokenizer", "max_length": 512,
        "samples_per_shard": 4, "seed": 5,
        "vision": {"tile_size": 32, "patch_size": 8, "max_grid": 2},
        "sources": [{"name": "colours", "kind": "llava_json",
                     "location": f"{s3_bucket}/corpus/data.json"}]}))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}

    clean_s = _cli_build(recipe, f"{s3_bucket}/clean", env)
    with FaultProxy(s3_server, seed=7, rate=0.15) as proxy:
        # The outage starts at the first shard's done-marker, written by a Ray worker.
        proxy.outage_when(20, lambda method, path: method == "PUT" and "/faulted/_build/" in path)
        faulted_s = _cli_build(recipe, f"{s3_bucket}/faulted",
                               {**env, "AWS_ENDPOINT_URL": proxy.url})

    clean, faulted = _objects(f"{s3_bucket}/clean"), _objects(f"{s3_bucket}/faulted")
    assert "/mixture.json" in clean and sum(k.startswith("/shards/") for k in clean) >= 5
    assert sorted(faulted) == sorted(clean)
    faulted["/mixture.json"] = _comparable_mixture_json(clean["/mixture.json"],
                                                        faulted["/mixture.json"])
    for name in clean:
        assert faulted[name] == clean[name], name
    # Every kind of fault happened, the outage among them, and the workers' own traffic (the
    # shards they write) went through the proxy: the runtime_env carried the endpoint to them.
    assert all(proxy.counts[k] >= 1 for k in (*KINDS, "outage")), proxy.counts
    assert proxy.outage_started
    assert proxy.requests("PUT", "/faulted/shards/shard-")
    print(f"clean build {clean_s:.0f} s, faulted build {faulted_s:.0f} s; faults injected: "
          f"{dict(proxy.counts)} over {len(proxy.log)} requests")
