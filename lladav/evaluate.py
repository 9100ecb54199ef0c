"""Held-out accuracy of an export: unseen images, one question each, answered with the sampler.

The held-out format is the synthetic corpus's heldout.json (data/synthetic.py): LLaVA records
with `answer` (one word) and `choices`; chance is 1 / len(choices). The question is asked the
short way (`/no_think`, the tag stage 3 trains for direct answers), and an answer counts when
its text, lower-cased and without surrounding spaces or a final full stop, is the expected word.

Owns: reading heldout.json, scoring, the per-sample records the pipeline logs to MLflow.
Does not own: loading and prompting the model (inference.py) or the sampling rules (sampler.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NO_THINK = " /no_think"


@dataclass
class EvalResult:
    accuracy: float
    n: int
    chance: float
    by_factor: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    """One per question: image (local path), question, answer, expected, correct, passes."""


def is_correct(answer: str, expected: str) -> bool:
    return answer.strip().rstrip(".").strip().lower() == expected.strip().lower()


def evaluate_heldout(export: str, heldout_dir: str, settings: Any = None, *,
                     limit: int | None = None, suffix: str = NO_THINK,
                     progress: Callable[[str, int, int], None] | None = None) -> EvalResult:
    """Answer every question of `heldout_dir`/heldout.json (folder or URI) with `export`."""
    from PIL import Image

    from lladav import storage
    from lladav.inference import SamplerSettings, answer, load

    settings = settings or SamplerSettings(gen_length=8, block_length=8, steps=8)
    model, tok = load(export)
    samples: list[dict[str, Any]] = []
    by_factor: dict[str, list[bool]] = {}
    with storage.local_folder(heldout_dir) as folder:
        records = json.loads((Path(folder) / "heldout.json").read_text())[:limit]
        for i, rec in enumerate(records):
            image_path = Path(folder) / rec["image"]
            question = rec["conversations"][0]["value"] + suffix
            with Image.open(image_path) as img:
                out = answer(model, tok, [img.convert("RGB")], question, settings)
            ok = is_correct(out.text, rec["answer"])
            by_factor.setdefault(rec.get("factor", "all"), []).append(ok)
            samples.append({"id": rec["id"], "image": str(image_path), "question": question,
                            "answer": out.text, "expected": rec["answer"], "correct": ok,
                            "forward_passes": out.forward_passes})
            if progress:
                progress("eval", i + 1, len(records))
        n = len(samples)
        chance = sum(1 / len(r["choices"]) for r in records) / max(n, 1)
        result = EvalResult(sum(s["correct"] for s in samples) / max(n, 1), n, chance,
                            {k: sum(v) / len(v) for k, v in sorted(by_factor.items())}, samples)
        if storage.is_s3(heldout_dir):  # the local copy goes away: keep the images the caller logs
            result.samples = [dict(s, image=None) for s in samples]
    return result
