"""The synthetic corpora say what their pixels show, and the tiny tokenizer behaves like LLaDA's."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lladav.data.conversation import BOS, EOS, IMAGE, MASK, SPECIAL_TOKENS, ChatTokenizer
from lladav.demo.shapes import (COLOURS, FACTORS, KINDS, POSITION_X, POSITIONS, RGB,
                                corpus_texts, synth_all, synth_corpus)
from lladav.data.tokenizer import train_tokenizer

TRAIN_FILES = ("captions.json", "qa.json", "reasoning.json")
N_TRAIN, N_HELDOUT, SIZE = 60, 30, 48


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    synth_all(root, n_train=N_TRAIN, n_heldout=N_HELDOUT, image_size=SIZE, seed=0)
    return root


@pytest.fixture(scope="module")
def tokenizer(synth):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(synth / "tokenizer", local_files_only=True)


def _load(root: Path, name: str) -> list[dict]:
    return json.loads((root / "corpus" / name).read_text(encoding="utf-8"))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_arguments_give_identical_bytes(synth, tmp_path):
    synth_all(tmp_path / "a", n_train=N_TRAIN, n_heldout=N_HELDOUT, image_size=SIZE, seed=0)
    first, second = _files(synth), _files(tmp_path / "a")
    assert len(first) == N_TRAIN + N_HELDOUT + 4 + 2  # images, 4 JSON files, 2 tokenizer files
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []
    synth_corpus(tmp_path / "b", n_train=N_TRAIN, n_heldout=N_HELDOUT, image_size=SIZE, seed=1)
    assert _files(tmp_path / "b")["captions.json"] != first["corpus/captions.json"]


def test_records_are_llava_records(synth):
    text_only = multi_turn = 0
    for name in (*TRAIN_FILES, "heldout.json"):
        records = _load(synth, name)
        assert len({r["id"] for r in records}) == len(records), name
        for r in records:
            turns = r["conversations"]
            assert len(turns) >= 2 and len(turns) % 2 == 0
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            assert all(isinstance(t["value"], str) and t["value"] for t in turns)
            n_placeholders = sum(t["value"].count(IMAGE) for t in turns)
            if "image" in r:
                assert turns[0]["value"].startswith(IMAGE + "\n") and n_placeholders == 1
                assert (synth / "corpus" / r["image"]).is_file()
                assert set(r["meta"]) == {"colour", "kind", "position"}
            else:
                assert n_placeholders == 0
                text_only += 1
            multi_turn += len(turns) > 2
    assert text_only >= 3 and multi_turn >= N_TRAIN // 4
    assert len(_load(synth, "captions.json")) == len(_load(synth, "reasoning.json")) == N_TRAIN


def test_both_formats_decode_and_heldout_images_are_unseen(synth):
    train = {r["image"] for name in TRAIN_FILES for r in _load(synth, name) if "image" in r}
    heldout = {r["image"] for r in _load(synth, "heldout.json")}
    assert len(train) == N_TRAIN and len(heldout) == N_HELDOUT
    assert not train & heldout
    formats = Counter()
    for rel in train | heldout:
        with Image.open(synth / "corpus" / rel) as img:
            img.load()
            formats[img.format] += 1
            assert img.size == (SIZE, SIZE)
            assert rel.endswith({"JPEG": ".jpg", "PNG": ".png"}[img.format])
    assert formats["JPEG"] >= 30 and formats["PNG"] >= 30


def _read_pixels(path: Path) -> tuple[str, float, float]:
    """(colour, centroid x / width, fill ratio of the shape's bounding box) measured from pixels."""
    a = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    palette = np.stack([a[0, 0]] + [np.asarray(RGB[c], np.float64) for c in COLOURS])
    label = ((a[:, :, None, :] - palette) ** 2).sum(-1).argmin(-1)  # (H, W): 0 = background
    counts = np.bincount(label.ravel(), minlength=4)[1:]
    colour = COLOURS[int(counts.argmax())]
    assert counts.max() > 40 and counts.sum() - counts.max() <= 0.05 * counts.max(), path
    ys, xs = np.nonzero(label == 1 + COLOURS.index(colour))
    fill = len(xs) / ((np.ptp(xs) + 1) * (np.ptp(ys) + 1))
    return colour, xs.mean() / a.shape[1], fill


def _kind_from_fill(fill: float) -> str:
    # Area / bounding box: square 1, circle pi/4 ~ 0.785, triangle 1/2.
    return "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"


def test_meta_matches_the_pixels(synth):
    records = _load(synth, "captions.json") + _load(synth, "heldout.json")
    for r in records:
        colour, x, fill = _read_pixels(synth / "corpus" / r["image"])
        position = min(POSITIONS, key=lambda p: abs(POSITION_X[p] - x))
        assert (colour, _kind_from_fill(fill), position) == (
            r["meta"]["colour"], r["meta"]["kind"], r["meta"]["position"]), r["id"]
    seen = Counter((r["meta"]["colour"], r["meta"]["kind"], r["meta"]["position"]) for r in records)
    assert len(seen) == 27


def test_texts_state_the_meta(synth):
    for r in _load(synth, "captions.json"):
        words = r["conversations"][1]["value"].rstrip(".").split()
        assert set(r["meta"].values()) <= set(words), r["id"]
    asked = Counter()
    for r in _load(synth, "qa.json"):
        turns = r["conversations"]
        for q, a in zip(turns[0::2], turns[1::2]):
            if "meta" not in r:
                continue
            factor = next(f for f, words in FACTORS.items() if all(w in q["value"] for w in words))
            assert a["value"] == r["meta"][factor], r["id"]
            asked[factor] += 1
    assert set(asked) == set(FACTORS) and min(asked.values()) >= N_TRAIN // 4
    for r in _load(synth, "reasoning.json"):
        answer = r["conversations"][1]["value"]
        assert len(answer.split()) < 30
        final = answer.rsplit("Answer: ", 1)[1]
        assert final in r["meta"].values() and final in answer.rsplit("Answer: ", 1)[0], r["id"]


def test_every_factor_is_asked_alone_as_heldout_asks_it(synth):
    # A held-out record is one question about an image; training must hold that shape for every
    # factor, or the model learns that some factor is never the last question of a conversation.
    alone, last = Counter(), Counter()
    for r in _load(synth, "qa.json"):
        if "meta" not in r:
            continue
        turns = r["conversations"]
        factor = next(f for f, words in FACTORS.items() if all(w in turns[-2]["value"] for w in words))
        last[factor] += 1
        alone[factor] += len(turns) == 2
    assert set(alone) == set(FACTORS) and min(alone.values()) >= N_TRAIN // 6, alone
    assert max(last.values()) <= 2 * min(last.values()), last


def test_heldout_answers_are_choices_and_balanced(synth):
    records = _load(synth, "heldout.json")
    for r in records:
        question, answer = r["conversations"][0]["value"], r["conversations"][1]["value"]
        assert len(r["choices"]) >= 3 and len(set(r["choices"])) == len(r["choices"])
        assert r["answer"] == answer == r["meta"][r["factor"]]
        assert r["answer"] in r["choices"]
        assert all(choice in question for choice in r["choices"])
    answers = Counter(r["answer"] for r in records)
    assert max(answers.values()) <= 0.5 * len(records)
    for factor, classes in FACTORS.items():
        within = Counter(r["answer"] for r in records if r["factor"] == factor)
        assert set(within) == set(classes) and max(within.values()) <= 0.5 * sum(within.values())
    assert set(KINDS) <= set(answers) and set(COLOURS) <= set(answers)


def test_special_tokens_are_single_ids_and_nothing_is_added(tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS) and tokenizer.unk_token_id not in ids
    for token, token_id in zip(SPECIAL_TOKENS, ids):
        assert tokenizer(token)["input_ids"] == [token_id]
        assert token_id in tokenizer(f"a{token}b")["input_ids"]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.mask_token) == (
        BOS, EOS, EOS, MASK)
    assert tokenizer("hi")["input_ids"] == tokenizer("hi", add_special_tokens=False)["input_ids"]
    assert not {tokenizer.bos_token_id, tokenizer.eos_token_id} & set(tokenizer("hi")["input_ids"])
    chat = ChatTokenizer(tokenizer)  # the templating code accepts it without adding tokens
    assert len(chat.tokenizer) == len(tokenizer)


