"""Peak memory of exporting a ZeRO-3 checkpoint: lladav's streamed export vs DeepSpeed's readers.

    1. torchrun, 2 ranks, fp32: a LLaDA-V-shaped model (LM hidden 1024, 8 layers, vocab 32000,
       the tiny tower; 150.5M parameters, 574 MiB fp32) built under zero.Init, one optimizer
       step, `engine.save_checkpoint` (1.7 GiB of rank files, Adam moments included).
    2. in a fresh process each, in interleaved rounds (A B C, C B A, ...): peak RSS (getrusage
       ru_maxrss), peak anonymous RSS (RssAnon sampled every 5 ms) and wall time of
       (a) stream:         lladav.train.export.export_consolidated(ckpt, out, config)
       (b) deepspeed:      get_fp32_state_dict_from_zero_checkpoint(ckpt) + safetensors save_file
       (c) deepspeed-lazy: convert_zero_checkpoint_to_state_dict(ckpt, out, max_shard_size=...,
                           safe_serialization=True), DeepSpeed's shard-at-a-time converter
       (a) and (c) with the same max shard size, --shard-mib (default ours, 5 GiB).
    3. the outputs compared tensor by tensor, with their file lists.

Every measuring process imports the same modules first, so their baselines match; the table
shows medians over rounds of the peak, the peak above that baseline, its anonymous part (what
the kernel cannot reclaim; the rest is mmap'ed checkpoint pages, counted in RSS and in a
container's memory limit until reclaimed) and the ratios to stream. Target (issue 16): keep
stream only if its peak above baseline is clearly (>= 1.5x) below deepspeed-lazy's.

Measured 2026-12-08 on 2 CPU cores, no GPU, beside a CI run (times noisy, memory steady);
medians of 3 rounds, two runs at the default 5 GiB shards (the whole model is one shard) and
one at --shard-mib 128 (6 shards, a production-like shard/model ratio):

    shards   method           peak RSS   above baseline   anonymous   seconds (run 1, run 2)
    5 GiB    stream            592 MiB           69 MiB       0 MiB   0.5, 0.4
             deepspeed        1675 MiB         1152 MiB     574 MiB   2.0, 1.8
             deepspeed-lazy   1675 MiB   1153, 1152 MiB     575 MiB   1.9, 2.0
    128 MiB  stream            592 MiB           69 MiB       0 MiB   0.5
             deepspeed        1675 MiB         1152 MiB     574 MiB   1.5
             deepspeed-lazy   1358 MiB          835 MiB     257 MiB   3.5

So deepspeed-lazy is 16.8x stream's peak above baseline at equal shards and 12.1x at 128 MiB
shards, and 4-7x its time: it makes a whole shard in memory (with 5 GiB shards here the whole
model, exactly the eager reader's peak) and leaves every mmap'ed page it read in RSS. All 115
tensors are bit-identical with the same names in all three; stream also writes config.json and
always an index, DeepSpeed names a lone shard model.safetensors with no index. Kept: stream.

    .venv/bin/python bench/consolidate.py [--layers 8] [--rounds 3] [--shard-mib 5120] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "consolidate"


def model_config(layers: int):
    from lladav.model.flavors import lladav_config

    return lladav_config("tiny", vocab_size=32000, hidden_size=1024, intermediate_size=2048,
                         num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
                         mask_token_id=2, eos_token_id=1)


def train(out: Path, layers: int) -> None:
    """One rank: build under ZeRO-3, one step, save the checkpoint and the config beside it."""
    import torch

    from lladav.model.lladav import LLaDAVModel
    from lladav.train import engine as eng

    rank, world = eng.init_distributed()
    config = model_config(layers)
    ds_config = eng.render_ds_config(
        "infra/deepspeed/zero3.json", micro_batch=1, grad_accum=1, world_size=world,
        gradient_clipping=1.0, precision="fp32", hidden_size=config.text_config.hidden_size)
    model = eng.build_model(lambda: LLaDAVModel(config), ds_config)
    groups = []
    for component, named in model.component_parameters().items():
        trained = component != "vision_tower"
        for _, p in named:
            p.requires_grad_(trained)
        if trained:
            groups.append({"name": component, "params": [p for _, p in named], "lr": 1e-4})
    engine = eng.initialize(model, groups, ds_config, total_steps=10, warmup_ratio=0.0)
    ids = torch.randint(3, 32000, (1, 16), generator=torch.Generator().manual_seed(rank))
    embeds, _ = engine.module.embed_multimodal(list(ids), [[]], [[]])
    logits = engine.module(inputs_embeds=embeds).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
    engine.backward(loss)
    engine.step()
    eng.save_checkpoint(engine, str(out / "ckpt"), {"step": 1})
    if rank == 0:
        config.save_pretrained(out / "ckpt")
        n = sum(int(p.ds_numel) for p in engine.module.parameters())
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({"parameters": n, "loss": float(loss), "rank0_peak": peak}), flush=True)


def status_bytes(field: str) -> int:
    """A memory line of /proc/self/status (VmRSS, RssAnon, ...) in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(f"{field}:"))


