"""Tiny base checkpoints (demo/base.py): a pretrained tiny tower that sees what the questions
ask, loadable as a stage-1 init exactly as LLaDA-8B + SigLIP2 folders are, for the shapes and
for any corpus (its chosen assistant turn as the image's text)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lladav.config import ConfigError, VisionGeometry, load_recipe, load_stage
from lladav.data.conversation import ChatTokenizer
from lladav.data.images import image_tiles
from lladav.data.sources import corpus_source
from lladav.demo.base import image_text_pairs, sigmoid_contrastive_loss, write_base
from lladav.model.lladav import LLaDAVModel

ROOT = Path(__file__).resolve().parents[2]


def captions(synth_dir: Path) -> list:
    return [corpus_source(str(synth_dir / "corpus" / "captions.json"))]


@pytest.fixture(scope="module")
def base(synth_dir: Path, tmp_path_factory) -> dict[str, str]:
    return write_base(captions(synth_dir), str(synth_dir / "tokenizer"),
                      str(tmp_path_factory.mktemp("base")), steps=300)


def _centroid_accuracy(model: LLaDAVModel, corpus: Path, factor: str) -> float:
    """Leave-one-out nearest-centroid accuracy of `factor` from mean-pooled image features."""
    records = json.loads((corpus / "captions.json").read_text())
    tiles = torch.from_numpy(np.concatenate([
        image_tiles(Image.open(corpus / r["image"]).convert("RGB"), model.config.geometry,
                    "square", 1) for r in records]))
    with torch.no_grad():
        feats = model.vision_tower(pixel_values=tiles).last_hidden_state.mean(1)
    labels = [r["meta"][factor] for r in records]
    right = 0
    for i, label in enumerate(labels):
        centroids = {v: torch.stack([feats[j] for j, other in enumerate(labels)
                                     if other == v and j != i]).mean(0) for v in set(labels)}
        right += min(centroids, key=lambda v: float((feats[i] - centroids[v]).norm())) == label
    return right / len(labels)


def test_pretraining_lowers_the_loss_and_the_folders_load_as_a_stage1_init(base, synth_dir):
    summary = json.loads((Path(base["vision_tower"]).parent / "pretrain.json").read_text())
    assert summary["final_loss"] < 0.5 * summary["first_loss"], summary

    from transformers import SiglipVisionModel

    model = LLaDAVModel.from_components(base["language_model"], base["vision_tower"])
    tower = SiglipVisionModel.from_pretrained(base["vision_tower"]).state_dict()
    for name, p in model.vision_tower.state_dict().items():
        assert torch.equal(p, tower[name]), name
    tok = ChatTokenizer.from_folder(synth_dir / "tokenizer")
    assert model.config.text_config.vocab_size == len(tok.tokenizer)
    assert model.config.text_config.mask_token_id == tok.mask_id


def test_pretrained_tower_tells_every_factor_apart_where_a_random_one_does_not(base, synth_dir):
    """What stage 2 needs from the tower: colour, kind and position readable from the mean of
    its features (a random tower gives colour; kind and position stay near chance)."""
    corpus = synth_dir / "corpus"
    pretrained = LLaDAVModel.from_components(base["language_model"], base["vision_tower"])
    torch.manual_seed(0)
    random_tower = LLaDAVModel(pretrained.config)
    for factor in ("colour", "kind", "position"):
        good = _centroid_accuracy(pretrained, corpus, factor)
        assert good >= 0.9, (factor, good)
    # measured: random 0.95 / 0.53 / 0.28, pretrained 1.0 on all three (60 images, 300 steps)
    assert _centroid_accuracy(random_tower, corpus, "kind") < 0.7
    assert _centroid_accuracy(random_tower, corpus, "position") < 0.5


def test_same_arguments_give_the_same_weights(synth_dir, tmp_path):
    a = write_base(captions(synth_dir), str(synth_dir / "tokenizer"), str(tmp_path / "a"), steps=3)
    b = write_base(captions(synth_dir), str(synth_dir / "tokenizer"), str(tmp_path / "b"), steps=3)
    for key in a:
        files = sorted(p.name for p in Path(a[key]).glob("*.safetensors"))
        assert files
        for f in files:
            assert (Path(a[key]) / f).read_bytes() == (Path(b[key]) / f).read_bytes(), (key, f)


def test_tiny_stage1_starts_from_the_base_folders_on_the_tiny_grid(base, synth_dir):
    from lladav.train.stage import apply_stage, initial_weights

    stage = load_stage(ROOT / "stages/tiny/stage1.yaml",
                       {"init": {"language_model": base["language_model"],
                                 "vision_tower": base["vision_tower"]}})
    tok = ChatTokenizer.from_folder(synth_dir / "tokenizer")
    recipe = load_recipe(ROOT / "data_recipes/tiny_stage1.yaml")
    geometry = recipe.vision.model_copy(update={"image_aspect": recipe.image_aspect})
    config, weights = initial_weights(stage, tok, geometry)
    # The grid and aspect are the mixture's: the model takes them from it.
    assert (config.max_grid, config.max_tiles_area, config.image_aspect) == (2, 4, "square")
    model = LLaDAVModel(config)
    model.load_state_dict(weights)
    groups, _ = apply_stage(model, stage)
    assert [g["name"] for g in groups] == ["projector"]
    # A mixture counted for the 8B tower is refused, naming both geometries and the fix.
    with pytest.raises(ConfigError, match=r"384 px tiles of 14 px.*32 px tiles of 8 px.*"
                                          r"tile_size: 32, patch_size: 8"):
        initial_weights(stage, tok, VisionGeometry(image_aspect="square"))


def test_the_images_text_is_the_chosen_assistant_turn(tmp_path, synth_dir):
    corpus = synth_dir / "corpus"
    records = json.loads((corpus / "qa.json").read_text())
    two_turn = [r for r in records if len(r["conversations"]) == 4][:2]
    text_only = [r for r in records if "image" not in r][:1]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(two_turn + text_only))
    source = [corpus_source(str(path), image_root=str(corpus))]
    for turn, index in (("last", 3), ("first", 1), (0, 1), (1, 3)):
        skipped: Counter = Counter()
        pairs = list(image_text_pairs(source, turn, skipped))
        assert [t for _, t in pairs] == [r["conversations"][index]["value"] for r in two_turn]
        assert pairs[0][0] == (corpus / two_turn[0]["image"]).read_bytes()
        assert skipped == Counter({"not_one_image": 1})
    skipped = Counter()
    assert list(image_text_pairs(source, 2, skipped)) == []
    assert skipped == Counter({"not_one_image": 1, "no_caption_turn": 2})


def test_contrastive_loss_prefers_matching_pairs():
    img = torch.nn.functional.normalize(torch.eye(3), dim=-1)
    same = torch.eye(3, dtype=torch.bool)
    scale, bias = torch.tensor(float(np.log(10.0))), torch.tensor(-5.0)
    aligned = sigmoid_contrastive_loss(img, img, same, scale, bias)
    swapped = sigmoid_contrastive_loss(img, img[[1, 2, 0]], same, scale, bias)
    assert aligned < swapped
    # by hand: 3 matches at logit 10-5=5, 6 non-matches at -5, each -log sigmoid(5)
    assert aligned == pytest.approx(-3 * np.log(1 / (1 + np.exp(-5.0))), rel=1e-5)
