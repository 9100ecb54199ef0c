"""The records: what a pipeline writes into MLflow (the run tree in lladav/lineage/__init__.py).

`Lineage` is the driver's writer, one per process: runs and their tags, configs as params and
artifacts, dataset inputs (mixtures, source corpora), metrics and registered exports.
`StepMetrics` is the worker's: the on_step hook a stage's rank 0 calls, which batches the steps'
metrics into the step's run. Both turn a metrics dict into MLflow batches through `send_metrics`.

Secrets: nothing from the environment is logged. Every param, tag and artifact text passes
`scrub` (secrets.py), which blanks the value of any environment variable whose name looks like a
credential and the user:password part of URLs, so a secret pasted into a config still never
reaches MLflow. A tracking server that does not answer is a `TrackingError` naming it scrubbed.

All calls go through `MlflowClient` with explicit run ids, never the fluent "active run": a stage
worker logs into the same run from another process, and an active run left open at exit would
retry a stopped server for minutes (FEASIBILITY §5).
Owns: the MLflow vocabulary (`PREFIX` tags, dataset contexts), where the store is, the writes.
Does not own: reading lineage back (queries.py), drawing it (render.py), when steps run
(pipeline.py) or what a mixture/export holds (data/manifest.py, train/).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lladav.secrets import describe, install, remember, scrub

log = logging.getLogger(__name__)

PREFIX = "lladav."
_PARAM_MAX = 500
_METRICS_PER_BATCH = 1000  # MLflow's limit per log_batch


class TrackingError(RuntimeError):
    """The MLflow tracking server did not answer or refused a call (its URI scrubbed)."""


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"} for MLflow params (scrubbed, capped in length)."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix.rstrip(".")] = scrub(str(obj))[:_PARAM_MAX]
    return out


# ---- where the store is ----------------------------------------------------------------------

def _check_listening(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds when nothing listens at an http(s) tracking URI: MLflow's own client
    retries a refused connection for minutes before it reports it."""
    import socket
    from urllib.parse import urlparse

    from mlflow.exceptions import MlflowException

    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise MlflowException(f"cannot connect to {parsed.hostname}:{port}: {e.strerror or e}") from None


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else a SQLite store under ./.lladav/ (created on first use)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path.cwd() / ".lladav"
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def _is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


# ---- the writers ----------------------------------------------------------------------------

class Lineage:
    """The MLflow side of a pipeline run (one per process)."""

    def __init__(self, tracking_uri: str | None = None, experiment: str = "lladav") -> None:
        from mlflow import MlflowClient

        # MLflow prints each run's URL on ending it, a password in the tracking URI included.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self.tracking_uri = tracking_uri or default_tracking_uri()
        remember(self.tracking_uri)
        self.client = MlflowClient(self.tracking_uri, registry_uri=self.tracking_uri)
        found = self._reach(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            # A local store gets its artifacts beside the database, not in ./mlruns of the cwd;
            # a tracking server decides for itself (e.g. proxied S3).
            location = None
            if _is_local_store(self.tracking_uri):
                db = Path(self.tracking_uri.split(":///", 1)[-1])
                location = (db.parent / "mlartifacts").resolve().as_uri()
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)

    def _reach(self, experiment: str) -> Any:
        """The experiment (or None), or a TrackingError before any work when the store is down."""
        from mlflow.exceptions import MlflowException

        try:
            _check_listening(self.tracking_uri)
            return self.client.get_experiment_by_name(experiment)
        except MlflowException as e:
            raise TrackingError(
                f"MLflow tracking server {scrub(self.tracking_uri)} did not answer ({describe(e)}). "
                "Start it, or point the pipeline's mlflow.tracking_uri or MLFLOW_TRACKING_URI at "
                "one that runs") from None

    # -- runs --

    def start_run(self, name: str, tags: dict[str, str], parent: str | None = None) -> str:
        from lladav import __version__
        from lladav.digest import code_version

        version = code_version()
        all_tags = {f"{PREFIX}version": __version__,
                    f"{PREFIX}git_commit": str(version.get("git_commit")),
                    f"{PREFIX}git_dirty": str(version.get("git_dirty")),
                    **tags}
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={k: scrub(str(v)) for k, v in all_tags.items()})
        run_id: str = run.info.run_id
        return run_id

    def resume_run(self, run_id: str) -> str:
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, scrub(str(v)))

    # -- what a run read and wrote --

    def log_config(self, run_id: str, name: str, config: dict[str, Any]) -> None:
        """Params `<name>.<field...>` plus the whole config as artifact config/<name>.yaml."""
        from mlflow.entities import Param

        import yaml

        params = [Param(k, v) for k, v in flatten(config, f"{name}.").items()]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params per call
            self.client.log_batch(run_id, params=params[i:i + 100])
        self.log_text(run_id, f"config/{name}.yaml", yaml.safe_dump(config, sort_keys=False))

    def log_text(self, run_id: str, artifact_path: str, text: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_path).name
            path.write_text(scrub(text))
            self.client.log_artifact(run_id, str(path), str(Path(artifact_path).parent) or None)

    def log_file(self, run_id: str, local_path: str | Path, artifact_dir: str) -> None:
        self.client.log_artifact(run_id, str(local_path), artifact_dir)

    def log_dataset(self, run_id: str, name: str, uri: str, digest: str | None, context: str,
                    tags: dict[str, str] | None = None) -> None:
        """A mixture (context "train") or a source corpus (context "source") as a dataset input.
        MLflow caps a dataset digest at 36 characters, so the full sha256 goes in a tag."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        import warnings

        short = digest.removeprefix("sha256:")[:32] if digest else None
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are local
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(scrub(uri))
        dataset = MetaDataset(source, name=name, digest=short)
        input_tags = [InputTag("mlflow.data.context", context)]
        if digest:
            input_tags.append(InputTag(f"{PREFIX}digest", digest))
        input_tags += [InputTag(k, scrub(v)) for k, v in (tags or {}).items()]
        self.client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), input_tags)])

    def log_metrics(self, run_id: str, metrics: dict[str, Any], step: int) -> None:
        send_metrics(self.client, run_id, as_metrics(metrics, step))

    def register_export(self, run_id: str, model_name: str, export_uri: str,
                        tags: dict[str, str] | None = None) -> str:
        """The export as a new version of registered model `model_name` (with `tags` beside its
        export URI); returns the version."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(model_name)
        except MlflowException as e:
            if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
                raise
        version = self.client.create_model_version(model_name, source=scrub(export_uri), run_id=run_id,
                                                   tags={f"{PREFIX}export": scrub(export_uri),
                                                         **(tags or {})})
        return str(version.version)


