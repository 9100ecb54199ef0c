"""Takedowns: remove records from every mixture that holds them, through the recipes, on record.

A takedown list is one YAML file (local or s3://) that a pipeline names in `takedowns:` (or a
recipe in its own `takedowns:`). `lladav lineage takedown` appends to it; nobody edits recipes:

    format: lladav.takedowns/1
    takedowns:
    - id: td-20261208T034000-1a2b3c4d
      source: qa                # a recipe source name, as in manifests and `lineage trace`
      records: ['000123']
      reason: DMCA notice 42
      requested: '2026-12-08T03:40:00Z'
      run_id: <the MLflow run that records the request>

The three moments of a takedown:
    request   `lineage takedown --source S --record R`: lists the mixtures and the exports that
              hold the records (their manifests, found through MLflow), appends the entry under a
              lease on the list's folder (two requests at once both land), and records an MLflow
              run (`lladav.kind` takedown) with the records and what held them.
    rerun     `pipeline run`: a recipe reads the list when it is loaded (config.load_recipe ->
              `taken_down`), so the data steps over source S get new keys and rebuild, refusing
              the records at plan time, before reading them (rejects.parquet reason `takedown`);
              every step downstream of those mixtures reruns, nothing else.
    status    `lineage takedown --status`: per entry, the mixtures built since that no longer
              hold the records, any that still do (a failure), the stages retrained on the rebuilt
              mixtures, and the exports that read the records before (superseded; `lineage
              trace` marks them so); logged to the request's run.

A source name is the key, as everywhere in lineage: the takedown applies to every recipe that
has a source of that name. Owns: the list's format, the request and the status. Does not own:
refusing the records (data/build.py `plan`), keys (pipeline.py) or MLflow (lladav/lineage/).
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lladav import storage

log = logging.getLogger(__name__)

LIST_FORMAT = "lladav.takedowns/1"
KIND = "takedown"


class TakedownError(ValueError):
    """A takedown list is unreadable, or a request names nothing; the message says which."""


class Entry(BaseModel):
    """One takedown request in the list."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    source: str
    records: list[str] = Field(min_length=1)
    reason: str = ""
    requested: str
    """UTC time of the request, ISO 8601 (`2026-12-08T03:40:00Z`)."""
    run_id: str | None = None
    """The MLflow run that records the request."""
    images: list[str] = []
    """With --with-copies: the perceptual hashes of the records' images (from the manifests
    that held them); copies of them are refused in every source of every recipe reading the list."""

    @property
    def requested_ms(self) -> int:
        """The request time in milliseconds since the epoch (MLflow's run times)."""
        when = dt.datetime.fromisoformat(self.requested.replace("Z", "+00:00"))
        return int(when.timestamp() * 1000)


def read_list(uri: str) -> list[Entry]:
    """The entries of the takedown list at `uri`; a list that does not exist yet is empty."""
    try:
        text = storage.read_bytes(uri).decode()
    except FileNotFoundError:
        return []
    try:
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict) or data.get("format") != LIST_FORMAT:
            raise TakedownError(f"{uri}: not a takedown list (expected `format: {LIST_FORMAT}`)")
        return [Entry.model_validate(e) for e in data.get("takedowns") or []]
    except (yaml.YAMLError, ValidationError) as e:
        raise TakedownError(f"{uri}: invalid takedown list: {e}") from None


def list_bytes(entries: list[Entry]) -> bytes:
    text: str = yaml.safe_dump({"format": LIST_FORMAT,
                                "takedowns": [e.model_dump(mode="json") for e in entries]},
                               sort_keys=False, allow_unicode=True)
    return text.encode()


