"""Per-step overhead of `lladav train`, loader speed at the 8B geometry, padding with grouping.

Three figures in one run (issue 4's last acceptance point):

    1. overhead  median optimizer-step time of the real stage path vs a bare DeepSpeed loop, on the
                 tiny flavour, micro-batch 4, fp32, world size 1, one thread each:
         bare    a subprocess that prepares exactly as train/loop.py does (initial_weights,
                 render_ds_config, build_model under zero.Init, apply_stage, engine.initialize),
                 reads its first N micro-batches from MixtureLoader into memory before the clock
                 starts, then per batch: diffusion_step, engine.backward, engine.step
         lladav  train/launch.run_stage: Ray Train TorchTrainer, 1 worker with 1 CPU, loader
                 workers 0, checkpoint.every_steps past the run; a step is the gap between two
                 consecutive on_step hook calls, so it holds the loader, the step, _Window and
                 ray.train.report, and none of the start-up, checkpoint or export
       Both see the same batches in the same order with the same masking draws (their losses are
       compared as a check). The first --warmup steps are dropped; rounds alternate the two (ABBA)
       and the medians are over all rounds' steps. Target: lladav / bare - 1 <= 10%.
    2. loader    MixtureLoader samples/s on one core (num_workers=0, one thread): read, decode,
                 anyres tiles, collate, over realistic image sizes (640x480 and mixed aspect
                 ratios, JPEG) built with the 8B geometry (384 px tiles, patch 14, grids up to 6x6,
                 anyres_max_4). Also with 2 worker processes, for information. Target: >= 20/s.
    3. padding   MixtureLoader.padding_fraction of a stage-2-like mixture (log-normal answer
                 lengths; most samples one anyres image, some two images, some text only), micro-
                 batch 8, without and with group_by_length (window 32 batches), epochs 0-3.
                 Target: <= 5% with grouping.

Reading the overhead: if a lladav step sits near 2 s whatever the model, look at Ray Train V2's
report path. ray.train.report puts each result on a queue of size 1 that the controller drains once
per poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, default 2 s), so a loop reporting every step waits for
the poll: that was +2100% here (py-spy: ~90% of the training thread in Queue.put) until
train/loop.py reported only at checkpoints (c5f18d8). Rounds are cheap since then; 4 by default,
as single rounds on this shared 2-core machine vary by +-20%.

The mixtures are built by lladav's own `build` from a Recipe over generated LLaVA JSON corpora,
under bench/out/train_step/ (kept between runs: an identical rebuild is a no-op). Exit code 0 only
if every target is met.

    .venv/bin/python bench/train_step.py [--steps 40] [--warmup 8] [--rounds 4] [--samples 2048]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: the Ray worker inherits it too

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "train_step"
THREADS = 1
MICRO_BATCH = 4
OVERHEAD_TARGET, LOADER_TARGET, PADDING_TARGET = 0.10, 20.0, 0.05

# Image sizes (W, H) of the anyres corpus and their weights: COCO/LLaVA-like photos, mostly
# 640x480-class, some portrait, some larger; 3 to 9 tiles of 384 px each (base view included).
SIZES = [((640, 480), 6), ((480, 640), 2), ((640, 427), 3), ((500, 375), 2), ((800, 600), 2),
         ((1024, 768), 2), ((1280, 720), 1), ((720, 1280), 1), ((512, 512), 1)]
WORDS = ("the shape is a red green blue circle square triangle on left right centre of image "
         "it has three four no corners so").split()


# ---- corpora and mixtures ---------------------------------------------------------------------

def photo(size: tuple[int, int], rng: random.Random) -> bytes:
    """A JPEG with photo-like statistics: smooth colour fields plus sensor-like noise (a flat
    synthetic image would decode unrealistically fast)."""
    import io

    import numpy as np
    from PIL import Image

    w, h = size
    gen = np.random.default_rng(rng.randrange(2**32))
    coarse = Image.fromarray(gen.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
        (w, h), Image.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.float32) + gen.normal(0, 6, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def stage2_corpus(folder: Path, n: int, seed: int = 0) -> Path:
    """A LLaVA JSON list of n stage-2-like records over a pool of 48 photos of SIZES.

    Answers have log-normal lengths (median ~90 words, long tail, capped at 1500); 82% of the
    records have one image, 8% two, 10% none. Images repeat across records (different texts,
    so dedup keeps them); every sample is still decoded and tiled on its own by the loader.
    """
    corpus = folder / "corpus.json"
    if corpus.exists():
        return corpus
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    sizes = [s for s, weight in SIZES for _ in range(weight)]
    pool = []
    for i in range(48):
        name = f"images/photo-{i:03d}.jpg"
        (folder / name).write_bytes(photo(sizes[i % len(sizes)], rng))
        pool.append(name)
    records = []
    for i in range(n):
        draw = rng.random()
        images = [] if draw < 0.10 else rng.sample(pool, 2 if draw < 0.18 else 1)
        words = min(1500, max(1, int(rng.lognormvariate(4.5, 0.9))))
        answer = " ".join(rng.choice(WORDS) for _ in range(words)) + "."
        question = "<image>\n" * len(images) + f"Question {i}: describe what you see."
        record = {"id": f"s2-{i:05d}", "conversations": [{"from": "human", "value": question},
                                                         {"from": "gpt", "value": answer}]}
        if images:
            record["image"] = images if len(images) > 1 else images[0]
        records.append(record)
    corpus.write_text(json.dumps(records))
    return corpus


def build_mixture(name: str, tokenizer: Path, corpus: Path, out: Path, vision: dict,
                  samples_per_shard: int, max_length: int) -> str:
    from lladav.config import parse_recipe
    from lladav.data.build import build

    recipe = parse_recipe({"name": name, "template": "llava_llada", "tokenizer": str(tokenizer),
                           "max_length": max_length, "samples_per_shard": samples_per_shard,
                           "seed": 0, "vision": vision,
                           "sources": [{"name": "corpus", "kind": "llava_json",
                                        "location": str(corpus)}]})
    return build(recipe, str(out), overwrite=True).uri


def prepare_mixtures(samples: int) -> tuple[str, str]:
    """(tiny mixture of the shapes QA corpus, tiny geometry; stage-2-like mixture, 8B geometry)."""
    from lladav.demo.shapes import synth_all

    shapes = OUT / "shapes"
    if not (shapes / "tokenizer" / "tokenizer.json").exists():
        synth_all(shapes)
    tokenizer = shapes / "tokenizer"
    tiny = build_mixture("bench-step-tiny", tokenizer, shapes / "corpus" / "qa.json",
                         OUT / "mixture-tiny", {"tile_size": 32, "patch_size": 8, "max_grid": 2},
                         samples_per_shard=256, max_length=512)
    corpus = stage2_corpus(OUT / f"stage2-{samples}", samples)
    anyres = build_mixture("bench-step-anyres", tokenizer, corpus,
                           OUT / f"mixture-anyres-{samples}", {}, samples_per_shard=256,
                           max_length=8192)
    return tiny, anyres


# ---- 1. step overhead -------------------------------------------------------------------------

def stage_config(mixture: str, steps: int, run: str):
    from lladav.config import parse_stage

    return parse_stage({
        "name": "bench-step", "init": {"flavor": "tiny"}, "mixture": mixture,
        "trainable": {"vision_tower": 1e-4, "projector": 1e-3, "language_model": 1e-4},
        "micro_batch": MICRO_BATCH, "grad_accum": 1, "max_steps": steps, "warmup_ratio": 0.1,
        "precision": "fp32", "seed": 0, "loader_workers": 0,
        "scaling": {"workers": 1, "cpus_per_worker": THREADS},
        "checkpoint": {"every_steps": 10 * steps, "keep": 1, "uri": str(OUT / "ckpt")},
        "output": str(OUT / "export" / run)})


@dataclass
class StepClock:
    """on_step hook: appends the wall clock of every optimizer step to `path` (JSON lines).
    Defined here, in __main__, so Ray pickles it by value into the worker."""

    path: str

    def __call__(self, step: int, rank: int, metrics: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"t": time.perf_counter(), "step": step, "loss": metrics["loss"],
                                "samples_per_s": metrics["samples_per_s"],
                                "threads": torch.get_num_threads()}) + "\n")


def bare_loop(stage_json: str, result_path: str) -> None:
    """The baseline, in its own process: the loop's preparation, then only the DeepSpeed step."""
    from lladav.config import StageConfig
    from lladav.data.loader import MixtureLoader
    from lladav.train import engine as eng
    from lladav.train.loop import prepare_model
    from lladav.train.step import diffusion_step

    torch.set_num_threads(THREADS)
    stage = StageConfig.model_validate_json(Path(stage_json).read_text())
    model, groups, _, ds_config = prepare_model(stage, world_size=1)
    loader = MixtureLoader(stage.mixture, batch_size=stage.micro_batch, rank=0, world_size=1,
                           num_workers=0, seed=stage.seed, group_by_length=stage.group_by_length,
                           end_of_answer=stage.end_of_answer)
    batches = list(islice((b for _ in range(stage.max_steps) for b in loader), stage.max_steps))
    engine = eng.initialize(model, groups, ds_config, total_steps=stage.max_steps,
                            warmup_ratio=stage.warmup_ratio, betas=stage.betas,
                            eps=stage.adam_eps, weight_decay=stage.weight_decay)
    clock, steps = [time.perf_counter()], []
    for step, batch in enumerate(batches, 1):
        eng.start_micro_batch(engine)
        loss, metrics = diffusion_step(engine.module, batch, stage.seed, loader.aspect,
                                       stage.objective)
        engine.backward(loss)
        engine.step()
        clock.append(time.perf_counter())
        steps.append({"t": clock[-1], "step": step, "loss": metrics["loss"],
                      "threads": torch.get_num_threads()})
    Path(result_path).write_text(json.dumps(steps))


