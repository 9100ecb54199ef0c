"""Scoring an export on any test set: `lladav eval` and the pipeline's eval step.

    test set (LLaVA .json/.jsonl or .parquet, images resolved as the build resolves them)
    --read_test_set--> TestRecords: the conversation up to its last assistant turn, and that
    turn as the expected answer --answer (sampler)--> text --score--> EvalResult

A test set needs no fields of its own: any LLaVA record whose last assistant turn is the right
answer will do (earlier turns stay in the prompt as context). `choices` (a list of options) is
optional: it gives the chance level and lets `choice` scoring map letters to options. Images go
through the build's readers (data/sources.py: safe paths under the image root) and the model's
own tiling, as in training.

Scoring modes (`score`), all on the final answer (the text after a reasoning answer's last
"Answer:", stripped of whitespace and a final full stop, case-folded):
    exact     the final answer equals the expected one ("Red." is right for "red"; "red or blue"
              is not)
    choice    multiple choice: the answer's option letter ("B", "(B)", "B." or the option's text
              when `choices` are given) equals the expected letter (or the expected option's)
    contains  the expected answer appears in the answer as whole words
    regex     the expected answer is a regular expression the final answer must match (search)

`EvalResult.by_class` is the accuracy per expected answer, `confusion` counts (expected,
predicted) pairs, predictions outside the expected answers counted as "(other)".

Owns: reading and checking test sets, prompts, the scoring rules, the per-sample records and
tables a pipeline logs. Does not own: sampling (sampler.py, inference.py), the corpus readers
(data/sources.py) or MLflow (pipeline.py logs what this returns).
"""

from __future__ import annotations

import io
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from lladav import Progress
from lladav.inference import SamplerSettings

SCORING = ("exact", "choice", "contains", "regex")
NO_ANSWER = ("no assistant turn to score against (the expected answer is the record's last "
             "`gpt` turn)")
OTHER = "(other)"


class TestSetError(ValueError):
    """A test set that cannot be evaluated; the message names the file, the record and why."""

    __test__ = False  # not a pytest class


@dataclass(frozen=True)
class TestRecord:
    """One question of a test set."""

    __test__ = False

    id: str
    location: str                      # where it was read: file#byte=..., file#row=...
    prompt: list[dict[str, str]]       # LLaVA messages up to (not including) the last answer
    expected: str
    choices: list[str] | None
    fields: dict[str, Any]             # the record's other top-level fields
    ref: Any                           # sources.RecordRef, to read the images back


@dataclass
class EvalResult:
    accuracy: float
    n: int
    chance: float
    """Mean 1/len(choices) when every record has choices, else 1/(distinct expected answers)."""
    by_class: dict[str, float] = field(default_factory=dict)
    """Accuracy per expected answer (normalized)."""
    by_group: dict[str, float] = field(default_factory=dict)
    """Accuracy per value of the `group_by` field, when one was asked for."""
    confusion: dict[str, dict[str, int]] = field(default_factory=dict)
    """expected -> predicted -> count (predictions outside the expected answers: "(other)")."""
    samples: list[dict[str, Any]] = field(default_factory=list)
    """Per record: id, location, prompt, answer (the model's text), prediction (its scored
    form), expected, correct, choices, forward_passes, the group value."""


# ---- scoring ------------------------------------------------------------------------------------

def final_answer(text: str) -> str:
    """The part of an answer that is scored: after the last "Answer:", case-folded, stripped of
    whitespace and a final full stop."""
    tail = text.rsplit("Answer:", 1)[-1]
    return tail.strip().casefold().removesuffix(".").strip()


_LETTER = re.compile(r"^\(?([A-Za-z])[\).:]?(?:\s|$)")


def _choice_letter(text: str, choices: list[str] | None) -> str | None:
    """'B', '(b)', 'B.' or 'B) circle' -> 'B'; an option's own text -> its letter."""
    stripped = text.strip()
    if choices:
        for i, option in enumerate(choices):
            if final_answer(stripped) == final_answer(option):
                return chr(ord("A") + i)
    match = _LETTER.match(stripped)
    return match.group(1).upper() if match else None


