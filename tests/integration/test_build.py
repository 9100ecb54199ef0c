"""`lladav data build` across the real boundaries: Ray tasks, the moto S3 server, plain readers."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from lladav import storage
from lladav.config import load_recipe
from lladav.data.build import build
from lladav.data.manifest import MixtureNotCommitted, open_mixture

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _files(uri: str) -> dict[str, bytes]:
    """Every object of a mixture, by name relative to the mixture."""
    return {u[len(uri):].lstrip("/"): storage.read_bytes(u) for u in storage.list_uris(uri)}


def _recipe(tmp_path: Path, corpus: Path, tokenizer: Path | str, **extra) -> Path:
    data = {"name": "qa", "tokenizer": str(tokenizer), "max_length": 512, "samples_per_shard": 16,
            "seed": 3, "vision": {"tile_size": 32, "patch_size": 8, "max_grid": 2},
            "sources": [{"name": "qa", "kind": "llava_json", "location": str(corpus / "qa.json")},
                        {"name": "captions", "kind": "llava_json", "weight": 0.5,
                         "location": str(corpus / "captions.json")}]}
    data.update(extra)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_s3_and_local_and_worker_counts_give_identical_bytes(tmp_path, synth_dir, s3_bucket):
    recipe = load_recipe(_recipe(tmp_path, synth_dir / "corpus", synth_dir / "tokenizer"))
    local1 = build(recipe, str(tmp_path / "one"), num_workers=1)
    local2 = build(recipe, str(tmp_path / "two"), num_workers=2)
    remote = build(recipe, f"{s3_bucket}/mixtures/qa", num_workers=2)

    a, b, c = _files(local1.uri), _files(local2.uri), _files(remote.uri)
    assert sorted(a) == sorted(b) == sorted(c)
    assert {"mixture.json", "manifest.parquet", "rejects.parquet"} <= set(a)
    assert sum(n.startswith("shards/") for n in a) == local1.info["counts"]["shards"] > 1
    for name in a:
        assert a[name] == b[name] == c[name], name
    assert local1.digest == remote.digest
    # Nothing but the committed files: the resume markers are gone.
    assert not any(n.startswith("_build") for n in c)


def test_near_duplicate_images_are_refused_naming_the_kept_key_at_any_worker_count(tmp_path, synth_dir):
    """40 generated images captioned, then 20 resized / re-encoded / cropped / enlarged copies
    with their original's caption, and 5 records asking something else about an original (a
    VQA corpus's normal case, kept): near dedup refuses the copies, naming the original's key,
    with the same bytes from 1 and 2 workers."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from near_copies import copy, distinct, encode

    folder = tmp_path / "corpus"
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(5)
    originals = distinct(40, seed=5)
    records = []

    def add(rid: str, data: bytes, ext: str, question: str, answer: str) -> None:
        (folder / "images" / f"{rid}.{ext}").write_bytes(data)
        records.append({"id": rid, "image": f"images/{rid}.{ext}", "conversations": [
            {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]})

    for i, img in enumerate(originals):
        add(f"orig-{i}", encode(img), "png", "Describe the image.", f"caption number {i}")
    for i in range(20):
        data = copy(originals[i], i % 4, rng)
        add(f"copy-{i}", data, "jpg" if data[:2] == b"\xff\xd8" else "png", "Describe the image.",
            f"caption number {i}")
    for i in range(5):
        add(f"other-{i}", encode(originals[i]), "png", "How many shapes are there?", "three")
    (folder / "data.json").write_text(json.dumps(records))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "name": "near", "tokenizer": str(synth_dir / "tokenizer"), "max_length": 512,
        "samples_per_shard": 8, "seed": 1, "near_dedup": {"max_distance": 8},
        "vision": {"tile_size": 32, "patch_size": 8, "max_grid": 2},
        "sources": [{"name": "web", "kind": "llava_json", "location": str(folder / "data.json")}]}))
    recipe = load_recipe(path)
    one = build(recipe, str(tmp_path / "one"), num_workers=1)
    two = build(recipe, str(tmp_path / "two"), num_workers=2)
    a, b = _files(one.uri), _files(two.uri)
    assert sorted(a) == sorted(b) and all(a[k] == b[k] for k in a)

    rejects = one.rejects().to_pylist()
    near = {r["source_id"]: r for r in rejects if r["reason"] == "near_duplicate"}
    assert len(near) >= 19 and set(near) <= {f"copy-{i}" for i in range(20)}, sorted(near)
    by_key = {r["key"]: r for r in one.manifest().to_pylist()}
    for rid, r in near.items():
        kept = by_key[r["duplicate_of"]]
        assert kept["source_id"] == "orig-" + rid.split("-")[1], (rid, kept["source_id"])
        assert f"key {r['duplicate_of']}" in r["detail"] and "perceptual-hash bits" in r["detail"]
    kept_ids = {r["source_id"] for r in by_key.values()}
    assert {f"orig-{i}" for i in range(40)} | {f"other-{i}" for i in range(5)} <= kept_ids
    assert len(by_key) + len(rejects) == len(records)
    assert all(len(h) == 1 and len(h[0]) == 32 for h in one.manifest().column("image_phash").to_pylist())