# ---- metrics: the one rule for turning a metrics dict into MLflow batches --------------------

def as_metrics(metrics: dict[str, Any], step: int, timestamp_ms: int | None = None) -> list[Any]:
    """The numbers of `metrics` as MLflow `Metric`s of `step` (at `timestamp_ms`, default now).
    Bools and non-numbers are not metrics: a step's `checkpoint` flag or a label is dropped."""
    from mlflow.entities import Metric

    when = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    return [Metric(k, float(v), when, step) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)]


def send_metrics(client: Any, run_id: str, metrics: list[Any]) -> None:
    """`metrics` into run `run_id`, in as many `log_batch` calls as MLflow's per-call limit needs
    (none for an empty list)."""
    for start in range(0, len(metrics), _METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[start:start + _METRICS_PER_BATCH])


@dataclass
class StepMetrics:
    """on_step hook for a stage (pickled into each Ray Train worker): rank 0 logs the step's
    metrics into the step's MLflow run. A tracking hiccup is logged, never fatal to training.

    Steps are sent in batches, on the training thread: the first step, every step that writes a
    checkpoint (`checkpoint` in the metrics, before it is written) and the last step
    (`total_steps`) send what accumulated, and so does any step `flush_s` seconds after the last
    send. A `log_batch` into SQLite cost a tiny demo step 40 ms of its 170 (a sender thread cost
    more: it holds the GIL the training thread needs). The run's history still holds every
    step, and a killed run's history reaches at least its last checkpoint."""

    tracking_uri: str
    run_id: str
    total_steps: int | None = None
    flush_s: float = 5.0
    _pending: list[Any] = field(default_factory=list, init=False, repr=False, compare=False)
    _sent_at: float | None = field(default=None, init=False, repr=False, compare=False)
    _client: Any = field(default=None, init=False, repr=False, compare=False)

    def __repr__(self) -> str:
        # Ray Train keeps str() of every train_loop_config value in its run state
        return f"StepMetrics({scrub(self.tracking_uri)!r}, run_id={self.run_id!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}  # each process makes its own

    def __call__(self, step: int, rank: int, metrics: dict[str, Any]) -> None:
        if rank != 0:
            return
        now = time.time()
        self._pending += as_metrics(metrics, step, int(now * 1000))
        total = metrics.get("total_steps", self.total_steps)
        if (self._sent_at is None or metrics.get("checkpoint") is True
                or (total is not None and step >= int(total)) or now - self._sent_at >= self.flush_s):
            self._send(step)
            self._sent_at = now

    def _send(self, step: int) -> None:
        install()  # this worker's logs (MLflow's, Ray's, ours) are scrubbed from here on
        batch, self._pending = self._pending, []
        try:
            from mlflow import MlflowClient

            self._client = self._client or MlflowClient(self.tracking_uri)
            send_metrics(self._client, self.run_id, batch)
        except Exception as e:  # noqa: BLE001 - lineage must not kill a multi-day run
            log.warning("could not log step %d to MLflow run %s: %s", step, self.run_id, describe(e))
