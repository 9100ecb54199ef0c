"""The loader over a mixture of many shards on S3 with a shard cache capped at a few of them:
disk use within the cap, a first batch that downloads a bounded number of shards, one download
per shard per node for two loaders, the unbounded run's batches, and exact resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from lladav.config import ShardCacheSettings, Shuffle, load_recipe
from lladav.data.build import build
from lladav.data.loader import MixtureLoader

pytestmark = pytest.mark.usefixtures("ray_cluster")

BATCH, BLOCK, PREFETCH, CAP_SHARDS = 4, 2, 2, 6
GEOMETRY = {"tile_size": 32, "patch_size": 8, "max_grid": 2}


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory, synth_dir, s3_server, ray_cluster) -> dict:
    """The synthetic corpus built into S3 at 3 samples a shard (about 40 shards)."""
    import boto3

    bucket = f"cache-{uuid.uuid4().hex[:16]}"
    boto3.session.Session().client("s3").create_bucket(Bucket=bucket)
    corpus = synth_dir / "corpus"
    recipe = {"name": "many", "tokenizer": str(synth_dir / "tokenizer"), "max_length": 512,
              "samples_per_shard": 3, "seed": 1, "vision": GEOMETRY,
              "sources": [{"name": "qa", "kind": "llava_json", "location": str(corpus / "qa.json")},
                          {"name": "captions", "kind": "llava_json",
                           "location": str(corpus / "captions.json")}]}
    path = tmp_path_factory.mktemp("many_shards") / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    mixture = build(load_recipe(path), f"s3://{bucket}/many", num_workers=2)
    shards = mixture.info["shards"]
    assert len(shards) >= 24
    return {"uri": mixture.uri, "largest": max(s["bytes"] for s in shards),
            "total": sum(s["bytes"] for s in shards), "n_shards": len(shards)}


def _loader(uri: str, folder: Path, limit: int | None, **kwargs) -> MixtureLoader:
    args = {"batch_size": BATCH, "rank": 0, "world_size": 1, "num_workers": 0, "seed": 5,
            "shuffle": Shuffle(kind="block", block_shards=BLOCK),
            "shard_cache": ShardCacheSettings(folder=str(folder), limit_bytes=limit,
                                              prefetch_shards=PREFETCH)}
    return MixtureLoader(uri, **{**args, **kwargs})


UNBOUNDED = 10**12


def _used(loader: MixtureLoader, epoch: int = 0) -> set[str]:
    """sha256 of the shards this rank's epoch reads (drop_last may leave a shard out)."""
    return {loader._refs[shard].sha256 for planned in loader._plan(epoch)[1]
            for _, shard, _, _ in planned.samples}


class _DiskUse:
    """Samples the bytes of shards and reservations in a cache folder from a thread."""

    def __init__(self, folder: Path):
        self.folder, self.peak, self.samples = folder, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for name in os.listdir(self.folder):
                if name.endswith((".tar", ".tar.part")):
                    try:
                        total += os.stat(self.folder / name).st_size
                    except FileNotFoundError:
                        pass
            self.peak, self.samples = max(self.peak, total), self.samples + 1
            time.sleep(0.002)

    def __enter__(self) -> "_DiskUse":
        self.folder.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.parametrize("group,workers", [(False, 0), (True, 0), (False, 2)])
def test_a_capped_cache_gives_the_unbounded_batches_within_its_cap(many_shards, tmp_path, group,
                                                                  workers):
    uri, cap = many_shards["uri"], CAP_SHARDS * many_shards["largest"]
    kwargs = {"group_by_length": group, "group_window": 2}
    unbounded = _loader(uri, tmp_path / "unbounded", UNBOUNDED, **kwargs)
    expected = list(unbounded)
    capped = _loader(uri, tmp_path / "capped", cap, num_workers=workers, **kwargs)
    got, first_batch_bytes = [], None
    with _DiskUse(tmp_path / "capped") as disk:
        for batch in capped:
            if first_batch_bytes is None:
                first_batch_bytes = capped.cache.stats.bytes_downloaded
            got.append(batch)
    assert [b.keys for b in got] == [b.keys for b in expected] and len(got) == len(capped)
    assert all(torch.equal(a.ids, b.ids) and torch.equal(a.targets, b.targets)
               for a, b in zip(got, expected))
    assert disk.samples > 10 and 0 < disk.peak <= cap
    assert capped.cache.stats.peak_bytes <= cap
    # The whole mixture went through a cache that holds a few shards of it.
    assert many_shards["total"] > 3 * cap
    if workers == 0:
        stats = capped.cache.stats
        assert set(stats.downloads) == _used(capped)
        assert stats.evictions > 0
        # Time to first batch: the first batch's shards plus the prefetch window, whatever the
        # number of shards (the old loader fetched all of them first).
        bound = (BATCH + PREFETCH) * many_shards["largest"]
        assert 0 < first_batch_bytes <= bound < many_shards["total"] / 4
    print(f"{many_shards['n_shards']} shards, {many_shards['total']} bytes; cap {cap}, disk peak "
          f"{disk.peak}; first batch after {first_batch_bytes} bytes downloaded")


