"""Takedown lists: what a recipe reads from one, what the plan refuses, which keys change.
The request/rerun/status path through MLflow and a real rerun is in
tests/integration/test_pipeline.py (test_pipeline_lineage_and_reruns)."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from lladav import takedown as td
from lladav.config import load_pipeline, load_recipe
from lladav.data.build import ScanResults, _dedup, check_accounting, plan as plan_build
from lladav.pipeline import plan

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))
from pipeline_files import write_pipeline  # noqa: E402


def write_list(path: Path, *entries: dict) -> None:
    full = [td.Entry(id=f"td-{i}", requested="2026-12-08T03:40:00Z", **e)
            for i, e in enumerate(entries)]
    path.write_bytes(td.list_bytes(full))


def corpus(tmp_path: Path, n: int = 6) -> Path:
    records = [{"id": f"r{i}", "conversations": [{"from": "human", "value": f"question {i}?"},
                                                 {"from": "gpt", "value": f"answer {i}"}]}
               for i in range(n)]
    path = tmp_path / "qa.json"
    path.write_text(json.dumps(records))
    return path


def recipe_file(tmp_path: Path, takedowns: str | None, weight: float = 1.0) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "name": "mix", "tokenizer": "unused", "dedup": False,
        **({"takedowns": takedowns} if takedowns else {}),
        "sources": [{"name": "qa", "kind": "llava_json", "location": str(corpus(tmp_path)),
                     "weight": weight},
                    {"name": "other", "kind": "llava_json", "location": str(corpus(tmp_path))}]}))
    return path


def test_a_recipe_reads_its_sources_entries_and_a_missing_list_is_empty(tmp_path):
    listed = tmp_path / "takedowns.yaml"
    assert load_recipe(recipe_file(tmp_path, "takedowns.yaml")).taken_down == {}
    write_list(listed, {"source": "qa", "records": ["r3", "r1"]},
               {"source": "qa", "records": ["r1", "r4"]},
               {"source": "elsewhere", "records": ["r0"]})
    recipe = load_recipe(recipe_file(tmp_path, "takedowns.yaml"))
    assert recipe.takedowns == str(listed)                     # relative to the recipe's folder
    assert recipe.taken_down == {"qa": ["r1", "r3", "r4"]}     # only this recipe's sources
    identity = recipe.identity()
    assert identity["taken_down"] == {"qa": ["r1", "r3", "r4"]} and "takedowns" not in identity


def test_a_bad_list_names_the_file(tmp_path):
    bad = tmp_path / "takedowns.yaml"
    bad.write_text("format: something-else\n")
    with pytest.raises(td.TakedownError, match=r"takedowns.yaml: not a takedown list"):
        td.read_list(str(bad))
    bad.write_text(f"format: {td.LIST_FORMAT}\ntakedowns:\n- source: qa\n")
    with pytest.raises(td.TakedownError, match="invalid takedown list"):
        td.read_list(str(bad))


@pytest.mark.parametrize("weight", [1.0, 2.5])
def test_the_plan_refuses_taken_down_records_unread_and_the_counts_add_up(tmp_path, weight):
    write_list(tmp_path / "takedowns.yaml", {"source": "qa", "records": ["r2", "r5", "nope"]})
    recipe = load_recipe(recipe_file(tmp_path, "takedowns.yaml", weight))
    the_plan = plan_build(recipe)
    planned = [(e.ref.source, e.ref.record_id) for e in the_plan.entries[:]]
    assert ("qa", "r2") not in planned and ("qa", "r5") not in planned
    assert ("other", "r2") in planned                          # another source's r2 stays
    assert [(r.source, r.record_id) for r in the_plan.taken_down] == [("qa", "r2"), ("qa", "r5")]
    survivors, rejects = _dedup(recipe, the_plan, ScanResults(len(the_plan)))
    refused = [r for r in rejects if r["reason"] == "takedown"]
    assert [(r["source"], r["source_id"]) for r in refused] == [("qa", "r2"), ("qa", "r5")]
    samples = Counter(the_plan.selected())
    check_accounting(recipe, the_plan, samples, rejects)       # raises if a record went missing
    assert the_plan.records["qa"] == 6 and samples["qa"] == round(4 * weight)


def test_a_takedown_rekeys_the_builds_over_its_source_and_what_follows_them(tmp_path, synth_dir):
    path = write_pipeline(tmp_path / "p", synth_dir, storage=str(tmp_path / "store"),
                          tracking_uri=None)
    data = yaml.safe_load(path.read_text())
    data["takedowns"] = "takedowns.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    before = {p.name: p.key for p in plan(load_pipeline(path))}
    listed = path.parent / "takedowns.yaml"
    write_list(listed, {"source": "reasoning", "records": ["x"]})
    after = {p.name: p for p in plan(load_pipeline(path))}
    assert {k for k in before if before[k] != after[k].key} == {"mix-stage3", "stage3", "eval"}
    assert after["mix-stage3"].config.taken_down == {"reasoning": ["x"]}
    assert after["mix-stage2"].config.taken_down == {}
    write_list(listed, {"source": "qa", "records": ["y"]})     # a list is read again at each plan
    again = {p.name: p.key for p in plan(load_pipeline(path))}
    assert {k for k in before if before[k] != again[k]} == {"mix-stage2", "stage2", "stage3", "eval"}


def test_a_takedown_is_complete_only_when_rebuilt_and_nothing_since_holds_or_read_it():
    from lladav.lineage import TraceHit

    entry = td.Entry(id="td-1", source="qa", records=["r1"], requested="2026-12-08T03:40:00Z")
    assert entry.requested_ms == 1796701200000
    old = TraceHit("s3://b/e1", "stage2", "run1", "FINISHED", "read 1 sample", 1,
                   superseded="takedown td-1 of 2026-12-08 03:40 UTC")
    late = TraceHit("s3://b/e2", "stage2", "run2", "FINISHED", "read 1 sample", 1)
    mixture = {"uri": "s3://b/m", "kind": "data", "step": "mix", "run_id": "r", "start_time": 0,
               "samples": 0, "taken_down": 1, "mixtures": []}
    assert not td.Status(entry).complete                                   # not rebuilt yet
    assert td.Status(entry, rebuilt=[mixture], superseded_exports=[old]).complete
    assert not td.Status(entry, rebuilt=[mixture], still_holding=[mixture]).complete
    assert not td.Status(entry, rebuilt=[mixture], superseded_exports=[old, late]).complete
    assert td.Status(entry, rebuilt=[mixture]).to_json()["complete"] is True


def test_a_takedown_with_copies_refuses_the_image_in_every_source(tmp_path):
    from lladav.data.build import Scanned

    taken = (0x0123456789ABCDEF, 0x0FEDCBA987654321)
    near = (taken[0] ^ 0b1011, taken[1] ^ 0b1)                  # 3 and 1 bits away: a copy
    far = (taken[0] ^ 0xFFFF, taken[1])                         # 16 bits away: another image
    write_list(tmp_path / "takedowns.yaml", {"source": "qa", "records": ["r0"],
                                             "images": [f"{taken[0]:016x}{taken[1]:016x}"]})
    recipe = load_recipe(recipe_file(tmp_path, "takedowns.yaml"))
    assert recipe.taken_down == {"qa": ["r0"]}
    assert recipe.taken_down_images == [f"{taken[0]:016x}{taken[1]:016x}"]
    assert "taken_down_images" in recipe.identity()
    the_plan = plan_build(recipe)
    results = ScanResults(len(the_plan))
    image_of = {("qa", "r3"): [far, near], ("other", "r1"): [near], ("other", "r4"): [far]}
    results.add([Scanned(e.index, key=bytes([e.index % 256]) * 16,
                         phash=b"".join(a.to_bytes(8, "big") + b.to_bytes(8, "big")
                                        for a, b in image_of.get((e.ref.source, e.ref.record_id), [])))
                 for e in the_plan.entries[:]])
    survivors, rejects = _dedup(recipe.model_copy(update={"dedup": False}), the_plan, results)
    refused = {(r["source"], r["source_id"]) for r in rejects if r["reason"] == "takedown"}
    assert refused == {("qa", "r0"), ("qa", "r3"), ("other", "r1")}   # r3: its second image
    kept = {(e.ref.source, e.ref.record_id) for e in the_plan.take(survivors)}
    assert ("other", "r4") in kept and len(kept) == 12 - 3
