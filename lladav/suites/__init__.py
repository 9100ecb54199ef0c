"""Evaluation suites as data: which lmms-eval tasks to run with which generation settings.

    llada_v_paper.yaml   the paper's 17 tasks and per-task settings (lmms-eval's own tasks)
    cpu_mini             lmms-eval task YAMLs over a lladav test set (a LLaVA JSON file with the
                         expected answer as the last turn, as `lladav eval` reads), written by
                         `write_cpu_mini`, runnable offline on the CPU:
                           cpu_mini_mc      the paper's multiple-choice setting: 2 tokens, one
                                            2-token block, 2 steps, /no_think, exact scoring
                           cpu_mini_short   short answers: 8 tokens in 8 steps, stop at "\\n"
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).parent


class SuiteError(RuntimeError):
    """A suite cannot run: unknown suite, no test set, or lmms-eval failed (names its log)."""
CPU_MINI = {
    "cpu_mini_mc": {"gen_length": 2, "block_length": 2, "gen_steps": 2, "think_mode": "no_think",
                    "until": []},
    "cpu_mini_short": {"gen_length": 8, "block_length": 8, "gen_steps": 8, "think_mode": "no_think",
                       "until": ["\n"]},
}


def paper_suite() -> dict[str, Any]:
    """The paper suite: {"name", "defaults", "tasks": {task: gen kwargs}}."""
    return yaml.safe_load((HERE / "llada_v_paper.yaml").read_text())


SUITES = ("cpu_mini", "llada_v_paper")


def suite_settings(name: str) -> dict[str, dict[str, Any]]:
    """Per task of suite `name`: the generation settings it runs with (defaults merged in)."""
    if name == "cpu_mini":
        return {t: dict(g) for t, g in CPU_MINI.items()}
    if name == "llada_v_paper":
        suite = paper_suite()
        return {t: {**suite["defaults"], **g} for t, g in suite["tasks"].items()}
    raise SuiteError(f"unknown suite {name!r}; expected one of {SUITES}")


def suite_tasks(name: str) -> list[str]:
    return list(suite_settings(name))


def settings_for_task(suite: str, task: str) -> dict[str, Any] | None:
    """The suite's settings for an lmms-eval task name: its own, or its group's (a group's
    subtasks, e.g. mathverse_testmini_vision_intensive, take the group's settings)."""
    table = suite_settings(suite)
    names = [t for t in table if task == t or task.startswith(t + "_")]
    return table[max(names, key=len)] if names else None


@dataclass
class SuiteResult:
    scores: dict[str, dict[str, float]]
    """task -> metric -> value, as lmms-eval's results.json gives them (numeric ones)."""
    stats: dict[str, dict[str, float]]
    """task -> n, seconds, forward_passes (sums over its answered requests)."""
    wall_seconds: float
    files: list[Path]
    """lmms-eval's results and sample logs."""

    def metrics(self) -> dict[str, float]:
        """What an eval run logs: <task>/<metric>, <task>/seconds_per_sample and
        <task>/forward_passes_per_answer."""
        out = {f"{t}/{m}": v for t, ms in self.scores.items() for m, v in ms.items()}
        for task, st in self.stats.items():
            if st["n"]:
                out[f"{task}/seconds_per_sample"] = st["seconds"] / st["n"]
                out[f"{task}/forward_passes_per_answer"] = st["forward_passes"] / st["n"]
        out["wall_seconds"] = self.wall_seconds
        return out


def score_lines(scores: dict[str, dict[str, float]],
                stats: dict[str, dict[str, float]]) -> list[str]:
    """One line per task: its scores, seconds per sample and forward passes per answer."""
    lines = []
    for task, values in scores.items():
        st = stats.get(task, {})
        per = (f", {st['seconds'] / st['n']:.2f} s/sample, "
               f"{st['forward_passes'] / st['n']:.2f} forward passes/answer" if st.get("n") else "")
        lines.append(f"{task} " + ", ".join(f"{m} {v:.3f}" for m, v in values.items()) + per)
    return lines


def run_suite(export: str, suite: str, out_dir: str | Path, *, data: str | None = None,
              tasks: list[str] | None = None, image_root: str | None = None,
              limit: int | None = None, threshold: float | None = None,
              prefix_cache: bool = False) -> SuiteResult:
    """Run the real lmms-eval CLI (a subprocess) with `--model lladav` on `suite`'s tasks for
    `export`, writing its logs under `out_dir`. The plugin applies the suite's per-task settings
    (model arg `suite`) and writes its timing per task (model arg `stats`)."""
    import subprocess
    import sys
    import time

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = tasks or suite_tasks(suite)
    args = []
    if suite == "cpu_mini":
        if data is None:
            raise SuiteError("suite cpu_mini needs a test set (--data / `data`)")
        write_cpu_mini(data, out / "tasks", image_root=image_root, limit=limit)
        args += ["--include_path", str(out / "tasks")]
    elif limit is not None:
        args += ["--limit", str(limit)]
    model_args = f"pretrained={export},suite={suite},stats={out / 'lladav_stats.json'}"
    if threshold is not None:
        model_args += f",threshold={threshold}"
    if prefix_cache:
        model_args += ",prefix_cache=true"
    cli = Path(sys.executable).parent / "lmms-eval"
    command = [str(cli) if cli.exists() else "lmms-eval", "--model", "lladav",
               "--model_args", model_args, "--tasks", ",".join(tasks), "--batch_size", "1",
               "--log_samples", "--output_path", str(out / "lmms"), *args]
    start = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, cwd=out)
    wall = time.monotonic() - start
    (out / "lmms_eval.log").write_text(done.stdout + done.stderr)
    found = sorted((out / "lmms").rglob("*_results.json"))
    if done.returncode != 0 or not found:
        raise SuiteError(f"lmms-eval failed on suite {suite} (exit {done.returncode}); its log: "
                           f"{out / 'lmms_eval.log'}\n{(done.stderr or done.stdout)[-2000:]}")
    results = json.loads(found[-1].read_text())["results"]
    scores = {t: {k.split(",")[0]: float(v) for k, v in r.items()
                  if isinstance(v, (int, float)) and "stderr" not in k}
              for t, r in results.items()}
    stats = json.loads((out / "lladav_stats.json").read_text())
    return SuiteResult(scores, stats, wall, [*found, *sorted((out / "lmms").rglob("*_samples_*.jsonl"))])


