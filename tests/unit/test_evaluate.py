"""Held-out evaluation: the scoring rule, the counts, and that samples are the sampler's answers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from lladav.evaluate import NO_THINK, evaluate_heldout, final_answer, score_answer
from lladav.inference import SamplerSettings, answer, load

SETTINGS = SamplerSettings(gen_length=4, block_length=4, steps=4)


@pytest.fixture(scope="module")
def export(random_export) -> str:
    return str(random_export)


@pytest.mark.parametrize("text, expected, correct", [
    ("red", "red", True),
    ("Red.", "red", True),
    ("  red \n", "red", True),
    ("The shape is filled with red, so its colour is red. Answer: red", "red", True),
    ("The shape is red. Answer: blue", "red", False),
    ("red or blue", "red", False),
    ("blue", "red", False),
    ("", "red", False),
    ("redd", "red", False),
])
def test_scoring_rule(text, expected, correct):
    assert score_answer(text, expected) is correct


def test_final_answer_takes_what_follows_the_last_answer_marker():
    assert final_answer("Answer: left. Answer: Right.") == "right"


def test_counts_chance_and_samples_are_the_samplers_answers(export, synth_dir):
    corpus = synth_dir / "corpus"
    heldout = json.loads((corpus / "heldout.json").read_text())
    seen = []
    result = evaluate_heldout(export, str(corpus), SETTINGS,
                              progress=lambda phase, done, total: seen.append((phase, done, total)))
    assert result.n == len(heldout) == 9 and seen[-1] == ("eval", 9, 9) and len(seen) == 9
    assert result.chance == pytest.approx(1 / 3)
    assert result.accuracy == sum(s["correct"] for s in result.samples) / 9
    for factor in ("colour", "kind", "position"):
        mine = [s["correct"] for s in result.samples if s["factor"] == factor]
        assert len(mine) == 3 and result.by_factor[factor] == sum(mine) / 3
    model, tok = load(export)
    for record, sample in zip(heldout, result.samples):
        assert sample["expected"] == record["answer"] and sample["factor"] == record["factor"]
        assert Path(sample["image"]).is_file() and sample["image"].endswith(record["image"])
        assert sample["question"] == record["conversations"][0]["value"] + NO_THINK
        direct = answer(model, tok, [Image.open(sample["image"]).convert("RGB")],
                        sample["question"], SETTINGS)
        assert sample["answer"] == direct.text
        assert sample["forward_passes"] == direct.forward_passes <= SETTINGS.steps
        assert sample["correct"] == score_answer(direct.text, record["answer"])

    limited = evaluate_heldout(export, str(corpus), SETTINGS, limit=4, suffix="")
    assert limited.n == 4 and [s["id"] for s in limited.samples] == [r["id"] for r in heldout[:4]]
    assert limited.samples[0]["question"] == heldout[0]["conversations"][0]["value"]


def test_accuracy_counts_exactly_the_answers_that_match(export, synth_dir, tmp_path):
    # Rewrite the expected answers: the model's own answer for the first three records, a word it
    # cannot say for the rest. Accuracy must then be exactly 3/9, whatever the random model says.
    corpus = tmp_path / "corpus"
    shutil.copytree(synth_dir / "corpus", corpus)
    first = evaluate_heldout(export, str(corpus), SETTINGS)
    records = json.loads((corpus / "heldout.json").read_text())
    for i, (record, sample) in enumerate(zip(records, first.samples)):
        record["answer"] = final_answer(sample["answer"]) if i < 3 else "no-such-word"
    (corpus / "heldout.json").write_text(json.dumps(records))
    second = evaluate_heldout(export, str(corpus), SETTINGS)
    assert [s["correct"] for s in second.samples] == [True] * 3 + [False] * 6
    assert second.accuracy == pytest.approx(3 / 9)


def test_empty_heldout_is_an_error(export, tmp_path):
    (tmp_path / "heldout.json").write_text("[]")
    with pytest.raises(ValueError, match="no held-out questions"):
        evaluate_heldout(export, str(tmp_path))
