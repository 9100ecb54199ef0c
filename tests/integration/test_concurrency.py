"""One writer per output, through the CLI: two writers of one output at once, exactly one proceeds.

    test_two_builds_of_different_recipes_to_one_out   local and S3: the second build refuses at
                                                      once naming the first; the first commits a
                                                      mixture that verifies
    test_two_runs_of_one_pipeline                     the second `pipeline run` refuses at the
                                                      stage the first is training; one model
                                                      version; a later run skips every step

The overlap is forced, not hoped for: the first writer is paused (SIGSTOP) once its lease names
it, the second runs to its end, then the first continues (SIGCONT).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lladav import storage
from lladav.config import load_pipeline
from lladav.data.manifest import Mixture, open_mixture
from lladav.digest import sha256_bytes
from lladav.lease import LEASE_FILE, holder_of
from lladav.pipeline import plan, run

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_files import write_pipeline  # noqa: E402

LLADAV = str(Path(sys.executable).parent / "lladav")


def verify(uri: str) -> Mixture:
    """The committed mixture is whole and only itself: every file matches its digest in
    mixture.json, the manifest names exactly its shards, and nothing else is under the URI."""
    mixture = open_mixture(uri)
    info = mixture.info
    names = set()
    for shard in info["shards"]:
        data = storage.read_bytes(storage.join(uri, shard["name"]))
        assert (sha256_bytes(data), len(data)) == (shard["sha256"], shard["bytes"]), shard["name"]
        names.add(shard["name"])
    for table in ("manifest", "rejects"):
        data = storage.read_bytes(storage.join(uri, info[table]["name"]))
        assert sha256_bytes(data) == info[table]["sha256"], table
    rows = mixture.manifest().to_pylist()
    assert len(rows) == info["manifest"]["rows"] == info["counts"]["samples"] > 0
    assert {r["shard"] for r in rows} == names
    listed = {u[len(uri):].lstrip("/") for u in storage.list_uris(uri)}
    assert listed == {"mixture.json", "manifest.parquet", "rejects.parquet", *names}
    return mixture


def _recipe(path: Path, name: str, corpus: Path, tokenizer: Path, files: list[str]) -> Path:
    path.write_text(yaml.safe_dump({
        "name": name, "tokenizer": str(tokenizer), "max_length": 512, "samples_per_shard": 8,
        "seed": 0, "vision": {"tile_size": 32, "patch_size": 8, "max_grid": 2},
        "sources": [{"name": f.split(".")[0], "kind": "llava_json", "location": str(corpus / f)}
                    for f in files]}))
    return path


def _pause_when_holding(proc: subprocess.Popen, lease_folder: callable, log: Path) -> str:
    """Wait until the lease under lease_folder() names `proc`, then stop `proc`; the folder."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the first writer ended early:\n{log.read_text()[-3000:]}"
        folder = lease_folder()
        if folder and (holder_of(folder) or {}).get("pid") == proc.pid:
            proc.send_signal(signal.SIGSTOP)
            return folder
        time.sleep(0.05)
    raise AssertionError(f"the first writer never took its lease:\n{log.read_text()[-3000:]}")


