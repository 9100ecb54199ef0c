"""Contamination reports across a real build (Ray tasks) and the CLI: a mixture seeded with
re-encoded test images and reworded test questions is reported with exactly those overlaps."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lladav import storage
from lladav.cli import app
from lladav.config import load_recipe
from lladav.contamination import check
from lladav.data.build import build

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from near_copies import distinct, encode  # noqa: E402

pytestmark = pytest.mark.usefixtures("ray_cluster")


def record(folder: Path, rid: str, data: bytes, ext: str, question: str, answer: str) -> dict:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "images" / f"{rid}.{ext}").write_bytes(data)
    return {"id": rid, "image": f"images/{rid}.{ext}", "conversations": [
        {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}


def test_seeded_images_and_questions_are_reported_exactly(tmp_path, synth_dir):
    tests, train = tmp_path / "test", tmp_path / "train"
    test_images = distinct(12, seed=21)
    questions = [f"Which object in picture {w} sits closest to the left edge?"
                 for w in ("one two three four five six seven eight nine ten eleven twelve".split())]
    test_records = [record(tests, f"t{i}", encode(img), "png", questions[i], "the circle")
                    for i, img in enumerate(test_images)]
    (tests / "test.json").write_text(json.dumps(test_records))

    rows = [record(train, f"r{i}", encode(img), "png", f"Tell me about training image {i}.",
                   f"answer {i}") for i, img in enumerate(distinct(40, seed=22))]
    # 5 test images re-encoded as JPEGs, asked about differently
    rows += [record(train, f"leak-img-{i}", encode(test_images[i], "JPEG", quality=60), "jpg",
                    f"Describe the colours here ({i}).", "many") for i in range(5)]
    # 5 test questions, upper-cased and without their question mark, over other images
    rows += [record(train, f"leak-q-{i}", encode(img), "png", questions[5 + i].upper().rstrip("?"),
                    "the square") for i, img in enumerate(distinct(5, seed=23))]
    (train / "train.json").write_text(json.dumps(rows))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "leaky", "tokenizer": str(synth_dir / "tokenizer"), "max_length": 512,
        "samples_per_shard": 16, "vision": {"tile_size": 32, "patch_size": 8, "max_grid": 2},
        "sources": [{"name": "web", "kind": "llava_json", "location": str(train / "train.json")}]}))
    mixture = build(load_recipe(recipe), str(tmp_path / "mix"), num_workers=2)

    result = CliRunner().invoke(app, ["data", "contamination", mixture.uri, str(tests / "test.json")])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # the console may wrap a long path
    assert "10 of 12 test records overlap" in said and "5 images, 5 questions" in said

    report, where = check(mixture.uri, str(tests / "test.json"))
    assert where.startswith(storage.join(mixture.uri, "contamination"))
    stored = json.loads(storage.read_bytes(where))
    assert stored["counts"] == {"records": 12, "images": 5, "questions": 5, "contaminated_records": 10}
    keys = {r["key"]: r["source_id"] for r in mixture.manifest().to_pylist()}
    images = sorted((o["eval_id"], keys[o["mixture_key"]]) for o in report.image_overlaps)
    assert images == [(f"t{i}", f"leak-img-{i}") for i in range(5)]
    assert all(o["distance"] <= 8 for o in report.image_overlaps)
    asked = sorted((o["eval_id"], tuple(keys[k] for k in o["mixture_keys"]))
                   for o in report.question_overlaps)
    assert asked == [(f"t{5 + i}", (f"leak-q-{i}",)) for i in range(5)]
    # a clean test set against the same mixture: nothing
    clean = tmp_path / "clean"
    clean_records = [record(clean, f"c{i}", encode(img), "png", f"What is unusual in scene {i}?", "x")
                     for i, img in enumerate(distinct(6, seed=24))]
    (clean / "test.json").write_text(json.dumps(clean_records))
    none, _ = check(mixture.uri, str(clean / "test.json"))
    assert none.counts()["contaminated_records"] == 0 and none.records == 6