def run_bare(stage, tag: str) -> list[dict]:
    stage_json, result = OUT / f"{tag}-stage.json", OUT / f"{tag}-steps.json"
    stage_json.write_text(stage.model_dump_json())
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, __file__, "--bare", str(stage_json), str(result)],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"bare loop exited {proc.returncode}:\n{proc.stdout[-2000:]}\n"
                 f"{proc.stderr[-4000:]}")
    return json.loads(result.read_text())


def run_lladav(stage, tag: str) -> list[dict]:
    from lladav.train.launch import run_stage

    log = OUT / f"{tag}-steps.jsonl"
    log.unlink(missing_ok=True)
    run_stage(stage, run_name=f"{tag}-{uuid.uuid4().hex[:8]}", on_step=StepClock(str(log)))
    return [json.loads(line) for line in log.read_text().splitlines()]


def step_times(records: list[dict], warmup: int) -> list[float]:
    """Seconds per step from consecutive timestamps, steps after the warm-up only."""
    records = sorted(records, key=lambda r: r["step"])
    return [b["t"] - a["t"] for a, b in zip(records, records[1:]) if b["step"] > warmup]


def overhead(mixture: str, steps: int, warmup: int, rounds: int) -> tuple[float, str]:
    total = warmup + steps
    times: dict[str, list[float]] = {"bare": [], "lladav": []}
    per_round, losses, threads = [], {}, {}
    for r in range(rounds):
        order = ("bare", "lladav") if r % 2 == 0 else ("lladav", "bare")
        row = {}
        for kind in order:
            tag = f"round{r}-{kind}"
            stage = stage_config(mixture, total, tag)
            t0 = time.perf_counter()
            records = run_bare(stage, tag) if kind == "bare" else run_lladav(stage, tag)
            if len(records) != total:
                sys.exit(f"{tag}: {len(records)} steps recorded, expected {total}")
            row[kind] = statistics.median(step_times(records, warmup))
            times[kind] += step_times(records, warmup)
            losses[kind] = [rec["loss"] for rec in sorted(records, key=lambda rec: rec["step"])]
            threads[kind] = sorted({rec["threads"] for rec in records})
            if kind == "lladav":  # the loop's own figure for the same steps, as a cross-check
                row["window"] = statistics.median(MICRO_BATCH / rec["samples_per_s"]
                                                  for rec in records if rec["step"] > warmup)
            window = f"  (_Window says {row['window'] * 1e3:.1f} ms)" if kind == "lladav" else ""
            print(f"  round {r} {kind:<6} median step {row[kind] * 1e3:7.1f} ms{window}"
                  f"  [{time.perf_counter() - t0:.0f} s wall]", flush=True)
        per_round.append(row["lladav"] / row["bare"] - 1)
    bare, lladav = statistics.median(times["bare"]), statistics.median(times["lladav"])
    ratio = lladav / bare - 1
    drift = max(abs(a - b) for a, b in zip(losses["bare"], losses["lladav"]))
    print(f"compared: tiny LLaDA-V, ZeRO-3 (infra/deepspeed/zero3.json rendered), fp32, "
          f"micro-batch {MICRO_BATCH}, world size 1, torch threads bare {threads['bare']} / lladav "
          f"{threads['lladav']}; {steps} steps after {warmup} warm-up x {rounds} rounds")
    print(f"losses, bare vs lladav, same batches and masks: max |diff| {drift:.2e}")
    print(f"bare DeepSpeed loop  median step {bare * 1e3:7.1f} ms")
    print(f"lladav train (Ray)   median step {lladav * 1e3:7.1f} ms")
    print(f"overhead {ratio:+.1%} (per round: {', '.join(f'{x:+.1%}' for x in per_round)}; "
          f"target <= {OVERHEAD_TARGET:.0%})")
    return ratio, f"{ratio:+.1%} per-step overhead"


