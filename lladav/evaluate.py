"""Held-out accuracy of an export: every unseen image's question answered by the sampler, scored.

    <corpus>/heldout.json + images --load(export)--> answer(question + suffix) per record
    --score_answer--> EvalResult(accuracy, n, chance, samples)

A held-out record is a LLaVA record (data/synthetic.py writes them) with one question about one
image, its expected `answer` and the `choices` it was asked among. An answer is right when its
final word is the expected one and nothing else is said: the text is lowercased, stripped of
surrounding whitespace and of a final full stop, and a reasoning-style answer ("... Answer: red")
is judged on what follows its last "Answer:". "Red." is right; "red or blue", "" and another
choice are wrong. `chance` is the mean of 1/len(choices): what picking a choice at random scores.

The question gets `suffix` appended, " /no_think" by default: the final stage trains direct
answers under that tag and makes reasoning the untagged default (the paper's 3b mix), and a
held-out question wants one word.

Owns: reading held-out records, the prompt suffix, the scoring rule and the per-sample record a
pipeline logs. Does not own: sampling (sampler.py, inference.py), the corpus (data/synthetic.py)
or MLflow (pipeline.py logs `samples`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lladav import storage
from lladav.inference import SamplerSettings

NO_THINK = " /no_think"
# One word and its end-of-turn: 8 positions leave room for a longer word or a stray token.
DEFAULT_SETTINGS = SamplerSettings(gen_length=8, block_length=8, steps=8)


@dataclass
class EvalResult:
    accuracy: float
    n: int
    chance: float
    by_factor: dict[str, float] = field(default_factory=dict)
    """Accuracy per asked factor (colour, kind, position) of records that name one."""
    samples: list[dict[str, Any]] = field(default_factory=list)
    """Per question: id, factor, image (local path; None for a remote corpus), image_uri,
    question, answer (the model's text), expected, correct, choices, forward_passes."""


def final_answer(text: str) -> str:
    """The part of an answer that is scored: after the last "Answer:", lowercased, stripped of
    whitespace and a final full stop."""
    tail = text.rsplit("Answer:", 1)[-1]
    return tail.strip().lower().removesuffix(".").strip()


def score_answer(text: str, expected: str) -> bool:
    return final_answer(text) == expected.strip().lower()


def _question(record: dict[str, Any]) -> str:
    turns = record["conversations"]
    if not turns or turns[0].get("from") not in ("human", "user"):
        raise ValueError(f"held-out record {record.get('id')!r}: the first turn must be the question")
    return turns[0]["value"]


def evaluate_heldout(export: str, corpus_dir: str, settings: SamplerSettings | None = None,
                     limit: int | None = None, suffix: str = NO_THINK,
                     progress: Callable[[str, int, int], None] | None = None) -> EvalResult:
    """Answer the first `limit` (default: all) questions of corpus_dir/heldout.json with the
    export (folder or URI) and score them; images resolve against corpus_dir (folder or URI).
    progress("eval", done, total) is called after each question."""
    from PIL import Image

    from lladav.inference import answer, load

    model, tok = load(export)
    settings = settings or DEFAULT_SETTINGS
    samples = []
    with storage.local_folder(corpus_dir) as folder:
        records = json.loads((Path(folder) / "heldout.json").read_text(encoding="utf-8"))
        records = records[:limit] if limit is not None else records
        if not records:
            raise ValueError(f"{corpus_dir}/heldout.json: no held-out questions to evaluate")
        for i, record in enumerate(records):
            image_path = Path(folder) / record["image"]
            question = _question(record) + suffix
            with Image.open(image_path) as image:
                out = answer(model, tok, [image.convert("RGB")], question, settings)
            samples.append({
                "id": record.get("id"), "factor": record.get("factor"),
                # A remote corpus's local copy goes away on return: keep only its URI then.
                "image": None if storage.is_s3(corpus_dir) else str(image_path),
                "image_uri": storage.join(corpus_dir, record["image"]),
                "question": question, "answer": out.text, "expected": record["answer"],
                "correct": score_answer(out.text, record["answer"]),
                "choices": record["choices"], "forward_passes": out.forward_passes})
            if progress is not None:
                progress("eval", i + 1, len(records))
    n = len(samples)
    by_factor: dict[str, list[bool]] = {}
    for s in samples:
        if s["factor"]:
            by_factor.setdefault(s["factor"], []).append(s["correct"])
    return EvalResult(accuracy=sum(s["correct"] for s in samples) / n, n=n,
                      chance=sum(1 / len(s["choices"]) for s in samples) / n,
                      by_factor={k: sum(v) / len(v) for k, v in sorted(by_factor.items())},
                      samples=samples)
