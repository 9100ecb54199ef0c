"""OpenLineage events of a pipeline's steps, in-process: the tiny test pipeline's real plan with
made-up step records (no build, no training, no MLflow), sent through openlineage-python's real
file and HTTP transports. Every event validates against the OpenLineage schema as rebuilt by
tests/openlineage_events.py, and the datasets chain corpus -> mixture -> stage -> export -> stage
-> export -> eval results."""

from __future__ import annotations

import json
import logging
import socket
import sys
import uuid
from pathlib import Path

import pytest
from openlineage_events import Validator, by_job, dataset_ids, feeds

from lladav import openlineage as ol
from lladav import storage
from lladav.config import ConfigError, load_pipeline, parse_pipeline
from lladav.pipeline import RUNNERS, RunContext, _openlineage, _run_leased, plan, storage_root

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))
from pipeline_files import write_pipeline  # noqa: E402

PIPELINE_RUN = "f" * 32
SECRET = "s3cr3t-ol-9vQk2LmT0kEn"


@pytest.fixture(scope="module")
def validator() -> Validator:
    return Validator()


def pipeline_at(tmp_path: Path, synth_dir: Path, **kwargs) -> Path:
    return write_pipeline(tmp_path / "p", synth_dir, storage=str(tmp_path / "store"),
                          tracking_uri=None, **kwargs)


def mlflow_id(step: str) -> str:
    return uuid.uuid5(uuid.NAMESPACE_DNS, step).hex  # MLflow's run ids are 32 hex digits


def fake_outputs(p, done: dict) -> dict:
    """What each runner would have returned (pipeline._run_data, _run_stage, _run_eval)."""
    licenses = {"unknown": {"sources": ["qa"], "samples": 10, "tokens": 1000}}
    if p.kind == "data":
        return {"mixture": storage.join(p.folder, "mixture"), "digest": f"{len(done):064x}",
                "licenses": licenses}
    if p.kind == "stage":
        return {"export": storage.join(p.folder, "export") + "/", "steps": 3, "licenses": licenses}
    export = done[p.step.model]["outputs"]["export"]
    return {"accuracy": 0.5, "n": 4, "chance": 0.25, "export": export, "data": p.config.data}


def run_steps(path: Path) -> tuple[dict, dict]:
    """START and COMPLETE of every step but the suite, through pipeline._openlineage; returns the
    plan and the done records by step name."""
    pipe = load_pipeline(path)
    steps = {p.name: p for p in plan(pipe)}
    emitter = ol.Emitter.create(pipe, storage_root(pipe), PIPELINE_RUN)
    ctx = RunContext(pipe, None, PIPELINE_RUN, {}, lambda name: None, print, openlineage=emitter)
    for p in steps.values():
        run_id = mlflow_id(p.name)
        _openlineage(ctx, p, run_id, "START")
        outputs = fake_outputs(p, ctx.done)
        ctx.done[p.name] = {"run_id": run_id, "outputs": outputs}
        _openlineage(ctx, p, run_id, "COMPLETE", outputs=outputs)
    emitter.close()
    return steps, ctx.done