def taken_down(uri: str, recipe: Any) -> dict[str, Any]:
    """What the list takes from `recipe` (config.Recipe): `taken_down`, source name -> sorted
    record ids of its sources, and `taken_down_images`, the sorted image hashes of every entry
    taken down with its copies."""
    names = {s.name for s in recipe.sources}
    out: dict[str, set[str]] = {}
    images: set[str] = set()
    for e in read_list(uri):
        if e.source in names:
            out.setdefault(e.source, set()).update(e.records)
        images.update(e.images)
    return {"taken_down": {k: sorted(v) for k, v in sorted(out.items())},
            "taken_down_images": sorted(images)}


def read_records_file(path: str) -> list[str]:
    """Record ids from a file, one per line (blank lines and `#` comments skipped)."""
    lines = storage.read_bytes(path).decode().splitlines()
    return [s for line in lines if (s := line.strip()) and not s.startswith("#")]


# ---- request -----------------------------------------------------------------------------------

@dataclass
class Request:
    entry: Entry
    list_uri: str
    mixtures: list[dict[str, Any]]
    """Mixtures that hold the records: uri, step, run_id, samples."""
    exports: list[Any]
    """lineage.TraceHit of every stage that read the records or descends from one that did."""


def request(list_uri: str, source: str, records: list[str], *, reason: str = "",
            tracking_uri: str | None = None, experiment: str = "lladav",
            with_copies: bool = False, mixtures: Sequence[str] = ()) -> Request:
    """Record a takedown: what holds the records now, the entry in the list, an MLflow run.
    `with_copies`: also the records' images, read from the manifests that hold them, so that
    their copies under other ids or in other sources are refused too. `mixtures`: mixture URIs
    to look in besides those MLflow knows (a `lladav data build` outside a pipeline)."""
    from lladav import lineage
    from lladav.lease import lease

    records = sorted(set(records))
    if not records:
        raise TakedownError("no record ids given: pass --record or --records FILE")
    manifests: dict[str, Any] = {}
    known = lineage.mixtures_holding(source, records, tracking_uri, manifests=manifests)
    given = [m for uri in mixtures if uri not in {k["uri"] for k in known}
             if (m := lineage.mixture_holding(uri, source, records))["samples"]]
    holding = known + given
    exports = lineage.trace(source, records=records, tracking_uri=tracking_uri,
                            manifests=manifests)
    images = _record_images(holding, source, records) if with_copies else []
    if with_copies and not images:
        raise TakedownError(f"--with-copies: no manifest in {lineage.scrub(tracking_uri or '')} "
                            f"holds an image of these records of {source}, so their copies "
                            "cannot be recognised; take them down by id (without --with-copies)")
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    entry_id = f"td-{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    lin = lineage.Lineage(tracking_uri, experiment)
    run_id = lin.start_run(f"takedown {source}", {
        f"{lineage.PREFIX}kind": KIND, f"{lineage.PREFIX}takedown.id": entry_id,
        f"{lineage.PREFIX}takedown.source": source,
        f"{lineage.PREFIX}takedown.records": str(len(records)),
        f"{lineage.PREFIX}takedown.list": list_uri})
    entry = Entry(id=entry_id, source=source, records=records, reason=reason,
                  requested=now.isoformat().replace("+00:00", "Z"), run_id=run_id, images=images)
    # Read, append, write under a lease on the list's folder: two requests at once both land.
    with lease(storage.parent(list_uri), f"takedown {entry_id}"):
        entries = read_list(list_uri)
        storage.write_bytes(list_uri, list_bytes([*entries, entry]))
    lin.log_text(run_id, "takedown/request.json", _json({
        "entry": entry.model_dump(mode="json"), "list": list_uri, "mixtures": holding,
        "exports": [vars(h) for h in exports]}))
    lin.end_run(run_id)
    return Request(entry, list_uri, holding, exports)


