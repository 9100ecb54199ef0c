"""OpenLineage events of pipeline steps, through openlineage-python's client and transports.

One OpenLineage run per step run, in the pipeline's namespace (`openlineage.namespace`, default
the pipeline's name):

    job      <pipeline>.<step>                   facet jobType (BATCH, integration LLADAV)
    run      uuid5 of the step's MLflow run id    the same run when a step resumes; facets parent
                                                 (the pipeline's run, job <pipeline>) and
                                                 lladav_step (kind, step key, MLflow run id)
    START    the inputs, before the step runs
    COMPLETE inputs and outputs, once done.json is written
    FAIL     inputs and an errorMessage facet (scrubbed); ABORT on Ctrl-C

    kind    inputs                                         outputs
    data    each source corpus (lladav_source),            the mixture (lladav_digest,
            the tokenizer                                  lladav_licenses)
    view    each mixture (lladav_digest if a step's)       the view (lladav_digest, lladav_licenses)
    stage   its mixture (lladav_digest if a step's),       the export (lladav_licenses: those of
            the parent stage's export, init weights        its mixture and of its parent's)
    eval    the export, the test set                       eval results <job>/results/<MLflow run>
                                                           in the job namespace (lladav_scores)
    synth, tokenizer, base: their corpora and tokenizer in, what they write out

A dataset's namespace and name follow OpenLineage's naming: s3://bucket/key is namespace
s3://bucket, name key; a local path is namespace `file`, name the absolute path; a trailing
slash is dropped, so the export a stage writes and the export an eval reads are one dataset.
`lladav_*` facets are ours (attrs classes below; their _schemaURL is a URN, the class being the
schema).

Transports (openlineage-python's): with `openlineage.url` set, HTTP POST to <url>/api/v1/lineage
(Marquez; an API key from $OPENLINEAGE_API_KEY, never from the config). Otherwise files under
`openlineage.path` (default <storage>/openlineage): a local folder gets events.jsonl, one event
appended per line (the library's file transport); an s3:// prefix, where nothing can be appended,
gets one object per event through lladav.storage (`StorageTransport`), named so that listing the
prefix lists the events in time order. OPENLINEAGE_DISABLED=true turns emission off, as it does
for every OpenLineage client.

An event that cannot be built or sent is a scrubbed warning in the log: lineage export never
fails a step (MLflow, lladav/lineage/, stays the record `lineage show|trace` read).
Owns: the event vocabulary above and the choice of transport. Does not own: when steps run or
what they output (pipeline.py).
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import attr
from openlineage.client import OpenLineageClient
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import (DatasetFacet, RunFacet, error_message_run, job_type_job,
                                         parent_run)
from openlineage.client.serde import Serde
from openlineage.client.transport.transport import Config, Transport

import lladav
from lladav.secrets import describe, format_exception, scrub

log = logging.getLogger(__name__)

PRODUCER = f"urn:lladav:{lladav.__version__}"
"""Who wrote an event or facet (a URI, as the spec asks; lladav has no public URL of its own)."""
FACET_SCHEMA = "urn:lladav:openlineage:facets:1"
"""_schemaURL prefix of our facets; bump the version when a facet's fields change."""
API_KEY_ENV = "OPENLINEAGE_API_KEY"
RUN_ID_NAMESPACE = uuid.UUID("6f0e7c1e-9a52-4f35-8d8f-2b1c1d0a7a51")
"""uuid5 namespace that turns an MLflow run id into an OpenLineage run id (OpenLineage wants a
UUID; the same MLflow run, resumed, must stay the same OpenLineage run)."""


# ---- our facets ------------------------------------------------------------------------------

class _Ours:
    """Our facets' _schemaURL: FACET_SCHEMA and the class's name (the class is the schema)."""

    @classmethod
    def _get_schema(cls) -> str:
        return f"{FACET_SCHEMA}:{cls.__name__}"