def write_cpu_mini(test_set: str, out_dir: str | Path, *, image_root: str | None = None,
                   limit: int | None = None, scoring: str = "exact") -> list[str]:
    """Write the cpu_mini task folder for `test_set` (checked record by record, as `lladav eval`
    does) into `out_dir`, for `lmms-eval --include_path out_dir`; returns the task names.
    Images are copied into the folder (lmms-eval reads local files)."""
    from lladav.data.sources import load_record
    from lladav.evaluate import _test_source, read_test_set

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    source = _test_source(test_set, image_root)
    with (out / "docs.jsonl").open("w") as f:
        for i, rec in enumerate(read_test_set(test_set, image_root=image_root, limit=limit,
                                              scoring=scoring)):
            images = []
            for k, blob in enumerate(load_record(source, rec.ref).images):
                path = out / "images" / f"{i:06d}-{k}{Path(blob.location).suffix or '.img'}"
                path.write_bytes(blob.data)
                images.append(str(path.resolve()))
            if len(rec.prompt) != 1:
                raise ValueError(f"{rec.location}: cpu_mini takes one-question records "
                                 f"({len(rec.prompt)} messages before the answer)")
            f.write(json.dumps({"id": rec.id, "question": rec.prompt[0]["value"], "images": images,
                                "expected": rec.expected, "choices": rec.choices or [],
                                "scoring": scoring}) + "\n")
    shutil.copy(HERE / "cpu_mini" / "utils.py", out / "utils.py")
    for task, gen in CPU_MINI.items():
        config = {
            "task": task, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str((out / "docs.jsonl").resolve())}},
            "test_split": "test", "output_type": "generate_until",
            "doc_to_visual": _Function("utils.doc_to_visual"),
            "doc_to_text": _Function("utils.doc_to_text"), "doc_to_target": "expected",
            "generation_kwargs": gen,
            "process_results": _Function("utils.process_results"),
            "metric_list": [{"metric": "accuracy", "aggregation": "mean", "higher_is_better": True}],
        }
        (out / f"{task}.yaml").write_text(yaml.dump(config, Dumper=_Dumper, sort_keys=False))
    return list(CPU_MINI)


class _Function(str):
    """A `!function module.name` reference, which lmms-eval's task loader resolves."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Function, lambda d, v: d.represent_scalar("!function", str(v)))
