"""Paper scale on the build's driver: its memory does not grow with the corpus.

`test_the_driver_plans_and_commits_a_million_records_in_bounded_memory` runs every driver-side
step of a build (enumerate and plan, dedup, shard assignment, manifest, commit) on 1,000,000
generated text records, in a subprocess whose peak RSS it reads. The per-record work that Ray
tasks do in a real build (scan_chunk, write_shard) is replaced in that subprocess by light
stand-ins run in-process: they produce the same kinds of results (dedup keys, rejects, shard
markers with manifest rows) without a tokenizer, so the driver's own memory is what is measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow]

N_RECORDS = 1_000_000
PEAK_LIMIT = 1 << 30  # the acceptance bound: the driver's peak RSS at 1M records

_DRIVER = textwrap.dedent('''
    import hashlib, json, resource, sys
    from lladav import storage
    from lladav.config import Recipe
    from lladav.data import build as b
    from lladav.data import manifest as mf

    corpus, tokenizer, out, spp = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

    def fake_scan(recipe, entries, cache_uri):
        """Every 500th record a reject; every 250th a copy of its predecessor's text."""
        res = []
        for e in entries:
            o = e.ref.ordinal
            if o % 500 == 7:
                res.append(b.Scanned(e.index, "filtered", f"fake reject of {e.ref.record_id}"))
                continue
            text = o - 1 if o % 250 == 3 else o
            res.append(b.Scanned(e.index, key=hashlib.sha256(str(text).encode()).digest()[:16]))
        return res

    def fake_write(recipe, out_uri, shard, first_key, entries, shard_plan, chunk_size):
        name = mf.shard_name(shard)
        rows = [{"key": f"{first_key + i:09d}", "shard": name, "source": e.ref.source,
                 "source_id": e.ref.record_id, "location": e.ref.location, "copy": e.copy,
                 "image_sha256": [], "image_widths": [], "image_heights": [],
                 "text_sha256": hashlib.sha256(e.ref.record_id.encode()).hexdigest(),
                 "n_tokens": 12, "n_text_tokens": 12, "n_target_tokens": 3, "n_image_tokens": 0,
                 "image_orientations": []} for i, e in enumerate(entries)]
        storage.write_bytes(storage.join(out_uri, name), b"tar")
        marker = {"plan": shard_plan, "name": name, "sha256": "0" * 64, "bytes": 3,
                  "samples": len(rows), "totals": b._totals(rows), "rows": rows}
        storage.write_bytes(b._marker_uri(out_uri, shard), b.canonical_json(marker))
        return b._light(marker)

    def in_process(fn, n, make_args, num_workers, phase, progress, on_result=None):
        fn = {b.scan_chunk: fake_scan, b.write_shard: fake_write}[fn]
        out = [fn(*make_args(i)) for i in range(n)]
        if on_result is None:
            return out
        for i, r in enumerate(out):
            on_result(i, r)
        return []

    b._run_tasks = in_process
    b.ensure_ray = lambda: None
    recipe = Recipe.model_validate({"name": "scale", "tokenizer": tokenizer, "samples_per_shard": spp,
                                    "max_planned": 2_000_000,
                                    "sources": [{"name": "text", "kind": "llava_json",
                                                 "location": corpus}]})
    mix = b.build(recipe, out, num_workers=2)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak": peak, "counts": mix.info["counts"], "shards": len(mix.info["shards"]),
                      "manifest_rows": mix.info["manifest"]["rows"]}))
''')


def _corpus(path: Path, n: int) -> None:
    with path.open("w") as f:
        for start in range(0, n, 10_000):
            f.write("".join(
                json.dumps({"id": f"r{i}", "conversations": [
                    {"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}) + "\n"
                for i in range(start, min(n, start + 10_000))))


def test_the_driver_plans_and_commits_a_million_records_in_bounded_memory(tmp_path, tiny_tokenizer):
    corpus = tmp_path / "text.jsonl"
    _corpus(corpus, N_RECORDS)
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER)
    done = subprocess.run([sys.executable, str(script), str(corpus), str(tiny_tokenizer),
                           str(tmp_path / "mix"), "2000"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    rejected = len(range(7, N_RECORDS, 500))
    duplicates = len(range(3, N_RECORDS, 250))
    counts = result["counts"]
    assert counts["rejected"] == rejected + duplicates
    assert counts["samples"] == result["manifest_rows"] == N_RECORDS - rejected - duplicates
    assert result["shards"] == -(-counts["samples"] // 2000)
    assert counts["by_source"]["text"]["rejected_by_reason"] == {"duplicate": duplicates,
                                                                 "filtered": rejected}
    assert result["peak"] <= PEAK_LIMIT, f"driver peak {result['peak'] / 2**20:.0f} MiB at 1M records"


N_BUILD = 100_000


@pytest.mark.usefixtures("ray_cluster")
def test_a_hundred_thousand_text_records_build_and_verify(tmp_path, tiny_tokenizer):
    """A real build (Ray tasks, the tokenizer, tars) of 100k text records with planted bad and
    duplicate records: every shard's bytes match mixture.json, and every record is a sample or a
    reject row, with the right text."""
    import hashlib
    import io
    import tarfile

    import pyarrow.parquet as pq

    from lladav import storage
    from lladav.config import Recipe
    from lladav.data import manifest as mf
    from lladav.data.build import build

    corpus = tmp_path / "text.jsonl"
    with corpus.open("w") as f:
        for i in range(N_BUILD):
            if i % 10_000 == 5:
                f.write('{"id": "broken", "conversations": [\n')  # not JSON: unreadable
                continue
            j = i - 1 if i % 5_000 == 9 else i  # every 5,000th copies its predecessor's text
            f.write(json.dumps({"id": f"r{i}", "conversations": [
                {"from": "human", "value": f"what is {j}?"},
                {"from": "gpt", "value": f"n{j % 97}"}]}) + "\n")
    recipe = Recipe.model_validate({"name": "scale", "tokenizer": str(tiny_tokenizer),
                                    "samples_per_shard": 5_000, "max_length": 128,
                                    "sources": [{"name": "text", "kind": "llava_json",
                                                 "location": str(corpus)}]})
    out = tmp_path / "mix"
    mix = build(recipe, str(out), num_workers=2)

    broken, copies = len(range(5, N_BUILD, 10_000)), len(range(9, N_BUILD, 5_000))
    counts = mix.info["counts"]
    assert counts["samples"] == N_BUILD - broken - copies
    assert counts["by_source"]["text"]["rejected_by_reason"] == {"duplicate": copies,
                                                                 "malformed_json": broken}
    for shard in mix.info["shards"]:
        data = (out / shard["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]
    manifest = pq.read_table(out / mf.MANIFEST, columns=["source_id", "key", "shard"]).to_pydict()
    rejects = pq.read_table(out / mf.REJECTS).to_pydict()
    assert len(manifest["source_id"]) == counts["samples"] == len(set(manifest["source_id"]))
    assert manifest["key"] == [f"{i:09d}" for i in range(counts["samples"])]
    assert sorted(manifest["source_id"] + [r for r in rejects["source_id"] if r]) == \
        sorted(f"r{i}" for i in range(N_BUILD) if i % 10_000 != 5)
    # The text in a tar is the record's own.
    first = mix.info["shards"][0]["name"]
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(str(out / first)))) as tar:
        metas = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers()
                 if m.name.endswith(".json")]
    assert len(metas) == 5_000
    for meta in metas[:200]:
        i = int(meta["source_id"][1:])
        assert [t["text"] for t in meta["turns"]][-2:] == [f"what is {i}?", f"n{i % 97}"]
