"""The stage DAG of `lladav pipeline plan|run|status PIPELINE.yaml`: durable, keyed steps.

Each step's key is the digest of what it does (its resolved recipe, stage config or settings,
without where its outputs go), the keys of the steps it reads, and the code version. Its outputs
live under a folder named by that key, so a key is also an address:

    <storage>/steps/<step>/<key[:16]>/   started.json  written when the step starts (+ its MLflow run)
                                          done.json     written last, atomically: the step is done
                                          mixture/ | export/ + checkpoints/ | eval/

    done.json present     -> the step is skipped (its outputs are read from done.json)
    only started.json     -> interrupted: rerun in the same folder, which resumes (a build keeps
                             its finished shards; a stage restores its last Ray Train checkpoint;
                             the same MLflow run continues)
    neither               -> pending: a new config, new inputs or new code; everything
                             downstream gets new keys too, so it reruns as well

Steps run in file order (references may only point backwards, so that is a topological order).
Owns: keys, step folders, the order of execution and the per-kind glue. Does not own: building
(data/build.py), training (train/launch.py), scoring (evaluate.py) or MLflow (lineage.py).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lladav import storage
from lladav.config import (DataStep, EvalStep, PipelineConfig, StageStep, SynthStep, load_recipe,
                           load_stage)
from lladav.digest import code_version, digest_obj, pretty_json

log = logging.getLogger(__name__)

STARTED, DONE = "started.json", "done.json"
Progress = Callable[[str, int, int], None]


@dataclass
class PlannedStep:
    step: Any
    """The step as written in the pipeline (config.SynthStep | DataStep | StageStep | EvalStep)."""
    key: str
    folder: str
    config: Any
    """What the step runs: a Recipe, a StageConfig (URIs filled in) or the step itself."""
    identity: dict[str, Any]
    """What the key digests."""
    state: str = "pending"
    """done | interrupted | pending | unknown (storage unreachable)"""
    record: dict[str, Any] | None = None
    """done.json (done) or started.json (interrupted)."""
    previous: str | None = None
    """Another key of this step that finished earlier (the config, inputs or code changed)."""

    @property
    def name(self) -> str:
        return self.step.name

    @property
    def kind(self) -> str:
        return self.step.kind


def storage_root(pipe: PipelineConfig) -> str:
    return pipe.storage or str((Path.cwd() / ".lladav" / pipe.name).resolve())


def _code_identity() -> dict[str, Any]:
    """The code part of a step key: the package's version, its git tree (lladav/ only, not the
    commit: editing the README must not rerun days of stages) and any uncommitted diff of it."""
    v = code_version()
    return {k: v.get(k) for k in ("lladav", "git_tree", "git_diff_sha256")}


def _outputs(folder: str) -> dict[str, str]:
    return {"mixture": storage.join(folder, "mixture"), "export": storage.join(folder, "export"),
            "checkpoints": storage.join(folder, "checkpoints"), "eval": storage.join(folder, "eval")}


def plan(pipe: PipelineConfig) -> list[PlannedStep]:
    """Every step with its key, folder, resolved config and state; validates all configs."""
    code = _code_identity()
    root = storage_root(pipe)
    planned: dict[str, PlannedStep] = {}
    for step in pipe.steps:
        up = {role: planned[ref] for role, ref in step.refs().items()}
        inputs = {role: p.key for role, p in up.items()}
        inputs.update({f"needs:{ref}": planned[ref].key for ref in step.needs})
        config, identity = _resolve(step, up, folder=None)
        key = digest_obj({"kind": step.kind, "config": identity, "inputs": inputs, "code": code})
        folder = storage.join(root, "steps", step.name, key[:16])
        config, _ = _resolve(step, up, folder)
        p = PlannedStep(step, key, folder, config, identity)
        _read_state(p, root)
        planned[step.name] = p
    return list(planned.values())


def _resolve(step: Any, up: dict[str, PlannedStep], folder: str | None) -> tuple[Any, dict[str, Any]]:
    """(runnable config, identity). With folder=None the URIs are placeholders: where a step
    writes and where its inputs live are not part of what it is."""
    out = _outputs(folder) if folder else {k: f"<{k}>" for k in ("mixture", "export", "checkpoints", "eval")}
    if isinstance(step, DataStep):
        recipe = load_recipe(step.recipe, step.overrides)
        return recipe.model_copy(update={"output": out["mixture"]}), recipe.identity()
    if isinstance(step, StageStep):
        over: dict[str, Any] = {"output": out["export"], "checkpoint": {"uri": out["checkpoints"]}}
        if "mixture" in up:
            over["mixture"] = _outputs(up["mixture"].folder)["mixture"] if folder else f"<step {up['mixture'].name}>"
        elif step.mixture:
            over["mixture"] = step.mixture
        stage = load_stage(step.stage, _merge_over(step.overrides, over))
        if "init" in up:
            export = _outputs(up["init"].folder)["export"] if folder else f"<step {up['init'].name}>"
            stage = stage.model_copy(update={"init": stage.init.model_copy(update={
                "export": export, "language_model": None, "vision_tower": None, "flavor": None})})
        identity = stage.model_dump(mode="json", exclude={"output": True, "checkpoint": {"uri"}})
        return stage, identity
    if isinstance(step, EvalStep):
        return step, step.model_dump(mode="json", exclude={"name", "needs", "model", "heldout"}) | (
            {"heldout": step.heldout} if "heldout" not in up else {})
    if isinstance(step, SynthStep):
        return step, step.model_dump(mode="json", exclude={"name", "needs"})
    raise TypeError(f"unknown step kind {step!r}")


def _merge_over(overrides: dict[str, Any], pipeline_set: dict[str, Any]) -> dict[str, Any]:
    from lladav.config import merge

    return merge(overrides, pipeline_set)


def _read_state(p: PlannedStep, root: str) -> None:
    """Fill p.state from the step folder. Unreachable storage (no credentials on a laptop
    planning a cluster pipeline) leaves the state "unknown": the plan still validates."""
    try:
        _read_markers(p, root)
    except (storage.StorageError, FileNotFoundError) as e:
        p.state, p.record = "unknown", {"error": str(e)}


def _read_markers(p: PlannedStep, root: str) -> None:
    for name, state in ((DONE, "done"), (STARTED, "interrupted")):
        uri = storage.join(p.folder, name)
        if storage.exists(uri):
            p.state, p.record = state, json.loads(storage.read_bytes(uri))
            break
    if p.state != "done":
        others = [u for u in storage.list_uris(storage.join(root, "steps", p.name), suffix=DONE)
                  if not u.startswith(p.folder)]
        if others:
            p.previous = json.loads(storage.read_bytes(others[-1])).get("key")


# ---- running ---------------------------------------------------------------------------------

@dataclass
class RunContext:
    pipe: PipelineConfig
    lineage: Any
    parent_run: str
    done: dict[str, dict[str, Any]]
    """Finished steps' done.json by step name (their outputs and MLflow run ids)."""
    progress: Callable[[str], Progress]
    """progress(step name) -> update(phase, done, total)."""
    say: Callable[[str], None]