def score(answer: str, expected: str, mode: str = "exact",
          choices: list[str] | None = None) -> tuple[bool, str]:
    """(correct, the prediction as scored) under `mode` (see the module docstring)."""
    if mode == "exact":
        return final_answer(answer) == final_answer(expected), final_answer(answer)
    if mode == "choice":
        got, want = _choice_letter(final_answer(answer), choices), _choice_letter(expected, choices)
        return got is not None and got == want, got or final_answer(answer)
    if mode == "contains":
        words = re.escape(final_answer(expected))
        found = re.search(rf"(?<!\w){words}(?!\w)", answer.casefold()) is not None
        return found, final_answer(answer)
    if mode == "regex":
        return re.search(expected, final_answer(answer)) is not None, final_answer(answer)
    raise ValueError(f"unknown scoring {mode!r}; expected one of {SCORING}")


def score_answer(text: str, expected: str) -> bool:
    """Exact scoring (the default)."""
    return score(text, expected)[0]


# ---- reading a test set -------------------------------------------------------------------------

def _test_source(uri: str, image_root: str | None) -> Any:
    from lladav.data.sources import SourceError, corpus_source

    try:
        return corpus_source(uri, name="test", image_root=image_root)
    except SourceError as e:
        raise TestSetError(str(e)) from None


def read_test_set(uri: str, *, image_root: str | None = None, limit: int | None = None,
                  scoring: str = "exact") -> Iterator[TestRecord]:
    """The records of a test set, checked one by one: a missing file, a record that cannot be
    parsed, has no assistant turn to score against, has placeholders that do not match its
    images, or (regex scoring) an invalid pattern raises TestSetError naming the file, the record
    and the reason. Storage that cannot be reached raises storage.StorageError or
    storage.BucketNotFound. Images are not read here."""
    from lladav.data import RecordError
    from lladav.data.conversation import normalize_turns
    from lladav.data.sources import SourceError, Unreadable, enumerate_source, load_record
    from lladav.storage import BucketNotFound

    source = _test_source(uri, image_root)
    n = 0
    try:
        for ref in enumerate_source(source):
            if limit is not None and n >= limit:
                return
            if isinstance(ref, Unreadable):
                raise TestSetError(f"{ref.location}: record {n + 1} cannot be parsed: {ref.detail}")
            where = f"{ref.location} (record {ref.record_id!r})"
            try:
                record = load_record(source, ref, with_images=False)
                normalize_turns(record.conversations, len(record.images))
            except RecordError as e:
                if e.code == "no_assistant_turn":
                    raise TestSetError(f"{where}: {NO_ANSWER}") from None
                raise TestSetError(f"{where}: {e.code}: {e.detail}") from None
            messages = record.conversations
            last = max((i for i, m in enumerate(messages)
                        if str(m.get("from", "")).lower() in ("gpt", "assistant")), default=None)
            if last is None or not messages[last]["value"].strip():
                raise TestSetError(f"{where}: {NO_ANSWER}")
            if not any(str(m.get("from", "")).lower() in ("human", "user") for m in messages[:last]):
                raise TestSetError(f"{where}: no question before the expected answer")
            choices = record.fields.get("choices")
            if choices is not None and not (isinstance(choices, list) and choices
                                            and all(isinstance(c, str) for c in choices)):
                raise TestSetError(f"{where}: `choices` must be a non-empty list of strings")
            expected = messages[last]["value"].strip()
            if scoring == "regex":
                try:
                    re.compile(expected)
                except re.error as e:
                    raise TestSetError(f"{where}: the expected answer is not a valid regular "
                                       f"expression for regex scoring: {e}") from None
            n += 1
            yield TestRecord(ref.record_id, ref.location, messages[:last], expected, choices,
                             record.fields, ref)
    except BucketNotFound:
        raise  # storage this machine does not see, like StorageError: not the test set's fault
    except SourceError as e:  # names the file and byte already
        raise TestSetError(f"{e} (at record {n + 1} of the test set)") from None
    except FileNotFoundError as e:
        raise TestSetError(f"{uri}: {e}") from None
    if n == 0:
        raise TestSetError(f"{uri}: no records to evaluate")


