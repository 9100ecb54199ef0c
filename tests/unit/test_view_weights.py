"""Mixture views without a build: the weight rule, weight names, and view steps in a pipeline."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from lladav.config import ConfigError, load_pipeline, parse_pipeline
from lladav.data.views import ViewError, resolve_weights, seeded_draws, weighted_copies
from lladav.pipeline import plan

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))
from pipeline_files import write_pipeline  # noqa: E402

KEYS = [f"{i:09d}" for i in range(101)]


@pytest.mark.parametrize("weight", [0.0, 0.3, 0.5, 1.0, 2.0, 2.5, 3.7, 100.0])
@pytest.mark.parametrize("n", [0, 1, 7, 101])
def test_copies_are_exactly_floor_plus_a_rounded_fraction(weight, n):
    copies = weighted_copies(KEYS[:n], weight, 0, "mix", "qa")
    whole = math.floor(weight)
    assert copies.sum() == whole * n + round((weight - whole) * n)
    assert set(copies.tolist()) <= {whole, whole + 1}


def test_the_draw_is_seeded_salted_and_lower_weights_keep_a_subset():
    half = weighted_copies(KEYS, 0.5, 0, "mix", "qa")
    assert np.array_equal(half, weighted_copies(KEYS, 0.5, 0, "mix", "qa"))
    assert not np.array_equal(half, weighted_copies(KEYS, 0.5, 1, "mix", "qa"))
    assert not np.array_equal(half, weighted_copies(KEYS, 0.5, 0, "mix", "captions"))
    # the smallest draws are kept, so 0.3 keeps a subset of what 0.5 keeps, and 1.5 adds to 1
    third = weighted_copies(KEYS, 0.3, 0, "mix", "qa")
    assert np.all(third <= half)
    assert np.array_equal(weighted_copies(KEYS, 1.5, 0, "mix", "qa") - 1, half)


def test_draws_are_the_sha256_of_the_seed_the_salt_and_the_key():
    from lladav.digest import hash_key

    keys = ["000000001", "m0-é\"x-1", ""]
    draws = seeded_draws(keys, 7, "weight", "mix", "qa")
    assert draws.tolist() == [int(hash_key(7, "weight", "mix", "qa", k)[:16], 16) for k in keys]


@pytest.mark.parametrize("weight", [-0.1, 100.5, math.inf, math.nan])
def test_weights_outside_the_range_are_refused(weight):
    with pytest.raises(ViewError, match="finite number in"):
        weighted_copies(KEYS, weight, 0)
    with pytest.raises(ViewError, match="qa="):
        resolve_weights([("mix", ["qa"])], {"qa": weight})


MIXTURES = [("mix-a", ["qa", "captions"]), ("mix-b", ["qa", "reasoning"])]


def test_the_most_specific_weight_name_applies():
    got = resolve_weights(MIXTURES, {"qa": 2.0, "mix-b": 0.5, "mix-b/qa": 3.0})
    assert got == [{"qa": 2.0, "captions": 1.0}, {"qa": 3.0, "reasoning": 0.5}]
    assert resolve_weights(MIXTURES, {}) == [{"qa": 1.0, "captions": 1.0},
                                             {"qa": 1.0, "reasoning": 1.0}]


@pytest.mark.parametrize("mixtures, weights, message", [
    (MIXTURES, {"qaa": 1.0}, "weight 'qaa' names no source or mixture of the view; valid: "
                             "captions, mix-a, mix-a/captions"),
    ([("qa", ["qa"])], {"qa": 1.0}, "names a mixture and a source; write 'qa/<source>'"),
    ([("m", ["a"]), ("m", ["b"])], {"m/a": 1.0}, "two of the view's mixtures are named 'm'"),
])
def test_weight_names_that_match_nothing_or_two_things_are_refused(mixtures, weights, message):
    with pytest.raises(ViewError) as err:
        resolve_weights(mixtures, weights)
    assert message in str(err.value)


# ---- view steps in a pipeline ----------------------------------------------------------------

def base(*steps) -> dict:
    return {"name": "p", "steps": [{"name": "mix", "kind": "data", "recipe": "r.yaml"},
                                   {"name": "s0", "kind": "stage", "stage": "s.yaml", "mixture": "mix"},
                                   *steps]}


@pytest.mark.parametrize("steps, message", [
    ([{"name": "v", "kind": "view", "mixtures": ["s0"]}], "mixtures.0 's0' is a stage step, expected a data step"),
    ([{"name": "v", "kind": "view", "mixtures": ["mix", "later"]}], "mixtures.1 'later' must name an earlier step"),
    ([{"name": "v", "kind": "view", "mixtures": []}], "steps.2.view.mixtures"),
    ([{"name": "v", "kind": "view", "mixtures": ["mix"], "weights": {"qa": -1}}], "steps.2.view.weights.qa"),
    ([{"name": "v", "kind": "view", "mixtures": ["mix"]},
      {"name": "v2", "kind": "view", "mixtures": ["v"]}], "mixtures.0 'v' is a view step, expected a data step"),
])
def test_bad_view_steps_name_the_step_and_the_reason(steps, message):
    with pytest.raises(ConfigError) as err:
        parse_pipeline(base(*steps), "pipe.yaml")
    assert message in str(err.value)


def with_view(path: Path, weights: dict, **view) -> Path:
    """The test pipeline with stage2 reading a view of mix-stage2 and mix-stage3."""
    data = yaml.safe_load(path.read_text())
    steps = data["steps"]
    steps.insert(3, {"name": "mix-view", "kind": "view", "mixtures": ["mix-stage2", "mix-stage3"],
                     "weights": weights, "seed": 0, **view})
    next(s for s in steps if s["name"] == "stage2")["mixture"] = "mix-view"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def files(tmp_path, synth_dir) -> Path:
    path = write_pipeline(tmp_path / "p", synth_dir, storage=str(tmp_path / "store"), tracking_uri=None)
    return with_view(path, {"qa": 2.0, "reasoning": 0.5})


def test_a_weight_change_rekeys_the_view_and_its_stages_but_no_build(files):
    steps = {p.name: p for p in plan(load_pipeline(files))}
    view, stage2 = steps["mix-view"], steps["stage2"]
    assert view.config.mixtures == [storage_mixture(steps, "mix-stage2"), storage_mixture(steps, "mix-stage3")]
    assert stage2.config.mixture == storage_mixture(steps, "mix-view")
    with_weights = {p.name: p.key for p in steps.values()}
    data = yaml.safe_load(files.read_text())
    data["steps"][3]["weights"]["reasoning"] = 0.25
    files.write_text(yaml.safe_dump(data, sort_keys=False))
    after = {p.name: p.key for p in plan(load_pipeline(files))}
    assert {k for k in after if after[k] != with_weights[k]} == {"mix-view", "stage2", "stage3", "eval"}


def storage_mixture(steps: dict, name: str) -> str:
    from lladav import storage

    return storage.join(steps[name].folder, "mixture")


def test_a_view_over_mixtures_for_different_towers_fails_the_plan(files):
    recipe = files.parent / "mix_stage3.yaml"
    data = yaml.safe_load(recipe.read_text())
    data["vision"] = {"tile_size": 64, "patch_size": 8, "max_grid": 2}
    recipe.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"view step mix-view: .*mix-stage3.* 64 px tiles .*"
                                          r"mix-stage2.* 32 px tiles"):
        plan(load_pipeline(files))