def run(pipe: PipelineConfig, *, progress: Callable[[str], Progress] | None = None,
        say: Callable[[str], None] = print) -> list[PlannedStep]:
    """Run every step that is not done, in order; returns the plan with final states."""
    from lladav.lineage import Lineage

    steps = plan(pipe)
    if pipe.ray_address:
        os.environ["RAY_ADDRESS"] = pipe.ray_address
    lineage = Lineage(pipe.mlflow.tracking_uri, pipe.mlflow.experiment or pipe.name)
    parent = lineage.start_run(f"pipeline {pipe.name}", {
        "lladav.kind": "pipeline", "lladav.pipeline": pipe.name, "lladav.storage": storage_root(pipe)})
    lineage.log_config(parent, "pipeline", pipe.model_dump(mode="json"))
    ctx = RunContext(pipe, lineage, parent, {}, progress or (lambda name: lambda *a: None), say)
    status = "FAILED"
    try:
        for p in steps:
            if p.state == "done":
                ctx.done[p.name] = p.record or {}
                lineage.set_tags(parent, {f"lladav.step.{p.name}": f"skipped: done in run {p.record['run_id']}"})
                say(f"skip  {p.name:<14} done (key {p.key[:12]}, run {p.record['run_id'][:8]})")
                continue
            _run_step(p, ctx)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        lineage.end_run(parent, status)
    return steps


