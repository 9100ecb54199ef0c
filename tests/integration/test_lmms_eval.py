"""The real `lmms-eval` CLI with `--model lladav` on the cpu_mini suite: its per-task scores and
every answer equal what `lladav eval` gives on the same records with the same settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is installed by `make setup` (the eval extra)")

from lladav.evaluate import evaluate, score  # noqa: E402
from lladav.inference import SamplerSettings  # noqa: E402
from lladav.lmms_model import cut_at_stops  # noqa: E402
from lladav.suites import CPU_MINI, write_cpu_mini  # noqa: E402

pytestmark = [pytest.mark.slow]


def test_lmms_eval_cli_scores_cpu_mini_as_lladav_eval_answers(tmp_path, random_export, synth_dir):
    heldout = str(synth_dir / "corpus" / "heldout.json")
    tasks = write_cpu_mini(heldout, tmp_path / "tasks")
    out = tmp_path / "out"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [str(Path(sys.executable).parent / "lmms-eval"), "--model", "lladav",
         "--model_args", f"pretrained={random_export}", "--tasks", ",".join(tasks),
         "--include_path", str(tmp_path / "tasks"), "--batch_size", "1", "--log_samples",
         "--output_path", str(out)],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    results = json.loads(next(out.rglob("*_results.json")).read_text())["results"]

    for task in tasks:
        gen = CPU_MINI[task]
        ours = evaluate(str(random_export), heldout,
                        SamplerSettings(gen["gen_length"], gen["block_length"], gen["gen_steps"]),
                        tag=f"/{gen['think_mode']}")
        logged = [json.loads(line) for line in
                  next(out.rglob(f"*_samples_{task}.jsonl")).read_text().splitlines()]
        logged.sort(key=lambda s: s["doc_id"])
        assert len(logged) == len(ours.samples) == 9
        correct = []
        for sample, mine in zip(logged, ours.samples):
            text = cut_at_stops(mine["answer"], gen["until"])  # lmms-eval's stop strings
            assert sample["filtered_resps"] in (text, [text]), task
            assert sample["target"] == mine["expected"]
            correct.append(score(text, mine["expected"], "exact", mine["choices"])[0])
            assert sample["accuracy"] == float(correct[-1])
        assert results[task]["accuracy,none"] == pytest.approx(sum(correct) / 9), task
        if not gen["until"]:
            assert results[task]["accuracy,none"] == pytest.approx(ours.accuracy), task