def _finish(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    proc.send_signal(signal.SIGCONT)
    proc.wait(timeout=timeout)
    return log.read_text()


def _reap(proc: subprocess.Popen) -> None:
    """Kill a still-running (possibly SIGSTOPped) first writer after a failed assertion."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()


def _flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long messages at the console width


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_builds_of_different_recipes_to_one_out(where, tmp_path, synth_dir, ray_cluster,
                                                    s3_bucket):
    corpus, tok = synth_dir / "corpus", synth_dir / "tokenizer"
    first = _recipe(tmp_path / "a.yaml", "mix-a", corpus, tok, ["qa.json", "captions.json"])
    second = _recipe(tmp_path / "b.yaml", "mix-b", corpus, tok, ["reasoning.json"])
    out = str(tmp_path / "out") if where == "local" else f"{s3_bucket}/mixtures/out"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}

    log = tmp_path / "first.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([LLADAV, "data", "build", str(first), "--out", out], env=env,
                                stdout=f, stderr=subprocess.STDOUT)
    try:
        _pause_when_holding(proc, lambda: out, log)
        refused = subprocess.run([LLADAV, "data", "build", str(second), "--out", out], env=env,
                                 capture_output=True, text=True, timeout=300)
        text = _flat(refused.stdout + refused.stderr)
        assert refused.returncode == 2, text
        assert f"error: {out} is being written by pid {proc.pid} on " in text, text
        assert "build recipe mix-a" in text and "wait for it" in text, text
        assert "Traceback" not in text, text
        first_log = _finish(proc, log, timeout=600)
    finally:
        _reap(proc)
    assert proc.returncode == 0, first_log[-3000:]

    mixture = verify(out)  # mixture.json, manifest and shards all from the first recipe
    assert mixture.info["name"] == "mix-a"
    assert {r["source"] for r in mixture.manifest().to_pylist()} <= {"qa", "captions"}
    assert holder_of(out) is None


@pytest.mark.slow
def test_two_runs_of_one_pipeline(tmp_path, synth_dir, ray_cluster, s3_bucket, mlflow_server):
    """On S3 storage (the MLflow server registers exports by URI, not local path), with a long
    ttl so the paused first run's lease cannot go stale on a loaded machine."""
    from mlflow import MlflowClient

    name = f"twice-{os.getpid()}-{time.time_ns() % 10**6}"
    path = write_pipeline(tmp_path / "p", synth_dir, storage=f"{s3_bucket}/pipe",
                          tracking_uri=mlflow_server.url, steps=3, every=2, name=name)
    data = yaml.safe_load(path.read_text())
    data["steps"] = data["steps"][:1] + data["steps"][3:4]  # mix-stage1 -> stage1
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "LLADAV_LEASE_TTL": "900"}

    def stage_lease() -> str | None:  # found, not computed: the key is the running code's
        found = storage.list_uris(f"{s3_bucket}/pipe/steps/stage1", suffix=f"/{LEASE_FILE}")
        return storage.parent(found[0]) if found else None

    log = tmp_path / "first.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([LLADAV, "pipeline", "run", str(path)], env=env, cwd=tmp_path,
                                stdout=f, stderr=subprocess.STDOUT)
    try:
        folder = _pause_when_holding(proc, stage_lease, log)
        refused = subprocess.run([LLADAV, "pipeline", "run", str(path)], env=env, cwd=tmp_path,
                                 capture_output=True, text=True, timeout=300)
        text = _flat(refused.stdout + refused.stderr)
        assert refused.returncode == 2, text
        assert f"error: {folder} is being written by pid {proc.pid} on " in text, text
        assert f"pipeline {name} step stage1" in text and "Traceback" not in text, text
        assert "skip mix-stage1" in text, text  # the finished build was not redone
        first_log = _finish(proc, log, timeout=900)
    finally:
        _reap(proc)
    assert proc.returncode == 0, first_log[-3000:]

    client = MlflowClient(mlflow_server.url)
    versions = client.search_model_versions(f"name='{name}-stage1'")
    assert len(versions) == 1
    experiment = client.get_experiment_by_name(name)
    stage_runs = [r for r in client.search_runs([experiment.experiment_id])
                  if r.data.tags.get("lladav.step") == "stage1"]
    assert len(stage_runs) == 1 and stage_runs[0].info.status == "FINISHED"
    steps = {p.name: p for p in plan(load_pipeline(path))}
    verify(steps["mix-stage1"].record["outputs"]["mixture"])

    # A run after it finds every step done, under the lease, and skips it.
    again = {p.name: p for p in run(load_pipeline(path), say=lambda m: None)}
    assert {p.state for p in again.values()} == {"done"}
    assert again["stage1"].record["run_id"] == stage_runs[0].info.run_id
    assert len(client.search_model_versions(f"name='{name}-stage1'")) == 1
    assert holder_of(folder) is None