def _run_step(p: PlannedStep, ctx: RunContext) -> None:
    lin = ctx.lineage
    if p.state == "interrupted" and p.record and p.record.get("run_id"):
        run_id = lin.resume_run(p.record["run_id"])
        lin.set_tags(run_id, {"lladav.resumed_by": ctx.parent_run})
        ctx.say(f"resume {p.name:<13} interrupted earlier (key {p.key[:12]}, run {run_id[:8]})")
    else:
        run_id = lin.start_run(p.name, {"lladav.kind": p.kind, "lladav.step": p.name,
                                        "lladav.step_key": p.key, "lladav.pipeline": ctx.pipe.name},
                               parent=ctx.parent_run)
        storage.write_bytes(storage.join(p.folder, STARTED), pretty_json(
            {"step": p.name, "key": p.key, "run_id": run_id, "started": time.time()}))
        why = f"changed since key {p.previous[:12]}" if p.previous else "new"
        ctx.say(f"run   {p.name:<14} {why} (key {p.key[:12]}, run {run_id[:8]})")
    lin.set_tags(ctx.parent_run, {f"lladav.step.{p.name}": run_id})
    try:
        outputs = RUNNERS[p.kind](p, ctx, run_id)
    except BaseException:
        lin.end_run(run_id, "FAILED")
        raise
    record = {"step": p.name, "kind": p.kind, "key": p.key, "run_id": run_id,
              "outputs": outputs, "finished": time.time()}
    storage.write_bytes(storage.join(p.folder, DONE), pretty_json(record))  # the commit
    lin.end_run(run_id)
    ctx.done[p.name] = record
    p.state, p.record = "done", record


def _run_synth(p: PlannedStep, ctx: RunContext, run_id: str) -> dict[str, Any]:
    from lladav.data.synthetic import synth_all

    step: SynthStep = p.config
    ctx.lineage.log_config(run_id, "synth", step.model_dump(mode="json"))
    synth_all(Path(step.output), n_train=step.n_train, n_heldout=step.n_heldout, seed=step.seed)
    outputs = {"corpus": storage.join(step.output, "corpus"),
               "tokenizer": storage.join(step.output, "tokenizer")}
    if step.base_steps:
        from lladav.model.base import write_base

        out = Path(step.output)
        outputs.update(write_base(out / "corpus", out / "tokenizer", out / "base",
                                  steps=step.base_steps, seed=step.seed))
        pretrain = json.loads((out / "base" / "pretrain.json").read_text())
        ctx.lineage.log_metrics(run_id, {"tower_pretrain_loss": pretrain["final_loss"]}, step=step.base_steps)
    return outputs


def _run_data(p: PlannedStep, ctx: RunContext, run_id: str) -> dict[str, Any]:
    from lladav.data.build import build

    recipe = p.config
    lin = ctx.lineage
    lin.log_config(run_id, "recipe", recipe.model_dump(mode="json"))
    for s in recipe.sources:
        lin.log_dataset(run_id, s.name, s.location, None, context="source", tags={"lladav.kind": s.kind})
    # overwrite: the folder is this key's own; a different mixture there is an older attempt
    mixture = build(recipe, recipe.output, overwrite=True, progress=ctx.progress(p.name))
    lin.set_tags(run_id, {"lladav.mixture": mixture.uri, "lladav.mixture_digest": mixture.digest})
    lin.log_text(run_id, "mixture/mixture.json", json.dumps(mixture.info, indent=2))
    counts = mixture.info["counts"]
    lin.log_metrics(run_id, {"samples": counts["samples"], "rejected": counts["rejected"],
                             "shards": counts["shards"], "tokens": counts["tokens"]}, step=0)
    return {"mixture": mixture.uri, "digest": mixture.digest}