# ---- 2. loader throughput ---------------------------------------------------------------------

def loader_rate(mixture: str, num_workers: int, batches: int, rounds: int) -> list[float]:
    """Samples/s over `batches` batches, `rounds` times in a row (each round continues the order);
    the first batch of a round (shard verification, worker start) is not counted."""
    from lladav.data.loader import MixtureLoader

    loader = MixtureLoader(mixture, batch_size=MICRO_BATCH, rank=0, world_size=1,
                           num_workers=num_workers, seed=1)
    rates = []
    for _ in range(rounds):
        stream = iter(loader)
        next(stream)
        t0, n = time.perf_counter(), 0
        for batch in islice(stream, batches):
            n += len(batch.keys)
        rates.append(n / (time.perf_counter() - t0))
        stream.close()
    return rates


def loader_speed(mixture: str) -> tuple[float, str]:
    from lladav.data.manifest import open_mixture

    torch.set_num_threads(THREADS)
    one = loader_rate(mixture, 0, batches=25, rounds=3)
    two = loader_rate(mixture, 2, batches=25, rounds=2)
    n = len(open_mixture(mixture).manifest())
    sizes = ", ".join(f"{w}x{h}" for (w, h), _ in SIZES)
    print(f"compared: MixtureLoader over {n} samples, images {sizes} (JPEG), 8B geometry "
          f"384/14, anyres_max_4, micro-batch {MICRO_BATCH}")
    print(f"num_workers=0, 1 thread: {statistics.median(one):6.1f} samples/s per core "
          f"(rounds: {', '.join(f'{x:.1f}' for x in one)}; target >= {LOADER_TARGET:.0f})")
    print(f"num_workers=2          : {statistics.median(two):6.1f} samples/s, "
          f"{statistics.median(two) / 2:.1f} per worker core (information only)")
    rate = statistics.median(one)
    return rate, f"{rate:.1f} samples/s per core"


