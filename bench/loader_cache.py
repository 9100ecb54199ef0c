"""Time and bytes to the first batch against the number of shards: the node-shared shard cache
with the block order, against the old loader's fetch-everything-first, in one run.

Issue 17 item 4. For mixtures of --shards (default 8, 32, 128) shards of --per-shard samples
(noisy 256x192 JPEGs, so a shard is ~100-200 KB) on an S3 endpoint (moto's server, started
here, so every shard crosses HTTP), each round in a fresh cache folder:

    old   what the loader did before: the global order, and every shard the epoch touches
          downloaded and verified (8 threads, the same ShardCache.ensure) before the first batch
    new   MixtureLoader with the stage defaults: block order (16 shards a block), cache capped at
          the block order's working set, 16 shards prefetched; its first batch downloads that
          batch's shards on demand while the prefetcher fetches the next ones

Printed per size: median seconds to the first batch and the bytes downloaded by then (the new
loader's own counter, CacheStats.bytes_downloaded, read when the batch is handed over), then
how each grows from the smallest to the largest mixture. Target: the new loader's bytes before
the first batch stay within (prefetch + batch) shards at every size, i.e. do not grow with the
mixture; exit 1 if not. The times are for reading, on a shared machine they vary +-20%.

Mixtures are built by lladav's own `build` (local Ray, 2 CPUs) under bench/out/loader_cache/
and kept between runs (an identical rebuild is a no-op); each run uploads them to the endpoint.

    .venv/bin/python bench/loader_cache.py [--shards 8,32,128] [--per-shard 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "loader_cache"
GEOMETRY = {"tile_size": 32, "patch_size": 8, "max_grid": 2}
BATCH = 8
WORDS = "red green blue square circle triangle small large left right the a of shape".split()


# ---- corpora and mixtures -----------------------------------------------------------------------

def _jpeg(rng: random.Random) -> bytes:
    import numpy as np
    from PIL import Image

    gen = np.random.default_rng(rng.getrandbits(32))
    pixels = gen.integers(0, 256, size=(192, 256, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=70)
    return buf.getvalue()


def make_mixture(n_shards: int, per_shard: int) -> Path:
    """A local mixture of n_shards shards (kept between runs)."""
    from lladav.config import Recipe
    from lladav.data.build import build
    from lladav.data.tokenizer import template_texts, train_tokenizer

    out = OUT / f"mix-{n_shards}x{per_shard}"
    if (out / "mixture.json").exists():
        return out
    rng = random.Random(0)
    tokenizer = OUT / "tokenizer"
    if not (tokenizer / "tokenizer.json").exists():
        train_tokenizer(template_texts() + [" ".join(rng.choice(WORDS) for _ in range(12))
                                            for _ in range(500)], tokenizer, vocab_size=512)
    corpus = OUT / f"corpus-{n_shards * per_shard}"
    if not (corpus / "data.json").exists():
        (corpus / "images").mkdir(parents=True, exist_ok=True)
        records = []
        for i in range(n_shards * per_shard):
            (corpus / "images" / f"{i:06d}.jpg").write_bytes(_jpeg(rng))
            records.append({"id": f"r{i}", "image": f"images/{i:06d}.jpg", "conversations": [
                {"from": "human", "value": "<image>\nWhat is in the picture?"},
                {"from": "gpt", "value": " ".join(rng.choice(WORDS) for _ in range(10))}]})
        (corpus / "data.json").write_text(json.dumps(records))
    recipe = {"name": out.name, "tokenizer": str(tokenizer), "max_length": 1024,
              "samples_per_shard": per_shard, "seed": 0, "vision": GEOMETRY,
              "sources": [{"name": "s", "kind": "llava_json",
                           "location": str(corpus / "data.json")}]}
    build(Recipe.model_validate(recipe), str(out), num_workers=2)
    return out


# ---- the S3 endpoint -----------------------------------------------------------------------

def start_moto() -> subprocess.Popen:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    binary = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    import boto3

    deadline = time.monotonic() + 30
    while True:
        try:
            boto3.session.Session().client("s3").create_bucket(Bucket="bench")
            return proc
        except Exception:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.2)


# ---- the two contenders -------------------------------------------------------------------------

def old_first_batch(uri: str, folder: str) -> tuple[float, int]:
    """The old loader: every shard of the epoch fetched and verified, then the first batch."""
    from lladav.config import ShardCacheSettings, Shuffle
    from lladav.data.loader import MixtureLoader
    from lladav.data.shard_cache import DOWNLOAD_THREADS

    t0 = time.perf_counter()
    loader = MixtureLoader(uri, batch_size=BATCH, rank=0, world_size=1, num_workers=0,
                           shuffle=Shuffle(kind="global"),
                           shard_cache=ShardCacheSettings(folder=folder, prefetch_shards=0))
    refs = list(loader._refs.values())
    with ThreadPoolExecutor(min(DOWNLOAD_THREADS, len(refs))) as pool:
        list(pool.map(loader.cache.ensure, refs))
    next(iter(loader))
    return time.perf_counter() - t0, loader.cache.stats.bytes_downloaded


def new_first_batch(uri: str, folder: str) -> tuple[float, int]:
    """The stage defaults: block order, capped cache, prefetch window."""
    from lladav.config import ShardCacheSettings
    from lladav.data.loader import MixtureLoader

    t0 = time.perf_counter()
    loader = MixtureLoader(uri, batch_size=BATCH, rank=0, world_size=1, num_workers=0,
                           shard_cache=ShardCacheSettings(folder=folder))
    stream = iter(loader)
    next(stream)
    seconds, downloaded = time.perf_counter() - t0, loader.cache.stats.bytes_downloaded
    stream.close()                                  # stops the prefetcher
    return seconds, downloaded


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default="8,32,128")
    parser.add_argument("--per-shard", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(s) for s in args.shards.split(",")]
    logging.basicConfig(level=logging.WARNING)
    OUT.mkdir(parents=True, exist_ok=True)

    import ray

    local = [make_mixture(n, args.per_shard) for n in sizes]
    if ray.is_initialized():
        ray.shutdown()
    moto = start_moto()
    from lladav import storage
    from lladav.config import ShardCacheSettings

    try:
        rows, ok = [], True
        for n, folder in zip(sizes, local):
            uri = f"s3://bench/{folder.name}"
            storage.publish_folder(folder, uri, last="mixture.json")
            info = json.loads((folder / "mixture.json").read_text())
            largest = max(s["bytes"] for s in info["shards"])
            total = sum(s["bytes"] for s in info["shards"])
            runs: dict[str, list[tuple[float, int]]] = {"old": [], "new": []}
            for r in range(args.rounds):
                for kind in (("old", "new") if r % 2 == 0 else ("new", "old")):
                    cache = tempfile.mkdtemp(prefix="lladav-bench-cache-")
                    try:
                        run = old_first_batch if kind == "old" else new_first_batch
                        runs[kind].append(run(uri, cache))
                    finally:
                        shutil.rmtree(cache, ignore_errors=True)
            row = {"shards": n, "total": total, "largest": largest}
            for kind, results in runs.items():
                row[f"{kind}_s"] = statistics.median(t for t, _ in results)
                row[f"{kind}_bytes"] = max(b for _, b in results)
            bound = (ShardCacheSettings().prefetch_shards + BATCH) * largest
            row["bound"] = bound
            ok &= row["new_bytes"] <= bound
            rows.append(row)
            mib = total / 2**20
            print(f"{n:4d} shards ({mib:5.1f} MiB): first batch old {row['old_s']:6.2f} s "
                  f"after {row['old_bytes'] / 2**20:6.1f} MiB | new {row['new_s']:6.2f} s after "
                  f"{row['new_bytes'] / 2**20:6.1f} MiB (bound {bound / 2**20:.1f} MiB) | old/new "
                  f"time {row['old_s'] / row['new_s']:5.1f}x, bytes "
                  f"{row['old_bytes'] / max(row['new_bytes'], 1):5.1f}x", flush=True)
        first, last = rows[0], rows[-1]
        print(f"from {first['shards']} to {last['shards']} shards: old time x"
              f"{last['old_s'] / first['old_s']:.1f}, bytes x"
              f"{last['old_bytes'] / first['old_bytes']:.1f}; new time x"
              f"{last['new_s'] / first['new_s']:.1f}, bytes x"
              f"{last['new_bytes'] / max(first['new_bytes'], 1):.1f}")
        print("target (new bytes before the first batch within prefetch + batch shards): "
              + ("met" if ok else "MISSED"))
        return 0 if ok else 1
    finally:
        moto.terminate()
        moto.wait()


if __name__ == "__main__":
    sys.exit(main())
