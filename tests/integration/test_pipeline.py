"""Pipelines end to end on the real boundaries: Ray Train stages, S3 storage, an MLflow server.

    test_pipeline_lineage_and_reruns   3 builds -> 3 stages -> eval, on S3 + `mlflow server`:
                                       lineage show/trace, no secret anywhere, a rerun skips all,
                                       a changed lr reruns that stage and what follows only
    test_a_killed_pipeline_resumes     SIGKILL during a stage; the rerun keeps the finished build
                                       and continues the stage from its last checkpoint
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lladav import lineage, storage
from lladav.config import load_pipeline
from lladav.pipeline import plan, run

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_files import write_pipeline  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

SECRET = "s3cr3t-Zq8v1LmT0kEn-4lladav"


def step_runs(client, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return [r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("lladav.kind") != "pipeline"]


def done_bytes(steps) -> dict[str, bytes]:
    return {p.name: storage.read_bytes(storage.join(p.folder, "done.json")) for p in steps}


def record_id(corpus: Path, file: str, index: int) -> str:
    return json.loads((corpus / "corpus" / file).read_text())[index]["id"]


@pytest.mark.timeout(1800)  # four pipeline runs: ~7 min alone, 14 under a loaded CI (900 ran out)
def test_pipeline_lineage_and_reruns(tmp_path, synth_dir, s3_bucket, mlflow_server, monkeypatch,
                                     openlineage_receiver):
    from mlflow import MlflowClient

    monkeypatch.setenv("LLADAV_TEST_API_TOKEN", SECRET)  # a credential the process can see
    host = mlflow_server.url.split("://", 1)[1]
    # ...and one pasted into the config itself, as users do with URLs
    tracking = f"http://lladav:{SECRET}@{host}"
    path = write_pipeline(tmp_path / "p", synth_dir, storage=f"{s3_bucket}/pipe", tracking_uri=tracking,
                          suite=True, openlineage={"url": openlineage_receiver.url})
    client = MlflowClient(mlflow_server.url)

    first = {p.name: p for p in run(load_pipeline(path))}
    assert all(p.state == "done" for p in first.values())
    evaluation = first["eval"].record["outputs"]
    assert evaluation["n"] == 3 and 0.0 <= evaluation["accuracy"] <= 1.0
    assert evaluation["export"] == first["stage3"].record["outputs"]["export"]
    assert first["stage3"].record["outputs"]["export"].startswith(s3_bucket)

    # OpenLineage: what the run POSTed to the receiver (openlineage.url). Every event validates
    # against the spec's schema (as rebuilt from openlineage-python, tests/openlineage_events.py);
    # each step ran once: START then COMPLETE; the datasets chain corpus qa.json -> mix-stage2's
    # mixture (its digest) -> stage2 -> its export -> stage3 (the parent export) -> its export
    # (its licences) -> eval -> results (its accuracy); no secret in any event.
    from openlineage_events import Validator, by_job, dataset_ids, feeds, named

    events = list(openlineage_receiver.events)
    validator = Validator()
    for event in events:
        validator.validate(event)
    assert [(e["job"]["name"], e["eventType"]) for e in events] == [
        (f"ptest.{name}", state) for name in first for state in ("START", "COMPLETE")]
    completed = by_job(events, "COMPLETE")
    mix2, stage2, stage3, evaluated = (completed[f"ptest.{name}"]
                                       for name in ("mix-stage2", "stage2", "stage3", "eval"))
    outputs = {name: p.record["outputs"] for name, p in first.items()}
    assert named(str(synth_dir / "corpus" / "qa.json")) in dataset_ids(mix2["inputs"])
    mixture_id = named(outputs["mix-stage2"]["mixture"])
    assert feeds(mix2, stage2) == {mixture_id}
    (mixture,) = [d for d in stage2["inputs"] if (d["namespace"], d["name"]) == mixture_id]
    assert mixture["facets"]["lladav_digest"]["sha256"] == outputs["mix-stage2"]["digest"]
    assert feeds(stage2, stage3) == {named(outputs["stage2"]["export"])}
    assert feeds(stage3, evaluated) == {named(outputs["stage3"]["export"])}
    (export3,) = stage3["outputs"]
    assert export3["facets"]["lladav_licenses"]["licenses"] == outputs["stage3"]["licenses"]
    (results,) = evaluated["outputs"]
    assert results["facets"]["lladav_scores"]["scores"]["accuracy"] == evaluation["accuracy"]
    assert SECRET not in json.dumps(events)
    # (end of the OpenLineage block)

    # the cpu_mini suite through lmms-eval's CLI: scores, s/sample and forward passes in MLflow
    suite = first["suite"].record
    assert set(suite["outputs"]["scores"]) == {"cpu_mini_mc", "cpu_mini_short"}
    assert {t: s["n"] for t, s in suite["outputs"]["stats"].items()} == {"cpu_mini_mc": 3,
                                                                       "cpu_mini_short": 3}
    metrics = client.get_run(suite["run_id"]).data.metrics
    assert 0.0 <= metrics["cpu_mini_mc/accuracy"] <= 1.0 and metrics["cpu_mini_mc/seconds_per_sample"] > 0
    assert metrics["cpu_mini_mc/forward_passes_per_answer"] <= 2  # 2 tokens, 2 steps
    # each stage run holds the step log's values: global loss, grad norm, lr per group, speed
    stage_metrics = client.get_run(first["stage2"].record["run_id"]).data.metrics
    assert {"loss", "grad_norm", "samples_per_s", "tokens_per_s", "padding_fraction",
            "lr/projector"} <= set(stage_metrics), sorted(stage_metrics)
    logged = {a.path for a in client.list_artifacts(suite["run_id"], "lmms_eval")}
    assert any(p.endswith("_samples_cpu_mini_mc.jsonl") for p in logged), logged

    # lineage show: the three stage runs, their mixtures' digests and the source corpora
    export = first["stage3"].record["outputs"]["export"]
    tree = lineage.show(export, mlflow_server.url)
    stages = lineage.stages_in(tree)
    assert [n.run_id for n in stages] == [first[s].record["run_id"] for s in ("stage3", "stage2", "stage1")]
    text = json.dumps(tree, default=vars)
    evals = [n for n in tree.children if n.kind == "eval"]
    assert {n.run_id for n in evals} == {first["eval"].record["run_id"], suite["run_id"]}
    detail = next(n.detail for n in evals if n.run_id == suite["run_id"])
    assert detail.startswith("suite cpu_mini · cpu_mini_mc: accuracy ") and "s/sample" in detail
    assert "cpu_mini_short: accuracy " in detail
    # contamination: each eval run holds the held-out set's report against the three stages'
    # mixtures, stored beside each manifest, and lineage show names it beside the scores
    for ev in (first["eval"].record, suite):
        logged = {a.path for a in client.list_artifacts(ev["run_id"], "contamination")}
        assert logged == {f"contamination/{s}.json" for s in ("stage1", "stage2", "stage3")}
        ev_tags = client.get_run(ev["run_id"]).data.tags
        assert " of 9 test records overlap the training data" in ev_tags["lladav.contamination"]
        reports = ev_tags["lladav.contamination_reports"].split()
        assert len(reports) == 3 and all(storage.exists(r) for r in reports)
        assert {r.split("/contamination/")[0] for r in reports} == {
            first[m].record["outputs"]["mixture"] for m in ("mix-stage1", "mix-stage2", "mix-stage3")}
        assert "contamination: " in next(n.detail for n in evals if n.run_id == ev["run_id"])
    for mix, (source, file) in zip(("mix-stage1", "mix-stage2", "mix-stage3"),
                                   (("captions", "captions.json"), ("qa", "qa.json"),
                                    ("reasoning", "reasoning.json"))):
        assert first[mix].record["outputs"]["digest"] in text
        assert f"source {source}" in text and str(synth_dir / "corpus" / file) in text
    assert "flavor=tiny" in text
    artifacts = [a.path for a in client.list_artifacts(first["stage3"].record["run_id"], "lineage")]
    assert artifacts == ["lineage/lineage.png"]
    versions = client.search_model_versions("name='ptest-stage3'")
    assert [v.source for v in versions] == [export]
    # licences: stage 1's captions are CC-BY-4.0, the other corpora say nothing (unknown); the
    # stage-3 export answers for all three stages, in its outputs, its run and its model version
    from lladav.data.manifest import open_mixture

    mix1 = open_mixture(first["mix-stage1"].record["outputs"]["mixture"])
    assert mix1.info["counts"]["by_license"] == {"CC-BY-4.0": {
        "sources": ["captions"], "samples": mix1.info["counts"]["samples"],
        "tokens": mix1.info["counts"]["tokens"]}}
    assert set(mix1.manifest().column("license").to_pylist()) == {"CC-BY-4.0"}
    licenses = first["stage3"].record["outputs"]["licenses"]
    assert {k: v["sources"] for k, v in licenses.items()} == {"CC-BY-4.0": ["captions"],
                                                            "unknown": ["qa", "reasoning"]}
    assert licenses["CC-BY-4.0"]["samples"] == mix1.info["counts"]["samples"]
    assert versions[0].tags["lladav.licenses"] == "CC-BY-4.0, unknown"
    assert client.get_run(first["stage1"].record["run_id"]).data.tags["lladav.licenses"] == "CC-BY-4.0"

    # the training-content summary of the stage-3 export, in the EU template's section order
    from lladav import summary as sm

    s = sm.summarize(export, mlflow_server.url)
    assert s.stages == ["stage3", "stage2", "stage1"]
    assert [(r.stage, r.source, r.license) for r in s.rows] == [
        ("stage3", "reasoning", "unknown"), ("stage2", "qa", "unknown"),
        ("stage1", "captions", "CC-BY-4.0")]
    assert abs(sum(r.share_of_training for r in s.rows) - 1) < 1e-9 and s.tokens > 0
    assert s.rows[2].samples == mix1.info["counts"]["samples"]
    md = sm.render_markdown(s)
    assert md.index("## 1. General information") < md.index("## 2. List of data sources") \
        < md.index("## 3. Data processing aspects")
    assert "| stage1 | captions | image-text |" in md and "CC-BY-4.0" in md
    sm.log_summary(s, mlflow_server.url)
    logged = {a.path for a in client.list_artifacts(first["stage3"].record["run_id"], "summary")}
    assert logged == {"summary/summary.md", "summary/summary.json"}

    # lineage trace: exactly the exports whose stages read the record, and their descendants.
    # The MLflow server is shared by the tests of this xdist worker, and other tests' pipelines
    # read the same session corpus: this pipeline's exports are the ones in its own bucket.
    def own(hits):
        return [h for h in hits if h.export is None or h.export.startswith(s3_bucket)]

    hits = own(lineage.trace("qa", record_id(synth_dir, "qa.json", 5), mlflow_server.url))
    read = {h.export for h in hits if h.how.startswith("read")}
    descends = {h.export for h in hits if h.how.startswith("descends")}
    assert read == {first["stage2"].record["outputs"]["export"]}
    assert descends == {export}
    hits = own(lineage.trace("captions", record_id(synth_dir, "captions.json", 0), mlflow_server.url))
    assert {h.export for h in hits if h.how.startswith("read")} == {first["stage1"].record["outputs"]["export"]}
    assert lineage.trace("qa", "no-such-record", mlflow_server.url) == []

    # no secret anywhere: the store's raw bytes and every artifact object
    assert SECRET.encode() not in mlflow_server.db.read_bytes()
    for uri in storage.list_uris(mlflow_server.artifacts):
        assert SECRET.encode() not in storage.read_bytes(uri), uri
    parent = client.get_run(client.get_run(first["stage1"].record["run_id"]).data.tags["mlflow.parentRunId"])
    assert parent.data.params["pipeline.mlflow.tracking_uri"] == f"http://***@{host}"
    assert client.get_run(first["stage1"].record["run_id"]).data.params["stage.trainable.projector"] == "0.003"

    # a second run skips every step
    before = done_bytes(first.values())
    n_runs = len(step_runs(client, "ptest"))
    second = run(load_pipeline(path))
    assert all(p.state == "done" for p in second)
    assert len(step_runs(client, "ptest")) == n_runs
    assert done_bytes(second) == before

    # a new learning rate for stage 2 reruns stage 2, stage 3 and the eval, not the builds or stage 1
    data = yaml.safe_load(path.read_text())
    data["steps"][4]["overrides"] = {"trainable": {"language_model": 1e-3}}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    third = {p.name: p for p in run(load_pipeline(path))}
    after = done_bytes(third.values())
    assert {k for k in before if before[k] != after[k]} == {"stage2", "stage3", "eval", "suite"}
    old_ids = {json.loads(b)["run_id"] for b in before.values()}
    new_runs = [r for r in step_runs(client, "ptest") if r.info.run_id not in old_ids]
    assert sorted(r.data.tags["lladav.step"] for r in new_runs) == ["eval", "stage2", "stage3", "suite"]
    rerun2 = client.get_run(third["stage2"].record["run_id"])
    assert rerun2.data.tags["lladav.parent_run"] == first["stage1"].record["run_id"]
    assert rerun2.data.params["stage.trainable.language_model"] == "0.001"

    # Takedown of one reasoning record through the CLI. Naming the (still empty) list in the
    # pipeline reruns nothing; after the request, the rerun rebuilds mix-stage3 without it and
    # retrains stage3 (and reruns the evals), nothing else; trace marks the old exports.
    import pyarrow.compute as pc
    from typer.testing import CliRunner

    from lladav import takedown
    from lladav.cli import app

    edit = yaml.safe_load(path.read_text())
    edit["takedowns"] = "takedowns.yaml"
    path.write_text(yaml.safe_dump(edit, sort_keys=False))
    assert {p.name: p.state for p in plan(load_pipeline(path))} == {p: "done" for p in third}
    gone = record_id(synth_dir, "reasoning.json", 3)
    readers = {third["stage3"].record["outputs"]["export"], export}
    assert {h.export for h in own(lineage.trace("reasoning", gone, mlflow_server.url))} == readers
    cli = CliRunner().invoke(app, ["lineage", "takedown", "--pipeline", str(path), "--source",
                                   "reasoning", "--record", gone, "--reason", "notice 42"])
    assert cli.exit_code == 0, cli.output
    assert "takedown td-" in cli.output and "1 record(s) of reasoning" in cli.output
    entry, = takedown.read_list(str(path.parent / "takedowns.yaml"))
    assert (entry.source, entry.records, entry.reason) == ("reasoning", [gone], "notice 42")
    assert client.get_run(entry.run_id).data.tags["lladav.kind"] == "takedown"
    held = json.loads(Path(client.download_artifacts(entry.run_id, "takedown/request.json",
                                                     str(tmp_path))).read_text())
    assert {m["uri"] for m in held["mixtures"] if m["uri"].startswith(s3_bucket)} == {
        first["mix-stage3"].record["outputs"]["mixture"]}
    assert {h["export"] for h in held["exports"] if (h["export"] or "").startswith(s3_bucket)} == readers

    fourth = {p.name: p for p in run(load_pipeline(path))}
    after_takedown = done_bytes(fourth.values())
    assert {k for k in after if after[k] != after_takedown[k]} == {"mix-stage3", "stage3", "eval",
                                                                   "suite"}
    rebuilt = open_mixture(fourth["mix-stage3"].record["outputs"]["mixture"])
    assert gone not in rebuilt.manifest().column("source_id").to_pylist()
    refused = rebuilt.rejects().filter(pc.equal(rebuilt.rejects()["reason"], "takedown"))
    assert refused.column("source_id").to_pylist() == [gone]
    assert rebuilt.info["recipe"]["taken_down"] == {"reasoning": [gone]}
    for p in fourth.values():                       # no mixture of the pipeline holds it now
        if p.kind == "data":
            rows = open_mixture(p.record["outputs"]["mixture"]).manifest().to_pylist()
            assert not [r for r in rows if (r["source"], r["source_id"]) == ("reasoning", gone)]
    hits = own(lineage.trace("reasoning", gone, mlflow_server.url))
    assert {h.export for h in hits} == readers      # only the pre-takedown exports...
    assert all(h.superseded and h.superseded.startswith(f"takedown {entry.id}") for h in hits)

    status, = takedown.status(str(path.parent / "takedowns.yaml"), mlflow_server.url)
    mine = lambda items: [m for m in items if m["uri"].startswith(s3_bucket)]  # noqa: E731
    assert [m["uri"] for m in mine(status.rebuilt)] == [rebuilt.uri]
    assert mine(status.still_holding) == []
    assert {m["uri"] for m in mine(status.superseded)} == {
        first["mix-stage3"].record["outputs"]["mixture"]}
    assert [(r["step"], r["export"]) for r in status.retrained
            if (r["export"] or "").startswith(s3_bucket)] == [
        ("stage3", fourth["stage3"].record["outputs"]["export"])]
    logged = {a.path for a in client.list_artifacts(entry.run_id, "takedown")}
    assert logged == {"takedown/request.json", "takedown/status.json"}
    cli = CliRunner().invoke(app, ["lineage", "takedown", "--pipeline", str(path), "--status"])
    assert cli.exit_code == 0, cli.output
    assert f"retrained: stage stage3 -> {fourth['stage3'].record['outputs']['export']}" in cli.output


def metric_steps(db: Path, run_id: str) -> list[int]:
    """The `step` metric's history of a run, in logging order, read straight from SQLite."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT value FROM metrics WHERE run_uuid = ? AND key = 'step' "
                            "ORDER BY timestamp, step", (run_id,)).fetchall()
    return [int(v) for (v,) in rows]