def check_test_set(uri: str, *, image_root: str | None = None, limit: int | None = None,
                   scoring: str = "exact") -> int:
    """Read and check every record (none is kept in memory); returns how many there are."""
    return sum(1 for _ in read_test_set(uri, image_root=image_root, limit=limit, scoring=scoring))


# ---- evaluating -----------------------------------------------------------------------------------

def evaluate(export: str, test_set: str, settings: SamplerSettings | None = None, *,
             image_root: str | None = None, scoring: str = "exact", tag: str | None = None,
             limit: int | None = None, group_by: str | None = None,
             progress: Progress | None = None) -> EvalResult:
    """Answer the first `limit` (default: all) records of `test_set` with the export (folder or
    URI) and score them. progress("eval", done, total) is called after each record."""
    from lladav.data.images import decode_rgb
    from lladav.data.sources import load_record
    from lladav.inference import answer, load

    if scoring not in SCORING:
        raise ValueError(f"unknown scoring {scoring!r}; expected one of {SCORING}")
    total = check_test_set(test_set, image_root=image_root, limit=limit, scoring=scoring)
    model, tok = load(export)
    settings = settings or SamplerSettings(gen_length=8, block_length=8, steps=8)
    source = _test_source(test_set, image_root)
    samples = []
    for i, rec in enumerate(read_test_set(test_set, image_root=image_root, limit=limit,
                                          scoring=scoring)):
        try:
            blobs = load_record(source, rec.ref).images
            images = [decode_rgb(b.data) for b in blobs]
        except Exception as e:  # noqa: BLE001 - a missing or broken image names its record
            raise TestSetError(f"{rec.location} (record {rec.id!r}): image unusable: {e}") from None
        out = answer(model, tok, images, rec.prompt, settings, tag=tag)
        correct, prediction = score(out.text, rec.expected, scoring, rec.choices)
        samples.append({"id": rec.id, "location": rec.location,
                        "image": blobs[0].location if blobs else None,
                        "question": rec.prompt[-1]["value"], "answer": out.text,
                        "prediction": prediction, "expected": rec.expected, "correct": correct,
                        "choices": rec.choices, "forward_passes": out.forward_passes,
                        "group": None if group_by is None else rec.fields.get(group_by)})
        if progress is not None:
            progress("eval", i + 1, total)
    return summarize(samples, scoring)


def summarize(samples: list[dict[str, Any]], scoring: str = "exact") -> EvalResult:
    """Accuracy, chance, per-class and per-group accuracy and the confusion table of samples."""
    n = len(samples)
    expected = [_class_of(s["expected"], scoring, s["choices"]) for s in samples]
    classes = set(expected)
    if all(s["choices"] for s in samples):
        chance = sum(1 / len(s["choices"]) for s in samples) / n
    else:
        chance = 1 / len(classes)
    by_class: dict[str, list[bool]] = defaultdict(list)
    by_group: dict[str, list[bool]] = defaultdict(list)
    confusion: dict[str, Counter] = defaultdict(Counter)
    for s, want in zip(samples, expected):
        by_class[want].append(s["correct"])
        if s["group"] is not None:
            by_group[str(s["group"])].append(s["correct"])
        got = want if s["correct"] else _class_of(s["prediction"], scoring, s["choices"])
        confusion[want][got if got in classes else OTHER] += 1
    return EvalResult(
        accuracy=sum(s["correct"] for s in samples) / n, n=n, chance=chance,
        by_class={k: sum(v) / len(v) for k, v in sorted(by_class.items())},
        by_group={k: sum(v) / len(v) for k, v in sorted(by_group.items())},
        confusion={k: dict(sorted(v.items())) for k, v in sorted(confusion.items())},
        samples=samples)


def _class_of(text: str, scoring: str, choices: list[str] | None) -> str:
    if scoring == "choice":
        return _choice_letter(text, choices) or final_answer(text)
    return final_answer(text)


def confusion_csv(result: EvalResult) -> str:
    """The confusion table as CSV: one row per expected answer, one column per prediction."""
    import csv

    columns = sorted({p for row in result.confusion.values() for p in row})
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["expected \\ predicted", *columns])
    for want, row in result.confusion.items():
        writer.writerow([want, *(row.get(c, 0) for c in columns)])
    return buf.getvalue()
