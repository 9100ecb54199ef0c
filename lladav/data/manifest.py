"""The committed mixture's index files: manifest.parquet, rejects.parquet and mixture.json.

Owns: the pyarrow schemas of the two tables, their deterministic serialisation (the same rows
give the same bytes), the layout of a mixture folder, and reading a committed mixture back
(`open_mixture` refuses anything without its mixture.json, which is written last). Also the
layout of a view folder (view.json + a manifest.parquet whose rows point into other mixtures'
shards) and reading it back: `open_mixture` returns a `View` there, which reads like a Mixture.
Does not own: how rows are produced (data/build.py, data/views.py) or how shards are read for
training (data/loader.py).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lladav import storage
from lladav.config import VisionGeometry
from lladav.digest import sha256_bytes

MIXTURE_FORMAT = "lladav.mixture/1"
MIXTURE_JSON = "mixture.json"
VIEW_FORMAT = "lladav.view/1"
VIEW_JSON = "view.json"
MANIFEST = "manifest.parquet"
REJECTS = "rejects.parquet"
SHARD_DIR = "shards"


def shard_name(index: int) -> str:
    return f"{SHARD_DIR}/shard-{index:06d}.tar"


MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()),              # sample key inside the shard (<key>.json, <key>.ids.npy, ...)
    ("shard", pa.string()),            # shard path relative to the mixture, e.g. shards/shard-000000.tar
    ("source", pa.string()),           # recipe source name
    ("source_id", pa.string()),        # the record's id in its corpus
    ("location", pa.string()),         # where the record was read: uri#byte=..., uri#row=..., tar#key
    ("copy", pa.int32()),              # 0, or the repeat index when weight > 1
    ("image_sha256", pa.list_(pa.string())),
    ("image_widths", pa.list_(pa.int32())),
    ("image_heights", pa.list_(pa.int32())),
    ("text_sha256", pa.string()),      # sha256 of the normalized conversation text (dedup identity)
    ("n_tokens", pa.int32()),          # sequence length the model sees: text + image feature tokens
    ("n_text_tokens", pa.int32()),
    ("n_target_tokens", pa.int32()),
    ("n_image_tokens", pa.int32()),
    ("image_orientations", pa.list_(pa.int8())),  # EXIF orientation per image (1 = upright);
    # widths/heights above are after it is applied, as every reader decodes (images.to_rgb)
    ("license", pa.string()),          # the source's licence (config.Source.license)
    ("image_phash", pa.list_(pa.string())),  # 32-hex perceptual hash per image (images.perceptual_hash)
    ("question_keys", pa.list_(pa.string())),  # conversation.question_key of each user turn
])

# A view's manifest: a mixture's columns, but `key` is the view's own sample key
# (m<mixture index>-<member>-<view_copy>, unique in the view) and `shard` the full URI of the
# mixture's shard holding the sample; then where the row comes from.
VIEW_MANIFEST_SCHEMA = pa.schema([
    *MANIFEST_SCHEMA,
    ("mixture", pa.string()),          # URI of the mixture the row comes from
    ("member", pa.string()),           # the sample's key inside its shard (the mixture's `key`)
    ("view_copy", pa.int32()),         # 0, or the view's repeat index when its weight > 1
])

REJECTS_SCHEMA = pa.schema([
    ("source", pa.string()),
    ("source_id", pa.string()),        # null when the record could not be parsed
    ("location", pa.string()),
    ("copy", pa.int32()),
    ("reason", pa.string()),           # short code: image_truncated, duplicate, too_long, ...
    ("detail", pa.string()),           # the human explanation
    ("duplicate_of", pa.string()),     # duplicate / near_duplicate: the manifest key of the kept sample
])


def table_bytes(rows: list[dict[str, Any]], schema: pa.Schema) -> bytes:
    """Rows -> parquet bytes. Fixed writer options and no pandas metadata, so the same rows
    always serialise to the same bytes."""
    return table_to_bytes(pa.Table.from_pylist(rows, schema=schema))


def table_to_bytes(table: pa.Table) -> bytes:
    """A table -> parquet bytes, with the fixed options of `table_bytes`."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", row_group_size=100_000,
                   write_statistics=False, store_schema=False)
    return sink.getvalue()


def read_table(uri: str) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)))


