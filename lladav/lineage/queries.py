"""The auditors' two questions, read back from MLflow: what made an export, and what read a record.

`show(ref)` walks an export back through `lladav.parent_run` to the first stage and, for each
stage, lists its mixture (digest, URI) and that mixture's source corpora (from its mixture.json);
a view lists its mixtures, each with its weights and sources. The answer is a tree of `Node`s
(render.py draws it).
`trace(source, record)` scans every stage run's mixture manifest for the record and returns the
exports that read it, and those that descend from one that did (initialised from its export). A
view's manifest rows carry their mixture rows' source and record id, so a record is found
through a view exactly as often as the view repeats it (and not at all if it dropped it).
`mixtures_holding` and `stages_after` answer a takedown's (takedown.py): which mixtures hold the
records, and which stages trained on them since.

Reads only, through `MlflowClient` (every experiment of the store) and the mixtures' manifests.
Owns: the queries and their answers (`Node`, `TraceHit`, the mixture rows). Does not own: the
vocabulary they read (records.py), drawing the tree (render.py) or what a mixture holds
(data/manifest.py).
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lladav.lineage.records import PREFIX, default_tracking_uri
from lladav.secrets import scrub


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


@dataclass
class TraceHit:
    """One stage run in `trace`'s answer: it read the records, or descends from one that did."""

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
          records: list[str] | None = None, manifests: dict[str, Any] | None = None
          ) -> list[TraceHit]:
    """Every stage run (and its export) that trained on records of `source` (one `record`, any
    of `records`, or all), read from the mixtures' manifests, plus the stages initialised from
    such an export. A stage that read records taken down after it started is marked
    `superseded` with the takedown (lladav/takedown.py). `manifests`: a cache of the manifests
    read (URI -> table), for a caller asking about several sources or records."""
    from mlflow import MlflowClient

    wanted = [record] if record is not None else (sorted(set(records)) if records else None)
    client = MlflowClient(tracking_uri or default_tracking_uri())
    runs = _all_runs(client, f"tags.`{PREFIX}kind` = 'stage'")
    by_id = {r.info.run_id: r for r in runs}
    matched: dict[str, int] = {}
    manifests = {} if manifests is None else manifests
    for run in runs:
        count = sum(_manifest_counts(uri, source, wanted, manifests) for uri in _train_mixtures(run))
        if count:
            matched[run.info.run_id] = count

    def ancestor_hit(run: Any) -> str | None:
        seen: set[str] = set()
        parent: str | None = run.data.tags.get(f"{PREFIX}parent_run")
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
                     with_empty: bool = False, manifests: dict[str, Any] | None = None
                     ) -> list[dict[str, Any]]:
    """The mixtures and views built by finished data/view step runs that hold any of `records`
    of `source` (with `with_empty`, every one of them): uri, kind, step, run_id, start_time,
    samples (rows of those records), taken_down (those records in its rejects as `takedown`) and,
    for a view, the mixtures it weights. `manifests`: as for `trace`."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from mlflow import MlflowClient

    from lladav.data.manifest import REJECTS, View, open_mixture, read_table
    from lladav import storage

    client = MlflowClient(tracking_uri or default_tracking_uri())
    runs = sorted((run for kind in ("data", "view") for run in _all_runs(
        client, f"tags.`{PREFIX}kind` = '{kind}' and attributes.status = 'FINISHED'")),
        key=lambda r: r.info.start_time)
    out, seen = [], set()
    cache: dict[str, Any] = {} if manifests is None else manifests
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
