"""Recipes fail before any work, naming the field; valid ones resolve relative URIs."""

from pathlib import Path

import pytest
import yaml

from lladav.config import ConfigError, Recipe, load_recipe

BASE = {"name": "m", "tokenizer": "tok", "sources": [{"name": "a", "kind": "llava_json",
                                                       "location": "data/a.json"}]}


def write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_valid_recipe_resolves_relative_uris(tmp_path):
    r = load_recipe(write(tmp_path, {**BASE, "output": "s3://bucket/mix"}))
    assert r.sources[0].location == str(tmp_path / "data" / "a.json")
    assert r.tokenizer == str(tmp_path / "tok")
    assert r.output == "s3://bucket/mix"  # URIs with a scheme are left alone
    assert r.image_aspect == "anyres_max_4"
    assert "output" not in r.identity()


@pytest.mark.parametrize("patch, field", [
    ({"samples_per_shrd": 10}, "samples_per_shrd: unknown key"),
    ({"max_length": "long"}, "max_length"),
    ({"sources": [{"name": "a", "kind": "csv", "location": "x"}]}, "sources.0.kind"),
    ({"sources": [{"name": "a", "kind": "parquet", "location": "x", "weight": -1}]}, "sources.0.weight"),
    ({"sources": [{"name": "a", "kind": "parquet", "location": "x", "weight": float("inf")}]},
     "sources.0.weight"),
    ({"sources": [{"name": "a", "kind": "parquet", "location": "x", "weight": float("nan")}]},
     "sources.0.weight"),
    ({"sources": [{"name": "a", "kind": "parquet", "location": "x", "weight": 1e9}]},
     "sources.0.weight: Input should be less than or equal to 100"),
    ({"sources": [{"name": "a", "kind": "parquet", "location": "x", "filters": {"max_turn": 2}}]},
     "sources.0.filters.max_turn: unknown key"),
    ({"template": "chatml"}, "template"),
    ({"tokenizer": 3}, "tokenizer"),
])
def test_invalid_recipe_names_the_field(tmp_path, patch, field):
    with pytest.raises(ConfigError) as err:
        load_recipe(write(tmp_path, {**BASE, **patch}))
    assert field in str(err.value)
    assert "recipe.yaml" in str(err.value)


def test_missing_required_field_and_duplicate_sources(tmp_path):
    with pytest.raises(ConfigError, match="sources: required field is missing"):
        load_recipe(write(tmp_path, {k: v for k, v in BASE.items() if k != "sources"}))
    two = [BASE["sources"][0], BASE["sources"][0]]
    with pytest.raises(ConfigError, match="repeated: a"):
        load_recipe(write(tmp_path, {**BASE, "sources": two}))