def check_chain(events: list[dict], steps: dict, done: dict, synth_dir: Path, validator) -> None:
    for event in events:
        validator.validate(event)
    started, completed = by_job(events, "START"), by_job(events, "COMPLETE")
    jobs = {f"ptest.{name}" for name in steps}
    assert set(started) == set(completed) == jobs
    for name in steps:
        job = f"ptest.{name}"
        run_id = str(uuid.uuid5(ol.RUN_ID_NAMESPACE, done[name]["run_id"]))
        assert started[job]["run"]["runId"] == completed[job]["run"]["runId"] == run_id
        parent = completed[job]["run"]["facets"]["parent"]
        assert parent["job"] == {"namespace": "ptest", "name": "ptest", "facets": {}}
        assert parent["run"]["runId"] == ol.run_uuid(PIPELINE_RUN)
        assert completed[job]["run"]["facets"]["lladav_step"]["mlflowRunId"] == done[name]["run_id"]
        assert not started[job]["outputs"]

    # corpus -> mixture: the recipe's source, with its licence, is the data step's input
    mix = completed["ptest.mix-stage2"]
    qa = ("file", str(synth_dir / "corpus" / "qa.json"))
    assert qa in dataset_ids(mix["inputs"])
    source = next(d for d in mix["inputs"] if (d["namespace"], d["name"]) == qa)
    assert source["facets"]["lladav_source"]["license"] == "unknown"
    # mixture -> stage2, carrying its digest
    mixture = ("file", done["mix-stage2"]["outputs"]["mixture"])
    assert feeds(mix, completed["ptest.stage2"]) == {mixture}
    (written,) = mix["outputs"]
    assert written["facets"]["lladav_digest"]["sha256"] == done["mix-stage2"]["outputs"]["digest"]
    licenses = done["mix-stage2"]["outputs"]["licenses"]
    assert written["facets"]["lladav_licenses"]["licenses"] == licenses
    (read,) = [d for d in completed["ptest.stage2"]["inputs"]
               if (d["namespace"], d["name"]) == mixture]
    assert read["facets"]["lladav_digest"] == written["facets"]["lladav_digest"]
    # stage2 -> its export -> stage3 (its parent export) -> export -> eval -> results
    export2 = ("file", done["stage2"]["outputs"]["export"].rstrip("/"))
    assert dataset_ids(completed["ptest.stage2"]["outputs"]) == {export2}
    assert feeds(completed["ptest.stage2"], completed["ptest.stage3"]) == {export2}
    export3 = ("file", done["stage3"]["outputs"]["export"].rstrip("/"))
    assert feeds(completed["ptest.stage3"], completed["ptest.eval"]) == {export3}
    test_set = ("file", str(synth_dir / "corpus" / "heldout.json"))
    assert test_set in dataset_ids(completed["ptest.eval"]["inputs"])
    (results,) = completed["ptest.eval"]["outputs"]
    assert (results["namespace"], results["name"]) == (
        "ptest", f"ptest.eval/results/{done['eval']['run_id']}")
    assert results["facets"]["lladav_scores"]["scores"] == {"accuracy": 0.5, "n": 4, "chance": 0.25}


def test_the_file_transport_appends_valid_events_that_chain(tmp_path, synth_dir, validator):
    path = pipeline_at(tmp_path, synth_dir)
    steps, done = run_steps(path)
    lines = (tmp_path / "store" / "openlineage" / "events.jsonl").read_text().splitlines()
    assert len(lines) == 2 * len(steps)
    check_chain([json.loads(line) for line in lines], steps, done, synth_dir, validator)


def test_the_http_transport_posts_valid_events_that_chain(tmp_path, synth_dir, validator,
                                                          openlineage_receiver):
    path = pipeline_at(tmp_path, synth_dir,
                       openlineage={"url": openlineage_receiver.url, "namespace": "ptest"})
    steps, done = run_steps(path)
    assert len(openlineage_receiver.events) == 2 * len(steps)
    assert not (tmp_path / "store" / "openlineage").exists()
    check_chain(openlineage_receiver.events, steps, done, synth_dir, validator)


def test_on_s3_each_event_is_an_object_named_in_time_order(tmp_path, validator):
    pipe = parse_pipeline({"name": "p", "storage": "s3://bucket/pipe",
                           "steps": [{"name": "s", "kind": "synth", "output": "/tmp/x"}]})
    assert ol.transport_config(pipe.openlineage, "s3://bucket/pipe") == {
        "type": "lladav.openlineage.StorageTransport", "prefix": "s3://bucket/pipe/openlineage"}
    # the same transport on a local prefix (lladav.storage writes both alike)
    transport = ol.StorageTransport(ol.StorageConfig(prefix=str(tmp_path / "events")))
    run = ol.StepRun("p", "p", "s", "synth", "k" * 64, mlflow_id("s"), PIPELINE_RUN)
    for state in (ol.RunState.START, ol.RunState.COMPLETE):
        transport.emit(ol.step_event(state, run, [], [ol._output("/tmp/x/corpus")]))
    names = sorted(p.name for p in (tmp_path / "events").iterdir())
    assert [n.rsplit("-", 1)[1] for n in names] == ["START.json", "COMPLETE.json"]
    assert all(ol.run_uuid(run.mlflow_run_id) in n and "-p.s-" in n for n in names)
    for name in names:
        validator.validate(json.loads((tmp_path / "events" / name).read_text()))


class FakeLineage:
    """The MLflow side of _run_leased, which this test is not about."""

    def start_run(self, name, tags, parent=None):
        return mlflow_id(name)

    def set_tags(self, run_id, tags):
        pass

    def end_run(self, run_id, status="FINISHED"):
        self.ended = status


