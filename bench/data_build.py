"""`lladav data build` against the plain tools, and the build driver's memory per record.

Issue 17's figures, all measured in one run on this machine:

    1. throughput  samples/s and CPU seconds per sample, interleaved rounds (A B C, C B A, ...) of
         lladav    data.build.build(recipe, out, num_workers=2) on a local Ray cluster (2 CPUs)
         raydata   a plain Ray Data pipeline written here: the records -> map_batches(read image,
                   decode and check it, template + tokenize) -> write_webdataset, 2 CPUs
         loop      the same work in one process on one core, into one tar (webdataset.TarWriter)
       on two corpora of LLaVA JSON + JPEG files: `small` (--small, default 20,000 images of
       64x48) and `photo` (--photos, default 5,000 images of 640x480). Ratios lladav/raydata and
       lladav/loop per corpus are medians over rounds; the spread (min..max) is printed beside.
       Also lladav with 1 worker, for the 1 -> 2 worker scaling.
    2. driver      peak RSS of the build's driver process (ru_maxrss of a subprocess that runs
       build()) on text-only corpora of --driver-sizes records (default 10k, 40k, 160k), and the
       least-squares slope in bytes per record.

CPU seconds are the machine's total busy time (/proc/stat) during a run divided by samples: the
Ray workers are not children of the driver, so this is the honest count (and includes noise from
anything else running; the rounds show it). Targets (issue 17): lladav >= 1.5x Ray Data on small
images, >= 1.0x on photos; >= 1.8x from 1 -> 2 workers; driver <= 200 bytes per record. Exit 1
when a target is missed, so the figures are a check as well as a report.

Corpora and tokenizer are generated under bench/out/data_build/ and kept between runs.

    .venv/bin/python bench/data_build.py [--small 20000] [--photos 5000] [--rounds 2]
                                         [--driver-sizes 10000,40000,160000] [--skip-driver]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "data_build"
GEOMETRY = {"tile_size": 32, "patch_size": 8, "max_grid": 2}
WORDS = ("red green blue square circle triangle small large left right top bottom the a of "
         "shape colour picture shows there is one two three").split()


# ---- corpora ----------------------------------------------------------------------------------

def _jpeg(rng: random.Random, size: tuple[int, int]) -> bytes:
    """A JPEG with some structure (blocks of colour plus noise), so it compresses like a photo."""
    import numpy as np
    from PIL import Image

    w, h = size
    gen = np.random.default_rng(rng.getrandbits(32))
    base = gen.integers(0, 256, size=(max(1, h // 16), max(1, w // 16), 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.int16) + gen.integers(-12, 13, size=(h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_corpus(name: str, n: int, size: tuple[int, int] | None) -> Path:
    """<OUT>/<name>/{data.json, images/}; text-only when size is None. Kept between runs."""
    folder = OUT / f"{name}-{n}"
    if (folder / "data.json").exists():
        return folder
    tmp = Path(tempfile.mkdtemp(dir=OUT, prefix=f".{name}-"))
    rng = random.Random(f"{name}-{n}")
    records = []
    if size:
        (tmp / "images").mkdir()
    for i in range(n):
        rec = {"id": f"{name}-{i}",
               "conversations": [{"from": "human", "value": ("<image>\n" if size else "")
                                  + _sentence(rng, rng.randint(4, 12)) + "?"},
                                 {"from": "gpt", "value": _sentence(rng, rng.randint(2, 20))}]}
        if size:
            rec["image"] = f"images/{i:07d}.jpg"
            (tmp / rec["image"]).write_bytes(_jpeg(rng, size))
        records.append(rec)
    (tmp / "data.json").write_text(json.dumps(records))
    os.replace(tmp, folder)
    return folder


def make_tokenizer() -> Path:
    from lladav.data.tokenizer import template_texts, train_tokenizer

    out = OUT / "tokenizer"
    if not (out / "tokenizer.json").exists():
        rng = random.Random(0)
        train_tokenizer(template_texts() + [_sentence(rng, 20) for _ in range(2000)], out,
                        vocab_size=512)
    return out


def recipe_for(corpus: Path, tokenizer: Path) -> dict:
    return {"name": corpus.name, "tokenizer": str(tokenizer), "max_length": 1024,
            "samples_per_shard": 1000, "seed": 0, "vision": GEOMETRY,
            "sources": [{"name": "s", "kind": "llava_json", "location": str(corpus / "data.json")}]}


# ---- the three contenders (each runs in a subprocess: `python bench/data_build.py --run X`) ---

def run_lladav(corpus: Path, tokenizer: Path, out: Path, workers: int) -> int:
    import ray

    from lladav.config import Recipe
    from lladav.data.build import build

    ray.init(num_cpus=2, logging_level=logging.WARNING, log_to_driver=False,
             include_dashboard=False)
    mixture = build(Recipe.model_validate(recipe_for(corpus, tokenizer)), str(out),
                    num_workers=workers)
    return int(mixture.info["counts"]["samples"])


def _process(record: dict, root: Path, tok, limits, geometry) -> dict | None:
    """What every contender must do per record: read, check the image, template, tokenize."""
    from lladav.data.conversation import normalize_turns, tokenize
    from lladav.data.images import image_token_count, inspect_image

    data = (root / record["image"]).read_bytes() if record.get("image") else None
    info = inspect_image(data, limits) if data is not None else None
    turns = normalize_turns(record["conversations"], 1 if data is not None else 0)
    tokens = tokenize(turns, tok, "llava_llada")
    n_img = image_token_count(info.width, info.height, geometry, "anyres_max_4") if info else 0
    if tokens.n_text_tokens + n_img > 1024:
        return None
    sample = {"__key__": record["id"], "ids.npy": tokens.ids.astype("int32"),
              "targets.npy": tokens.targets.astype("uint8")}
    if data is not None:
        sample[f"img0.{info.ext}"] = data
    return sample


def _npy(array) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def run_raydata(corpus: Path, tokenizer: Path, out: Path, workers: int) -> int:
    import numpy as np
    import ray
    import ray.data

    ray.init(num_cpus=2, logging_level=logging.WARNING, log_to_driver=False,
             include_dashboard=False)
    records = json.loads((corpus / "data.json").read_text())

    class Work:
        def __init__(self) -> None:
            from lladav.config import ImageLimits, VisionGeometry
            from lladav.data.tokenizer import load_tokenizer

            self.tok = load_tokenizer(str(tokenizer))
            self.limits, self.geometry = ImageLimits(), VisionGeometry(**GEOMETRY)

        def __call__(self, batch: dict) -> dict:
            out: dict[str, list] = {"__key__": [], "ids.npy": [], "targets.npy": [], "img0.jpg": []}
            for rec in batch["record"]:
                s = _process(json.loads(rec), corpus, self.tok, self.limits, self.geometry)
                if s is not None:
                    out["__key__"].append(s["__key__"])
                    out["ids.npy"].append(_npy(s["ids.npy"]))
                    out["targets.npy"].append(_npy(s["targets.npy"]))
                    out["img0.jpg"].append(s.get("img0.jpg", b""))
            return {k: np.array(v, dtype=object) for k, v in out.items()}

    ds = ray.data.from_items([{"record": json.dumps(r)} for r in records],
                             override_num_blocks=max(workers * 4, len(records) // 1000))
    ds = ds.map_batches(Work, batch_size=256, concurrency=workers, num_cpus=1)
    ds.write_webdataset(str(out), encoder=lambda sample: sample)  # values are already bytes
    # Every generated record is valid (main() checks all contenders report the same count).
    return len(records)


def run_loop(corpus: Path, tokenizer: Path, out: Path, workers: int) -> int:
    import webdataset as wds

    from lladav.config import ImageLimits, VisionGeometry
    from lladav.data.tokenizer import load_tokenizer

    tok, limits, geometry = load_tokenizer(str(tokenizer)), ImageLimits(), VisionGeometry(**GEOMETRY)
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    with wds.TarWriter(str(out / "all.tar")) as writer:
        for rec in json.loads((corpus / "data.json").read_text()):
            s = _process(rec, corpus, tok, limits, geometry)
            if s is not None:
                writer.write({k: _npy(v) if k.endswith(".npy") else v for k, v in s.items()})
                n += 1
    return n


RUNNERS = {"lladav": run_lladav, "raydata": run_raydata, "loop": run_loop}


# ---- measuring --------------------------------------------------------------------------------

def _busy_cpu_seconds() -> float:
    """Machine-wide busy CPU time (user + nice + system + irq + softirq) in seconds."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def measure(kind: str, corpus: Path, tokenizer: Path, workers: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"bench-{kind}-", dir=OUT))
    shutil.rmtree(out)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    cpu0, t0 = _busy_cpu_seconds(), time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--run", kind, str(corpus), str(tokenizer),
                           str(out), str(workers)], env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, _busy_cpu_seconds() - cpu0
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        sys.exit(f"{kind} on {corpus.name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    n = result["samples"]
    return {"kind": kind, "workers": workers, "samples": n, "wall": wall, "rate": n / wall,
            "cpu_per_sample": cpu / n, "max_rss": result["max_rss"]}


def driver_memory(sizes: list[int], tokenizer: Path) -> tuple[list[tuple[int, float]], float]:
    """(records, driver peak RSS bytes) per size, and the fitted bytes per record."""
    points = []
    for n in sizes:
        corpus = make_corpus("text", n, None)
        r = measure("lladav", corpus, tokenizer, 2)
        points.append((n, float(r["max_rss"])))
        print(f"  driver  {n:>8} text records: peak RSS {r['max_rss'] / 2**20:7.1f} MiB "
              f"({r['rate']:.0f} samples/s)", flush=True)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return points, slope


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}..{max(values):.2f})"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--run":
        import resource

        kind, corpus, tokenizer, out, workers = sys.argv[2:7]
        n = RUNNERS[kind](Path(corpus), Path(tokenizer), Path(out), int(workers))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        print(json.dumps({"samples": n, "max_rss": rss}))
        return 0

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=20_000)
    ap.add_argument("--photos", type=int, default=5_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--driver-sizes", default="10000,40000,160000")
    ap.add_argument("--skip-driver", action="store_true")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    tokenizer = make_tokenizer()
    corpora = {"small": make_corpus("small", args.small, (64, 48)),
               "photo": make_corpus("photo", args.photos, (640, 480))}
    failures = []
    for label, corpus in corpora.items():
        rates: dict[str, list[float]] = {k: [] for k in ("lladav", "raydata", "loop", "lladav1")}
        cpu: dict[str, list[float]] = {k: [] for k in rates}
        order = ["lladav", "raydata", "loop", "lladav1"]
        counts: dict[int, list[str]] = {}
        for r in range(args.rounds):
            for kind in (order if r % 2 == 0 else order[::-1]):
                res = measure("lladav" if kind == "lladav1" else kind, corpus, tokenizer,
                              1 if kind == "lladav1" else 2)
                counts.setdefault(res["samples"], []).append(kind)
                rates[kind].append(res["rate"])
                cpu[kind].append(res["cpu_per_sample"] * 1000)
                print(f"  {label:<6} round {r} {kind:<8} {res['rate']:8.1f} samples/s  "
                      f"{res['cpu_per_sample'] * 1000:6.2f} CPU ms/sample", flush=True)
        if len(counts) != 1:
            sys.exit(f"{label}: the contenders wrote different sample counts: {counts}")
        per_round = lambda a, b: [x / y for x, y in zip(rates[a], rates[b])]  # noqa: E731
        vs_ray, vs_loop = per_round("lladav", "raydata"), per_round("lladav", "loop")
        scaling = per_round("lladav", "lladav1")
        print(f"{label}: samples/s lladav {_spread(rates['lladav'])}, raydata "
              f"{_spread(rates['raydata'])}, loop {_spread(rates['loop'])}, lladav 1 worker "
              f"{_spread(rates['lladav1'])}")
        print(f"{label}: CPU ms/sample lladav {_spread(cpu['lladav'])}, raydata "
              f"{_spread(cpu['raydata'])}, loop {_spread(cpu['loop'])}")
        print(f"{label}: lladav/raydata {_spread(vs_ray)}, lladav/loop {_spread(vs_loop)}, "
              f"2 vs 1 worker {_spread(scaling)}")
        need = 1.5 if label == "small" else 1.0
        if statistics.median(vs_ray) < need:
            failures.append(f"{label}: lladav/raydata {statistics.median(vs_ray):.2f} < {need}")
        if statistics.median(scaling) < 1.8:
            failures.append(f"{label}: 1 -> 2 workers {statistics.median(scaling):.2f} < 1.8")
    if not args.skip_driver:
        sizes = [int(s) for s in args.driver_sizes.split(",")]
        _, slope = driver_memory(sizes, tokenizer)
        print(f"driver: {slope:.0f} bytes per record (least squares over {sizes})")
        if slope > 200:
            failures.append(f"driver {slope:.0f} bytes per record > 200")
    for f in failures:
        print(f"MISSED  {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