def test_recipes_in_the_repository_are_valid():
    recipes = sorted((Path(__file__).parents[2] / "data_recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        assert isinstance(load_recipe(path), Recipe)


def test_recipe_fields_are_pinned():
    """Growing the recipe schema is a reviewed decision: update this list with the change."""
    assert sorted(Recipe.model_fields) == sorted([
        "name", "sources", "template", "tokenizer", "max_length", "samples_per_shard", "seed",
        "dedup", "images", "vision", "output", "max_planned", "near_dedup", "takedowns",
        "taken_down", "taken_down_images"])


STAGE = {"name": "s1", "init": {"flavor": "tiny"}, "mixture": "mix", "output": "out",
         "trainable": {"projector": 1e-3}}


def test_stage_config_resolves_paths_and_checks_its_init(tmp_path):
    from lladav.config import load_stage

    p = tmp_path / "stage.yaml"
    p.write_text(yaml.safe_dump(STAGE))
    s = load_stage(p)
    assert s.mixture == str(tmp_path / "mix") and s.trainable.vision_tower is None
    for bad, field in [({"init": {"flavor": "tiny", "export": "x"}}, "init"),
                       ({"init": {"language_model": "x"}}, "init"),
                       ({"trainable": {}}, "trainable"),
                       ({"trainable": {"projector": -1}}, "trainable.projector"),
                       ({"micro_batch": 0}, "micro_batch"),
                       ({"scaling": {"workers": 2, "gpu": 1}}, "scaling.gpu: unknown key")]:
        p.write_text(yaml.safe_dump({**STAGE, **bad}))
        with pytest.raises(ConfigError) as err:
            load_stage(p)
        assert field in str(err.value), (bad, str(err.value))


def test_a_recipe_without_a_tokenizer_validates_but_does_not_build(tmp_path):
    """A pipeline's tokenizer step may supply it; building without one fails before any work."""
    from lladav.data.build import BuildError, build

    recipe = load_recipe(write(tmp_path, {k: v for k, v in BASE.items() if k != "tokenizer"}))
    assert recipe.tokenizer is None
    with pytest.raises(BuildError, match="no tokenizer.*tokenizer step"):
        build(recipe, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


CONFIG_FIELDS = {
    "SourceFilters": [
        "exclude_ids", "max_turns", "min_response_chars", "require_image", "text_only",
    ],
    "Source": [
        "caption_prompt", "collected", "filters", "image_root", "kind", "license", "location",
        "name", "tag", "tag_probability", "terms", "weight",
    ],
    "ImageLimits": ["max_bytes", "max_pixels", "min_side"],
    "VisionGeometry": ["image_aspect", "max_grid", "max_tiles_area", "patch_size", "tile_size"],
    "NearDedup": ["compare", "max_distance"],
    "StageInit": ["export", "flavor", "language_model", "vision_tower"],
    "Trainable": ["language_model", "projector", "vision_tower"],
    "Scaling": ["cpus_per_worker", "gpus_per_worker", "resources", "workers"],
    "Checkpointing": ["every_steps", "keep", "uri"],
    "EndOfAnswer": ["eos_tokens", "min_eos_tokens", "policy"],
    "Shuffle": ["block_shards", "kind"],
    "ShardCacheSettings": ["folder", "limit_bytes", "prefetch_shards"],
    "Objective": ["complementary", "head_chunk", "t_range"],
    "Packing": ["token_budget", "window"],
    "StageConfig": [
        "adam_eps", "betas", "checkpoint", "deepspeed", "deepspeed_overrides", "end_of_answer",
        "epochs", "grad_accum", "gradient_checkpointing", "gradient_clipping", "group_by_length",
        "init", "loader_workers", "log_every", "max_failures", "max_length", "max_steps",
        "micro_batch", "mixture", "name", "objective", "output", "packing", "precision", "scaling",
        "seed", "shard_cache", "shuffle", "trainable", "warmup_ratio", "weight_decay",
    ],
    "MlflowSettings": ["experiment", "tracking_uri"],
    "OpenLineageSettings": ["enabled", "namespace", "path", "url"],
    "_Step": ["name", "needs"],
    "_CorpusStep": ["corpus", "image_root", "name", "needs", "recipe"],
    "SynthStep": ["base_steps", "kind", "n_heldout", "n_train", "name", "needs", "output", "seed"],
    "TokenizerStep": [
        "corpus", "image_root", "kind", "max_records", "name", "needs", "recipe", "vocab_size",
    ],
    "BaseStep": [
        "caption_turn", "corpus", "flavor", "image_root", "kind", "max_images", "name", "needs",
        "recipe", "seed", "steps", "tokenizer",
    ],
    "DataStep": ["kind", "name", "needs", "overrides", "recipe", "tokenizer"],
    "ViewStep": ["kind", "mixtures", "name", "needs", "seed", "weights"],
    "StageStep": ["base", "init", "kind", "mixture", "name", "needs", "overrides", "stage"],
    "EvalStep": [
        "block_length", "data", "gen_length", "group_by", "image_root", "kind", "limit",
        "min_accuracy", "model", "name", "needs", "prefix_cache", "remasking", "scoring", "steps",
        "suite", "tag", "tasks", "threshold",
    ],
    "PipelineConfig": [
        "forbid_licenses", "mlflow", "name", "openlineage", "ray_address", "steps", "storage",
        "takedowns",
    ],
}
"""Every config model's field set (Recipe's is pinned above): growing or renaming a setting is
a reviewed decision, made here with the change."""


def _config_models() -> list[type]:
    import inspect

    from lladav import config

    return [m for m in vars(config).values() if inspect.isclass(m)
            and issubclass(m, config.StrictModel) and m is not config.StrictModel]


def test_every_config_models_field_set_is_pinned():
    models = {m.__name__: sorted(m.model_fields) for m in _config_models() if m is not Recipe}
    assert models == {name: sorted(fields) for name, fields in CONFIG_FIELDS.items()}


def test_every_config_field_has_a_docstring():
    """config.py says every field is documented (pydantic reads the docstring under it)."""
    missing = [f"{m.__name__}.{name}" for m in _config_models()
               for name, info in m.model_fields.items() if not (info.description or "").strip()]
    assert missing == []