def test_shards_open_with_plain_webdataset_and_ray_data(tmp_path, synth_dir):
    import ray.data
    import webdataset as wds

    recipe = load_recipe(_recipe(tmp_path, synth_dir / "corpus", synth_dir / "tokenizer"))
    mixture = build(recipe, str(tmp_path / "mix"), num_workers=2)
    manifest = mixture.manifest().to_pylist()
    keys = {r["key"] for r in manifest}
    assert len(keys) == len(manifest) == mixture.info["counts"]["samples"] > 0

    seen = {}
    for sample in wds.WebDataset(mixture.shard_uris(), shardshuffle=False).decode("pil"):
        seen[sample["__key__"]] = sample
    assert set(seen) == keys
    by_key = {r["key"]: r for r in manifest}
    for key, sample in seen.items():
        row = by_key[key]
        ids, targets = sample["ids.npy"], sample["targets.npy"]
        assert ids.dtype == np.int32 and targets.shape == ids.shape
        assert int((ids >= 0).sum()) == row["n_text_tokens"]
        assert int((targets != 0).sum()) == row["n_target_tokens"]
        assert set(np.unique(targets).tolist()) <= {0, 1, 2} and (targets == 2).any()  # 2: answers
        images = [sample[k] for k in sorted(sample) if k.startswith("img")]
        assert [im.size for im in images] == list(zip(row["image_widths"], row["image_heights"]))
        meta = sample["json"]
        assert meta["source_id"] == row["source_id"] and meta["location"] == row["location"]

    # Ray Data's default decoder turns images into one tensor column, which needs every image of
    # a block to share a shape; real mixtures never do, so read raw bytes and decode per row.
    rows = ray.data.read_webdataset(mixture.shard_uris(), decoder=None).take_all()
    assert sorted(r["__key__"] for r in rows) == sorted(keys)
    for r in rows:
        ids = np.load(io.BytesIO(r["ids.npy"]))
        assert np.array_equal(ids, seen[r["__key__"]]["ids.npy"])
        assert json.loads(r["json"])["key"] == r["__key__"]


def test_weights_tags_and_counts(tmp_path, synth_dir):
    corpus = synth_dir / "corpus"
    path = _recipe(tmp_path, corpus, synth_dir / "tokenizer", sources=[
        {"name": "qa", "kind": "llava_json", "location": str(corpus / "qa.json"), "weight": 2.0,
         "tag": "/no_think"},
        {"name": "reasoning", "kind": "llava_json", "location": str(corpus / "reasoning.json"),
         "weight": 0.3, "tag": "/think", "tag_probability": 0.5}])
    mixture = build(load_recipe(path), str(tmp_path / "mix"), num_workers=2)
    counts = mixture.info["counts"]["by_source"]
    n_qa = len(json.loads((corpus / "qa.json").read_text()))
    n_reasoning = len(json.loads((corpus / "reasoning.json").read_text()))
    assert counts["qa"]["selected"] == 2 * n_qa
    assert counts["reasoning"]["selected"] == round(0.3 * n_reasoning)
    for c in counts.values():
        assert c["selected"] == c["samples"] + c["rejected"]
    rows = mixture.manifest().to_pylist()
    copies = {}
    for r in rows:
        if r["source"] == "qa":
            copies.setdefault(r["source_id"], set()).add(r["copy"])
    assert all(v == {0, 1} for v in copies.values())  # every qa record twice, not deduplicated
    # Tags: every qa user turn ends with /no_think; about half the reasoning ones with /think.
    import webdataset as wds
    tagged = total = 0
    for sample in wds.WebDataset(mixture.shard_uris(), shardshuffle=False).decode():
        turns = [t for t in sample["json"]["turns"] if t["role"] == "user"]
        if sample["json"]["source"] == "qa":
            assert all(t["text"].endswith(" /no_think") for t in turns)
        else:
            tagged += sum(t["text"].endswith(" /think") for t in turns)
            total += len(turns)
    assert 0.3 < tagged / total < 0.7