def _record_images(mixtures: list[dict[str, Any]], source: str, records: list[str]) -> list[str]:
    """The perceptual hashes of the records' images, as the manifests holding them recorded."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from lladav.data.manifest import open_mixture

    found: set[str] = set()
    for m in mixtures:
        table = open_mixture(m["uri"]).manifest()
        if "image_phash" not in table.column_names:
            continue
        mask = pc.and_(pc.equal(table["source"], source),
                       pc.is_in(table["source_id"], value_set=pa.array(records, pa.string())))
        for hashes in table.filter(mask)["image_phash"].to_pylist():
            found.update(h for h in hashes or [] if h)
    return sorted(found)


# ---- status ------------------------------------------------------------------------------------

@dataclass
class Status:
    entry: Entry
    rebuilt: list[dict[str, Any]] = field(default_factory=list)
    """Mixtures built after the request whose rejects list the records as taken down."""
    still_holding: list[dict[str, Any]] = field(default_factory=list)
    """Mixtures built after the request that still hold some of the records: a failure."""
    superseded: list[dict[str, Any]] = field(default_factory=list)
    """Mixtures built before the request that hold them (replaced by the rebuilt ones)."""
    retrained: list[dict[str, Any]] = field(default_factory=list)
    """Stage runs started after the request on a rebuilt mixture, or from such a stage's export."""
    superseded_exports: list[Any] = field(default_factory=list)
    """lineage.TraceHit of the stages that read the records (all before the request)."""

    @property
    def complete(self) -> bool:
        """Rebuilt at least once, nothing built since holds the records, and nothing trained
        since read them."""
        late = [h for h in self.superseded_exports if not h.superseded]
        return bool(self.rebuilt) and not self.still_holding and not late

    def to_json(self) -> dict[str, Any]:
        return {"entry": self.entry.model_dump(mode="json"), "complete": self.complete,
                "rebuilt": self.rebuilt, "still_holding": self.still_holding,
                "superseded": self.superseded, "retrained": self.retrained,
                "superseded_exports": [vars(h) for h in self.superseded_exports]}


def status(list_uri: str, tracking_uri: str | None = None, *, log_to_mlflow: bool = True
           ) -> list[Status]:
    """Where every takedown of the list stands (see the module doc); each entry's status is
    logged to its request run (artifact takedown/status.json, tag lladav.takedown.status)."""
    from lladav import lineage

    out = []
    manifests: dict[str, Any] = {}  # each manifest read once, whatever the number of entries
    for entry in read_list(list_uri):
        st = Status(entry)
        since = entry.requested_ms
        for m in lineage.mixtures_holding(entry.source, entry.records, tracking_uri,
                                          with_empty=True, manifests=manifests):
            if m["start_time"] < since:
                if m["samples"]:
                    st.superseded.append(m)
            elif m["samples"]:
                st.still_holding.append(m)
            elif m["taken_down"] or set(m["mixtures"]) & {r["uri"] for r in st.rebuilt}:
                st.rebuilt.append(m)  # a view counts when it weights a rebuilt mixture
        rebuilt = {m["uri"] for m in st.rebuilt}
        st.retrained = lineage.stages_after(rebuilt, since, tracking_uri)
        st.superseded_exports = lineage.trace(entry.source, records=entry.records,
                                              tracking_uri=tracking_uri, manifests=manifests)
        if log_to_mlflow and entry.run_id:
            _log_status(st, tracking_uri)
        out.append(st)
    return out


def _log_status(st: Status, tracking_uri: str | None) -> None:
    from mlflow import MlflowClient

    from lladav import lineage

    assert st.entry.run_id is not None  # status() logs only the entries a request run recorded
    client = MlflowClient(tracking_uri or lineage.default_tracking_uri())
    experiment = client.get_experiment(client.get_run(st.entry.run_id).info.experiment_id).name
    lin = lineage.Lineage(tracking_uri, experiment)
    lin.log_text(st.entry.run_id, "takedown/status.json", _json(st.to_json()))
    lin.set_tags(st.entry.run_id, {f"{lineage.PREFIX}takedown.status":
                                   "complete" if st.complete else "pending",
                                   f"{lineage.PREFIX}takedown.retrained":
                                   ", ".join(r["step"] for r in st.retrained) or "none"})


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
