"""Peak memory of exporting a ZeRO-3 checkpoint: lladav's streamed export vs DeepSpeed's own.

    1. torchrun, 2 ranks, fp32: a LLaDA-V-shaped model (LM hidden 1024, 8 layers, vocab 32000,
       the tiny tower; ~150M parameters, 600 MB fp32) built under zero.Init, one optimizer
       step, `engine.save_checkpoint` (2 x ~0.9 GB of optimizer shards).
    2. in a fresh process each, peak RSS (getrusage ru_maxrss) of
       (a) stream:    lladav.train.export.export_consolidated(ckpt, out, config)
       (b) deepspeed: get_fp32_state_dict_from_zero_checkpoint(ckpt) + safetensors save_file
    3. both outputs compared tensor by tensor.

Both measuring processes import the same modules first, so their baselines match; the table
shows the peak and the peak above that baseline. Target (issue): stream peak <= 0.5x deepspeed's.

    .venv/bin/python bench/consolidate.py [--layers 8] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
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


def rss_now() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def measure(method: str, ckpt: Path, dest: Path) -> None:
    """One export in this fresh process; prints its peak RSS as JSON."""
    import deepspeed  # noqa: F401  (both methods unpickle DeepSpeed objects)
    import safetensors.torch
    import torch  # noqa: F401
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from lladav.model.lladav import LLaDAVConfig
    from lladav.train.export import export_consolidated

    config = LLaDAVConfig.from_pretrained(ckpt)
    baseline = rss_now()
    start = time.perf_counter()
    if method == "stream":
        export_consolidated(str(ckpt), str(dest), config)
    else:
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
        dest.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file(state, str(dest / "model.safetensors"),
                                    metadata={"format": "pt"})
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"method": method, "peak": peak, "baseline": baseline, "seconds": seconds}),
          flush=True)


def same_tensors(stream_dir: Path, ds_file: Path) -> bool:
    from safetensors import safe_open

    index = json.loads((stream_dir / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(ds_file), "pt") as ds:
        if set(ds.keys()) != set(index):
            return False
        for name, shard in index.items():
            with safe_open(str(stream_dir / shard), "pt") as f:
                if not f.get_tensor(name).equal(ds.get_tensor(name)):
                    return False
    return True


def last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and exports")
    parser.add_argument("--train", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--measure", nargs=3, metavar=("METHOD", "CKPT", "DEST"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train:
        return train(args.train, args.layers)
    if args.measure:
        return measure(args.measure[0], Path(args.measure[1]), Path(args.measure[2]))

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
          f"{trained['rank0_peak'] / 2**30:.1f} GiB")
    rows = {m: last_json(run([sys.executable, __file__, "--measure", m, str(ckpt), str(OUT / m)]))
            for m in ("stream", "deepspeed")}
    mib = 2**20
    print(f"{'method':<11}{'peak RSS':>12}{'above baseline':>16}{'seconds':>9}")
    for m, r in rows.items():
        print(f"{m:<11}{r['peak'] / mib:>8.0f} MiB{(r['peak'] - r['baseline']) / mib:>12.0f} MiB"
              f"{r['seconds']:>9.1f}")
    ratio = rows["stream"]["peak"] / rows["deepspeed"]["peak"]
    above = (rows["stream"]["peak"] - rows["stream"]["baseline"]) / max(
        1, rows["deepspeed"]["peak"] - rows["deepspeed"]["baseline"])
    print(f"ratio stream/deepspeed: peak {ratio:.2f}x, above baseline {above:.2f}x "
          "(target <= 0.5x)")
    same = same_tensors(OUT / "stream", OUT / "deepspeed" / "model.safetensors")
    print(f"identical tensors: {same}")
    if not args.keep:
        shutil.rmtree(OUT, ignore_errors=True)


if __name__ == "__main__":
    main()
