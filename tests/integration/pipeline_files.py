"""A three-stage tiny pipeline written into a test's folder: the shape of pipelines/tiny.yaml,
scaled down to a few optimizer steps per stage so a test can run it several times."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

VISION = {"tile_size": 32, "patch_size": 8, "max_grid": 2}
SOURCES = {"stage1": ("captions", "captions.json"), "stage2": ("qa", "qa.json"),
           "stage3": ("reasoning", "reasoning.json")}


def write_pipeline(root: Path, corpus: Path, *, storage: str, tracking_uri: str | None,
                   steps: int = 3, every: int = 2, stage2: dict[str, Any] | None = None,
                   eval_limit: int = 3, name: str = "ptest", suite: bool = False,
                   openlineage: dict[str, Any] | None = None) -> Path:
    """Recipes, stage YAMLs and pipeline.yaml under `root`; returns the pipeline's path.
    `corpus` is a synth_all folder (corpus/, tokenizer/); `openlineage` the pipeline's
    `openlineage:` block (config.OpenLineageSettings), if given."""
    root.mkdir(parents=True, exist_ok=True)
    for stage, (source, file) in SOURCES.items():
        (root / f"mix_{stage}.yaml").write_text(yaml.safe_dump({
            "name": f"mix-{stage}", "tokenizer": str(corpus / "tokenizer"), "max_length": 512,
            "samples_per_shard": 64, "seed": 0, "vision": VISION,
            "sources": [{"name": source, "kind": "llava_json", "location": str(corpus / "corpus" / file),
                         **({"license": "CC-BY-4.0"} if stage == "stage1" else {})}]}))
        trainable = ({"projector": 3e-3} if stage == "stage1" else
                     {"vision_tower": 1e-3, "projector": 3e-3, "language_model": 3e-3})
        (root / f"{stage}.yaml").write_text(yaml.safe_dump({
            "name": stage, "init": {"flavor": "tiny"}, "trainable": trainable,
            "micro_batch": 2, "max_steps": steps, "warmup_ratio": 0.1, "precision": "fp32", "seed": 0,
            "deepspeed_overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 0}},
            "scaling": {"workers": 1, "cpus_per_worker": 1},
            "checkpoint": {"every_steps": every, "keep": 2}, "max_failures": 0}))
    pipeline = {
        "name": name, "storage": storage,
        "mlflow": {"tracking_uri": tracking_uri, "experiment": name},
        **({"openlineage": openlineage} if openlineage is not None else {}),
        "steps": [
            {"name": "mix-stage1", "kind": "data", "recipe": "mix_stage1.yaml"},
            {"name": "mix-stage2", "kind": "data", "recipe": "mix_stage2.yaml"},
            {"name": "mix-stage3", "kind": "data", "recipe": "mix_stage3.yaml"},
            {"name": "stage1", "kind": "stage", "stage": "stage1.yaml", "mixture": "mix-stage1"},
            {"name": "stage2", "kind": "stage", "stage": "stage2.yaml", "mixture": "mix-stage2",
             "init": "stage1", "overrides": stage2 or {}},
            {"name": "stage3", "kind": "stage", "stage": "stage3.yaml", "mixture": "mix-stage3",
             "init": "stage2"},
            {"name": "eval", "kind": "eval", "model": "stage3",
             "data": str(corpus / "corpus" / "heldout.json"), "tag": "/no_think",
             "limit": eval_limit, "gen_length": 4},
        ] + ([{"name": "suite", "kind": "eval", "model": "stage3", "suite": "cpu_mini",
               "data": str(corpus / "corpus" / "heldout.json"), "limit": eval_limit}]
             if suite else [])}
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    return path
