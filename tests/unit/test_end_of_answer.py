"""The end-of-answer policy: a sample's EOS targets, and what the model computes for it, do not
depend on which samples share its micro-batch (config.EndOfAnswer, data/loader.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lladav.config import EndOfAnswer, VisionGeometry
from lladav.data.conversation import ChatTokenizer, normalize_turns, tokenize
from lladav.data.images import image_tiles
from lladav.data.loader import _collate, _Planned, eos_tail_length
from lladav.model.flavors import lladav_config_for
from lladav.model.lladav import LLaDAVModel
from lladav.train.step import splice_targets

POLICY = EndOfAnswer(policy="eos_tail", min_eos_tokens=2, eos_tokens=9)
GEOMETRY = VisionGeometry(image_aspect="square", tile_size=32, patch_size=8, max_grid=2)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer) -> ChatTokenizer:
    return ChatTokenizer.from_folder(tiny_tokenizer)


def decoded(tok: ChatTokenizer, question: str, answer: str, colour=None):
    """A sample as the loader decodes it: ids, target codes, tiles, image sizes."""
    n_images = 0 if colour is None else 1
    turns = normalize_turns([{"from": "human", "value": question},
                             {"from": "gpt", "value": answer}], n_images)
    out = tokenize(turns, tok, "llava_llada")
    tiles, sizes = [], []
    if colour is not None:
        image = Image.new("RGB", (40, 40), colour)
        tiles = [torch.from_numpy(image_tiles(image, GEOMETRY, "square", 1))]
        sizes = [image.size]
    return out.ids, out.targets, tiles, sizes


def batch_of(samples: dict, keys: list[str], policy: EndOfAnswer, eos_id: int, epoch: int = 0):
    planned = _Planned(epoch, 0, 0, tuple((k, "shard", len(samples[k][0]), len(samples[k][3]))
                                          for k in keys))
    return _collate([samples[k] for k in keys], eos_id, planned, policy, seed=7)


@pytest.fixture(scope="module")
def samples(tok):
    return {"short": decoded(tok, "<image>\nWhat colour is it?", "red", (200, 30, 30)),
            "long": decoded(tok, "<image>\nDescribe the shape at length, please.",
                            "A red circle on the left, near the edge, with a soft shadow.",
                            (30, 30, 200)),
            "twin": decoded(tok, "<image>\nWhat colour is this?", "blue", (30, 30, 200)),
            "text": decoded(tok, "How many corners does a square have?", "four")}


def own_row(batch, row: int) -> tuple[list[int], list[bool], list[bool]]:
    n = batch.lengths[row]
    return (batch.ids[row, :n].tolist(), batch.targets[row, :n].tolist(),
            batch.targets[row, n:].tolist())


def test_a_sample_carries_the_same_eos_targets_alone_beside_a_longer_one_and_grouped(tok, samples):
    eos = tok.eos_id
    alone = batch_of(samples, ["short"], POLICY, eos)
    beside_longer = batch_of(samples, ["long", "short"], POLICY, eos)
    grouped = batch_of(samples, ["short", "twin"], POLICY, eos)  # similar lengths, as grouping does
    tail = eos_tail_length(POLICY, 7, 0, "short")
    assert POLICY.min_eos_tokens <= tail <= POLICY.eos_tokens
    n = len(samples["short"][0])
    for batch, row in ((alone, 0), (beside_longer, 1), (grouped, 0)):
        ids, targets, padding = own_row(batch, row)
        assert batch.lengths[row] == n + tail
        assert ids == alone.ids[0].tolist()                 # tokens, then exactly `tail` EOS
        assert ids[n:] == [eos] * tail and all(targets[n:])
        assert targets == alone.targets[0].tolist()
        assert not any(padding)                             # batch padding is no target
        assert not batch.pads_are_targets
    assert beside_longer.ids.shape[1] > alone.ids.shape[1]  # the batch did pad it
    # the draw is per (seed, epoch, key): other keys and epochs get other lengths
    draws = {eos_tail_length(POLICY, 7, e, k) for e in range(5) for k in ("a", "b", "c", "d")}
    assert len(draws) > 1 and eos_tail_length(POLICY, 7, 0, "short") == tail


def test_the_model_computes_the_same_logits_for_a_sample_whatever_its_batch(tok, samples):
    """Past its EOS tail a sample's row is hidden from attention: its logits are those of the
    sample alone, to float32 precision, text-only or with an image."""
    torch.manual_seed(0)
    model = LLaDAVModel(lladav_config_for("tiny", tok)).eval()
    model.config.image_aspect = "square"

    def own_logits(keys: list[str], row: int) -> torch.Tensor:
        batch = batch_of(samples, keys, POLICY, tok.eos_id)
        embeds, image_pos = model.embed_multimodal(list(batch.ids), batch.images,
                                                   batch.image_sizes)
        spliced = splice_targets(batch.ids, batch.targets, image_pos, tok.eos_id, batch.answer,
                                 batch.lengths, batch.pads_are_targets)
        mask = None if bool(spliced.own.all()) else spliced.own
        with torch.no_grad():
            logits = model(inputs_embeds=embeds, attention_mask=mask).logits
        n = int(spliced.own[row].sum())
        assert not spliced.targets[row, n:].any()
        return logits[row, :n]

    for key in ("short", "text"):
        alone = own_logits([key], 0)
        torch.testing.assert_close(own_logits(["long", key], 1), alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(own_logits([key, "twin"], 0), alone, atol=1e-5, rtol=1e-5)


def test_the_references_padding_is_available_and_depends_on_the_batch(tok, samples):
    """pad_to_longest is the reference's behaviour, by name: EOS pads to the longest, all of them
    targets, no own tail; so a sample's targets change with its neighbours."""
    reference = EndOfAnswer(policy="pad_to_longest")
    alone = batch_of(samples, ["short"], reference, tok.eos_id)
    beside_longer = batch_of(samples, ["long", "short"], reference, tok.eos_id)
    n = len(samples["short"][0])
    assert alone.lengths == [n] and alone.targets.shape[1] == n and alone.pads_are_targets
    assert beside_longer.targets[1, n:].all() and beside_longer.ids.shape[1] > n
    assert int(beside_longer.targets[1].sum()) > int(alone.targets[0].sum())
    assert eos_tail_length(reference, 7, 0, "short") == 0


def test_answer_positions_are_the_assistants_words(tok, samples):
    batch = batch_of(samples, ["long", "short"], POLICY, tok.eos_id)
    answer = batch.ids[1][batch.answer[1]].tolist()
    assert tok.decode(answer) == "red"
    assert not (batch.answer & ~batch.targets).any()


def test_tail_bounds_are_validated():
    with pytest.raises(ValueError, match="min_eos_tokens 5 > eos_tokens 3"):
        EndOfAnswer(min_eos_tokens=5, eos_tokens=3)
    default = EndOfAnswer()
    assert (default.policy, default.eos_tokens) == ("eos_tail", 4)
    assert {eos_tail_length(default, 0, e, k) for e in range(3) for k in "abc"} == {4}
    assert np.mean([eos_tail_length(POLICY, 1, 0, str(i)) for i in range(2000)]) == pytest.approx(
        (POLICY.min_eos_tokens + POLICY.eos_tokens) / 2, abs=0.3)
