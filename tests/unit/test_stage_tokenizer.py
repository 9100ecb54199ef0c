"""What stops a stage before Ray starts (train/launch.preflight): the tokenizer folder its
mixture names changed since the build (`lladav train` exits 2 naming both digests), or a sample
longer than the stage's max_length."""

from __future__ import annotations

import json
import re

import yaml
from typer.testing import CliRunner

from lladav.cli import app
from lladav.config import Recipe
from lladav.data.manifest import MANIFEST_SCHEMA, MIXTURE_FORMAT, table_bytes
from lladav.data.tokenizer import tokenizer_digest, train_tokenizer


def fake_mixture(tmp_path, n_tokens: list[int]):
    """A committed mixture's index files by hand (no shards): enough for preflight."""
    tok = train_tokenizer(["a cat sat on a mat", "the dog"], tmp_path / "tok", vocab_size=300)
    recipe = Recipe.model_validate({
        "name": "m", "tokenizer": str(tok), "vision": {"tile_size": 32, "patch_size": 8, "max_grid": 2},
        "sources": [{"name": "s", "kind": "llava_json", "location": "x.json"}]})
    mixture = tmp_path / "mix"
    mixture.mkdir(parents=True)
    (mixture / "mixture.json").write_text(json.dumps({
        "format": MIXTURE_FORMAT, "name": "m", "recipe": recipe.identity(),
        "tokenizer": {"uri": str(tok), "digest": tokenizer_digest(str(tok))}}))
    rows = [{"key": f"{i:09d}", "shard": "shards/shard-000000.tar", "source": "s", "source_id": str(i),
             "n_tokens": n} for i, n in enumerate(n_tokens)]
    (mixture / "manifest.parquet").write_bytes(table_bytes(rows, MANIFEST_SCHEMA))
    stage = tmp_path / "stage.yaml"
    stage.write_text(yaml.safe_dump({
        "name": "s1", "init": {"flavor": "tiny"}, "mixture": str(mixture), "output": str(tmp_path / "out"),
        "trainable": {"projector": 1e-3}, "precision": "fp32", "max_length": 512}))
    return tok, stage


def test_a_sample_longer_than_the_stages_max_length_stops_it(tmp_path):
    import pytest

    from lladav.config import ConfigError, load_stage
    from lladav.train.launch import preflight

    _, stage = fake_mixture(tmp_path, [100, 512, 40])
    preflight(load_stage(stage))                        # 512 <= 512: passes
    with pytest.raises(ConfigError, match="holds a sample of 600 tokens, more than the stage's "
                                          "max_length 512"):
        preflight(load_stage(stage, {"mixture": str(fake_mixture(tmp_path / "b", [600])[1].parent / "mix")}))


def test_a_tokenizer_changed_since_the_build_stops_the_stage_naming_both_digests(tmp_path):
    from lladav.config import load_stage
    from lladav.train.launch import preflight

    tok, stage = fake_mixture(tmp_path, [100])
    built_with = tokenizer_digest(str(tok))
    preflight(load_stage(stage))                        # unchanged: passes
    config = tok / "tokenizer_config.json"
    config.write_text(config.read_text().replace("}", ', "model_max_length": 7}', 1))
    now = tokenizer_digest(str(tok))
    result = CliRunner().invoke(app, ["train", str(stage)])
    assert result.exit_code == 2, result.output
    text = re.sub(r"\s+", "", result.output)
    assert built_with in text and now in text and "changed after the build" in result.output.replace("\n", " ")