@attr.define
class DigestDatasetFacet(_Ours, DatasetFacet):
    """A mixture's or view's identity: the digest lladav's step keys and MLflow tags use."""

    sha256: str
    """sha256 of its mixture.json (a view's view.json)."""



@attr.define
class LicensesDatasetFacet(_Ours, DatasetFacet):
    """What a mixture, view or export was made of, per licence (pipeline.trained_licenses)."""

    licenses: dict[str, Any]
    """licence -> {sources: [names], samples, tokens}; an export counts its parents' too."""



@attr.define
class SourceDatasetFacet(_Ours, DatasetFacet):
    """A recipe's source corpus as the recipe declares it."""

    name: str
    kind: str
    """Its reader (llava_json, webdataset, ...)."""
    license: str
    """Its licence as the recipe says (`unknown` if it says nothing)."""



@attr.define
class ScoresDatasetFacet(_Ours, DatasetFacet):
    """An eval step's results: accuracy, n and chance, or a suite's scores per task."""

    scores: dict[str, Any]



@attr.define
class StepRunFacet(_Ours, RunFacet):
    """Where to look in lladav for this run: its MLflow run and its step folder's key."""

    kind: str
    key: str
    """The step's key (its folder is <storage>/steps/<step>/<key[:16]>)."""
    mlflowRunId: str  # noqa: N815 - OpenLineage's camelCase



# ---- building events (no I/O) ------------------------------------------------------------------

def run_uuid(mlflow_run_id: str) -> str:
    return str(uuid.uuid5(RUN_ID_NAMESPACE, mlflow_run_id))


def dataset_id(uri: str) -> tuple[str, str]:
    """(namespace, name) of a URI by OpenLineage's naming conventions (module docstring)."""
    uri = scrub(uri).rstrip("/") or "/"
    if "://" in uri and not uri.startswith("file://"):
        scheme, rest = uri.split("://", 1)
        authority, _, path = rest.partition("/")
        return f"{scheme}://{authority}", path or "/"
    return "file", os.path.abspath(uri.removeprefix("file://"))


def _input(uri: str, **facets: DatasetFacet) -> InputDataset:
    namespace, name = dataset_id(uri)
    return InputDataset(namespace=namespace, name=name, facets=facets)


def _output(uri: str, **facets: DatasetFacet) -> OutputDataset:
    namespace, name = dataset_id(uri)
    return OutputDataset(namespace=namespace, name=name, facets=facets)


def _digest(outputs: dict[str, Any] | None) -> dict[str, DatasetFacet]:
    digest = (outputs or {}).get("digest")
    return {"lladav_digest": DigestDatasetFacet(digest, producer=PRODUCER)} if digest else {}


def _licenses(outputs: dict[str, Any] | None) -> dict[str, DatasetFacet]:
    licenses = (outputs or {}).get("licenses")
    if licenses is None:
        return {}
    return {"lladav_licenses": LicensesDatasetFacet(licenses, producer=PRODUCER)}


@dataclass(frozen=True)
class StepRun:
    """One run of one step, as OpenLineage names it."""

    namespace: str
    pipeline: str
    step: str
    kind: str
    key: str
    mlflow_run_id: str
    pipeline_run_id: str
    """The MLflow run id of the pipeline's run (the parent)."""

    @property
    def job(self) -> str:
        return f"{self.pipeline}.{self.step}"

    @property
    def results(self) -> str:
        """The eval results dataset's name (in the job namespace)."""
        return f"{self.job}/results/{self.mlflow_run_id}"


