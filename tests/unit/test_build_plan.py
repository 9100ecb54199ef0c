"""The build's plan and dedup as columns (data/build.py): the refs a task gets back are the ones
the readers enumerated, weights give exact copy counts, and the vectorised dedup decides as the
one-record-at-a-time rule does."""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections import Counter

import numpy as np

from lladav.config import Recipe
from lladav.data import build as b
from lladav.data.sources import RecordRef, enumerate_source


def _jsonl(path, n, start=0):
    path.write_text("".join(json.dumps({"id": f"r{i}", "conversations": [
        {"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}]}) + "\n"
        for i in range(start, start + n)))


def _tar(path, n):
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            for ext, data in (("txt", f"caption {i}".encode()), ("json", b"{}")):
                info = tarfile.TarInfo(f"k{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _recipe(sources, **extra):
    return Recipe.model_validate({"name": "r", "tokenizer": "unused", "seed": 5,
                                  "sources": sources, **extra})


def test_plan_entries_give_back_the_enumerated_refs(tmp_path):
    _jsonl(tmp_path / "a.jsonl", 40)
    _tar(tmp_path / "b.tar", 25)
    recipe = _recipe([{"name": "a", "kind": "llava_json", "location": str(tmp_path / "a.jsonl")},
                      {"name": "b", "kind": "webdataset", "location": str(tmp_path / "b.tar")}])
    enumerated = {(r.source, r.ordinal): r for s in recipe.sources for r in enumerate_source(s)
                  if isinstance(r, RecordRef)}
    the_plan = b.plan(recipe)
    entries = the_plan.entries[0:len(the_plan)]
    assert [e.index for e in entries] == list(range(65))
    assert {(e.ref.source, e.ref.ordinal): e.ref for e in entries} == enumerated
    # The order is a seeded shuffle of both sources, not one source after the other.
    assert [e.ref.source for e in entries[:40]].count("b") > 5
    assert the_plan.take([3, 1])[0] == entries[3] and the_plan.entries[1] == entries[1]


def test_weights_give_exact_copy_counts_and_a_stable_order(tmp_path):
    _jsonl(tmp_path / "a.jsonl", 101)
    _jsonl(tmp_path / "b.jsonl", 50, start=1000)
    recipe = _recipe([{"name": "a", "kind": "llava_json", "location": str(tmp_path / "a.jsonl"),
                       "weight": 2.3},
                      {"name": "b", "kind": "llava_json", "location": str(tmp_path / "b.jsonl"),
                       "weight": 0.5}])
    the_plan = b.plan(recipe)
    entries = the_plan.entries[0:len(the_plan)]
    assert the_plan.selected() == Counter({"a": 2 * 101 + round(0.3 * 101), "b": 25})
    per_record = Counter((e.ref.source, e.ref.ordinal) for e in entries)
    assert sorted(Counter(v for (s, _), v in per_record.items() if s == "a").items()) == [(2, 71), (3, 30)]
    assert set(per_record[k] for k in per_record if k[0] == "b") == {1}
    again = b.plan(recipe).entries[0:len(the_plan)]
    assert [(e.ref.location, e.copy) for e in again] == [(e.ref.location, e.copy) for e in entries]
    reseeded = b.plan(recipe.model_copy(update={"seed": 6})).entries[0:len(the_plan)]
    assert [e.ref.location for e in reseeded] != [e.ref.location for e in entries]


def _reference_dedup(entries, results, source_order):
    """The rule, one sample at a time: of the accepted samples with one key, the record first in
    the corpus (source, then ordinal) owns it; the others are its duplicates."""
    owner = {}
    for e in entries:
        if e.index not in results.rejected:
            here = (source_order[e.ref.source], e.ref.ordinal)
            key = results.keys[e.index].tobytes()
            owner[key] = min(owner.get(key, (here, e)), (here, e), key=lambda t: t[0])
    survivors, dups = [], {}
    for e in entries:
        if e.index in results.rejected:
            continue
        first = owner[results.keys[e.index].tobytes()][1]
        if (first.ref.source, first.ref.ordinal) != (e.ref.source, e.ref.ordinal):
            dups[e.index] = (first.ref.location, first.index)
        else:
            survivors.append(e.index)
    return survivors, dups


def test_the_vectorised_dedup_decides_as_the_one_at_a_time_rule(tmp_path):
    _jsonl(tmp_path / "a.jsonl", 300)
    _jsonl(tmp_path / "b.jsonl", 100, start=300)
    recipe = _recipe([{"name": "b", "kind": "llava_json", "location": str(tmp_path / "b.jsonl")},
                      {"name": "a", "kind": "llava_json", "location": str(tmp_path / "a.jsonl"),
                       "weight": 1.7}])
    the_plan = b.plan(recipe)
    entries = the_plan.entries[0:len(the_plan)]
    rng = random.Random(0)
    pool = [rng.randbytes(16) for _ in range(120)]  # few keys: many collisions
    results = b.ScanResults(len(the_plan))
    # copies of a record share its key
    record_key = {(s, o): rng.choice(pool) for s in "ab" for o in range(300)}
    results.add([b.Scanned(e.index, "filtered", "x") if rng.random() < 0.1
                 else b.Scanned(e.index, key=record_key[e.ref.source, e.ref.ordinal]) for e in entries])
    survivors, rejects = b._dedup(recipe, the_plan, results)
    want_survivors, want_dups = _reference_dedup(entries, results, {"b": 0, "a": 1})
    assert survivors.tolist() == want_survivors
    dup_rows = [r for r in rejects if r["reason"] == "duplicate"]
    assert len(dup_rows) == len(want_dups) > 50
    # each names the record it repeats, and that record's key in the manifest (its survivor rank)
    by_location = {(entries[i].ref.location, entries[i].copy):
                   (f"same images and text as {where} (key {want_survivors.index(kept):09d})",
                    f"{want_survivors.index(kept):09d}")
                   for i, (where, kept) in want_dups.items()}
    assert {(r["location"], r["copy"]): (r["detail"], r["duplicate_of"])
            for r in dup_rows} == by_location
    # Rejects come in plan order: scan rejects and duplicates interleaved.
    order = [(r["location"], r["copy"]) for r in rejects]
    plan_pos = {(e.ref.location, e.copy): e.index for e in entries}
    assert [plan_pos[k] for k in order] == sorted(plan_pos[k] for k in order)
    assert len(survivors) + len(rejects) == len(the_plan)
    assert np.all(np.diff(survivors) > 0)
