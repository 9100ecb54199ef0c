"""Lineage in MLflow: what the pipeline records, and the two questions auditors ask of it.

    pipeline run (parent)                      tags lladav.pipeline, lladav.git_commit, lladav.version
    ├── step run "mix-stage1"  (kind data)     inputs: each source corpus (context "source")
    │                                          tags lladav.mixture + lladav.mixture_digest
    ├── step run "mix-view"    (kind view)     inputs: each mixture it weights (context "mixture")
    │                                          tags lladav.mixture + lladav.mixture_digest (the view's)
    ├── step run "stage1"      (kind stage)    inputs: its mixture (context "train", digest tag),
    │                                          and if that is a view, the view's mixtures
    │                                          (context "mixture", tag lladav.view)
    │                                          tags lladav.export, lladav.parent_run (the stage
    │                                          whose export it started from), metrics per step
    └── step run "eval"        (kind eval)     metrics accuracy, class_accuracy/<answer>; the
                                               samples, confusion.csv and by_class.json

`show(ref)` walks an export back through `lladav.parent_run` to the first stage and, for each
stage, lists its mixture (digest, URI) and that mixture's source corpora (from its mixture.json);
a view lists its mixtures, each with its weights and sources.
`trace(source, record)` scans every stage run's mixture manifest for the record and returns the
exports that read it, and those that descend from one that did (initialised from its export). A
view's manifest rows carry their mixture rows' source and record id, so a record is found
through a view exactly as often as the view repeats it (and not at all if it dropped it).

Secrets: nothing from the environment is logged. Every param, tag and artifact text passes
`scrub` (secrets.py), which blanks the value of any environment variable whose name looks like a
credential and the user:password part of URLs, so a secret pasted into a config still never
reaches MLflow. A tracking server that does not answer is a `TrackingError` naming it scrubbed.

All calls go through `MlflowClient` with explicit run ids, never the fluent "active run": a stage
worker logs into the same run from another process, and an active run left open at exit would
retry a stopped server for minutes (FEASIBILITY §5).
Owns: the MLflow vocabulary above and the show/trace queries. Does not own: when steps run
(pipeline.py) or what a mixture/export holds (data/manifest.py, train/).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lladav.secrets import describe, install, remember, scrub

log = logging.getLogger(__name__)

PREFIX = "lladav."
_PARAM_MAX = 500


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
        return run.info.run_id

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
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if batch:
            self.client.log_batch(run_id, metrics=batch)

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

    def latest_metric(self, run_id: str, key: str) -> float | None:
        return self.client.get_run(run_id).data.metrics.get(key)


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
    _pending: list = field(default_factory=list, init=False, repr=False, compare=False)
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
        from mlflow.entities import Metric

        now = time.time()
        self._pending += [Metric(k, float(v), int(now * 1000), step) for k, v in metrics.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool)]
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
            for start in range(0, len(batch), 1000):  # MLflow's limit per log_batch
                self._client.log_batch(self.run_id, metrics=batch[start:start + 1000])
        except Exception as e:  # noqa: BLE001 - lineage must not kill a multi-day run
            log.warning("could not log step %d to MLflow run %s: %s", step, self.run_id, describe(e))


# ---- the auditors' queries -------------------------------------------------------------------

@dataclass
class Node:
    """One box of a lineage tree: an export (stage run), a mixture, a source corpus or an init."""

    kind: str
    label: str
    detail: str = ""
    run_id: str | None = None
    children: list["Node"] = field(default_factory=list)


class LineageError(LookupError):
    """The run or export asked about is not in the tracking store."""


def _experiment_ids(client: Any) -> list[str]:
    return [e.experiment_id for e in client.search_experiments()]


def _all_runs(client: Any, filter_string: str, order_by: list[str] | None = None) -> list[Any]:
    """Every run of every experiment matching `filter_string`, page by page (search_runs stops
    at 1,000 a page)."""
    runs, token = [], None
    while True:
        page = client.search_runs(_experiment_ids(client), filter_string=filter_string,
                                  order_by=order_by, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _find_export_run(client: Any, ref: str) -> Any:
    if re.fullmatch(r"[0-9a-f]{32}", ref):
        return client.get_run(ref)
    runs = client.search_runs(_experiment_ids(client),
                              filter_string=f"tags.`{PREFIX}export` = '{ref.rstrip('/')}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise LineageError(f"{ref}: no stage run in {scrub(client.tracking_uri)} exported this URI")
    return runs[0]


def _mixture_sources(uri: str) -> list[Node]:
    """The source corpora of a mixture; for a view, its mixtures, each with its sources."""
    from lladav.data.manifest import View, open_mixture

    try:
        mixture = open_mixture(uri)
    except (OSError, ValueError) as e:
        return [Node("source", "(mixture unreadable)", str(e))]
    info = mixture.info
    if isinstance(mixture, View):
        return [Node("mixture", f"mixture {m['name']}",
                     f"{m['digest']} · {scrub(m['uri'])} · view weights " + ", ".join(
                         f"{s} {c['weight']:g} ({c['samples']} of {c['available']})"
                         for s, c in m["sources"].items()),
                     children=_mixture_sources(m["uri"]))
                for m in info["mixtures"]]
    counts = info.get("counts", {}).get("by_source", {})
    return [Node("source", f"source {s['name']}",
                 f"{s['kind']} {scrub(s['location'])} · {counts.get(s['name'], {}).get('samples', '?')} samples")
            for s in info["recipe"]["sources"]]


def _stage_node(client: Any, run: Any, seen: set[str]) -> Node:
    tags = run.data.tags
    node = Node("export", f"stage {tags.get(f'{PREFIX}step', run.info.run_name)}",
                f"{tags.get(f'{PREFIX}export', '(not exported)')} · run {run.info.run_id} · {run.info.status}",
                run.info.run_id)
    seen.add(run.info.run_id)
    for ds in run.inputs.dataset_inputs:
        itags = {t.key: t.value for t in ds.tags}
        if itags.get("mlflow.data.context") != "train":
            continue
        import json

        uri = json.loads(ds.dataset.source).get("uri", ds.dataset.source)
        mix = Node("mixture", f"mixture {ds.dataset.name}", f"{itags.get(f'{PREFIX}digest', ds.dataset.digest)} · {uri}")
        mix.children = _mixture_sources(uri)
        node.children.append(mix)
    if export := tags.get(f"{PREFIX}export"):
        node.children += _eval_nodes(client, export)
    parent = tags.get(f"{PREFIX}parent_run")
    if parent and parent not in seen:
        node.children.append(_stage_node(client, client.get_run(parent), seen))
    elif tags.get(f"{PREFIX}init"):
        node.children.append(Node("init", "init", tags[f"{PREFIX}init"]))
    return node


def _eval_nodes(client: Any, export: str) -> list[Node]:
    """The finished eval runs of an export, newest first, with their scores: accuracy for
    lladav's own scoring; per task score, s/sample and forward passes per answer for a suite."""
    runs = client.search_runs(_experiment_ids(client),
                              filter_string=f"tags.`{PREFIX}evaluated_export` = '{export}' "
                                            "and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=20)
    nodes = []
    for run in runs:
        m, tags = run.data.metrics, run.data.tags
        if suite := tags.get(f"{PREFIX}suite"):
            tasks = sorted({k.split("/", 1)[0] for k in m
                            if "/" in k and not k.startswith("contamination/")})
            parts = []
            for t in tasks:
                scores = [f"{k.split('/', 1)[1]} {v:.3f}" for k, v in sorted(m.items())
                          if k.startswith(t + "/") and k.split("/", 1)[1] not in
                          ("seconds_per_sample", "forward_passes_per_answer")]
                extra = (f", {m[f'{t}/seconds_per_sample']:.2f} s/sample, "
                         f"{m[f'{t}/forward_passes_per_answer']:.1f} passes/answer"
                         if f"{t}/seconds_per_sample" in m else "")
                parts.append(f"{t}: {', '.join(scores)}{extra}")
            detail = f"suite {suite} · " + " · ".join(parts)
        else:
            detail = f"accuracy {m.get('accuracy', float('nan')):.3f} on {tags.get(f'{PREFIX}test_set', '?')}"
        if contamination := tags.get(f"{PREFIX}contamination"):
            detail += f" · contamination: {contamination}"
        nodes.append(Node("eval", f"eval {tags.get(f'{PREFIX}step', run.info.run_name)}",
                          f"{detail} · run {run.info.run_id}", run.info.run_id))
    return nodes


def show(ref: str, tracking_uri: str | None = None) -> Node:
    """The lineage tree of an export (its URI) or of a stage run (its id)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri or default_tracking_uri())
    return _stage_node(client, _find_export_run(client, ref), set())


def stages_in(node: Node) -> list[Node]:
    """The export nodes of a tree, newest first."""
    out = [node] if node.kind == "export" else []
    for c in node.children:
        out += stages_in(c)
    return out


def render_tree(node: Node) -> Any:
    """A rich Tree of `node` for the terminal."""
    from rich.tree import Tree

    style = {"export": "bold", "mixture": "cyan", "source": "green", "init": "magenta",
             "eval": "yellow"}

    def add(tree: Any, n: Node) -> None:
        branch = tree.add(f"[{style.get(n.kind, '')}]{scrub(n.label)}[/]  [dim]{scrub(n.detail)}[/]")
        for c in n.children:
            add(branch, c)

    root = Tree(f"[bold]{scrub(node.label)}[/]  [dim]{scrub(node.detail)}[/]")
    for c in node.children:
        add(root, c)
    return root


def render_graph(node: Node, path: str | Path) -> Path:
    """The tree as a left-to-right graph image (PNG): sources -> mixtures -> exports.

    Drawn with matplotlib (an MLflow dependency) rather than graphviz, which needs a system binary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: list[tuple[int, Node, int | None]] = []  # (depth, node, parent row)

    def walk(n: Node, depth: int, parent: int | None) -> None:
        rows.append((depth, n, parent))
        me = len(rows) - 1
        for c in n.children:
            walk(c, depth + 1, me)

    walk(node, 0, None)
    depth_max = max(d for d, _, _ in rows)
    fig, ax = plt.subplots(figsize=(4 + 3.2 * depth_max, 0.5 + 0.45 * len(rows)))
    colours = {"export": "#f4d58d", "mixture": "#9ad1d4", "source": "#b8e0a8", "init": "#d7b9e8"}
    pos = {i: (d, -i) for i, (d, _, _) in enumerate(rows)}
    for i, (_, n, parent) in enumerate(rows):
        x, y = pos[i]
        if parent is not None:
            px, py = pos[parent]
            ax.annotate("", xy=(px + 0.05, py), xytext=(x - 0.05, y),
                        arrowprops={"arrowstyle": "->", "color": "#555"})
        ax.text(x, y, n.label, ha="left", va="center", fontsize=8,
                bbox={"boxstyle": "round", "fc": colours.get(n.kind, "#eee"), "ec": "#555"})
    ax.set_xlim(-0.2, depth_max + 1.5)
    ax.set_ylim(-len(rows), 1)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


@dataclass
class TraceHit:
    export: str | None
    step: str
    run_id: str
    status: str
    how: str
    """"read N samples" (its mixture holds the records) or "descends from <step>"."""
    samples: int = 0
    start_time: int = 0
    """When the stage run started (ms since the epoch)."""
    superseded: str | None = None
    """The takedown (id, time) the stage predates, when it read records taken down since."""


def _manifest_counts(uri: str, source: str, records: list[str] | None,
                     cache: dict[str, Any]) -> int:
    """Rows of `source` (or of those of its `records`) in the manifest of the mixture at `uri`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from lladav.data.manifest import open_mixture

    if uri not in cache:
        cache[uri] = open_mixture(uri).manifest().select(["source", "source_id"])
    table = cache[uri]
    mask = pc.equal(table["source"], source)
    if records is not None:
        mask = pc.and_(mask, pc.is_in(table["source_id"], value_set=pa.array(records, pa.string())))
    return int(pc.sum(mask.cast("int64")).as_py() or 0)


def _train_mixtures(run: Any) -> list[str]:
    import json

    return [json.loads(ds.dataset.source).get("uri") for ds in run.inputs.dataset_inputs
            if {t.key: t.value for t in ds.tags}.get("mlflow.data.context") == "train"]


def trace(source: str, record: str | None = None, tracking_uri: str | None = None, *,
          records: list[str] | None = None) -> list[TraceHit]:
    """Every stage run (and its export) that trained on records of `source` (one `record`, any
    of `records`, or all), read from the mixtures' manifests, plus the stages initialised from
    such an export. A stage that read records taken down after it started is marked
    `superseded` with the takedown (lladav/takedown.py)."""
    from mlflow import MlflowClient

    wanted = [record] if record is not None else (sorted(set(records)) if records else None)
    client = MlflowClient(tracking_uri or default_tracking_uri())
    runs = _all_runs(client, f"tags.`{PREFIX}kind` = 'stage'")
    by_id = {r.info.run_id: r for r in runs}
    matched: dict[str, int] = {}
    manifests: dict[str, Any] = {}
    for run in runs:
        count = sum(_manifest_counts(uri, source, wanted, manifests) for uri in _train_mixtures(run))
        if count:
            matched[run.info.run_id] = count

    def ancestor_hit(run: Any) -> str | None:
        seen, parent = set(), run.data.tags.get(f"{PREFIX}parent_run")
        while parent and parent not in seen:
            seen.add(parent)
            if parent in matched:
                return parent
            p = by_id.get(parent)
            parent = p.data.tags.get(f"{PREFIX}parent_run") if p else None
        return None

    takedowns = _takedowns_of(client, source, wanted) if wanted else []
    hits = []
    for run in sorted(runs, key=lambda r: r.info.start_time):
        tags = run.data.tags
        base = dict(export=tags.get(f"{PREFIX}export"), step=tags.get(f"{PREFIX}step", run.info.run_name),
                    run_id=run.info.run_id, status=run.info.status, start_time=run.info.start_time)
        if run.info.run_id in matched:
            n = matched[run.info.run_id]
            hit = TraceHit(**base, how=f"read {n} sample{'s' if n != 1 else ''}", samples=n)
        elif (anc := ancestor_hit(run)) is not None:
            hit = TraceHit(**base, how=f"descends from {by_id[anc].data.tags.get(f'{PREFIX}step')} ({anc[:8]})")
        else:
            continue
        later = [(t, when) for t, when in takedowns if when > run.info.start_time]
        if later:
            t, when = later[0]
            hit.superseded = f"takedown {t} of {time.strftime('%Y-%m-%d %H:%M', time.gmtime(when / 1000))} UTC"
        hits.append(hit)
    return hits


def _takedowns_of(client: Any, source: str, records: list[str]) -> list[tuple[str, int]]:
    """(takedown id, request time in ms) of the takedowns of `source` that name any of
    `records`, oldest first (read from their request runs' takedown/request.json)."""
    import json

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bar per file
    runs = _all_runs(client, f"tags.`{PREFIX}kind` = 'takedown' and "
                             f"tags.`{PREFIX}takedown.source` = '{source}'")
    wanted, out = set(records), []
    for run in runs:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = client.download_artifacts(run.info.run_id, "takedown/request.json", tmp)
            except Exception:  # noqa: BLE001 - a request that never finished names nothing
                continue
            entry = json.loads(Path(path).read_text())["entry"]
        if wanted & set(entry["records"]):
            from lladav.takedown import Entry

            out.append((entry["id"], Entry.model_validate(entry).requested_ms))
    return sorted(out, key=lambda t: t[1])


def mixtures_holding(source: str, records: list[str], tracking_uri: str | None = None, *,
                     with_empty: bool = False) -> list[dict[str, Any]]:
    """The mixtures and views built by finished data/view step runs that hold any of `records`
    of `source` (with `with_empty`, every one of them): uri, kind, step, run_id, start_time,
    samples (rows of those records), taken_down (those records in its rejects as `takedown`) and,
    for a view, the mixtures it weights."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from mlflow import MlflowClient

    from lladav.data.manifest import REJECTS, View, open_mixture, read_table
    from lladav import storage

    client = MlflowClient(tracking_uri or default_tracking_uri())
    runs = sorted((run for kind in ("data", "view") for run in _all_runs(
        client, f"tags.`{PREFIX}kind` = '{kind}' and attributes.status = 'FINISHED'")),
        key=lambda r: r.info.start_time)
    out, seen, cache = [], set(), {}
    for run in runs:
        uri = run.data.tags.get(f"{PREFIX}mixture")
        if not uri or uri in seen:
            continue
        seen.add(uri)
        try:
            mixture = open_mixture(uri)
            samples = _manifest_counts(uri, source, records, cache)
        except (FileNotFoundError, storage.StorageError):
            continue  # removed since: nothing to hold
        taken, parts = 0, []
        if isinstance(mixture, View):
            parts = [m["uri"] for m in mixture.info["mixtures"]]
        else:
            rejects = read_table(storage.join(uri, REJECTS))
            mask = pc.and_(pc.equal(rejects["reason"], "takedown"),
                           pc.and_(pc.equal(rejects["source"], source),
                                   pc.is_in(rejects["source_id"],
                                            value_set=pa.array(records, pa.string()))))
            taken = int(pc.sum(mask.cast("int64")).as_py() or 0)
        if samples or with_empty:
            out.append({"uri": uri, "kind": run.data.tags[f"{PREFIX}kind"],
                        "step": run.data.tags.get(f"{PREFIX}step", run.info.run_name),
                        "run_id": run.info.run_id, "start_time": run.info.start_time,
                        "samples": samples, "taken_down": taken, "mixtures": parts})
    return out


def mixture_holding(uri: str, source: str, records: list[str]) -> dict[str, Any]:
    """`mixtures_holding`'s row for one mixture URI that MLflow need not know."""
    return {"uri": uri, "kind": "mixture", "step": "(given)", "run_id": "-", "start_time": 0,
            "samples": _manifest_counts(uri, source, records, {}), "taken_down": 0, "mixtures": []}


def stages_after(mixtures: set[str], since_ms: int, tracking_uri: str | None = None
                 ) -> list[dict[str, Any]]:
    """Stage runs started at or after `since_ms` that trained on one of `mixtures` (or a view
    over one), or started from the export of such a stage: step, run_id, export, status."""
    from mlflow import MlflowClient

    from lladav.data.manifest import View, open_mixture

    client = MlflowClient(tracking_uri or default_tracking_uri())
    runs = _all_runs(client, f"tags.`{PREFIX}kind` = 'stage' and "
                             f"attributes.start_time >= {int(since_ms)}",
                     order_by=["attributes.start_time ASC"])
    out, chosen = [], set()
    for run in runs:
        uris = set(_train_mixtures(run))
        for uri in list(uris):
            try:
                m = open_mixture(uri)
            except (FileNotFoundError, OSError):
                continue
            if isinstance(m, View):
                uris |= {x["uri"] for x in m.info["mixtures"]}
        if uris & mixtures or run.data.tags.get(f"{PREFIX}parent_run") in chosen:
            chosen.add(run.info.run_id)
            out.append({"step": run.data.tags.get(f"{PREFIX}step", run.info.run_name),
                        "run_id": run.info.run_id, "export": run.data.tags.get(f"{PREFIX}export"),
                        "status": run.info.status})
    return out