# ---- 3. padding -------------------------------------------------------------------------------

def padding(mixture: str) -> tuple[float, str]:
    from lladav.data.loader import MixtureLoader

    fractions = {}
    for grouped in (False, True):
        loader = MixtureLoader(mixture, batch_size=8, rank=0, world_size=1, num_workers=0, seed=0,
                               group_by_length=grouped)
        fractions[grouped] = statistics.mean(loader.padding_fraction(e) for e in range(4))
    lengths = sorted(loader.n_tokens)
    print(f"compared: {len(lengths)} samples, spliced lengths p10/p50/p90/max "
          f"{'/'.join(str(lengths[int(q * (len(lengths) - 1))]) for q in (0.1, 0.5, 0.9, 1.0))}"
          f" tokens, micro-batch 8, window 32 batches, mean of epochs 0-3")
    print(f"padding without grouping {fractions[False]:.3f}, with group_by_length "
          f"{fractions[True]:.3f} (target <= {PADDING_TARGET:.2f})")
    return fractions[True], f"{fractions[True]:.1%} padding with grouping"


# ---- 4. packing and complementary masking --------------------------------------------------------

def objective_stage(mixture: str, steps: int, **extra):
    from lladav.config import parse_stage

    data = {"name": "bench-objective", "init": {"flavor": "tiny"}, "mixture": mixture,
            "trainable": {"vision_tower": 1e-4, "projector": 1e-3, "language_model": 1e-4},
            "micro_batch": MICRO_BATCH, "grad_accum": 1, "max_steps": steps, "warmup_ratio": 0.1,
            "precision": "fp32", "seed": 0, "loader_workers": 0, "group_by_length": True,
            "output": str(OUT / "export" / "objective")}
    data.update(extra)
    return parse_stage(data)


