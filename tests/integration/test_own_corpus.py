"""Bring your own corpus, through the CLI only: a LLaVA JSON folder nobody here curated, the
repository's own-corpus template, and a model that answers from the image.

    my_corpus/{train,test}.json + images   (tests/textures.py: coloured textures, 10 answers)
    lladav pipeline run pipelines/own_corpus.yaml   (the template, length grouping off or on)
      tokenizer -> base -> mix -> train -> eval

It asserts what a new user would look at: the evaluation well above chance (3x = 30%) with and
without length grouping (two branches of one pipeline), answers that are whole
class words (no "sixven": the end-of-answer policy at work), the per-class table in MLflow, and
the answer-only metric logged beside the loss.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from textures import COLOURS, write_textures  # noqa: E402

pytestmark = [pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = ("pipelines/own_corpus.yaml", "data_recipes/own_corpus.yaml", "stages/own_corpus.yaml")
STEPS = 400  # per stage (the template's 500 less a margin of time; see the stage file)


@pytest.mark.timeout(2400)  # ~9 min alone; up to ~17 beside the other slow tests on 2 cores
def test_own_corpus_through_the_cli(tmp_path, ray_cluster):
    """One pipeline, two branches from the same tokenizer, base and mixture: `train` without
    length grouping and `train-grouped` with it, each evaluated on the test file (sharing the
    prefix saves a tokenizer, a base pretraining and a build: ~2 min of the suite)."""
    for rel in TEMPLATE:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, tmp_path / rel)
    write_textures(tmp_path / "my_corpus", n_train=2000, n_test=100)
    pipeline = tmp_path / "pipelines" / "own_corpus.yaml"
    data = yaml.safe_load(pipeline.read_text())
    by_name = {s["name"]: s for s in data["steps"]}
    by_name["train"]["overrides"] = {"max_steps": STEPS, "group_by_length": False}
    grouped = {**by_name["train"], "name": "train-grouped",
               "overrides": {"max_steps": STEPS, "group_by_length": True}}
    data["steps"] += [grouped, {**by_name["eval"], "name": "eval-grouped", "model": "train-grouped"}]
    pipeline.write_text(yaml.safe_dump(data, sort_keys=False))

    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    cli = str(Path(sys.executable).parent / "lladav")
    plan = subprocess.run([cli, "pipeline", "plan", str(pipeline)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    run = subprocess.run([cli, "pipeline", "run", str(pipeline)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=2300)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]

    steps = {}
    for done in (tmp_path / ".lladav" / "own-corpus" / "steps").glob("*/*/done.json"):
        record = json.loads(done.read_text())
        steps[record["step"]] = record
    assert set(steps) == {"tokenizer", "base", "mix", "train", "eval", "train-grouped",
                          "eval-grouped"}
    db = tmp_path / ".lladav" / "mlflow.db"
    flat = " ".join(output.split())
    for train, evaluation in (("train", "eval"), ("train-grouped", "eval-grouped")):
        result = steps[evaluation]["outputs"]
        assert result["chance"] == pytest.approx(0.1) and result["n"] == 100
        assert result["accuracy"] >= 3 * result["chance"], (evaluation, result)
        assert f"{evaluation}: accuracy {result['accuracy']:.1%}" in flat
        samples = json.loads(_artifact(db, steps[evaluation]["run_id"], "eval/samples.json"))
        answers = {s["prediction"] for s in samples}
        # whole class words, or nothing: never word pieces run together
        assert answers <= set(COLOURS) | {""}, (evaluation, answers - set(COLOURS))
        by_class = json.loads(_artifact(db, steps[evaluation]["run_id"], "eval/by_class.json"))
        assert set(by_class) == set(COLOURS)

        with sqlite3.connect(db) as conn:
            rows = dict(conn.execute("SELECT key, value FROM latest_metrics WHERE run_uuid = ?",
                                     (steps[train]["run_id"],)).fetchall())
        assert rows["step"] == STEPS
        assert 0 <= rows["answer_accuracy"] <= 1 and rows["answer_loss"] > 0
        # the loss over everything is far below the answer-only loss: template tokens are easy
        assert rows["loss"] < rows["answer_loss"]


def _artifact(db: Path, run_id: str, path: str) -> str:
    """An artifact of a run of the local MLflow store the pipeline wrote (./.lladav/mlflow.db)."""
    from mlflow import MlflowClient

    return Path(MlflowClient(f"sqlite:///{db}").download_artifacts(run_id, path)).read_text()
