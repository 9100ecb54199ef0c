"""Evaluation on any test set: the scoring modes, the counts and tables, that samples are the
sampler's answers to the training-format prompt, and clear errors for bad test sets."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from lladav.evaluate import (OTHER, TestSetError, check_test_set, evaluate, final_answer, score,
                             score_answer, summarize)
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
def test_exact_scoring(text, expected, correct):
    assert score_answer(text, expected) is correct


@pytest.mark.parametrize("text, expected, choices, correct", [
    ("B", "B", None, True),
    ("(b)", "B", None, True),
    ("B. circle", "B", None, True),
    ("A", "B", None, False),
    ("circle", "B", ["square", "circle"], True),       # the option's text
    ("B", "circle", ["square", "circle"], True),       # the expected option's text
    ("square", "circle", ["square", "circle"], False),
    ("because", "B", None, False),                     # not a letter on its own
])
def test_choice_scoring(text, expected, choices, correct):
    assert score(text, expected, "choice", choices)[0] is correct


def test_contains_and_regex_scoring():
    assert score("It is a red circle.", "red circle", "contains")[0]
    assert not score("It is a reddish circle.", "red", "contains")[0]   # whole words only
    assert score("42 apples", r"^\d+ apples?$", "regex")[0]
    assert not score("many apples", r"^\d+ apples?$", "regex")[0]
    with pytest.raises(ValueError, match="unknown scoring"):
        score("a", "a", "fuzzy")


def test_final_answer_takes_what_follows_the_last_answer_marker():
    assert final_answer("Answer: left. Answer: Right.") == "right"


def test_counts_chance_groups_and_samples_are_the_samplers_answers(export, synth_dir):
    heldout_path = synth_dir / "corpus" / "heldout.json"
    heldout = json.loads(heldout_path.read_text())
    seen = []
    result = evaluate(export, str(heldout_path), SETTINGS, tag="/no_think", group_by="factor",
                      progress=lambda phase, done, total: seen.append((phase, done, total)))
    assert result.n == len(heldout) == 9 and seen[-1] == ("eval", 9, 9) and len(seen) == 9
    assert result.chance == pytest.approx(1 / 3)  # every record has 3 choices
    assert result.accuracy == sum(s["correct"] for s in result.samples) / 9
    for factor in ("colour", "kind", "position"):
        mine = [s["correct"] for s in result.samples if s["group"] == factor]
        assert len(mine) == 3 and result.by_group[factor] == sum(mine) / 3
    assert sum(n for row in result.confusion.values() for n in row.values()) == 9
    model, tok = load(export)
    for record, sample in zip(heldout, result.samples):
        # the expected answer is the record's last turn, not its synthetic `answer` field
        assert sample["expected"] == record["conversations"][-1]["value"] == record["answer"]
        assert sample["image"].endswith(record["image"]) and Path(sample["image"]).is_file()
        assert sample["question"] == record["conversations"][0]["value"]
        image = Image.open(sample["image"]).convert("RGB")
        direct = answer(model, tok, [image], record["conversations"][:1], SETTINGS, tag="/no_think")
        assert sample["answer"] == direct.text
        assert sample["forward_passes"] == direct.forward_passes <= SETTINGS.steps
        assert sample["correct"] == score_answer(direct.text, record["answer"])

    limited = evaluate(export, str(heldout_path), SETTINGS, limit=4)
    assert limited.n == 4 and [s["id"] for s in limited.samples] == [r["id"] for r in heldout[:4]]
    assert not limited.by_group


def test_accuracy_counts_exactly_the_answers_that_match(export, synth_dir, tmp_path):
    # Rewrite the expected answers (the last turns): the model's own answer for the first three
    # records, a word it cannot say for the rest. Accuracy must be exactly 3/9, whatever the
    # random model says; the records keep no `answer` or `choices` field, like a user's file.
    corpus = tmp_path / "corpus"
    shutil.copytree(synth_dir / "corpus", corpus)
    first = evaluate(export, str(corpus / "heldout.json"), SETTINGS)
    records = json.loads((corpus / "heldout.json").read_text())
    plain = []
    for i, (record, sample) in enumerate(zip(records, first.samples)):
        last = final_answer(sample["answer"]) if i < 3 else "no-such-word"
        plain.append({"id": record["id"], "image": record["image"], "conversations": [
            record["conversations"][0], {"from": "gpt", "value": last}]})
    (corpus / "test.jsonl").write_text("\n".join(json.dumps(r) for r in plain) + "\n")
    second = evaluate(export, str(corpus / "test.jsonl"), SETTINGS)
    assert [s["correct"] for s in second.samples] == [True] * 3 + [False] * 6
    assert second.accuracy == pytest.approx(3 / 9)
    classes = {final_answer(r["conversations"][-1]["value"]) for r in plain}
    assert second.chance == pytest.approx(1 / len(classes))  # no choices: uniform over answers
    assert second.by_class["no-such-word"] == 0.0


def test_the_confusion_table_counts_expected_against_predicted():
    samples = [{"expected": e, "prediction": p, "correct": e == p, "choices": None, "group": None}
               for e, p in [("cat", "cat"), ("cat", "dog"), ("dog", "dog"), ("dog", "cow"),
                            ("dog", "dog")]]
    result = summarize(samples)
    assert result.confusion == {"cat": {"cat": 1, "dog": 1}, "dog": {OTHER: 1, "dog": 2}}
    assert result.by_class == {"cat": 0.5, "dog": pytest.approx(2 / 3)}
    assert result.chance == 0.5 and result.accuracy == 0.6


def _write(path: Path, records: list) -> str:
    path.write_text(json.dumps(records))
    return str(path)


def test_a_bad_test_set_is_one_clear_error_naming_file_and_record(tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (16, 16)).save(image)
    good = {"id": "ok", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "black"}]}
    assert check_test_set(_write(tmp_path / "good.json", [good, good])) == 2

    with pytest.raises(TestSetError, match=r"missing\.json"):
        check_test_set(str(tmp_path / "missing.json"))
    no_answer = dict(good, id="r7", conversations=good["conversations"][:1])
    with pytest.raises(TestSetError, match=r"no-answer\.json.*'r7'.*no assistant turn"):
        check_test_set(_write(tmp_path / "no-answer.json", [good, no_answer]))
    (tmp_path / "broken.json").write_text(json.dumps([good])[:-1] + ', {"id": "x", "conv')
    with pytest.raises(TestSetError, match=r"broken\.json: byte \d+: Unterminated string.*at record 2 of the test set"):
        check_test_set(str(tmp_path / "broken.json"))
    (tmp_path / "lines.jsonl").write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(TestSetError, match=r"lines\.jsonl.*record 2 cannot be parsed.*line 2"):
        check_test_set(str(tmp_path / "lines.jsonl"))
    bad_choices = dict(good, id="c1", choices="abc")
    with pytest.raises(TestSetError, match=r"'c1'.*`choices` must be a non-empty list"):
        check_test_set(_write(tmp_path / "choices.json", [bad_choices]))
    two_marks = dict(good, id="m2", conversations=[
        {"from": "human", "value": "<image> <image> What?"}, {"from": "gpt", "value": "x"}])
    with pytest.raises(TestSetError, match=r"'m2'.*image_count_mismatch"):
        check_test_set(_write(tmp_path / "marks.json", [two_marks]))
    with pytest.raises(TestSetError, match=r"'ok'.*not a valid regular expression"):
        check_test_set(_write(tmp_path / "re.json", [dict(good, conversations=[
            good["conversations"][0], {"from": "gpt", "value": "(unclosed"}])]), scoring="regex")
    with pytest.raises(TestSetError, match="no records"):
        check_test_set(_write(tmp_path / "empty.json", []))


def test_a_missing_image_names_its_record(export, tmp_path):
    record = {"id": "lost", "image": "nowhere.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]}
    with pytest.raises(TestSetError, match=r"'lost'.*nowhere\.png"):
        evaluate(export, _write(tmp_path / "t.json", [record]), SETTINGS)


def test_parquet_test_sets_read_like_json(export, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 10, 10)).save(buf, format="PNG")
    table = pa.Table.from_pylist([{"id": f"p{i}", "image": {"bytes": buf.getvalue()},
                                   "conversations": [{"from": "human", "value": "Colour?"},
                                                     {"from": "gpt", "value": "red"}]}
                                  for i in range(3)])
    pq.write_table(table, tmp_path / "test.parquet")
    result = evaluate(export, str(tmp_path / "test.parquet"), SETTINGS)
    assert result.n == 3 and [s["expected"] for s in result.samples] == ["red"] * 3