def test_a_killed_pipeline_resumes_from_the_stage_checkpoint(tmp_path, synth_dir, ray_cluster):
    db = tmp_path / "mlflow.db"
    path = write_pipeline(tmp_path / "p", synth_dir, storage=str(tmp_path / "store"),
                          tracking_uri=f"sqlite:///{db}", steps=40, every=4, name="killed")
    data = yaml.safe_load(path.read_text())
    data["steps"] = data["steps"][:1] + data["steps"][3:4]  # mix-stage1 -> stage1
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    steps = {p.name: p for p in plan(load_pipeline(path))}
    started = storage.join(steps["stage1"].folder, "started.json")
    checkpoints = Path(steps["stage1"].folder) / "checkpoints"

    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "lladav"), "pipeline", "run", str(path)],
                            env=env, cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600  # a hang guard: on a loaded 2-core CI machine 300 s ran out
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            if storage.exists(started):
                run_id = json.loads(storage.read_bytes(started))["run_id"]
                if max(metric_steps(db, run_id), default=0) >= 6:  # a checkpoint at 4 is behind it
                    break
            time.sleep(0.5)
        else:
            raise AssertionError("the stage did not reach step 6 in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before_kill = metric_steps(db, run_id)
    killed_at = max(before_kill)
    assert killed_at < 40
    assert any(checkpoints.rglob("*")), "no checkpoint was written before the kill"
    build_done = storage.read_bytes(storage.join(steps["mix-stage1"].folder, "done.json"))
    assert {p.name: p.state for p in plan(load_pipeline(path))} == {"mix-stage1": "done", "stage1": "interrupted"}
    time.sleep(2)  # let Ray notice the dead driver and free its worker's CPU

    resumed = {p.name: p for p in run(load_pipeline(path))}
    assert resumed["stage1"].state == "done" and resumed["stage1"].record["run_id"] == run_id
    assert resumed["stage1"].record["outputs"]["steps"] == 40
    assert storage.read_bytes(storage.join(steps["mix-stage1"].folder, "done.json")) == build_done
    history = metric_steps(db, run_id)
    assert history[:len(before_kill)] == before_kill == sorted(set(before_kill))
    assert history.count(1) == 1, "the stage restarted from step 1"
    # StepMetrics sends a checkpoint's step before writing the checkpoint, so the run's history
    # reaches at least the checkpoint it resumed from; the resumed steps follow it one by one.
    after = history[len(before_kill):]
    resumed_from = after[0] - 1
    assert resumed_from % 4 == 0 and 4 <= resumed_from <= killed_at
    assert after == list(range(resumed_from + 1, 41))