class AnonPeak(threading.Thread):
    """Samples RssAnon every 5 ms: the part of RSS the kernel cannot drop (not mmap'ed file pages
    that are clean page cache), so a fairer count for a reader that leaves its mapped pages in."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.stopped = status_bytes("RssAnon"), threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.005):
            self.peak = max(self.peak, status_bytes("RssAnon"))

    def stop(self) -> int:
        self.stopped.set()
        self.join()
        return max(self.peak, status_bytes("RssAnon"))


def measure(method: str, ckpt: Path, dest: Path, shard_bytes: int) -> None:
    """One export in this fresh process; prints its peak RSS, anonymous peak and time as JSON."""
    import deepspeed  # noqa: F401  (every method unpickles DeepSpeed objects)
    import huggingface_hub  # noqa: F401  (the lazy converter's sharding helper)
    import safetensors.torch
    import torch  # noqa: F401
    from deepspeed.utils.zero_to_fp32 import (convert_zero_checkpoint_to_state_dict,
                                              get_fp32_state_dict_from_zero_checkpoint)

    from lladav.model.lladav import LLaDAVConfig
    from lladav.train.export import export_consolidated

    config = LLaDAVConfig.from_pretrained(ckpt)
    baseline, anon_baseline = status_bytes("VmRSS"), status_bytes("RssAnon")
    anon = AnonPeak()
    anon.start()
    start = time.perf_counter()
    if method == "stream":
        export_consolidated(str(ckpt), str(dest), config, max_shard_bytes=shard_bytes)
    elif method == "deepspeed":
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
        dest.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file(state, str(dest / "model.safetensors"),
                                    metadata={"format": "pt"})
    else:  # one shard of GatheredTensors made whole at a time, optimizer files mmap'ed
        convert_zero_checkpoint_to_state_dict(str(ckpt), str(dest), max_shard_size=shard_bytes,
                                              safe_serialization=True)
    seconds = time.perf_counter() - start
    anon_above = anon.stop() - anon_baseline
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"method": method, "peak": peak, "baseline": baseline, "seconds": seconds,
                      "anon_above": anon_above}), flush=True)


def tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> its safetensors file, for a sharded (index) or single-file folder."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return {n: folder / f for n, f in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {n: folder / "model.safetensors" for n in f.keys()}


def compare(ours: Path, theirs: Path) -> str:
    """Names only in one folder, how many common tensors are bit-identical, and the files."""
    from safetensors import safe_open

    a, b = tensor_files(ours), tensor_files(theirs)
    common = a.keys() & b.keys()
    same = 0
    for name in common:
        with safe_open(str(a[name]), "pt") as fa, safe_open(str(b[name]), "pt") as fb:
            same += fa.get_tensor(name).equal(fb.get_tensor(name))
    files = lambda folder: sorted(p.name for p in folder.iterdir())  # noqa: E731
    return (f"{same}/{len(common)} common tensors identical, only in stream "
            f"{sorted(a.keys() - b.keys())[:5]}, only in {theirs.name} "
            f"{sorted(b.keys() - a.keys())[:5]}; files {files(ours)} vs {files(theirs)}")


def last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


METHODS = ("stream", "deepspeed", "deepspeed-lazy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds of the three exports; the table shows medians")
    parser.add_argument("--shard-mib", type=int, default=5 * 2**10,
                        help="max shard size of stream and deepspeed-lazy (default: ours, 5 GiB)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and exports")
    parser.add_argument("--train", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--measure", nargs=3, metavar=("METHOD", "CKPT", "DEST"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train:
        return train(args.train, args.layers)
    if args.measure:
        return measure(args.measure[0], Path(args.measure[1]), Path(args.measure[2]),
                       args.shard_mib * 2**20)

    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    def run(cmd: list[str]) -> str:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{' '.join(cmd)} exited {proc.returncode}:\n"
                     f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        return proc.stdout

    t0 = time.perf_counter()
    trained = last_json(run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", __file__, "--train", str(OUT),
                             "--layers", str(args.layers)]))
    ckpt = OUT / "ckpt"
    shards = sum(f.stat().st_size for f in (ckpt / "ckpt").iterdir())
    print(f"trained and saved in {time.perf_counter() - t0:.0f} s: "
          f"{trained['parameters'] / 1e6:.1f}M "
          f"parameters ({trained['parameters'] * 4 / 2**20:.0f} MiB fp32), checkpoint shards "
          f"{shards / 2**20:.0f} MiB, training rank 0 peak RSS "
          f"{trained['rank0_peak'] / 2**30:.1f} GiB; max shard {args.shard_mib} MiB", flush=True)
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    for r in range(args.rounds):  # A B C, C B A, ...: drift under load hits every method alike
        for m in (METHODS if r % 2 == 0 else METHODS[::-1]):
            shutil.rmtree(OUT / m, ignore_errors=True)
            runs[m].append(last_json(run([sys.executable, __file__, "--measure", m, str(ckpt),
                                          str(OUT / m), "--shard-mib", str(args.shard_mib)])))
            row = runs[m][-1]
            print(f"  round {r + 1} {m:<15} peak {row['peak'] / 2**20:.0f} MiB, above baseline "
                  f"{(row['peak'] - row['baseline']) / 2**20:.0f} MiB (anonymous "
                  f"{row['anon_above'] / 2**20:.0f} MiB), {row['seconds']:.1f} s", flush=True)

    def median(m: str, key) -> float:
        return statistics.median(key(r) for r in runs[m])

    peak = {m: median(m, lambda r: r["peak"]) for m in METHODS}
    above = {m: median(m, lambda r: r["peak"] - r["baseline"]) for m in METHODS}
    anon = {m: median(m, lambda r: r["anon_above"]) for m in METHODS}
    seconds = {m: median(m, lambda r: r["seconds"]) for m in METHODS}
    mib = 2**20
    print(f"medians of {args.rounds} rounds; anon = RssAnon above baseline, sampled every 5 ms")
    print(f"{'method':<16}{'peak RSS':>12}{'above baseline':>16}{'anon':>10}{'seconds':>9}"
          f"{'above / stream':>16}{'time / stream':>15}")
    for m in METHODS:
        print(f"{m:<16}{peak[m] / mib:>8.0f} MiB{above[m] / mib:>12.0f} MiB"
              f"{anon[m] / mib:>6.0f} MiB{seconds[m]:>9.1f}"
              f"{above[m] / max(1, above['stream']):>15.2f}x"
              f"{seconds[m] / seconds['stream']:>14.2f}x")
    for m in METHODS[1:]:
        print(f"stream vs {m}: {compare(OUT / 'stream', OUT / m)}")
    if not args.keep:
        shutil.rmtree(OUT, ignore_errors=True)


if __name__ == "__main__":
    main()
