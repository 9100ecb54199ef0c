"""The chat templates against hand-written expectations built from the reference's rules."""

import numpy as np
import pytest

from lladav.data.conversation import (ANSWER_TARGET, BOS, EOT, IMAGE_PLACEHOLDER_ID, NOT_TARGET,
                                      SYSTEM_PROMPT, TEMPLATE_TARGET, ChatTokenizer,
                                      ConversationError, Turn, add_tag, normalize_turns,
                                      normalized_text, prompt_ids, tokenize)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer) -> ChatTokenizer:
    return ChatTokenizer.from_folder(tiny_tokenizer)


def enc(tok: ChatTokenizer, text: str) -> list[int]:
    """Plain text (no special tokens inside) through the raw Hugging Face tokenizer."""
    return tok.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_llava_llada_matches_hand_expectation(tok):
    record = [{"from": "human", "value": "What colour is the shape?\n<image>"},
              {"from": "gpt", "value": "red"},
              {"from": "human", "value": "And its kind?"},
              {"from": "gpt", "value": "A circle."}]
    turns = normalize_turns(record, n_images=1)
    # The lone <image> moves to the front of its turn: "<image>\n" + the rest, stripped.
    assert turns[0].text == "<image>\nWhat colour is the shape?"
    out = tokenize(turns, tok, "llava_llada")

    B, SH, EH, E = tok.bos_id, tok.sh_id, tok.eh_id, tok.eot_id
    ids, tgt = [], []

    def add(pieces, target_all):
        for p in pieces:
            ids.append(p)
            tgt.append(1 if target_all or p in (B, SH, EH, E) else 0)

    # system keeps its BOS; every later message drops it.
    add([B, SH, *enc(tok, "system"), EH, *enc(tok, "\n\n" + SYSTEM_PROMPT), E], False)
    add([SH, *enc(tok, "user"), EH, *enc(tok, "\n\n"), IMAGE_PLACEHOLDER_ID,
         *enc(tok, "\nWhat colour is the shape?"), E], False)
    add([SH, *enc(tok, "assistant"), EH, *enc(tok, "\n\nred"), E], True)
    add([SH, *enc(tok, "user"), EH, *enc(tok, "\n\nAnd its kind?"), E], False)
    add([SH, *enc(tok, "assistant"), EH, *enc(tok, "\n\nA circle."), E], True)

    assert out.ids.tolist() == ids
    assert (out.targets != NOT_TARGET).astype(int).tolist() == tgt
    assert out.ids.dtype == np.int32
    # The assistant's own words are ANSWER_TARGET, the rest of its message TEMPLATE_TARGET.
    answer = out.targets == ANSWER_TARGET
    assert tok.decode(out.ids[answer]) == "redA circle."
    assert out.n_answer_tokens == int(answer.sum()) and out.n_targets == sum(tgt)
    assert set(out.ids[(out.targets == TEMPLATE_TARGET)].tolist()) >= {B, SH, EH, E}
    # BOS only at position 0; exactly one placeholder; the placeholder is never a target.
    assert (out.ids == B).sum() == 1 and out.ids[0] == B
    assert out.n_placeholders == 1
    assert out.targets[out.ids == IMAGE_PLACEHOLDER_ID].sum() == 0
    labels = out.labels()
    assert (labels[out.targets == NOT_TARGET] == -100).all()
    assert (labels[out.targets != NOT_TARGET] == out.ids[out.targets != NOT_TARGET]).all()


def test_llada_plain_matches_hand_expectation(tok):
    turns = normalize_turns([{"from": "human", "value": "<image>\nDescribe it. Ignored."},
                             {"from": "gpt", "value": "A red circle."}], n_images=1)
    out = tokenize(turns, tok, "llada_plain")
    expected = [IMAGE_PLACEHOLDER_ID, *enc(tok, "A red circle.\n")]
    assert out.ids.tolist() == expected
    assert (out.targets != NOT_TARGET).astype(int).tolist() == [0] + [1] * (len(expected) - 1)
    assert tok.decode(out.ids[out.targets == ANSWER_TARGET]) == "A red circle."
    assert tok.decode(out.ids[out.targets == TEMPLATE_TARGET]) == "\n"
    assert tok.bos_id not in out.ids  # no BOS, no headers, no system prompt


