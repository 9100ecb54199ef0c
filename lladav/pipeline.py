"""The stage DAG of `lladav pipeline plan|run|status PIPELINE.yaml`: durable, keyed steps.

Each step's key is the digest of what it does (its resolved recipe, stage config or settings,
without where its outputs go), the keys of the steps it reads, and the code version. Its outputs
live under a folder named by that key, so a key is also an address:

    <storage>/steps/<step>/<key[:16]>/   started.json  written when the step starts (+ its MLflow run)
                                          done.json     written last, atomically: the step is done
                                          tokenizer/ | base/ | mixture/ | export/ + checkpoints/
                                          (a view step writes its view to mixture/)

    done.json present     -> the step is skipped (its outputs are read from done.json)
    only started.json     -> interrupted: rerun in the same folder, which resumes (a build keeps
                             its finished shards; a stage restores its last Ray Train checkpoint;
                             the same MLflow run continues)
    neither               -> pending: a new config, new inputs or new code; everything
                             downstream gets new keys too, so it reruns as well

Steps run in file order (references may only point backwards, so that is a topological order).
A step runs holding the lease on its folder (lladav/lease.py), so a second `pipeline run` of the
same pipeline refuses (LeaseHeld, naming the first) at the first step the first one is running,
instead of training it twice; a step another run finished meanwhile is skipped.
`plan` also checks, before any step runs, what can be checked without running: every recipe and
stage validates, each stage's mixture was built for its model's vision tower (tile and patch
size), and each eval step's test set exists, parses and has an answer per record.
Owns: keys, step folders, the order of execution and the per-kind glue. Does not own: building
(data/build.py), training (train/launch.py), scoring (evaluate.py), MLflow (lladav/lineage/) or
the OpenLineage events each step run sends (openlineage.py: START, COMPLETE after done.json,
FAIL).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lladav import Progress, storage
from lladav.config import (BaseStep, ConfigError, DataStep, EvalStep, PipelineConfig, Recipe,
                           StageConfig, StageStep, SynthStep, TokenizerStep, ViewStep,
                           VisionGeometry, load_recipe, load_stage, merge)
from lladav.digest import code_version, digest_obj, pretty_json
from lladav.lease import Lease, lease

log = logging.getLogger(__name__)

STARTED, DONE = "started.json", "done.json"


@dataclass
class PlannedStep:
    step: Any
    """The step as written in the pipeline (config.SynthStep | DataStep | StageStep | EvalStep)."""
    key: str
    folder: str
    config: Any
    """What the step runs: a Recipe, a StageConfig (URIs filled in) or the step itself (its
    references to other steps filled in with their outputs' URIs)."""
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


_OUTPUTS = ("mixture", "export", "checkpoints", "tokenizer", "base")


def _outputs(folder: str | None) -> dict[str, str]:
    """Where a step writes under its folder; placeholders when the folder is not known yet."""
    return {k: storage.join(folder, k) if folder else f"<{k}>" for k in _OUTPUTS}


def _provided(p: PlannedStep, what: str) -> str:
    """The URI of a `tokenizer` or `base` an upstream step provides (a synth step keeps them in
    its own output folder, the others in their step folder)."""
    if isinstance(p.step, SynthStep):
        return storage.join(p.step.output, what)
    return _outputs(p.folder)[what]


def plan(pipe: PipelineConfig) -> list[PlannedStep]:
    """Every step with its key, folder, resolved config and state; validates all configs, the
    geometry of every stage against its mixture and every eval step's test set (ConfigError or
    evaluate.TestSetError, naming the file and the fix)."""
    code = _code_identity()
    root = storage_root(pipe)
    planned: dict[str, PlannedStep] = {}
    towers: dict[str, tuple[int, int, str] | None] = {}
    geometries: dict[str, tuple[VisionGeometry | None, str]] = {}  # data and view steps'
    forbidden: list[str] = []
    for step in pipe.steps:
        up = {role: planned[ref] for role, ref in step.refs().items()}
        inputs = {role: p.key for role, p in up.items()}
        inputs.update({f"needs:{ref}": planned[ref].key for ref in step.needs})
        config, identity = _resolve(step, up, pipe.takedowns)
        key = digest_obj({"kind": step.kind, "config": identity, "inputs": inputs, "code": code})
        folder = storage.join(root, "steps", step.name, key[:16])
        config = _place(config, folder)
        p = PlannedStep(step, key, folder, config, identity)
        if isinstance(step, DataStep):
            geometries[step.name] = (config.vision, f"step {step.name}, recipe {step.recipe}")
            forbidden += [f"step {step.name} (recipe {step.recipe}): source {s.name} is "
                          f"{s.license}" for s in config.sources if s.license in pipe.forbid_licenses]
        if isinstance(step, ViewStep):
            geometries[step.name] = _check_view_geometry(p, geometries)
        if isinstance(step, StageStep):
            towers[step.name] = _check_stage_geometry(p, up, towers, geometries)
        unchecked = (_check_test_set(step) if isinstance(step, EvalStep) and "data" not in up
                     and step.data is not None else None)
        _read_state(p, root)
        if unchecked and p.state != "done":
            p.state, p.record = "unknown", {"error": unchecked}
        planned[step.name] = p
    if forbidden:
        raise ConfigError(f"pipeline {pipe.name} forbids the licences {pipe.forbid_licenses}, "
                          "but:\n  " + "\n  ".join(forbidden) + "\nRemove those sources from "
                          "the recipes, or set their `license` if it was wrong")
    return list(planned.values())


def _check_test_set(step: EvalStep) -> str | None:
    """Every record of the eval step's test set parses and has an answer (TestSetError naming the
    file and record otherwise). Storage that cannot be reached from here (a laptop planning a
    cluster pipeline, a placeholder bucket) leaves it to the run: returns why it was not checked,
    and the step's state becomes unknown, as a step folder's does."""
    from lladav.evaluate import check_test_set

    try:
        check_test_set(step.data, image_root=step.image_root, limit=step.limit,
                       scoring=step.scoring)
    except (storage.StorageError, storage.BucketNotFound) as e:
        return f"test set not checked: {e}"
    return None


def _committed_geometry(uri: str) -> VisionGeometry | None:
    """A committed mixture's (or view's) geometry; None when it cannot be read from here."""
    from lladav.data.manifest import MixtureNotCommitted, open_mixture

    try:
        return open_mixture(uri).geometry
    except (MixtureNotCommitted, storage.StorageError, FileNotFoundError):
        return None


def _check_view_geometry(p: PlannedStep, geometries: dict[str, tuple[VisionGeometry | None, str]]
                         ) -> tuple[VisionGeometry | None, str]:
    """A view's mixtures must count image tokens for one tower: ConfigError naming two that
    differ. Returns the first known geometry (and where it comes from) for the view's stages."""
    known = []
    for i, m in enumerate(p.step.mixtures):
        ref = p.step.refs().get(f"mixtures.{i}")
        geometry, where = geometries[ref] if ref else (_committed_geometry(m), m)
        if geometry is not None:
            known.append((geometry, where))
    for geometry, where in known[1:]:
        a, b = (geometry.tile_size, geometry.patch_size), (known[0][0].tile_size, known[0][0].patch_size)
        if a != b:
            raise ConfigError(f"view step {p.name}: its mixtures count image tokens for different "
                              f"towers: {where} for {a[0]} px tiles of {a[1]} px patches, "
                              f"{known[0][1]} for {b[0]} px tiles of {b[1]} px patches; give "
                              "their recipes one `vision:`")
    return known[0] if known else (None, f"view step {p.name}")


def _check_stage_geometry(p: PlannedStep, up: dict[str, PlannedStep],
                          towers: dict[str, tuple[int, int, str] | None],
                          geometries: dict[str, tuple[VisionGeometry | None, str]]) -> tuple | None:
    """The stage's tower (tile, patch, where) as far as it can be known before running, checked
    against its mixture's geometry (the recipe's, a view step's mixtures', or a committed
    mixture's or view's)."""
    from lladav.model.flavors import FLAVORS
    from lladav.train.stage import check_geometry, tower_geometry

    stage = p.config
    if "init" in up:
        tower = towers.get(up["init"].name)
    elif "base" in up:
        flavor = getattr(up["base"].step, "flavor", "tiny")  # validated (config.check_flavor)
        spec = FLAVORS[flavor]["vision_tower"]
        tower = (spec["image_size"], spec["patch_size"], f"base step {up['base'].name}, flavor {flavor}")
    else:
        tower = tower_geometry(stage.init)
    if "mixture" in up:
        geometry, where = geometries[up["mixture"].name]
    else:
        geometry, where = _committed_geometry(stage.mixture), stage.mixture
    if geometry is not None:
        check_geometry(p.name, tower, geometry, where)
    return tower


def _resolve(step: Any, up: dict[str, PlannedStep], takedowns: str | None = None
             ) -> tuple[Any, dict[str, Any]]:
    """(config, identity), every YAML read and validated once. The config reads its upstream
    steps' outputs (their folders are known) and has placeholders where it writes (`_place`
    fills them once the key is known); the identity has placeholders for both: where a step
    writes and where its inputs live are not part of what it is (an input's identity is its
    step's key, which the caller adds). `takedowns`: the pipeline's takedown list, given to
    every data step's recipe."""
    def named(role: str) -> str:
        return f"<step {up[role].name}>"

    if isinstance(step, DataStep):
        over = {"tokenizer": _provided(up["tokenizer"], "tokenizer")} if "tokenizer" in up else {}
        if takedowns:
            over["takedowns"] = takedowns
        recipe = load_recipe(step.recipe, merge(step.overrides, over))
        identity = recipe.identity()
        if "tokenizer" in up:
            identity["tokenizer"] = named("tokenizer")
        return recipe, identity
    if isinstance(step, ViewStep):
        # a data step's mixture by its step (the key covers it), a URI as written
        roles = {i: f"mixtures.{i}" for i in range(len(step.mixtures)) if f"mixtures.{i}" in up}
        identity = {**step.model_dump(mode="json", exclude={"name", "needs"}),
                    "mixtures": [named(roles[i]) if i in roles else m for i, m in enumerate(step.mixtures)]}
        uris = [_outputs(up[roles[i]].folder)["mixture"] if i in roles else m
                for i, m in enumerate(step.mixtures)]
        return step.model_copy(update={"mixtures": uris}), identity
    if isinstance(step, StageStep):
        out = _outputs(None)
        over: dict[str, Any] = {"output": out["export"], "checkpoint": {"uri": out["checkpoints"]}}
        if "mixture" in up:
            over["mixture"] = _outputs(up["mixture"].folder)["mixture"]
        elif step.mixture:
            over["mixture"] = step.mixture
        stage = load_stage(step.stage, merge(step.overrides, over))
        init: dict[str, Any] | None = None
        if "init" in up:
            init = {"export": _outputs(up["init"].folder)["export"]}
        elif "base" in up:
            base = _provided(up["base"], "base")
            init = {"language_model": storage.join(base, "llada"),
                    "vision_tower": storage.join(base, "siglip")}
        if init is not None:
            cleared = {"export": None, "language_model": None, "vision_tower": None, "flavor": None}
            stage = stage.model_copy(update={"init": stage.init.model_copy(update={**cleared, **init})})
        identity = stage.model_dump(mode="json", exclude={"output": True, "checkpoint": {"uri"}})
        if "mixture" in up:
            identity["mixture"] = named("mixture")
        for role in ("init", "base"):
            if role in up:
                identity["init"].update({k: named(role) for k in init})
        return stage, identity
    identity = step.model_dump(mode="json", exclude={"name", "needs", *step.refs()})
    update = {}
    if isinstance(step, BaseStep) and "tokenizer" in up:
        update["tokenizer"] = _provided(up["tokenizer"], "tokenizer")
    if isinstance(step, EvalStep) and "data" in up:
        update["data"] = storage.join(up["data"].step.output, "corpus", "heldout.json")
    if isinstance(step, (TokenizerStep, BaseStep)) and step.recipe:
        recipe = load_recipe(step.recipe)  # validated now; what it reads is part of the identity
        identity["recipe"] = {"sources": [s.model_dump(mode="json") for s in recipe.sources]}
    if isinstance(step, (SynthStep, TokenizerStep, BaseStep, EvalStep)):
        return step.model_copy(update=update), identity
    raise TypeError(f"unknown step kind {step!r}")


def _place(config: Any, folder: str) -> Any:
    """`config` from _resolve writing under the step's folder (known once its key is)."""
    out = _outputs(folder)
    if isinstance(config, Recipe):
        return config.model_copy(update={"output": out["mixture"]})
    if isinstance(config, StageConfig):
        return config.model_copy(update={"output": out["export"], "checkpoint": config.checkpoint.model_copy(
            update={"uri": out["checkpoints"]})})
    return config


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
    lease: Lease | None = None
    """The lease on the running step's folder; checked before the step commits anything."""
    openlineage: Any = None
    """openlineage.Emitter of the steps' START/COMPLETE/FAIL events; None when turned off."""


def run(pipe: PipelineConfig, *, progress: Callable[[str], Progress] | None = None,
        say: Callable[[str], None] = print) -> list[PlannedStep]:
    """Run every step that is not done, in order; returns the plan with final states."""
    from lladav.lineage import Lineage
    from lladav.openlineage import Emitter

    steps = plan(pipe)
    if pipe.ray_address:
        os.environ["RAY_ADDRESS"] = pipe.ray_address
    lineage = Lineage(pipe.mlflow.tracking_uri, pipe.mlflow.experiment or pipe.name)
    parent = lineage.start_run(f"pipeline {pipe.name}", {
        "lladav.kind": "pipeline", "lladav.pipeline": pipe.name, "lladav.storage": storage_root(pipe)})
    lineage.log_config(parent, "pipeline", pipe.model_dump(mode="json"))
    ctx = RunContext(pipe, lineage, parent, {}, progress or (lambda name: lambda *a: None), say)
    ctx.openlineage = Emitter.create(pipe, storage_root(pipe), parent)
    status = "FAILED"
    try:
        for p in steps:
            if p.state == "done":
                _skip(p, ctx)
                continue
            _run_step(p, ctx)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        _end_run_quietly(lineage, parent, status)
        if ctx.openlineage:
            ctx.openlineage.close()
    return steps


def _end_run_quietly(lineage: Any, run_id: str, status: str) -> None:
    """End a run; if the tracking server is gone too, log that instead of raising, so the error
    that stopped the pipeline is the one the user sees."""
    try:
        lineage.end_run(run_id, status)
    except Exception as e:  # noqa: BLE001 - a second failure must not replace the first
        if status == "FINISHED":
            raise
        from lladav.secrets import describe

        log.warning("could not mark run %s %s: %s", run_id, status, describe(e))


def _skip(p: PlannedStep, ctx: RunContext) -> None:
    ctx.done[p.name] = p.record or {}
    ctx.lineage.set_tags(ctx.parent_run,
                         {f"lladav.step.{p.name}": f"skipped: done in run {p.record['run_id']}"})
    ctx.say(f"skip  {p.name:<14} done (key {p.key[:12]}, run {p.record['run_id'][:8]})")


def _run_step(p: PlannedStep, ctx: RunContext) -> None:
    """Run a step holding the lease on its folder (lladav/lease.py): a concurrent run of the
    same pipeline refuses with LeaseHeld, naming this one, instead of running the step twice.
    Its markers are read again under the lease: another run may have finished it since the plan."""
    with lease(p.folder, f"pipeline {ctx.pipe.name} step {p.name}") as held:
        _read_markers(p, storage_root(ctx.pipe))
        if p.state == "done":
            _skip(p, ctx)
            return
        ctx.lease = held
        try:
            _run_leased(p, ctx)
        finally:
            ctx.lease = None


def _run_leased(p: PlannedStep, ctx: RunContext) -> None:
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
    _openlineage(ctx, p, run_id, "START")
    try:
        outputs = RUNNERS[p.kind](p, ctx, run_id)
        ctx.lease.check()  # a run that lost the step's lease must not commit it
    except BaseException as e:
        _openlineage(ctx, p, run_id, "ABORT" if isinstance(e, KeyboardInterrupt) else "FAIL",
                     error=e)
        _end_run_quietly(lin, run_id, "FAILED")
        raise
    record = {"step": p.name, "kind": p.kind, "key": p.key, "run_id": run_id,
              "outputs": outputs, "finished": time.time()}
    storage.write_bytes(storage.join(p.folder, DONE), pretty_json(record))  # the commit
    _openlineage(ctx, p, run_id, "COMPLETE", outputs=outputs)
    lin.end_run(run_id)
    ctx.done[p.name] = record
    p.state, p.record = "done", record


def _openlineage(ctx: RunContext, p: PlannedStep, run_id: str, state: str,
                 outputs: dict[str, Any] | None = None, error: BaseException | None = None) -> None:
    """The step's OpenLineage event (openlineage.py), its datasets read from its config and its
    upstream steps' outputs; never raises."""
    if ctx.openlineage is None:
        return
    upstream = {role: ctx.done.get(ref, {}).get("outputs") or {}
                for role, ref in p.step.refs().items()}
    ctx.openlineage.step(state, p.name, p.kind, p.key, run_id, p.config, upstream,
                         outputs=outputs, error=error)


def _run_synth(p: PlannedStep, ctx: RunContext, run_id: str) -> dict[str, Any]:
    from lladav.data.sources import corpus_source
    from lladav.demo.shapes import synth_all

    step: SynthStep = p.config
    ctx.lineage.log_config(run_id, "synth", step.model_dump(mode="json"))
    synth_all(Path(step.output), n_train=step.n_train, n_heldout=step.n_heldout, seed=step.seed)
    outputs = {"corpus": storage.join(step.output, "corpus"),
               "tokenizer": storage.join(step.output, "tokenizer")}
    if step.base_steps:
        from lladav.demo.base import write_base

        captions = corpus_source(storage.join(step.output, "corpus", "captions.json"))
        outputs.update(write_base([captions], outputs["tokenizer"], storage.join(step.output, "base"),
                                  steps=step.base_steps, seed=step.seed))
        _log_pretraining(ctx, run_id, storage.join(step.output, "base"), step.base_steps)
    return outputs


def _corpus_sources(step: TokenizerStep | BaseStep) -> list[Any]:
    from lladav.data.sources import corpus_source

    if step.recipe:
        return list(load_recipe(step.recipe).sources)
    return [corpus_source(uri, name=f"corpus{i}", image_root=step.image_root)
            for i, uri in enumerate(step.corpus)]


def _run_tokenizer(p: PlannedStep, ctx: RunContext, run_id: str) -> dict[str, Any]:
    from lladav.data.tokenizer import corpus_texts, train_to_uri

    step: TokenizerStep = p.config
    ctx.lineage.log_config(run_id, "tokenizer", step.model_dump(mode="json"))
    uri = train_to_uri(corpus_texts(_corpus_sources(step), step.max_records),
                       _outputs(p.folder)["tokenizer"], vocab_size=step.vocab_size)
    return {"tokenizer": uri}


def _run_base(p: PlannedStep, ctx: RunContext, run_id: str) -> dict[str, Any]:
    from lladav.demo.base import write_base

    step: BaseStep = p.config
    ctx.lineage.log_config(run_id, "base", step.model_dump(mode="json"))
    out = _outputs(p.folder)["base"]
    outputs = write_base(_corpus_sources(step), step.tokenizer, out, flavor=step.flavor,
                         steps=step.steps, seed=step.seed, caption_turn=step.caption_turn,
                         max_images=step.max_images)
    _log_pretraining(ctx, run_id, out, step.steps)
    return {"base": out, **outputs}


def _log_pretraining(ctx: RunContext, run_id: str, base: str, steps: int) -> None:
    pretrain = json.loads(storage.read_bytes(storage.join(base, "pretrain.json")))
    ctx.lineage.log_metrics(run_id, {"tower_pretrain_loss": pretrain["final_loss"],
                                     "tower_pretrain_images": pretrain["images"]}, step=steps)
    ctx.lineage.log_text(run_id, "base/pretrain.json", json.dumps(pretrain, indent=1))


def _run_data(p: PlannedStep, ctx: RunContext, run_id: str) -> dict[str, Any]:
    from lladav.data.build import build, vision_note

    recipe = p.config
    lin = ctx.lineage
    lin.log_config(run_id, "recipe", recipe.model_dump(mode="json"))
    for s in recipe.sources:
        lin.log_dataset(run_id, s.name, s.location, None, context="source", tags={"lladav.kind": s.kind})
    if note := vision_note(recipe):
        ctx.say(f"      {p.name}: {note}")
    # overwrite: the folder is this key's own; a different mixture there is an older attempt
    mixture = build(recipe, recipe.output, overwrite=True, progress=ctx.progress(p.name))
    lin.set_tags(run_id, {"lladav.mixture": mixture.uri, "lladav.mixture_digest": mixture.digest})
    lin.log_text(run_id, "mixture/mixture.json", json.dumps(mixture.info, indent=2))
    counts = mixture.info["counts"]
    lin.log_metrics(run_id, {"samples": counts["samples"], "rejected": counts["rejected"],
                             "shards": counts["shards"], "tokens": counts["tokens"]}, step=0)
    return {"mixture": mixture.uri, "digest": mixture.digest,
            "licenses": trained_licenses(mixture, None)}


def _run_view(p: PlannedStep, ctx: RunContext, run_id: str) -> dict[str, Any]:
    from lladav.data.views import make_view

    step: ViewStep = p.config
    lin = ctx.lineage
    lin.log_config(run_id, "view", step.model_dump(mode="json"))
    # overwrite: the folder is this key's own; a different view there is an older attempt
    view = make_view(step.mixtures, step.weights, _outputs(p.folder)["mixture"], seed=step.seed,
                     name=step.name, overwrite=True)
    _log_view_mixtures(lin, run_id, view)
    lin.set_tags(run_id, {"lladav.mixture": view.uri, "lladav.mixture_digest": view.digest})
    lin.log_text(run_id, "mixture/view.json", json.dumps(view.info, indent=2))
    counts = view.info["counts"]
    lin.log_metrics(run_id, {"samples": counts["samples"], "shards": counts["shards"],
                             "tokens": counts["tokens"]}, step=0)
    return {"mixture": view.uri, "digest": view.digest, "licenses": trained_licenses(view, None)}


def _log_view_mixtures(lin: Any, run_id: str, mixture: Any) -> None:
    """A view's mixtures as dataset inputs of context "mixture" (tagged with the view's digest);
    only the view itself is a "train" input, whose manifest `lineage trace` reads."""
    from lladav.data.manifest import View

    if not isinstance(mixture, View):
        return
    for m in mixture.info["mixtures"]:
        lin.log_dataset(run_id, m["name"], m["uri"], m["digest"], context="mixture",
                        tags={"lladav.view": mixture.digest})


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
    licenses = trained_licenses(mixture, ctx.done[step.init]["outputs"] if step.init else None)
    tags["lladav.licenses"] = ", ".join(licenses) or "none"
    lin.set_tags(run_id, tags)
    if p.state != "interrupted":
        lin.log_config(run_id, "stage", stage.model_dump(mode="json"))
        lin.log_config(run_id, "licenses", licenses)
        lin.log_dataset(run_id, mixture.info["name"], mixture.uri, mixture.digest, context="train",
                        tags={"lladav.step": step.mixture or ""})
        _log_view_mixtures(lin, run_id, mixture)
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
    if ctx.lease:
        ctx.lease.check()  # one model version per export: not from a run that lost the lease
    version = lin.register_export(run_id, f"{ctx.pipe.name}-{p.name}", result.export_uri,
                                  tags={"lladav.licenses": ", ".join(licenses) or "none"})
    _log_graph(lin, run_id, result.export_uri)
    return {"export": result.export_uri, "checkpoints": storage.join(p.folder, "checkpoints"),
            "steps": steps, "model_version": version, "licenses": licenses}


def trained_licenses(mixture: Any, parent_outputs: dict[str, Any] | None) -> dict[str, Any]:
    """The licences an export was trained under: its mixture's (samples and tokens per licence,
    data/build.license_counts) added to those its init export carried (a parent stage's
    outputs), so a stage-3 export answers for stages 1 and 2 too."""
    from lladav.data.manifest import license_counts

    counts = mixture.info.get("counts", {})
    mine = counts.get("by_license") or license_counts(counts.get("by_source", {}))
    out = {k: {"sources": list(v["sources"]), "samples": v["samples"], "tokens": v["tokens"]}
           for k, v in ((parent_outputs or {}).get("licenses") or {}).items()}
    for name, v in mine.items():
        entry = out.setdefault(name, {"sources": [], "samples": 0, "tokens": 0})
        entry["sources"] = sorted(set(entry["sources"]) | set(v["sources"]))
        entry["samples"] += v["samples"]
        entry["tokens"] += v["tokens"]
    return dict(sorted(out.items()))


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


def _metric_name(text: str) -> str:
    """A value as part of an MLflow metric key (letters, digits, _ - . / and spaces only)."""
    return re.sub(r"[^\w\-. /]", "_", text)[:200] or "_"


def _run_eval(p: PlannedStep, ctx: RunContext, run_id: str) -> dict[str, Any]:
    from lladav.evaluate import confusion_csv, evaluate
    from lladav.inference import SamplerSettings

    step: EvalStep = p.config
    lin = ctx.lineage
    model = ctx.done[step.model]
    export = model["outputs"]["export"]
    lin.set_tags(run_id, {"lladav.parent_run": model["run_id"], "lladav.evaluated_export": export,
                          "lladav.test_set": step.data})
    lin.log_config(run_id, "eval", step.model_dump(mode="json"))
    _log_contamination(ctx, run_id, model["run_id"], step)
    if step.suite is not None:
        return _run_suite(p, ctx, run_id, export)
    settings = SamplerSettings(gen_length=step.gen_length,
                               block_length=step.block_length or step.gen_length,
                               steps=step.steps or step.gen_length, remasking=step.remasking,
                               threshold=step.threshold)
    result = evaluate(export, step.data, settings, image_root=step.image_root,
                      scoring=step.scoring, tag=step.tag, limit=step.limit,
                      group_by=step.group_by, progress=ctx.progress(p.name))
    metrics = {"accuracy": result.accuracy, "n": result.n, "chance": result.chance,
               **{f"accuracy_{_metric_name(k)}": v for k, v in result.by_group.items()},
               **{f"class_accuracy/{_metric_name(k)}": v
                  for k, v in list(result.by_class.items())[:MAX_CLASS_METRICS]}}
    lin.log_metrics(run_id, metrics, step=0)
    lin.log_text(run_id, "eval/samples.json", json.dumps(result.samples, indent=2))
    lin.log_text(run_id, "eval/confusion.csv", confusion_csv(result))
    lin.log_text(run_id, "eval/by_class.json", json.dumps(result.by_class, indent=1))
    for s in result.samples[:12]:  # a few images beside their answers, for a human look
        if s["image"] and not storage.is_s3(s["image"]) and os.path.isfile(s["image"]):
            lin.log_file(run_id, s["image"], "eval/images")
    if step.min_accuracy is not None and result.accuracy < step.min_accuracy:
        raise RuntimeError(f"eval {p.name}: accuracy {result.accuracy:.1%} on {step.data} is "
                           f"below min_accuracy {step.min_accuracy:.0%}")
    return {"accuracy": result.accuracy, "n": result.n, "chance": result.chance, "export": export,
            "data": step.data}


def _log_contamination(ctx: RunContext, run_id: str, stage_run: str, step: EvalStep) -> None:
    """The test set's contamination report (contamination.py) against every mixture the export
    was trained on (its stage's and those of the stages it was initialised from), logged to the
    eval run: artifacts contamination/<stage>.json, metrics contamination/{records,images,
    questions} (test records, images and questions found in any of them), tag
    lladav.contamination (and lladav.contamination_reports: where each report is stored, beside
    its manifest). A check that cannot run (no local test file, an old mixture) is a tag and a
    warning, not a failed eval: the scores are still worth having."""
    from lladav.contamination import check, read_items
    from lladav.secrets import describe

    lin = ctx.lineage
    if step.data is None:
        lin.set_tags(run_id, {"lladav.contamination": "not checked: the suite's own datasets"})
        return
    chain, seen, rid = [], set(), stage_run
    while rid and rid not in seen:
        seen.add(rid)
        tags = lin.client.get_run(rid).data.tags
        if tags.get("lladav.mixture"):
            chain.append((tags.get("lladav.step", rid[:8]), tags["lladav.mixture"]))
        rid = tags.get("lladav.parent_run")
    try:
        items = read_items(step.data, image_root=step.image_root)
        reports = [(stage, *check(uri, step.data, image_root=step.image_root, items=items))
                   for stage, uri in chain]
    except Exception as e:  # noqa: BLE001 - see the docstring
        log.warning("eval %s: contamination not checked: %s", step.name, describe(e))
        lin.set_tags(run_id, {"lladav.contamination": f"not checked: {describe(e)}"[:490]})
        return
    records, images, questions = set(), set(), set()
    for stage, report, _ in reports:
        lin.log_text(run_id, f"contamination/{stage}.json", json.dumps(report.to_json(), indent=1))
        records |= set(report.contaminated)
        images |= {(o["eval_id"], o["eval_image"]) for o in report.image_overlaps}
        questions |= {(o["eval_id"], o["question_key"]) for o in report.question_overlaps}
    lin.log_metrics(run_id, {"contamination/records": len(records), "contamination/images": len(images),
                             "contamination/questions": len(questions)}, step=0)
    lin.set_tags(run_id, {
        "lladav.contamination": f"{len(records)} of {len(items.ids)} test records overlap the "
                                f"training data ({len(images)} images, {len(questions)} questions) "
                                f"across {len(reports)} mixtures",
        "lladav.contamination_reports": " ".join(where for _, _, where in reports)[:4900]})


def _run_suite(p: PlannedStep, ctx: RunContext, run_id: str, export: str) -> dict[str, Any]:
    """An eval step with `suite`: lmms-eval's CLI on the export (suites.run_suite); per-task
    scores, seconds per sample and forward passes per answer as metrics, lmms-eval's results
    and sample logs as artifacts."""
    import tempfile

    from lladav.suites import run_suite

    step: EvalStep = p.config
    lin = ctx.lineage
    lin.set_tags(run_id, {"lladav.suite": step.suite})
    with tempfile.TemporaryDirectory() as tmp:
        result = run_suite(export, step.suite, tmp, data=step.data, tasks=step.tasks,
                           image_root=step.image_root, limit=step.limit,
                           threshold=step.threshold, prefix_cache=step.prefix_cache)
        lin.log_metrics(run_id, result.metrics(), step=0)
        for f in result.files:
            lin.log_file(run_id, str(f), "lmms_eval")
        lin.log_file(run_id, str(Path(tmp) / "lmms_eval.log"), "lmms_eval")
    if step.min_accuracy is not None:
        low = {t: s["accuracy"] for t, s in result.scores.items()
               if "accuracy" in s and s["accuracy"] < step.min_accuracy}
        if low:
            raise RuntimeError(f"eval {p.name}: suite {step.suite} below min_accuracy "
                               f"{step.min_accuracy:.0%} on {low}")
    return {"suite": step.suite, "scores": result.scores, "stats": result.stats,
            "export": export, "data": step.data}


MAX_CLASS_METRICS = 50
"""Per-class accuracies logged as metrics (all of them go to eval/by_class.json)."""


RUNNERS = {"synth": _run_synth, "tokenizer": _run_tokenizer, "base": _run_base,
           "data": _run_data, "view": _run_view, "stage": _run_stage, "eval": _run_eval}
