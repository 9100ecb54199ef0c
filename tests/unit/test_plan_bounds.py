"""Recipe bounds: a plan larger than `max_planned` fails while the sources are enumerated,
before the rest of the corpus is read or any copy is planned."""

import json

import pytest

from lladav.config import Recipe
from lladav.data.build import BuildError, plan


def _recipe(tmp_path, n: int, weight: float, max_planned: int) -> Recipe:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "conversations": []}) + "\n"
                            for i in range(n)))
    return Recipe.model_validate({"name": "r", "tokenizer": "unused", "max_planned": max_planned,
                                  "sources": [{"name": "s", "kind": "llava_json",
                                               "location": str(path), "weight": weight}]})


def test_a_plan_over_max_planned_stops_at_the_first_record_past_it(tmp_path):
    with pytest.raises(BuildError) as err:
        plan(_recipe(tmp_path, 10_000, 20.0, 1_000))
    # 50 records x 20 = 1,000 fit; the 51st passes the ceiling and enumeration stops there.
    assert "max_planned 1000" in str(err.value) and "(51 records x weight 20 so far)" in str(err.value)


def test_a_plan_at_the_ceiling_is_planned_exactly(tmp_path):
    assert len(plan(_recipe(tmp_path, 50, 20.0, 1_000)).entries) == 1_000