def test_text_only_record_has_no_placeholder(tok):
    turns = normalize_turns([{"from": "human", "value": "Name a colour."},
                             {"from": "gpt", "value": "blue"}], n_images=0)
    out = tokenize(turns, tok, "llava_llada")
    assert out.n_placeholders == 0
    with pytest.raises(ConversationError, match="llada_plain needs exactly one image"):
        tokenize(turns, tok, "llada_plain")


def test_leading_assistant_turn_dropped_and_missing_placeholder_added():
    turns = normalize_turns([{"from": "gpt", "value": "stray"},
                             {"from": "human", "value": "What is it?"},
                             {"from": "gpt", "value": "a square"}], n_images=2)
    assert [t.role for t in turns] == ["user", "assistant"]
    assert turns[0].text == "<image> <image>\nWhat is it?"


@pytest.mark.parametrize("conversations, code", [
    ([{"from": "human", "value": "hello?"}], "no_assistant_turn"),
    ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "   "}], "no_assistant_turn"),
    ("not a list", "malformed_record"),
    ([{"from": "alien", "value": "x"}, {"from": "gpt", "value": "y"}], "malformed_record"),
    ([{"from": "human"}, {"from": "gpt", "value": "y"}], "malformed_record"),
])
def test_bad_conversations_name_their_reason(conversations, code):
    with pytest.raises(ConversationError) as err:
        normalize_turns(conversations, n_images=0)
    assert err.value.code == code


def test_placeholder_count_must_match_images():
    with pytest.raises(ConversationError) as err:
        normalize_turns([{"from": "human", "value": "<image> <image> two?"},
                         {"from": "gpt", "value": "one"}], n_images=1)
    assert err.value.code == "image_count_mismatch"


def test_tags_go_on_drawn_user_turns_only():
    turns = [Turn("user", "a"), Turn("assistant", "b"), Turn("user", "c"), Turn("assistant", "d")]
    tagged = add_tag(turns, "/think", [False, True])
    assert [t.text for t in tagged] == ["a", "b", "c /think", "d"]


def test_normalized_text_ignores_case_and_spacing_not_roles():
    a = [Turn("user", "What  colour?"), Turn("assistant", "Red")]
    b = [Turn("user", "what colour? "), Turn("assistant", "red")]
    c = [Turn("assistant", "what colour?"), Turn("user", "red")]
    assert normalized_text(a) == normalized_text(b)
    assert normalized_text(a) != normalized_text(c)


def test_inference_prompt_ends_with_assistant_header(tok):
    ids = prompt_ids("<image>\nWhat colour?", tok)
    tail = [tok.sh_id, *enc(tok, "assistant"), tok.eh_id, *enc(tok, "\n\n")]
    assert ids[-len(tail):].tolist() == tail
    assert ids[0] == tok.bos_id and (ids == IMAGE_PLACEHOLDER_ID).sum() == 1
    assert ids[-len(tail) - 1] == tok.eot_id


def test_a_multi_turn_prompt_is_the_training_sequence_up_to_the_last_answer(tok):
    """What the eval asks is exactly what training saw before the answer: the earlier turns and
    answers, the question, the assistant header; a tag is appended to every user turn."""
    messages = [{"from": "human", "value": "<image>\nWhat colour is it?"},
                {"from": "gpt", "value": "red"},
                {"from": "human", "value": "And its kind?"},
                {"from": "gpt", "value": "circle"}]
    def last_answer_start(out) -> int:
        last_header = np.flatnonzero(out.ids == tok.eh_id)[-1]
        return int(last_header + np.argmax(out.targets[last_header:] == ANSWER_TARGET))

    messages[3]["value"] = "a red circle, twice as wide"  # several answer tokens
    full = tokenize(normalize_turns(messages, 1), tok, "llava_llada")
    assert prompt_ids(messages[:3], tok, 1).tolist() == full.ids[:last_answer_start(full)].tolist()
    tagged = [dict(m, value=m["value"] + " /no_think") if m["from"] == "human" else m
              for m in messages]
    full = tokenize(normalize_turns(tagged, 1), tok, "llava_llada")
    assert (prompt_ids(messages[:3], tok, 1, tag="/no_think").tolist()
            == full.ids[:last_answer_start(full)].tolist())
