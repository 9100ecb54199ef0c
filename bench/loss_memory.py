"""Peak memory of the loss step: full logits (before issue 14) vs masked rows vs chunked rows.

One sample of L positions, hidden size D, the real vocabulary V = 126,464, fp32, t = 0.5 (about
half the positions masked, every position a target), forward and backward of the head and the
loss, the head's weight gradient included:

    full      lm_head(hidden) -> (1, L, V) logits -> diffusion_loss (what train/step.py did)
    rows      lm_head(hidden[masked]) -> (N, V) -> cross-entropy (masked rows, unchunked)
    chunked   LMHead(hidden[masked], labels): model/head.py, 1,024 rows per chunk (what the
              step does now)

Each variant runs in its own process; its figure is the process's peak RSS (VmHWM) minus its RSS
once the inputs and the head's weight exist, so every variant is charged the same way (the
weight's gradient, V x D fp32, counts in each). The losses of the three are compared (1e-5).
D defaults to 1,024 to keep the CPU matmuls to ~1 min per variant; D only adds the same
weight-gradient term to every variant, and the logits, which this is about, do not depend on it.

Targets (issue 14): chunked peak <= 0.4x full at L = 8,192, and flat in L (chunked at 8,192
within 1.25x of chunked at 4,096). Exit code 0 only if both hold.

    .venv/bin/python bench/loss_memory.py [--lengths 4096,8192] [--hidden 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

VOCAB = 126_464


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def one(variant: str, length: int, hidden_size: int) -> None:
    import time

    import torch
    import torch.nn.functional as F

    from lladav.diffusion import diffusion_loss
    from lladav.model.head import LMHead

    torch.manual_seed(0)
    head = LMHead(hidden_size, VOCAB)
    hidden = torch.randn(1, length, hidden_size, requires_grad=True)
    labels = torch.randint(0, VOCAB, (1, length))
    targets = torch.ones(1, length, dtype=torch.bool)
    masked = torch.rand(1, length) < 0.5
    p = torch.tensor([0.5])
    base = _rss("VmRSS")
    t0 = time.perf_counter()
    if variant == "full":
        loss = diffusion_loss(head(hidden), labels, masked, targets, p)
    else:
        rows = hidden[masked]                                              # (N, D)
        if variant == "rows":
            ce = F.cross_entropy(head(rows).float(), labels[masked], reduction="none")
        else:
            ce, _ = head(rows, labels[masked], 1024)
        loss = ce.sum() / p[0] / length
    loss.backward()
    seconds = time.perf_counter() - t0
    print(json.dumps({"variant": variant, "length": length, "loss": float(loss),
                      "peak_bytes": _rss("VmHWM") - base, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="4096,8192")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--one", nargs=2)
    args = parser.parse_args()
    if args.one:
        one(args.one[0], int(args.one[1]), args.hidden)
        return
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    results: dict[tuple[str, int], dict] = {}
    for length in (int(x) for x in args.lengths.split(",")):
        for variant in ("full", "rows", "chunked"):
            proc = subprocess.run([sys.executable, __file__, "--one", variant, str(length),
                                   "--hidden", str(args.hidden)], env=env, capture_output=True,
                                  text=True)
            if proc.returncode:
                sys.exit(f"{variant} at L={length} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results[(variant, length)] = r
            print(f"L={length:>6} {variant:<8} peak {r['peak_bytes'] / 2**30:6.2f} GiB  "
                  f"{r['seconds']:6.1f} s  loss {r['loss']:.6f}", flush=True)
    lengths = sorted({length for _, length in results})
    ok = True
    for length in lengths:
        full, chunked = results[("full", length)], results[("chunked", length)]
        rows = results[("rows", length)]
        same = abs(full["loss"] - chunked["loss"]) < 1e-5 and abs(full["loss"] - rows["loss"]) < 1e-5
        ratio = chunked["peak_bytes"] / full["peak_bytes"]
        print(f"L={length}: chunked / full peak = {ratio:.2f}, rows / full = "
              f"{rows['peak_bytes'] / full['peak_bytes']:.2f}, chunked time / full = "
              f"{chunked['seconds'] / full['seconds']:.2f}, losses equal: {same}")
        ok &= same
    longest, shortest = lengths[-1], lengths[0]
    ratio = results[("chunked", longest)]["peak_bytes"] / results[("full", longest)]["peak_bytes"]
    flat = (results[("chunked", longest)]["peak_bytes"]
            / results[("chunked", shortest)]["peak_bytes"])
    print(f"target: chunked <= 0.4x full at L={longest}: {ratio:.2f} "
          f"{'met' if ratio <= 0.4 else 'MISSED'}; flat in L (chunked {longest} / {shortest} "
          f"<= 1.25): {flat:.2f} {'met' if flat <= 1.25 else 'MISSED'}")
    sys.exit(0 if ok and ratio <= 0.4 and flat <= 1.25 else 1)


if __name__ == "__main__":
    main()