def step_datasets(run: StepRun, config: Any, upstream: dict[str, dict[str, Any]],
                  outputs: dict[str, Any] | None) -> tuple[list[InputDataset], list[OutputDataset]]:
    """A step's inputs and (once it is done, `outputs` being its done.json outputs) its outputs.
    `config` is the step's resolved config (pipeline.PlannedStep.config); `upstream` the outputs
    of the steps it references, by role (`mixture`, `init`, `model`, `mixtures.0`, ...)."""
    ins: list[InputDataset] = []
    outs: list[OutputDataset] = []
    done = outputs is not None
    out = outputs or {}
    if run.kind == "data":
        ins += [_input(s.location, lladav_source=SourceDatasetFacet(s.name, s.kind, s.license,
                                                                    producer=PRODUCER))
                for s in config.sources]
        if config.tokenizer:
            ins.append(_input(config.tokenizer))
        if done:
            outs.append(_output(out["mixture"], **_digest(out), **_licenses(out)))
    elif run.kind == "view":
        ins += [_input(uri, **_digest(upstream.get(f"mixtures.{i}")))
                for i, uri in enumerate(config.mixtures)]
        if done:
            outs.append(_output(out["mixture"], **_digest(out), **_licenses(out)))
    elif run.kind == "stage":
        ins.append(_input(config.mixture, **_digest(upstream.get("mixture"))))
        init = config.init  # a parent stage's export (pipeline._resolve fills it in) or weights
        ins += [_input(uri) for uri in (init.export, init.language_model, init.vision_tower) if uri]
        if done:
            outs.append(_output(out["export"], **_licenses(out)))
    elif run.kind == "eval":
        export = upstream.get("model", {}).get("export") or out.get("export")
        ins += [_input(uri) for uri in (export, config.data) if uri]
        if done:
            scores: dict[str, Any] = {k: out[k] for k in ("accuracy", "n", "chance", "suite", "scores") if k in out}
            outs.append(OutputDataset(namespace=run.namespace, name=run.results, facets={
                "lladav_scores": ScoresDatasetFacet(scores, producer=PRODUCER)}))
    else:  # synth, tokenizer, base: corpora and a tokenizer in, what they wrote out
        ins += [_input(uri) for uri in [*getattr(config, "corpus", []),
                                        getattr(config, "tokenizer", None)] if uri]
        if done:
            outs += [_output(out[k]) for k in ("corpus", "tokenizer", "base") if out.get(k)]
    return ins, outs


def step_event(state: RunState, run: StepRun, inputs: list[InputDataset],
               outputs: list[OutputDataset], error: BaseException | None = None,
               now: datetime | None = None) -> RunEvent:
    """The RunEvent of `run` entering `state`; a FAIL or ABORT carries `error` (scrubbed)."""
    pipeline_run = run_uuid(run.pipeline_run_id)  # the pipeline's run: parent and root
    root = parent_run.Root(run=parent_run.RootRun(runId=pipeline_run),
                           job=parent_run.RootJob(namespace=run.namespace, name=run.pipeline))
    facets: dict[str, RunFacet] = {
        "parent": parent_run.ParentRunFacet(
            run=parent_run.Run(runId=pipeline_run), producer=PRODUCER, root=root,
            job=parent_run.Job(namespace=run.namespace, name=run.pipeline)),
        "lladav_step": StepRunFacet(run.kind, run.key, run.mlflow_run_id, producer=PRODUCER)}
    if error is not None:
        facets["errorMessage"] = error_message_run.ErrorMessageRunFacet(
            message=describe(error), programmingLanguage="python", producer=PRODUCER,
            stackTrace=format_exception(error))
    job_type = job_type_job.JobTypeJobFacet(processingType="BATCH", integration="LLADAV",
                                            jobType=run.kind.upper(), producer=PRODUCER)
    return RunEvent(eventType=state, eventTime=(now or datetime.now(timezone.utc)).isoformat(),
                    run=Run(runId=run_uuid(run.mlflow_run_id), facets=facets),
                    job=Job(namespace=run.namespace, name=run.job, facets={"jobType": job_type}),
                    inputs=inputs, outputs=outputs, producer=PRODUCER)


# ---- sending them ----------------------------------------------------------------------------

@attr.define
class StorageConfig(Config):
    prefix: str
    """s3:// prefix (or any lladav.storage URI) the events are written under."""

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> "StorageConfig":
        return cls(prefix=params["prefix"])