def test_decode_gives_back_the_text(synth, tokenizer):
    texts = corpus_texts(synth / "corpus")
    assert "assistant" in texts and " /no_think" in texts and len(texts) > 3 * N_TRAIN
    tricky = [" leading space", "two\n\nlines,\tpunctuation!? (ok) 'quote'", "  x  ", "naïve → ü"]
    for text in texts + tricky:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    # The corpus vocabulary is learnt: every answer word is one token.
    for word in (*COLOURS, *KINDS, *POSITIONS):
        assert len(tokenizer(word)["input_ids"]) == 1, word


def test_tokenizer_reloads_offline_within_its_vocab_size(synth, tmp_path, monkeypatch):
    from transformers import AutoTokenizer
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reloaded = AutoTokenizer.from_pretrained(str(synth / "tokenizer"), local_files_only=True)
    assert len(reloaded) <= 512
    small = train_tokenizer(corpus_texts(synth / "corpus"), tmp_path / "small", vocab_size=300)
    small_tok = AutoTokenizer.from_pretrained(str(small), local_files_only=True)
    assert 256 + len(SPECIAL_TOKENS) <= len(small_tok) <= 300
    assert small_tok.convert_tokens_to_ids(IMAGE) == reloaded.convert_tokens_to_ids(IMAGE)
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["x"], tmp_path / "tiny", vocab_size=100)