def timed_steps(stage, steps: int, warmup: int) -> dict[str, float]:
    """In-process: prepare as train/loop.py does, then `warmup` + `steps` optimizer steps over
    the loader (read and decode included, one thread). Samples/s and tokens/s over the timed
    steps, and the loader's padding fraction over the same batches."""
    from lladav.data.loader import MixtureLoader
    from lladav.train import engine as eng
    from lladav.train.loop import prepare_model
    from lladav.train.step import diffusion_step

    model, groups, _, ds_config = prepare_model(stage, world_size=1)
    engine = eng.initialize(model, groups, ds_config, total_steps=warmup + steps,
                            warmup_ratio=0.1)
    loader = MixtureLoader(stage.mixture, batch_size=stage.micro_batch, rank=0, world_size=1,
                           num_workers=0, seed=stage.seed, group_by_length=stage.group_by_length,
                           end_of_answer=stage.end_of_answer, packing=stage.packing)
    samples = tokens = 0
    pad: list[float] = []
    t0 = None
    for i, batch in enumerate(b for _ in range(100) for b in loader):
        if i == warmup:
            t0 = time.perf_counter()
        if i == warmup + steps:
            break
        eng.start_micro_batch(engine)
        loss, metrics = diffusion_step(engine.module, batch, stage.seed, loader.aspect,
                                       stage.objective)
        engine.backward(loss)
        engine.step()
        if t0 is not None:
            samples += len(batch.keys)
            tokens += metrics["tokens"]
            pad.append(batch.padding_fraction)
    dt = time.perf_counter() - t0
    return {"samples_per_s": samples / dt, "tokens_per_s": tokens / dt,
            "step_s": dt / steps, "pad": statistics.mean(pad)}


