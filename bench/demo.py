"""`make demo` on a fresh clone: wall time against the 15-minute budget, and held-out accuracy.

    1. `git clone` this repository (HEAD; uncommitted changes are not part of it) into a
       temporary folder, so nothing of this checkout's .venv or .lladav is reused;
    2. time `make setup` (the install) and `make demo` (the pipeline) separately;
    3. read the eval step's accuracy, chance and per-factor figures from the clone's MLflow store
       (the same figures `make demo` prints), and the per-step wall times from its runs.

Targets (issue 5): setup + demo <= 15 min on 2 cores; accuracy >= 0.80 with chance <= 1/3.
Exits 1 when a target is missed, so the figures are a check as well as a report.

    .venv/bin/python bench/demo.py [--keep]      # --keep leaves the clone for inspection
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 15 * 60
MIN_ACCURACY = 0.80


def _timed(cmd: list[str], cwd: Path, log: Path) -> float:
    start = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}) after {elapsed:.0f} s; see {log}")
    return elapsed


def _eval_figures(clone: Path) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """(eval metrics, [(step name, seconds)]) from the clone's SQLite MLflow store."""
    code = (
        "import json, mlflow\n"
        "c = mlflow.MlflowClient('sqlite:///.lladav/mlflow.db')\n"
        "exp = c.get_experiment_by_name('tiny')\n"
        "runs = c.search_runs([exp.experiment_id], order_by=['start_time ASC'])\n"
        "ev = [r for r in runs if r.data.tags.get('mlflow.runName') == 'eval'][-1]\n"
        "steps = [(r.data.tags.get('mlflow.runName'), (r.info.end_time - r.info.start_time) / 1e3)\n"
        "         for r in runs if r.info.end_time and r.data.tags.get('mlflow.parentRunId')]\n"
        "print(json.dumps({'metrics': ev.data.metrics, 'steps': steps}))\n")
    out = subprocess.run([str(clone / ".venv/bin/python"), "-c", code], cwd=clone, check=True,
                         capture_output=True, text=True).stdout
    import json

    data = json.loads(out.strip().splitlines()[-1])
    return data["metrics"], [tuple(s) for s in data["steps"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the clone")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="lladav-demo-bench-"))
    clone = root / "lladav"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    env_note = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}, cores={os.cpu_count()}"
    try:
        setup_s = _timed(["make", "setup"], clone, root / "setup.log")
        demo_s = _timed(["make", "demo"], clone, root / "demo.log")
        metrics, steps = _eval_figures(clone)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    total = setup_s + demo_s
    acc, chance = metrics["heldout_accuracy"], metrics["chance"]
    print(f"make demo on a fresh clone ({env_note})")
    print(f"  make setup      {setup_s:7.1f} s")
    print(f"  make demo       {demo_s:7.1f} s")
    for name, secs in steps:
        print(f"    {name:<14}{secs:7.1f} s")
    print(f"  total           {total:7.1f} s = {total / BUDGET_S:.2f}x the 15-min budget "
          f"(target <= 1.00)")
    factors = {k.removeprefix("heldout_accuracy_"): v for k, v in metrics.items()
               if k.startswith("heldout_accuracy_")}
    print(f"  accuracy        {acc:.3f} on {int(metrics['heldout_n'])} held-out questions, "
          f"chance {chance:.3f} (target >= {MIN_ACCURACY:.2f}); "
          + ", ".join(f"{k} {v:.2f}" for k, v in sorted(factors.items())))
    if args.keep:
        print(f"  clone kept at {clone}")
    ok = total <= BUDGET_S and acc >= MIN_ACCURACY and chance <= 1 / 3 + 1e-9
    print("PASS" if ok else "MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