@pytest.mark.parametrize("cap_shards", [None, CAP_SHARDS])
def test_two_loaders_on_one_node_download_each_shard_once(many_shards, tmp_path, cap_shards):
    """Two ranks in lockstep sharing a folder: one download per shard, with a cap too."""
    uri = many_shards["uri"]
    cap = UNBOUNDED if cap_shards is None else cap_shards * many_shards["largest"]
    ranks = [_loader(uri, tmp_path / "node", cap, rank=r, world_size=2) for r in range(2)]
    alone = [[b.keys for b in _loader(uri, tmp_path / f"alone{r}", UNBOUNDED, rank=r,
                                      world_size=2)] for r in range(2)]
    seen: list[list[list[str]]] = [[], []]
    streams = [iter(r) for r in ranks]
    with _DiskUse(tmp_path / "node") as disk:
        for a, b in zip(*streams):
            seen[0].append(a.keys)
            seen[1].append(b.keys)
        assert next(streams[1], None) is None     # ends rank 1's epoch (zip stops at rank 0's)
    assert seen == alone
    downloads = ranks[0].cache.stats.downloads + ranks[1].cache.stats.downloads
    used = _used(ranks[0]) | _used(ranks[1])
    assert set(downloads) == used and len(used) >= 24
    assert all(n == 1 for n in downloads.values()), downloads
    if cap_shards is not None:
        assert disk.peak <= cap
        assert ranks[0].cache.stats.evictions + ranks[1].cache.stats.evictions > 0


CHILD = r"""
import json, os, sys
from lladav.config import ShardCacheSettings, Shuffle
from lladav.data.loader import MixtureLoader

uri, folder, cap, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
loader = MixtureLoader(uri, batch_size=4, rank=0, world_size=1, num_workers=1, seed=5,
                       shuffle=Shuffle(kind="block", block_shards=2),
                       shard_cache=ShardCacheSettings(folder=folder, limit_bytes=cap,
                                                      prefetch_shards=2))
with open(out, "a") as f:
    for batch in loader:
        f.write(json.dumps({"keys": batch.keys, "state": loader.state_dict()}) + "\n")
        f.flush()
        os.fsync(f.fileno())
"""


@pytest.mark.slow
def test_resume_after_a_kill_continues_exactly(many_shards, tmp_path):
    uri, cap = many_shards["uri"], CAP_SHARDS * many_shards["largest"]
    folder, out = tmp_path / "node", tmp_path / "batches.jsonl"
    expected = [b.keys for b in _loader(uri, tmp_path / "unbounded", UNBOUNDED)]
    proc = subprocess.Popen([sys.executable, "-c", CHILD, uri, str(folder), str(cap), str(out)],
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not (out.exists() and out.read_text().count("\n") >= len(expected) // 3):
        assert proc.poll() is None, f"the child exited with {proc.returncode}"
        assert time.monotonic() < deadline, "the child made no progress"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)           # the node dies: the loader and its worker
    proc.wait()
    # Every line ends with its newline; a torn last one was never handed over whole.
    lines = [json.loads(line) for line in out.read_text().split("\n")[:-1]]
    assert len(expected) // 3 <= len(lines) < len(expected)
    head, state = [line["keys"] for line in lines], lines[-1]["state"]
    again = _loader(uri, folder, cap)
    again.load_state_dict(state)
    with _DiskUse(folder) as disk:
        rest = [b.keys for b in again]
    assert head + rest == expected
    assert disk.peak <= cap and not list(folder.glob("*.part"))