def packing_and_complementary(mixture: str, steps: int, warmup: int, budget: int,
                              rounds: int) -> list[tuple[bool, str]]:
    from lladav.data.manifest import open_mixture

    torch.set_num_threads(THREADS)
    lengths = sorted(r["n_tokens"] for r in open_mixture(mixture).manifest().to_pylist())
    runs = {"grouped": {}, "packed": {"packing": {"token_budget": budget}, "micro_batch": 1},
            "grouped+complementary": {"objective": {"complementary": True}}}
    results: dict[str, list[dict]] = {k: [] for k in runs}
    for r in range(rounds):
        # grouped sits between the other two, so each comparison is of neighbouring runs
        for name in (("packed", "grouped", "grouped+complementary") if r % 2 == 0 else
                     ("grouped+complementary", "grouped", "packed")):
            out = timed_steps(objective_stage(mixture, warmup + steps, **runs[name]), steps, warmup)
            results[name].append(out)
            print(f"  round {r} {name:<22} {out['samples_per_s']:6.1f} samples/s "
                  f"{out['tokens_per_s']:7.0f} tokens/s  step {out['step_s'] * 1e3:6.0f} ms  "
                  f"pad {out['pad']:.3f}", flush=True)
    med = {k: {f: statistics.median(o[f] for o in v) for f in v[0]} for k, v in results.items()}
    print(f"compared: tiny LLaDA-V, fp32, one thread, in-process ZeRO-3, {len(lengths)} samples "
          f"of spliced lengths p10/p50/p90/max "
          f"{'/'.join(str(lengths[int(q * (len(lengths) - 1))]) for q in (0.1, 0.5, 0.9, 1.0))};"
          f" grouped: micro-batch {MICRO_BATCH}, group_by_length; packed: one row of "
          f"token_budget {budget} per micro-batch; {steps} steps after {warmup}, {rounds} rounds; "
          f"medians of per-round ratios")
    # paired per round (this machine's speed drifts between rounds by more than the effect)
    speeds = [p["samples_per_s"] / g["samples_per_s"]
              for p, g in zip(results["packed"], results["grouped"])]
    extras = [c["step_s"] / g["step_s"] - 1
              for c, g in zip(results["grouped+complementary"], results["grouped"])]
    speed, extra = statistics.median(speeds), statistics.median(extras)
    print(f"per round: packed/grouped samples/s {', '.join(f'{x:.2f}' for x in speeds)}; "
          f"complementary step time {', '.join(f'{x:+.1%}' for x in extras)}")
    for name, m in med.items():
        print(f"{name:<22} {m['samples_per_s']:6.1f} samples/s {m['tokens_per_s']:7.0f} "
              f"tokens/s, pad {m['pad']:.3f}")
    return [(med["packed"]["pad"] <= 0.01, f"packing: pad {med['packed']['pad']:.2%} (target "
             f"<= 1%; grouped {med['grouped']['pad']:.2%})"),
            (speed >= 1.2, f"packing: {speed:.2f}x samples/s of grouping (target >= 1.2x)"),
            (extra <= 0.15, f"complementary masking: step time {extra:+.1%} (target <= +15%)")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=8, help="steps dropped at the start")
    parser.add_argument("--rounds", type=int, default=4, help="bare/lladav pairs (ABBA order)")
    parser.add_argument("--samples", type=int, default=2048, help="stage-2-like mixture size")
    parser.add_argument("--only-objective", action="store_true",
                        help="run only section 4 (packing, complementary masking)")
    parser.add_argument("--budget", type=int, default=4096, help="packing token budget")
    parser.add_argument("--bare", nargs=2, metavar=("STAGE_JSON", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        return bare_loop(*args.bare)

    import ray

    logging.basicConfig(level=logging.WARNING)
    OUT.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(OUT / "ckpt", ignore_errors=True)
    shutil.rmtree(OUT / "export", ignore_errors=True)
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)
    try:
        tiny, anyres = prepare_mixtures(args.samples)
        print(f"mixtures ready in {time.perf_counter() - start:.0f} s", flush=True)
        stage2_tiny = build_mixture("bench-step-stage2-tiny", OUT / "shapes" / "tokenizer",
                                    stage2_corpus(OUT / f"stage2-{args.samples}", args.samples),
                                    OUT / f"mixture-stage2-tiny-{args.samples}",
                                    {"tile_size": 32, "patch_size": 8, "max_grid": 2},
                                    samples_per_shard=256, max_length=args.budget)
        if args.only_objective:
            ray.shutdown()
            print("== 4. packing and complementary masking, stage-2-like lengths", flush=True)
            verdicts = packing_and_complementary(stage2_tiny, 30, 3, args.budget, 4)
            for ok, line in verdicts:
                print(f"{'MET   ' if ok else 'MISSED'} {line}")
            sys.exit(0 if all(ok for ok, _ in verdicts) else 1)
        print("== 1. step time: lladav train vs a bare DeepSpeed loop", flush=True)
        ratio, said_overhead = overhead(tiny, args.steps, args.warmup, args.rounds)
    finally:
        ray.shutdown()
    print("== 2. loader throughput, anyres at the 8B geometry", flush=True)
    rate, said_rate = loader_speed(anyres)
    print("== 3. padding, stage-2-like lengths", flush=True)
    pad, said_pad = padding(anyres)
    print("== 4. packing and complementary masking, stage-2-like lengths", flush=True)
    objective_verdicts = packing_and_complementary(stage2_tiny, 30, 3, args.budget, 4)
    verdicts = [*objective_verdicts, (ratio <= OVERHEAD_TARGET, f"step overhead: {said_overhead} "
                 f"(target <= {OVERHEAD_TARGET:.0%})"),
                (rate >= LOADER_TARGET, f"loader: {said_rate} (target >= {LOADER_TARGET:.0f})"),
                (pad <= PADDING_TARGET, f"padding: {said_pad} (target <= {PADDING_TARGET:.0%})")]
    print(f"== verdict ({time.perf_counter() - start:.0f} s wall)")
    for ok, line in verdicts:
        print(f"{'MET   ' if ok else 'MISSED'} {line}")
    sys.exit(0 if all(ok for ok, _ in verdicts) else 1)


if __name__ == "__main__":
    main()
