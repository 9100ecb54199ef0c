"""Mixture views over a real built mixture on S3: no shard written, exact counts, the loader,
and (slow) a pipeline that trains from a view and traces records through it."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from lladav import storage
from lladav.config import EndOfAnswer, load_pipeline, load_recipe
from lladav.data.build import build
from lladav.data.loader import MixtureLoader
from lladav.data.manifest import View, open_mixture
from lladav.data.views import ViewError, make_view

pytestmark = pytest.mark.usefixtures("ray_cluster")

VISION = {"tile_size": 32, "patch_size": 8, "max_grid": 2}
WEIGHTS = {"qa": 2.0, "captions": 0.5}


def _recipe(folder: Path, synth: Path) -> Path:
    corpus = synth / "corpus"
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "name": "two", "tokenizer": str(synth / "tokenizer"), "max_length": 512,
        "samples_per_shard": 16, "seed": 3, "vision": VISION,
        "sources": [{"name": "qa", "kind": "llava_json", "location": str(corpus / "qa.json")},
                    {"name": "captions", "kind": "llava_json",
                     "location": str(corpus / "captions.json")}]}))
    return path


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    import boto3

    boto3.session.Session().client("s3").create_bucket(Bucket="views")
    return "s3://views"


@pytest.fixture(scope="module")
def mixture_uri(tmp_path_factory, synth_dir, bucket, ray_cluster) -> str:
    recipe = load_recipe(_recipe(tmp_path_factory.mktemp("views"), synth_dir))
    return build(recipe, f"{bucket}/mixtures/two", num_workers=2).uri


def _objects(bucket: str) -> dict[str, bytes]:
    return {u[len(bucket):].lstrip("/"): storage.read_bytes(u) for u in storage.list_uris(bucket)}


def _expected(n: int, weight: float) -> int:
    whole = math.floor(weight)
    return whole * n + round((weight - whole) * n)


def test_a_view_reweights_without_writing_a_shard_and_counts_exactly(mixture_uri, bucket):
    mixture = open_mixture(mixture_uri)
    available = {s: c["samples"] for s, c in mixture.info["counts"]["by_source"].items()}
    before = _objects(bucket)

    view = make_view([mixture_uri], WEIGHTS, f"{bucket}/views/a", seed=5)
    after = _objects(bucket)
    written = {k for k in after if before.get(k) != after[k]}
    assert written == {"views/a/view.json", "views/a/manifest.parquet"}
    assert not any("shards/" in k for k in written) and set(before) <= set(after)
    assert sum(len(after[k]) for k in written) < 64_000  # kilobytes for 180 samples, no shard

    # exact counts: floor(w) copies of each sample plus a seeded round(frac(w) * n)
    assert isinstance(open_mixture(view.uri), View)
    rows = view.manifest().to_pylist()
    for source, weight in WEIGHTS.items():
        want = _expected(available[source], weight)
        assert view.info["counts"]["by_source"][source]["samples"] == want
        assert sum(r["source"] == source for r in rows) == want
    copies = Counter((r["source"], r["member"]) for r in rows)
    assert {c for (s, _), c in copies.items() if s == "qa"} == {2}
    assert {c for (s, _), c in copies.items() if s == "captions"} == {1}
    assert len({r["key"] for r in rows}) == len(rows)
    shard_uris = set(mixture.shard_uris())
    assert {r["shard"] for r in rows} <= shard_uris
    assert {s["name"] for s in view.info["shards"]} == {r["shard"] for r in rows}

    # its own identity, stable: the same view anywhere has the same bytes; again here, a no-op
    assert view.digest != mixture.digest
    again = make_view([mixture_uri], WEIGHTS, f"{bucket}/views/b", seed=5)
    assert again.digest == view.digest
    assert _objects(f"{bucket}/views/b") == _objects(f"{bucket}/views/a")
    assert make_view([mixture_uri], WEIGHTS, view.uri, seed=5).digest == view.digest
    with pytest.raises(ViewError, match="different committed view"):
        make_view([mixture_uri], WEIGHTS, view.uri, seed=6)

    # one weight changed: that source's rows shrink to a subset, the others stay the same rows
    fewer = make_view([mixture_uri], {**WEIGHTS, "captions": 0.25}, f"{bucket}/views/c", seed=5)
    rows_c = fewer.manifest().to_pylist()
    pick = lambda rs, s: {(r["member"], r["view_copy"]) for r in rs if r["source"] == s}  # noqa: E731
    assert pick(rows_c, "qa") == pick(rows, "qa")
    assert pick(rows_c, "captions") < pick(rows, "captions")
    assert len(pick(rows_c, "captions")) == _expected(available["captions"], 0.25)
    assert fewer.digest not in (view.digest, mixture.digest)
    final = _objects(bucket)
    assert {k: v for k, v in final.items() if "shards/" in k} == {
        k: v for k, v in before.items() if "shards/" in k}


def test_the_loader_reads_exactly_the_views_samples(mixture_uri, bucket):
    view = make_view([mixture_uri], WEIGHTS, f"{bucket}/views/loader", seed=5)
    # pad_to_longest adds no EOS tail, so ids[:length] is the sample's own ids
    args = dict(batch_size=4, rank=0, world_size=1, num_workers=0, seed=2, drop_last=False,
                end_of_answer=EndOfAnswer(policy="pad_to_longest"))
    truth = {}
    for batch in MixtureLoader(mixture_uri, **args):
        for b, key in enumerate(batch.keys):
            truth[key] = (batch.ids[b, :batch.lengths[b]].tolist(), batch.image_sizes[b])
    loader = MixtureLoader(view.uri, **args)
    assert loader.state_dict()["mixture"] == view.digest
    rows = {r["key"]: r for r in view.manifest().to_pylist()}
    seen = []
    for batch in loader:
        for b, key in enumerate(batch.keys):
            seen.append(key)
            ids, sizes = truth[rows[key]["member"]]
            assert batch.ids[b, :batch.lengths[b]].tolist() == ids
            assert batch.image_sizes[b] == sizes
            assert batch.n_tokens[b] == rows[key]["n_tokens"]
        assert isinstance(batch.ids, torch.Tensor)
    assert sorted(seen) == sorted(rows)
    assert loader.epoch == 1


def test_the_cli_makes_and_inspects_a_view(mixture_uri, bucket):
    from typer.testing import CliRunner

    from lladav.cli import app

    out = f"{bucket}/views/cli"
    made = CliRunner().invoke(app, ["data", "view", "--mixture", mixture_uri, "--weight", "qa=2",
                                    "--weight", "captions=0.5", "--seed", "5", "--out", out])
    assert made.exit_code == 0, made.output
    view = open_mixture(out)
    assert view.digest[:16] in made.output and "none written" in made.output
    shown = CliRunner().invoke(app, ["data", "inspect", out])
    assert shown.exit_code == 0 and view.digest[:16] in shown.output
    for bad, message in ((["--weight", "qa"], "write NAME=NUMBER"),
                         (["--weight", "qb=1"], "names no source or mixture"),
                         (["--weight", "qa=-1"], "finite number in [0, 100]")):
        refused = CliRunner().invoke(app, ["data", "view", "--mixture", mixture_uri, *bad,
                                           "--out", f"{bucket}/views/bad"])
        assert refused.exit_code == 2 and message in refused.output, refused.output
    assert not storage.list_uris(f"{bucket}/views/bad")


# ---- training from a view, and lineage through it (slow) -------------------------------------

def _pipeline(root: Path, synth: Path, weights: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    _recipe(root, synth)
    (root / "stage.yaml").write_text(yaml.safe_dump({
        "name": "stage", "init": {"flavor": "tiny"}, "trainable": {"projector": 3e-3},
        "micro_batch": 2, "max_steps": 2, "warmup_ratio": 0.1, "precision": "fp32", "seed": 0,
        "deepspeed_overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 0}},
        "scaling": {"workers": 1, "cpus_per_worker": 1},
        "checkpoint": {"every_steps": 2, "keep": 1}, "max_failures": 0}))
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "name": "vtest", "storage": str(root / "store"),
        "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "vtest"},
        "steps": [{"name": "mix", "kind": "data", "recipe": "recipe.yaml"},
                  {"name": "mix-view", "kind": "view", "mixtures": ["mix"], "weights": weights,
                   "seed": 1},
                  {"name": "stage", "kind": "stage", "stage": "stage.yaml", "mixture": "mix-view"}]},
        sort_keys=False))
    return path


@pytest.mark.slow
def test_a_pipeline_trains_from_a_view_and_lineage_traces_records_through_it(tmp_path, synth_dir):
    from mlflow import MlflowClient

    from lladav import lineage
    from lladav.pipeline import plan, run

    path = _pipeline(tmp_path / "p", synth_dir, WEIGHTS)
    steps = {p.name: p for p in run(load_pipeline(path), say=lambda m: None)}
    assert all(p.state == "done" for p in steps.values())
    assert steps["stage"].record["outputs"]["steps"] == 2
    view_uri = steps["mix-view"].record["outputs"]["mixture"]
    view, mixture = open_mixture(view_uri), open_mixture(steps["mix"].record["outputs"]["mixture"])
    assert isinstance(view, View) and view.info["mixtures"][0]["digest"] == mixture.digest
    assert sorted(Path(view_uri).iterdir()) == [Path(view_uri, "manifest.parquet"),
                                                Path(view_uri, "view.json")]

    # the stage run's inputs: the view for training, its mixture beside it
    tracking = f"sqlite:///{tmp_path / 'p' / 'mlflow.db'}"
    run_info = MlflowClient(tracking).get_run(steps["stage"].record["run_id"])
    inputs = {(i.dataset.name, {t.key: t.value for t in i.tags}["mlflow.data.context"],
               {t.key: t.value for t in i.tags}["lladav.digest"])
              for i in run_info.inputs.dataset_inputs}
    assert inputs == {(view.info["name"], "train", view.digest), ("two", "mixture", mixture.digest)}

    # trace: a qa record twice (weight 2), a caption the view dropped not at all, though the
    # mixture holds it, and a caption it kept once
    rows = view.manifest().to_pylist()
    export = steps["stage"].record["outputs"]["export"]
    qa = rows[[r["source"] for r in rows].index("qa")]["source_id"]
    hits = lineage.trace("qa", qa, tracking)
    assert [(h.export, h.how) for h in hits] == [(export, "read 2 samples")]
    kept = {r["source_id"] for r in rows if r["source"] == "captions"}
    every = {r["source_id"] for r in mixture.manifest().to_pylist() if r["source"] == "captions"}
    assert lineage.trace("captions", sorted(every - kept)[0], tracking) == []
    assert [h.how for h in lineage.trace("captions", sorted(kept)[0], tracking)] == ["read 1 sample"]

    # show: the view, then its mixture with the weights, then the sources
    text = json.dumps(lineage.show(export, tracking), default=vars)
    assert view.digest in text and mixture.digest in text and "view weights" in text
    assert "qa 2 (" in text and "captions 0.5 (" in text
    assert "source qa" in text and "source captions" in text

    # a new weight: the view and the stage would rerun, the build would not
    data = yaml.safe_load(path.read_text())
    data["steps"][1]["weights"]["captions"] = 0.25
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert {p.name: p.state for p in plan(load_pipeline(path))} == {
        "mix": "done", "mix-view": "pending", "stage": "pending"}
