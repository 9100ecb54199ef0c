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
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).parent
CPU_MINI = {
    "cpu_mini_mc": {"gen_length": 2, "block_length": 2, "gen_steps": 2, "think_mode": "no_think",
                    "until": []},
    "cpu_mini_short": {"gen_length": 8, "block_length": 8, "gen_steps": 8, "think_mode": "no_think",
                       "until": ["\n"]},
}


def paper_suite() -> dict[str, Any]:
    """The paper suite: {"name", "defaults", "tasks": {task: gen kwargs}}."""
    return yaml.safe_load((HERE / "llada_v_paper.yaml").read_text())


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