class StorageTransport(Transport):
    """One object per event under a prefix, written with lladav.storage (its S3 endpoint,
    credentials and retries): S3 cannot append to a JSON-lines file."""

    kind = "lladav_storage"
    config_class = StorageConfig

    def __init__(self, config: StorageConfig) -> None:
        self.config = config

    def emit(self, event: Any) -> None:
        from lladav import storage

        storage.write_bytes(storage.join(self.config.prefix, event_object_name(event)),
                            Serde.to_json(event).encode())


def event_object_name(event: RunEvent) -> str:
    """<time>-<job>-<run id>-<type>.json: listing a prefix lists its events in time order."""
    when = datetime.fromisoformat(event.eventTime).astimezone(timezone.utc)
    job = "".join(c if c.isalnum() or c in "._-" else "_" for c in event.job.name)
    assert event.eventType is not None  # step_event always sets it (the spec leaves it optional)
    return f"{when:%Y%m%dT%H%M%S.%fZ}-{job}-{event.run.runId}-{event.eventType.value}.json"


def transport_config(settings: Any, root: str) -> dict[str, Any]:
    """openlineage-python's transport config for config.OpenLineageSettings (module docstring);
    `root` is the pipeline's storage root."""
    from lladav import storage

    if settings.url:
        config: dict[str, Any] = {
            "type": "http", "url": settings.url, "endpoint": "api/v1/lineage", "timeout": 5.0,
            # a server that is down costs seconds per event, not the library's ~10 s of retries
            "retry": {"total": 2, "backoff_factor": 0.5}}
        if key := os.environ.get(API_KEY_ENV):
            config["auth"] = {"type": "api_key", "apiKey": key}
        return config
    path = settings.path or storage.join(root, "openlineage")
    if storage.is_s3(path):
        return {"type": f"{__name__}.StorageTransport", "prefix": path}
    return {"type": "file", "append": True,
            "log_file_path": os.path.join(path.removeprefix("file://"), "events.jsonl")}


class Emitter:
    """Sends a pipeline run's step events; `step` never raises (a failure is a warning)."""

    def __init__(self, client: OpenLineageClient, namespace: str, pipeline: str,
                 pipeline_run_id: str) -> None:
        self.client, self.namespace = client, namespace
        self.pipeline, self.pipeline_run_id = pipeline, pipeline_run_id

    @classmethod
    def create(cls, pipe: Any, root: str, pipeline_run_id: str) -> "Emitter | None":
        """The emitter of `pipe` (config.PipelineConfig), or None when it is disabled or its
        transport cannot be set up (a warning)."""
        settings = pipe.openlineage
        if not settings.enabled:
            return None
        try:
            config = transport_config(settings, root)
            if config["type"] == "file":
                os.makedirs(os.path.dirname(config["log_file_path"]), exist_ok=True)
            client = OpenLineageClient(config={"transport": config})
        except Exception as e:  # noqa: BLE001 - lineage export never fails a pipeline
            log.warning("OpenLineage events are off for this run: %s", describe(e))
            return None
        return cls(client, settings.namespace or pipe.name, pipe.name, pipeline_run_id)

    def step(self, state: str, step: str, kind: str, key: str, mlflow_run_id: str,
             config: Any, upstream: dict[str, dict[str, Any]],
             outputs: dict[str, Any] | None = None, error: BaseException | None = None) -> None:
        """Build and send the event of step run `mlflow_run_id` entering `state` (START,
        COMPLETE, FAIL, ABORT); arguments as step_datasets and step_event take them."""
        run = StepRun(self.namespace, self.pipeline, step, kind, key, mlflow_run_id,
                      self.pipeline_run_id)
        try:
            inputs, outs = step_datasets(run, config, upstream, outputs)
            self.client.emit(step_event(RunState(state), run, inputs, outs, error))
        except Exception as e:  # noqa: BLE001 - lineage export never fails a step
            log.warning("OpenLineage %s event of step %s not sent: %s", state, step, describe(e))

    def close(self) -> None:
        try:
            self.client.close(timeout=5.0)
        except Exception as e:  # noqa: BLE001
            log.warning("OpenLineage transport did not close: %s", describe(e))