def test_a_failing_step_sends_start_then_fail_with_its_error_scrubbed(
        tmp_path, synth_dir, validator, openlineage_receiver, monkeypatch):
    monkeypatch.setenv("LLADAV_TEST_API_TOKEN", SECRET)
    path = pipeline_at(tmp_path, synth_dir, openlineage={"url": openlineage_receiver.url})
    pipe = load_pipeline(path)
    p = plan(pipe)[0]

    def broken(p, ctx, run_id):
        raise RuntimeError(f"reader died: s3://bucket/x?token={SECRET}")

    monkeypatch.setitem(RUNNERS, p.kind, broken)
    lineage = FakeLineage()
    ctx = RunContext(pipe, lineage, PIPELINE_RUN, {}, lambda name: None, lambda text: None,
                     openlineage=ol.Emitter.create(pipe, storage_root(pipe), PIPELINE_RUN))
    with pytest.raises(RuntimeError, match="reader died"):
        _run_leased(p, ctx)
    assert lineage.ended == "FAILED"
    assert [e["eventType"] for e in openlineage_receiver.events] == ["START", "FAIL"]
    fail = openlineage_receiver.events[1]
    validator.validate(fail)
    error = fail["run"]["facets"]["errorMessage"]
    assert error["message"].startswith("RuntimeError: reader died")
    assert "RuntimeError" in error["stackTrace"] and error["programmingLanguage"] == "python"
    assert SECRET not in json.dumps(fail)
    assert {d["name"] for d in fail["inputs"]} >= {str(synth_dir / "corpus" / "captions.json")}
    assert fail["outputs"] == []


def test_a_server_that_is_down_is_a_warning_not_a_failed_step(tmp_path, synth_dir, caplog):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        receiver_gone = f"http://127.0.0.1:{s.getsockname()[1]}"
    path = pipeline_at(tmp_path, synth_dir, openlineage={"url": receiver_gone})
    pipe = load_pipeline(path)
    p = plan(pipe)[0]
    ctx = RunContext(pipe, None, PIPELINE_RUN, {}, lambda name: None, print,
                     openlineage=ol.Emitter.create(pipe, storage_root(pipe), PIPELINE_RUN))
    with caplog.at_level(logging.WARNING, logger="lladav.openlineage"):
        _openlineage(ctx, p, mlflow_id(p.name), "START")  # returns: nothing raised
    assert "OpenLineage START event of step mix-stage1 not sent" in caplog.text


def test_settings_keep_credentials_out_of_the_config_and_resolve_a_relative_path(tmp_path,
                                                                                  monkeypatch):
    base = {"name": "p", "steps": [{"name": "s", "kind": "synth", "output": "out"}]}
    with pytest.raises(ConfigError, match="OPENLINEAGE_API_KEY") as e:
        parse_pipeline({**base, "openlineage": {"url": f"http://me:{SECRET}@marquez:5000"}})
    assert SECRET not in str(e.value)
    with pytest.raises(ConfigError, match="openlineage.url"):
        parse_pipeline({**base, "openlineage": {"url": "marquez:5000"}})
    monkeypatch.setenv("OPENLINEAGE_API_KEY", SECRET)  # the key comes from the environment
    http = parse_pipeline({**base, "openlineage": {"url": "http://marquez:5000"}}).openlineage
    assert ol.transport_config(http, "unused")["auth"] == {"type": "api_key", "apiKey": SECRET}
    assert SECRET not in json.dumps(http.model_dump())
    with pytest.raises(ConfigError, match="openlineage.transport"):
        parse_pipeline({**base, "openlineage": {"transport": "kafka"}})
    (tmp_path / "pipe.yaml").write_text(json.dumps({**base, "openlineage": {"path": "events"}}))
    pipe = load_pipeline(tmp_path / "pipe.yaml")
    assert pipe.openlineage.path == str(tmp_path / "events")
    assert ol.transport_config(pipe.openlineage, "unused") == {
        "type": "file", "append": True, "log_file_path": str(tmp_path / "events" / "events.jsonl")}
    off = parse_pipeline({**base, "openlineage": {"enabled": False}})
    assert ol.Emitter.create(off, str(tmp_path), PIPELINE_RUN) is None
