"""The build reads, checks and tokenizes each record once: the write phase takes its samples from
the scan's chunk caches (data/build.py), never from the source.

The task bodies run in-process here (they are plain functions), so every read of the source is
counted; the Ray-run build keeps its byte-identity tests in tests/integration/test_build.py.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from lladav import storage
from lladav.config import load_recipe
from lladav.data import build as b


def _recipe(tmp_path: Path, synth_dir: Path):
    corpus = synth_dir / "corpus"
    data = {"name": "qa", "tokenizer": str(synth_dir / "tokenizer"), "max_length": 512,
            "samples_per_shard": 16, "seed": 3,
            "vision": {"tile_size": 32, "patch_size": 8, "max_grid": 2},
            "sources": [{"name": "qa", "kind": "llava_json", "location": str(corpus / "qa.json")}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_recipe(path)


def test_each_record_is_read_once_and_written_from_the_scan_cache(tmp_path, big_synth_dir, monkeypatch):
    recipe = _recipe(tmp_path, big_synth_dir)
    reads: Counter = Counter()
    real_load = b.load_record

    def counting_load(source, ref, *args, **kwargs):
        reads[ref.location] += 1
        return real_load(source, ref, *args, **kwargs)

    monkeypatch.setattr(b, "load_record", counting_load)
    out = str(tmp_path / "mix")
    the_plan = b.plan(recipe)
    assert len(the_plan.entries) > 4 * b.SCAN_CHUNK  # several chunks, so shards span chunks
    chunks = [the_plan.entries[i:i + b.SCAN_CHUNK]
              for i in range(0, len(the_plan.entries), b.SCAN_CHUNK)]
    results = b.ScanResults(len(the_plan))
    for k, c in enumerate(chunks):
        results.add(b.scan_chunk(recipe, c, b._chunk_uri(out, k)))
    assert set(reads.values()) == {1} and len(reads) == len(the_plan.entries)

    survivors = the_plan.take(b._dedup(recipe, the_plan, results)[0])
    spp = recipe.samples_per_shard
    markers = [b.write_shard(recipe, out, s, start, survivors[start:start + spp], f"plan-{s}")
               for s, start in enumerate(range(0, len(survivors), spp))]
    assert set(reads.values()) == {1}, "the write phase read the source again"

    # What the tars hold is what a fresh read of each record gives.
    tok, cache = b.load_tokenizer(recipe.tokenizer), {}
    by_key = {}
    for marker in markers:
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(f"{out}/{marker['name']}"))) as tar:
            for m in tar.getmembers():
                by_key.setdefault(m.name.split(".", 1)[0], {})[m.name.split(".", 1)[1]] = \
                    tar.extractfile(m).read()
    assert len(by_key) == len(survivors) == sum(m["samples"] for m in markers)
    for position, entry in enumerate(survivors):
        fresh = b.process(recipe, entry, tok, cache)
        member = by_key[f"{position:09d}"]
        assert np.array_equal(np.load(io.BytesIO(member["ids.npy"])), fresh.ids)
        assert np.array_equal(np.load(io.BytesIO(member["targets.npy"])), fresh.targets)
        assert [member[f"img{k}.{ext}"] for k, (_, ext, _, _) in enumerate(fresh.images)] == \
            [data for data, _, _, _ in fresh.images]
        meta = json.loads(member["json"])
        assert meta["source_id"] == entry.ref.record_id and meta["text_sha256"] == fresh.text_sha256
        assert [t["text"] for t in meta["turns"]] == [t.text for t in fresh.turns]


def test_a_missing_scan_cache_fails_the_shard_with_its_uri(tmp_path, synth_dir):
    recipe = _recipe(tmp_path, synth_dir)
    out = str(tmp_path / "mix")
    entries = b.plan(recipe).entries[:4]
    with pytest.raises(b.BuildError, match=r"chunk-000000\.arrow: the scan cache of shard 0 is gone"):
        b.write_shard(recipe, out, 0, 0, entries, "plan-0")


@pytest.mark.parametrize("row_group", [7, 100_000])
def test_the_streamed_manifest_equals_the_whole_table(tmp_path, monkeypatch, row_group):
    """The commit streams manifest rows from the shard markers in row groups; the bytes are
    those of writing the whole table at once (row groups of the same size), so the output does
    not depend on how the rows were split into shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lladav.data import manifest as mf

    monkeypatch.setattr(b, "MANIFEST_ROW_GROUP", row_group)
    out = str(tmp_path / "mix")
    rows = [{"key": f"{i:09d}", "shard": mf.shard_name(i // 5), "source": "s", "source_id": str(i),
             "location": f"f.json#byte={i * 40}", "copy": 0, "image_sha256": [], "image_widths": [],
             "image_heights": [], "text_sha256": f"{i:064x}", "n_tokens": i, "n_text_tokens": i,
             "n_target_tokens": 1, "n_image_tokens": 0, "image_orientations": []} for i in range(23)]
    shards = []
    for s in range(5):
        mine = rows[s * 5:(s + 1) * 5]
        storage.write_bytes(b._marker_uri(out, s), json.dumps({"rows": mine}).encode())
        shards.append({"name": mf.shard_name(s)})
    sha, n = b._write_manifest(out, shards)

    whole = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=mf.MANIFEST_SCHEMA), whole, compression="zstd",
                   row_group_size=row_group, write_statistics=False, store_schema=False)
    written = storage.read_bytes(f"{out}/{mf.MANIFEST}")
    assert n == 23 and written == whole.getvalue()
    assert sha == b.sha256_bytes(written)
    if row_group == 100_000:  # the committed format: mf.table_bytes' bytes
        assert written == mf.table_bytes(rows, mf.MANIFEST_SCHEMA)