def _run_stage(p: PlannedStep, ctx: RunContext, run_id: str) -> dict[str, Any]:
    from lladav.data.manifest import open_mixture
    from lladav.lineage import StepMetrics
    from lladav.train.launch import run_stage

    stage = p.config
    lin = ctx.lineage
    step: StageStep = p.step
    mixture = open_mixture(stage.mixture)
    tags = {"lladav.mixture": mixture.uri, "lladav.mixture_digest": mixture.digest,
            "lladav.export_target": stage.output}
    if step.init:
        parent = ctx.done[step.init]
        tags.update({"lladav.parent_run": parent["run_id"], "lladav.parent_export": parent["outputs"]["export"]})
    else:
        init = stage.init.model_dump(exclude_none=True)
        tags["lladav.init"] = ", ".join(f"{k}={v}" for k, v in init.items())
    lin.set_tags(run_id, tags)
    if p.state != "interrupted":
        lin.log_config(run_id, "stage", stage.model_dump(mode="json"))
        lin.log_dataset(run_id, mixture.info["name"], mixture.uri, mixture.digest, context="train",
                        tags={"lladav.step": step.mixture or ""})
    update = ctx.progress(p.name)
    stop = threading.Event()
    poller = threading.Thread(target=_poll_steps, args=(lin, run_id, update, stop), daemon=True)
    poller.start()
    try:
        result = run_stage(stage, run_name=p.name, on_step=StepMetrics(lin.tracking_uri, run_id))
    finally:
        stop.set()
        poller.join(timeout=5)
    steps = int(result.metrics.get("step", 0))
    update("train", steps, steps)
    lin.set_tags(run_id, {"lladav.export": result.export_uri.rstrip("/")})
    version = lin.register_export(run_id, f"{ctx.pipe.name}-{p.name}", result.export_uri)
    _log_graph(lin, run_id, result.export_uri)
    return {"export": result.export_uri, "checkpoints": storage.join(p.folder, "checkpoints"),
            "steps": steps, "model_version": version}


def _poll_steps(lin: Any, run_id: str, update: Progress, stop: threading.Event) -> None:
    """Drive the step's progress bar from the metrics the workers log to MLflow."""
    while not stop.wait(2.0):
        try:
            metrics = lin.client.get_run(run_id).data.metrics
        except Exception:  # noqa: BLE001 - a progress bar never fails a stage
            continue
        if "step" in metrics:
            update("train", int(metrics["step"]), int(metrics.get("total_steps", metrics["step"])))


def _log_graph(lin: Any, run_id: str, export: str) -> None:
    import tempfile

    from lladav.lineage import render_graph, show

    with tempfile.TemporaryDirectory() as tmp:
        path = render_graph(show(export.rstrip("/"), lin.tracking_uri), Path(tmp) / "lineage.png")
        lin.log_file(run_id, path, "lineage")


def _run_eval(p: PlannedStep, ctx: RunContext, run_id: str) -> dict[str, Any]:
    from lladav.evaluate import evaluate_heldout
    from lladav.inference import SamplerSettings

    step: EvalStep = p.config
    lin = ctx.lineage
    model = ctx.done[step.model]
    export = model["outputs"]["export"]
    heldout = ctx.done[step.heldout]["outputs"]["corpus"] if step.heldout in ctx.done else step.heldout
    lin.set_tags(run_id, {"lladav.parent_run": model["run_id"], "lladav.evaluated_export": export})
    lin.log_config(run_id, "eval", step.model_dump(mode="json"))
    settings = SamplerSettings(gen_length=step.gen_length, block_length=step.gen_length,
                               steps=step.steps or step.gen_length, threshold=step.threshold)
    result = evaluate_heldout(export, heldout, settings, limit=step.limit, progress=ctx.progress(p.name))
    lin.log_metrics(run_id, {"heldout_accuracy": result.accuracy, "heldout_n": result.n,
                             "chance": result.chance,
                             **{f"heldout_accuracy_{k}": v for k, v in result.by_factor.items()}}, step=0)
    lin.log_text(run_id, "eval/samples.json", json.dumps(result.samples, indent=2))
    for s in result.samples[:12]:  # a few images beside their answers, for a human look
        if s["image"]:
            lin.log_file(run_id, s["image"], "eval/images")
    if step.min_accuracy is not None and result.accuracy < step.min_accuracy:
        raise RuntimeError(f"eval {p.name}: held-out accuracy {result.accuracy:.1%} is below "
                           f"min_accuracy {step.min_accuracy:.0%}")
    return {"accuracy": result.accuracy, "n": result.n, "chance": result.chance, "export": export}


RUNNERS = {"synth": _run_synth, "data": _run_data, "stage": _run_stage, "eval": _run_eval}
