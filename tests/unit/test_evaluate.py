"""Held-out scoring: the answer rule, chance, and the records logged per question."""

from __future__ import annotations

import json

import pytest
import torch

from lladav.evaluate import evaluate_heldout, is_correct


@pytest.mark.parametrize("answer, expected, ok", [
    ("red", "red", True), (" Red.", "red", True), ("red circle", "red", False),
    ("", "red", False), ("blue", "red", False), ("left.", "left", True)])
def test_the_answer_rule(answer, expected, ok):
    assert is_correct(answer, expected) is ok


def test_a_random_model_is_scored_on_every_question(tmp_path, synth_dir):
    from lladav.data.conversation import ChatTokenizer
    from lladav.inference import SamplerSettings
    from lladav.model.flavors import lladav_config
    from lladav.model.lladav import LLaDAVModel

    tok = ChatTokenizer.from_folder(synth_dir / "tokenizer")
    torch.manual_seed(0)
    model = LLaDAVModel(lladav_config("tiny", vocab_size=len(tok.tokenizer), bos_token_id=tok.bos_id,
                                      eos_token_id=tok.eos_id, pad_token_id=tok.eos_id,
                                      mask_token_id=tok.mask_id))
    model.save_pretrained(tmp_path / "export")
    tok.tokenizer.save_pretrained(tmp_path / "export")
    seen = []
    result = evaluate_heldout(str(tmp_path / "export"), str(synth_dir / "corpus"),
                              SamplerSettings(gen_length=2, block_length=2, steps=2), limit=5,
                              progress=lambda phase, done, total: seen.append((done, total)))
    records = json.loads((synth_dir / "corpus" / "heldout.json").read_text())[:5]
    assert result.n == 5 and seen[-1] == (5, 5)
    assert result.chance == pytest.approx(1 / 3)
    assert [s["expected"] for s in result.samples] == [r["answer"] for r in records]
    assert all(s["question"].endswith(" /no_think") and s["forward_passes"] >= 1 for s in result.samples)
    assert result.accuracy == sum(is_correct(s["answer"], s["expected"]) for s in result.samples) / 5
    assert set(result.by_factor) <= {"colour", "kind", "position"}
