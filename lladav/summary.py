"""`lladav lineage summary EXPORT`: what an export was trained on, in the order of the EU
training-content summary template (AI Act Art. 53(1)(d); the Commission's template of 2025:
1 general information, 2 list of data sources, 3 data processing aspects).

    export --MLflow (its stage run, then each parent_run)--> stages, newest first
    stage --tag lladav.mixture--> mixture.json (a view: each mixture it reads, its weights)
    mixture.json --recipe sources, counts.by_source--> one row per (stage, source)

Per row: modality (image-text when the source's samples carry image tokens, else text), samples
and tokens in the stage, the share of the stage's tokens and of all training tokens, the
licence and terms, the collection period if the recipe gives one, and what the build removed
(records read, exact duplicates, filtered, other rejects). Everything is read from the
committed mixtures and the runs; nothing is estimated. Counts are a mixture's (one epoch of
it): a stage that trains for fewer or more samples than its mixture holds keeps the shares.

Owns: assembling and rendering the summary. Does not own: the lineage walk's MLflow schema
(lladav/lineage/), the counts (data/build.py writes them into mixture.json).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from lladav.lineage import PREFIX, default_tracking_uri, scrub
from lladav.lineage.queries import _find_export_run


@dataclass
class SourceRow:
    stage: str
    mixture: str
    source: str
    kind: str
    location: str
    modality: str
    samples: int
    tokens: int
    share_of_stage: float
    share_of_training: float = 0.0
    license: str = "unknown"
    terms: str | None = None
    collected: str | None = None
    records: int | None = None
    duplicates: int = 0
    filtered: int = 0
    other_rejects: int = 0


@dataclass
class Summary:
    export: str
    run_id: str
    stages: list[str]
    rows: list[SourceRow] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.rows)

    def licenses(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for r in self.rows:
            entry = out.setdefault(r.license, {"samples": 0, "tokens": 0})
            entry["samples"] += r.samples
            entry["tokens"] += r.tokens
        return dict(sorted(out.items()))

    def to_json(self) -> dict[str, Any]:
        return {"export": self.export, "run_id": self.run_id, "stages": self.stages,
                "training_tokens": self.tokens, "licenses": self.licenses(),
                "sources": [asdict(r) for r in self.rows]}


def _mixture_rows(stage: str, uri: str) -> list[SourceRow]:
    """One row per source of a mixture, or of each mixture a view reads (its selected counts)."""
    from lladav.data.manifest import View, open_mixture

    mixture = open_mixture(uri)
    info = mixture.info
    if isinstance(mixture, View):
        rows = []
        for m in info["mixtures"]:
            inner = {r.source: r for r in _mixture_rows(stage, m["uri"])}
            for source, picked in m["sources"].items():
                row = inner[source]
                share = picked["samples"] / max(row.samples, 1)
                row.samples, row.tokens = picked["samples"], round(row.tokens * share)
                rows.append(row)
        total = sum(r.tokens for r in rows) or 1
        for r in rows:
            r.share_of_stage = r.tokens / total
        return rows
    counts = info.get("counts", {}).get("by_source", {})
    total = max(sum(c.get("tokens", 0) for c in counts.values()), 1)
    rows = []
    for s in info["recipe"]["sources"]:
        c = counts.get(s["name"], {})
        reasons = c.get("rejected_by_reason", {})
        duplicates, filtered = reasons.get("duplicate", 0), reasons.get("filtered", 0)
        rows.append(SourceRow(
            stage=stage, mixture=info["name"], source=s["name"], kind=s["kind"],
            location=scrub(s["location"]),
            modality="image-text" if c.get("image_tokens", 0) else "text",
            samples=int(c.get("samples", 0)), tokens=int(c.get("tokens", 0)),
            share_of_stage=c.get("tokens", 0) / total, license=s.get("license", "unknown"),
            terms=s.get("terms"), collected=s.get("collected"), records=c.get("records"),
            duplicates=duplicates, filtered=filtered,
            other_rejects=int(c.get("rejected", 0)) - duplicates - filtered))
    return rows


def summarize(export: str, tracking_uri: str | None = None) -> Summary:
    """The summary of `export` (its URI or its stage run id): every stage from it back to the
    first, each stage's mixture sources (LineageError if the export is unknown)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri or default_tracking_uri())
    run = _find_export_run(client, export)
    summary = Summary(run.data.tags.get(f"{PREFIX}export", export), run.info.run_id, [])
    seen: set[str] = set()
    while run is not None and run.info.run_id not in seen:
        seen.add(run.info.run_id)
        tags = run.data.tags
        stage = tags.get(f"{PREFIX}step", run.info.run_name)
        summary.stages.append(stage)
        if mixture := tags.get(f"{PREFIX}mixture"):
            summary.rows += _mixture_rows(stage, mixture)
        parent = tags.get(f"{PREFIX}parent_run")
        run = client.get_run(parent) if parent else None
    total = max(summary.tokens, 1)
    for r in summary.rows:
        r.share_of_training = r.tokens / total
    return summary


def render_markdown(s: Summary) -> str:
    """The summary as Markdown, sections in the template's order."""
    modalities = sorted({r.modality for r in s.rows})
    lines = [f"# Training-content summary: {s.export}", "",
             "## 1. General information", "",
             f"- Model: the export `{s.export}` (MLflow run {s.run_id})",
             f"- Training stages, last first: {', '.join(s.stages)}",
             f"- Modalities of the training data: {', '.join(modalities) or 'none'}",
             f"- Training data: {sum(r.samples for r in s.rows):,} samples, {s.tokens:,} tokens "
             "(text and image tokens as the model sees them)",
             "- Licences: " + "; ".join(f"{k}: {v['samples']:,} samples, {v['tokens']:,} tokens "
                                       f"({v['tokens'] / max(s.tokens, 1):.1%})"
                                       for k, v in s.licenses().items()), "",
             "## 2. List of data sources", "",
             "| stage | source | modality | samples | tokens | share of stage | share of training "
             "| licence | terms | collected | location |",
             "|---|---|---|---:|---:|---:|---:|---|---|---|---|"]
    for r in s.rows:
        lines.append(f"| {r.stage} | {r.source} | {r.modality} | {r.samples:,} | {r.tokens:,} | "
                     f"{r.share_of_stage:.1%} | {r.share_of_training:.1%} | {r.license} | "
                     f"{r.terms or ''} | {r.collected or ''} | {r.location} |")
    lines += ["", "## 3. Data processing aspects", "",
              "Per source, as its build recorded (rejects.parquet holds each record and reason):",
              "", "| stage | source | records read | exact duplicates removed | filtered | "
              "other rejects |", "|---|---|---:|---:|---:|---:|"]
    for r in s.rows:
        lines.append(f"| {r.stage} | {r.source} | {r.records if r.records is not None else '-'} "
                     f"| {r.duplicates:,} | {r.filtered:,} | {r.other_rejects:,} |")
    return "\n".join(lines) + "\n"


def log_summary(s: Summary, tracking_uri: str | None = None) -> None:
    """Both renderings as artifacts of the export's run (summary/summary.md, summary.json)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri or default_tracking_uri())
    client.log_text(s.run_id, scrub(render_markdown(s)), "summary/summary.md")
    client.log_text(s.run_id, scrub(json.dumps(s.to_json(), indent=2) + "\n"), "summary/summary.json")