class MixtureNotCommitted(FileNotFoundError):
    """The URI holds no committed mixture (no mixture.json): a build is absent or unfinished."""


@dataclass(frozen=True)
class Mixture:
    """A committed mixture: its URI, its parsed mixture.json and that file's digest (its name)."""

    uri: str
    info: dict[str, Any]
    digest: str

    @property
    def geometry(self) -> VisionGeometry:
        """The image geometry the mixture was built for, aspect resolved: the one owner of it.
        Stages and their models take it from here (train/stage.py), the loader tiles by it."""
        from lladav.config import Recipe

        recipe = Recipe.model_validate(self.info["recipe"])
        return recipe.vision.model_copy(update={"image_aspect": recipe.image_aspect})

    def shard_uri(self, name: str) -> str:
        """The URI of shard `name` (a manifest `shard` value, a mixture.json shard name)."""
        return storage.join(self.uri, name)

    def shard_uris(self) -> list[str]:
        return [self.shard_uri(s["name"]) for s in self.info["shards"]]

    def manifest(self) -> pa.Table:
        return read_table(storage.join(self.uri, MANIFEST))

    def longest_sample(self) -> int:
        """The most tokens (text + image features) of any sample; 0 when empty."""
        import pyarrow.compute as pc

        data = storage.read_bytes(storage.join(self.uri, MANIFEST))
        column = pq.read_table(io.BytesIO(data), columns=["n_tokens"])["n_tokens"]
        return int(pc.max(column).as_py() or 0)

    def rejects(self) -> pa.Table:
        return read_table(storage.join(self.uri, REJECTS))


@dataclass(frozen=True)
class View(Mixture):
    """A committed view (data/views.py): weights and a seed over committed mixtures, named by
    the digest of its view.json. Reads like a Mixture: its manifest.parquet holds one row per
    sample it selects (VIEW_MANIFEST_SCHEMA), whose `shard` is the full URI of a mixture's shard
    and `member` the sample's key in it; view.json lists those shards with their sha256s and
    carries its mixtures' tokenizer and geometry, so the loader, stages and lineage read a view
    as they read a mixture. A view writes no shard and has no rejects of its own."""

    @property
    def geometry(self) -> VisionGeometry:
        return VisionGeometry.model_validate(self.info["geometry"])

    def shard_uri(self, name: str) -> str:
        return name  # a view's shard names are its mixtures' shard URIs

    def rejects(self) -> pa.Table:
        return REJECTS_SCHEMA.empty_table()  # its mixtures' rejects stay theirs


def open_mixture(uri: str) -> Mixture:
    """The committed mixture at `uri`, or the committed view there (a View, which reads like
    one); MixtureNotCommitted when neither index file exists."""
    try:
        raw = storage.read_bytes(storage.join(uri, MIXTURE_JSON))
    except FileNotFoundError:
        return _open_view(uri)
    info = json.loads(raw)
    if info.get("format") != MIXTURE_FORMAT:
        raise ValueError(f"{uri}/{MIXTURE_JSON}: format {info.get('format')!r}, expected {MIXTURE_FORMAT}")
    return Mixture(uri, info, sha256_bytes(raw))


def _open_view(uri: str) -> View:
    try:
        raw = storage.read_bytes(storage.join(uri, VIEW_JSON))
    except FileNotFoundError:
        raise MixtureNotCommitted(f"{uri}: no {MIXTURE_JSON} (nor {VIEW_JSON}); the mixture was "
                                  "never committed (the build is missing or did not finish)") from None
    info = json.loads(raw)
    if info.get("format") != VIEW_FORMAT:
        raise ValueError(f"{uri}/{VIEW_JSON}: format {info.get('format')!r}, expected {VIEW_FORMAT}")
    return View(uri, info, sha256_bytes(raw))


def license_counts(by_source: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per licence: its sources, samples and tokens (mixture.json's counts.by_license, a view's
    too)."""
    out: dict[str, dict[str, Any]] = {}
    for name, counts in sorted(by_source.items()):
        entry = out.setdefault(counts.get("license", "unknown"),
                               {"sources": [], "samples": 0, "tokens": 0})
        entry["sources"].append(name)
        entry["samples"] += int(counts.get("samples", 0))
        entry["tokens"] += int(counts.get("tokens", 0))
    return dict(sorted(out.items()))