# ---- bad input --------------------------------------------------------------------------------

def _jpeg(colour=(200, 30, 30), size=(48, 48)) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise(size, 30).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png(size, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG")
    return buf.getvalue()


def _qa(rid, image, answer="red", question="<image>\nWhat colour is the shape?"):
    rec = {"id": rid, "conversations": [{"from": "human", "value": question},
                                        {"from": "gpt", "value": answer}]}
    if image is not None:
        rec["image"] = image
    return rec


def make_bad_corpus(root: Path) -> dict[str, str]:
    """A corpus with one of every kind of bad record; returns {record id or member: reason}."""
    img = root / "images"
    img.mkdir(parents=True)
    good = _jpeg()
    (img / "good1.jpg").write_bytes(good)
    (img / "good2.jpg").write_bytes(_jpeg())
    (img / "good3.png").write_bytes(_png((40, 40)))
    (img / "copy_of_good1.jpg").write_bytes(good)
    (img / "garbage.jpg").write_bytes(b"this is not an image at all")
    (img / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (img / "bomb.png").write_bytes(_png((5000, 5000), mode="1"))
    (img / "tiny.png").write_bytes(_png((3, 40)))
    (root / "outside.png").write_bytes(_png((40, 40)))
    lines = [
        json.dumps(_qa("good1", "images/good1.jpg")),
        json.dumps(_qa("good2", "images/good2.jpg", answer="blue")),
        json.dumps(_qa("good3", "images/good3.png", answer="green")),
        json.dumps(_qa("text_only", None, answer="three", question="How many corners has a triangle?")),
        json.dumps(_qa("undecodable", "images/garbage.jpg")),
        json.dumps(_qa("truncated", "images/truncated.jpg")),
        json.dumps(_qa("missing", "images/does_not_exist.jpg")),
        json.dumps(_qa("bomb", "images/bomb.png")),
        json.dumps(_qa("too_small", "images/tiny.png")),
        '{"id": "broken", "conversations": [{"from": "human", "value": "unterminated',
        json.dumps({"id": "no_answer", "image": "images/good2.jpg",
                    "conversations": [{"from": "human", "value": "<image>\nanything?"}]}),
        json.dumps(_qa("too_long", "images/good2.jpg", answer="red " * 600)),
        json.dumps(_qa("dup_same_file", "images/good1.jpg")),
        json.dumps(_qa("dup_other_file", "images/copy_of_good1.jpg", question="<image>\nWHAT colour is   the shape?")),
        json.dumps(_qa("escapes", "../outside.png")),
    ]
    (root / "records.jsonl").write_text("\n".join(lines) + "\n")

    # An img2dataset-style tar: a good caption pair, a member escaping the folder, a json caption.
    with tarfile.open(root / "captions.tar", "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add("000001.jpg", _jpeg())
        add("000001.txt", b"A noisy square.")
        add("../evil.txt", b"escape attempt")
        add("000002.jpg", _jpeg())
        add("000002.json", json.dumps({"caption": "Another noisy picture.", "key": "000002"}).encode())
        add("000003.jpg", _jpeg())  # no caption at all

    # LLaVA-OneVision-style parquet: image struct with bytes, conversations as a list of structs.
    conv = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    table = pa.table({
        "id": ["pq_good", "pq_text", "pq_badbytes"],
        "image": [{"bytes": _jpeg(), "path": "a.jpg"}, None, {"bytes": b"\x89PNG garbage", "path": "b.png"}],
        "conversations": [conv("<image>\nColour?", "red"), conv("Say hi.", "hi"), conv("<image>\nKind?", "circle")],
    })
    pq.write_table(table, root / "ov.parquet")
    return {
        "undecodable": "image_undecodable", "truncated": "image_truncated", "missing": "image_missing",
        "bomb": "decompression_bomb", "too_small": "image_too_small", "no_answer": "no_assistant_turn",
        "too_long": "too_long", "escapes": "unsafe_path", "pq_badbytes": "image_undecodable",
        "000003": "no_assistant_turn",
    }


def test_bad_input_is_rejected_with_reasons_and_nothing_else_is_lost(tmp_path, synth_dir):
    root = tmp_path / "corpus"
    expected = make_bad_corpus(root)
    path = _recipe(tmp_path, root, synth_dir / "tokenizer", samples_per_shard=4,
                   images={"max_pixels": 10_000_000, "min_side": 8},
                   sources=[{"name": "jsonl", "kind": "llava_json", "location": str(root / "records.jsonl")},
                            {"name": "tars", "kind": "webdataset", "location": str(root / "captions.tar")},
                            {"name": "ov", "kind": "parquet", "location": str(root / "ov.parquet")}])
    mixture = build(load_recipe(path), str(tmp_path / "mix"), num_workers=2)
    rejects = mixture.rejects().to_pylist()
    rows = mixture.manifest().to_pylist()

    by_id = {r["source_id"]: r for r in rejects if r["source_id"] is not None}
    for rid, reason in expected.items():
        assert by_id[rid]["reason"] == reason, (rid, by_id.get(rid))
        assert by_id[rid]["location"] and by_id[rid]["detail"]
    # The malformed line and the escaping tar member cannot even be parsed: located, no id.
    unparsed = {r["reason"]: r for r in rejects if r["source_id"] is None}
    assert unparsed["malformed_json"]["location"].startswith(str(root / "records.jsonl") + "#byte=")
    # A tar record is its members' key: the record "../evil" is refused whole, naming the member.
    assert unparsed["unsafe_path"]["location"].endswith("#../evil")
    assert "'../evil.txt'" in unparsed["unsafe_path"]["detail"]
    # Exact duplicates (same file, or same bytes under another name with re-spaced, re-cased
    # text) lose to the first in mixture order; exactly one of each group survives.
    group = {"good1", "dup_same_file", "dup_other_file"}
    assert len(group & {r["source_id"] for r in rows}) == 1
    assert sum(1 for r in rejects if r["source_id"] in group and r["reason"] == "duplicate") == 2
    # Decompression bomb: its detail names the file.
    assert "bomb.png" in by_id["bomb"]["detail"]
    # Survivors: the good ones of each format.
    assert {r["source_id"] for r in rows} - group == {"good2", "good3", "text_only", "000001",
                                                      "000002", "pq_good", "pq_text"}
    # Counts add up per source: every enumerated record is a sample or a reject.
    for name, c in mixture.info["counts"]["by_source"].items():
        assert c["records"] == c["samples"] + c["rejected"], name
    assert mixture.info["counts"]["by_source"]["jsonl"]["records"] == 15
    assert mixture.info["counts"]["by_source"]["tars"]["records"] == 4


def test_invalid_recipe_or_missing_source_fails_fast_and_leaves_nothing(tmp_path, synth_dir):
    corpus, tok = synth_dir / "corpus", synth_dir / "tokenizer"
    out = tmp_path / "out"
    bad = _recipe(tmp_path, corpus, tok, samples_per_shard="many")
    run = subprocess.run([sys.executable, "-m", "lladav.cli", "data", "build", str(bad), "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "samples_per_shard" in run.stdout + run.stderr and "recipe.yaml" in run.stdout + run.stderr
    assert not out.exists()

    missing = _recipe(tmp_path, corpus, tok, sources=[
        {"name": "gone", "kind": "llava_json", "location": str(tmp_path / "nowhere.json")}])
    run = subprocess.run([sys.executable, "-m", "lladav.cli", "data", "build", str(missing), "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "nowhere.json" in run.stdout + run.stderr and "gone" in run.stdout + run.stderr
    assert not (out / "mixture.json").exists()
    with pytest.raises(MixtureNotCommitted):
        open_mixture(str(out))


def test_a_build_that_would_commit_nothing_fails_with_its_top_reasons(tmp_path, synth_dir,
                                                                     ray_cluster):
    """A tiny-model recipe without `vision:` counts 8B image tokens, so every image record is
    too long: the build exits non-zero, commits nothing and says why and what to set."""
    corpus, tok = synth_dir / "corpus", synth_dir / "tokenizer"
    data = yaml.safe_load(_recipe(tmp_path, corpus, tok, max_length=300).read_text())
    del data["vision"]
    data["sources"][0]["filters"] = {"require_image": True}  # qa's text-only records: filtered
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "lladav.cli", "data", "build", str(path), "--out",
                          str(out)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "RAY_ADDRESS": ray_cluster})
    text = " ".join((run.stdout + run.stderr).split())
    assert run.returncode == 2, text
    assert "nothing was committed" in text and "Top reasons" in text
    assert re.search(r"too_long +\d+ +e\.g\. \S+\.json#byte=\d+: \d+ tokens \(\d+ text \+ \d+ image\)", text), text
    assert re.search(r"filtered +\d+ +e\.g\. .*require_image", text), text
    assert "no `vision:` in recipe qa" in text and "384 px tiles of 14 px patches" in text
    with pytest.raises(MixtureNotCommitted):
        open_mixture(str(out))


@pytest.mark.slow
def test_killed_build_leaves_no_mixture_and_rerun_equals_clean_build(tmp_path, big_synth_dir, ray_cluster):
    corpus, tok = big_synth_dir / "corpus", big_synth_dir / "tokenizer"
    path = _recipe(tmp_path, corpus, tok, samples_per_shard=8)
    out = tmp_path / "killed"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    proc = subprocess.Popen([sys.executable, "-m", "lladav.cli", "data", "build", str(path),
                             "--out", str(out), "--num-workers", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(list((out / "_build").glob("shard-*.json"))) < 2:
        assert proc.poll() is None, "the build finished before it could be killed; make it bigger"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(list((out / "shards").glob("*.tar"))) >= 2
    assert not (out / "mixture.json").exists()
    with pytest.raises(MixtureNotCommitted):
        open_mixture(str(out))
    kept = [json.loads(p.read_bytes())["name"].split("/")[-1]
            for p in sorted((out / "_build").glob("shard-*.json"))]
    written = {n: (out / "shards" / n).stat().st_mtime_ns for n in kept}

    resumed = build(load_recipe(path), str(out), num_workers=2)
    # The shards finished before the kill were kept, not rewritten.
    assert kept and all((out / "shards" / n).stat().st_mtime_ns == written[n] for n in kept)
    clean = build(load_recipe(path), str(tmp_path / "clean"), num_workers=2)
    a, b = _files(resumed.uri), _files(clean.uri)
    assert sorted(a) == sorted(b)
    assert all(a[n] == b[n] for n in a)


def test_corpora_and_tokenizer_on_s3_read_like_local_ones(tmp_path, synth_dir, s3_bucket):
    """All three readers, the image root and the tokenizer folder, read through S3."""
    root = tmp_path / "corpus"
    make_bad_corpus(root)
    for folder, prefix in ((root, "corpus"), (synth_dir / "tokenizer", "tokenizer")):
        for f in folder.rglob("*"):
            if f.is_file():
                storage.write_file(f"{s3_bucket}/{prefix}/{f.relative_to(folder)}", f)

    def recipe(base: str, tok: str):
        return load_recipe(_recipe(tmp_path, root, tok,
                                   images={"max_pixels": 10_000_000},
                                   sources=[{"name": "jsonl", "kind": "llava_json", "location": f"{base}/records.jsonl"},
                                            {"name": "tars", "kind": "webdataset", "location": f"{base}/captions.tar"},
                                            {"name": "ov", "kind": "parquet", "location": f"{base}/ov.parquet"}]))

    local = build(recipe(str(root), str(synth_dir / "tokenizer")), str(tmp_path / "local"))
    remote = build(recipe(f"{s3_bucket}/corpus", f"{s3_bucket}/tokenizer"), f"{s3_bucket}/mix")

    def outcome(m):
        return ({(r["source_id"], r["reason"]) for r in m.rejects().to_pylist()},
                sorted((r["source_id"], r["n_tokens"], r["text_sha256"], tuple(r["image_sha256"]))
                       for r in m.manifest().to_pylist()))

    assert outcome(local) == outcome(remote)
    assert remote.info["tokenizer"]["digest"] == local.info["tokenizer"]["digest"]
    assert all(r["location"].startswith(s3_bucket) for r in remote.manifest().to_pylist())
