"""Mixture views: re-weight committed mixtures without rebuilding a shard.

A view is per-source weights and a seed over one or more committed mixtures, committed as a
small folder of its own (read back by manifest.open_mixture, which returns a `View`):

    <view>/manifest.parquet   one row per sample the view selects (manifest.VIEW_MANIFEST_SCHEMA):
                              its mixture's row, with `shard` the full URI of the mixture's
                              shard, `member` the sample's key there and `key` the view's own
           view.json          written last (the commit): the mixtures (URI, digest, name), the
                              weights as given and the seed, per (mixture, source) the weight
                              applied and the counts, the shards used with their sha256s, the
                              mixtures' tokenizer and image geometry, the manifest's sha256

No shard byte is written: changing a weight rewrites these two files (about 100 bytes a
sample), where a rebuild rewrites every shard. Like a mixture, a view is named by the sha256 of
its index file, which is a pure function of (its mixtures' URIs and digests, the weights, the
seed, its name): making the same view again gives the same bytes and the same digest, wherever
it is written. The code version is deliberately not in it: the selection rule is fixed by the
format (lladav.view/1), and a new rule gets a new format.

Weights are repeat factors with the build's rule (data/build.plan): weight w keeps floor(w)
copies of each of a source's n rows, plus one more copy of the round(frac(w) * n) rows with the
smallest sha256(seed, "weight", mixture digest, source, key). Counts are exact, and the rows are
fixed for the view: every epoch sees the same ones, in a new order (data/loader.py). That is
Megatron-Energon's `blend_epochized` repetitions and MosaicML Streaming's `repeat` with
`sampling_method="fixed"`, not a sampling probability (Energon's `blend` weights, Streaming's
`proportion`), whose counts hold only in expectation. A view's weight multiplies its mixture's
rows, so it compounds with the recipe's weight: a source built at 2.0 and viewed at 0.5 keeps
n of its 2n rows (some records twice, some not at all).

A weight is named by a source (in every mixture that has it), a mixture's name (all its
sources) or `mixture/source`; the most specific one applies, and an unnamed source keeps 1.0.

Owns: weight resolution, the selection, and writing a view. Does not own: the files' schemas or
reading a view back (data/manifest.py), or reading samples (data/loader.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lladav import storage
from lladav.config import MAX_WEIGHT
from lladav.data import manifest as mf
from lladav.digest import canonical_json, pretty_json, sha256_bytes
from lladav.lease import lease


class ViewError(ValueError):
    """A view cannot be made: bad weights, mixtures that disagree, or an occupied output."""


# ---- the selection: pure functions ------------------------------------------------------------

def weighted_copies(keys: Sequence[str], weight: float, seed: int, *salt: Any) -> np.ndarray:
    """Copies of each of `keys` under `weight`: floor(w) each, and one more for the round(frac(w)
    * len(keys)) keys with the smallest sha256(seed, "weight", *salt, key); an int64 array."""
    if not (math.isfinite(weight) and 0 <= weight <= MAX_WEIGHT):
        raise ViewError(f"weight {weight!r}: use a finite number in [0, {MAX_WEIGHT:g}]")
    whole = math.floor(weight)
    copies = np.full(len(keys), whole, dtype=np.int64)
    extra = round((weight - whole) * len(keys))
    if extra:
        draws = seeded_draws(keys, seed, "weight", *salt)
        copies[np.argsort(draws, kind="stable")[:extra]] += 1
    return copies


def seeded_draws(keys: Sequence[str], *parts: Any) -> np.ndarray:
    """The first 64 bits of digest.hash_key(*parts, key) for each key, as uint64 (8 bytes a key,
    where 10M hex strings would take GBs). The same bits, faster: the canonical JSON's shared
    prefix is hashed once, and each key is JSON-quoted as canonical_json quotes it."""
    head = hashlib.sha256(canonical_json([str(p) for p in parts])[:-1] + b",")
    quote = json.encoder.encode_basestring  # = json.dumps(str, ensure_ascii=False), in C
    draws = np.empty(len(keys), dtype=np.uint64)
    for i, key in enumerate(keys):
        h = head.copy()
        h.update(quote(str(key)).encode("utf-8") + b"]")
        draws[i] = int.from_bytes(h.digest()[:8], "big")
    return draws


def resolve_weights(mixtures: Sequence[tuple[str, Sequence[str]]],
                    weights: dict[str, float]) -> list[dict[str, float]]:
    """Per mixture (name, its source names) the weight of each source: `mixture/source`, else
    `source`, else `mixture`, else 1.0. ViewError for a name that matches nothing or that could
    mean two things, listing the names that would work."""
    names = [name for name, _ in mixtures]
    sources = {s for _, srcs in mixtures for s in srcs}
    valid = sorted(sources | set(names) | {f"{n}/{s}" for n, srcs in mixtures for s in srcs})
    for key, weight in weights.items():
        if not (isinstance(weight, (int, float)) and math.isfinite(weight)
                and 0 <= weight <= MAX_WEIGHT):
            raise ViewError(f"weight {key}={weight!r}: use a finite number in [0, {MAX_WEIGHT:g}]"
                            " (0 drops the source, 2.5 repeats it two and a half times)")
        if key not in valid:
            raise ViewError(f"weight {key!r} names no source or mixture of the view; valid: "
                            f"{', '.join(valid)}")
        if key in sources and key in names:
            raise ViewError(f"weight {key!r} names a mixture and a source; write "
                            f"'{key}/<source>' or '<mixture>/{key}' instead")
        mixture = key.partition("/")[0]
        if mixture in names and names.count(mixture) > 1:
            raise ViewError(f"weight {key!r}: two of the view's mixtures are named {mixture!r}; "
                            "weight their sources by source name instead")
    return [{s: float(weights.get(f"{name}/{s}", weights.get(s, weights.get(name, 1.0))))
             for s in srcs} for name, srcs in mixtures]


# ---- reading the mixtures ----------------------------------------------------------------------

def _open_inputs(uris: Sequence[str]) -> list[mf.Mixture]:
    """The committed mixtures, checked to be distinct and to agree on tokenizer and geometry."""
    if not uris:
        raise ViewError("a view needs at least one mixture")
    mixtures = []
    for uri in uris:
        mixture = mf.open_mixture(uri)
        if isinstance(mixture, mf.View):
            raise ViewError(f"{uri} is a view; a view selects from mixtures: name its mixtures ("
                            f"{', '.join(m['uri'] for m in mixture.info['mixtures'])}) and "
                            "multiply the weights")
        mixtures.append(mixture)
    first, seen = mixtures[0], dict[str, str]()
    for m in mixtures:
        for identity in (m.digest, m.uri.rstrip("/")):
            if identity in seen:
                raise ViewError(f"{m.uri} and {seen[identity]} are the same mixture; give each "
                                "once (a weight repeats its rows)")
            seen[identity] = m.uri
    for m in mixtures[1:]:
        if m.info["tokenizer"]["digest"] != first.info["tokenizer"]["digest"]:
            raise ViewError(f"{m.uri} was tokenized with tokenizer {m.info['tokenizer']['digest']}"
                            f" ({m.info['tokenizer']['uri']}), {first.uri} with "
                            f"{first.info['tokenizer']['digest']} ({first.info['tokenizer']['uri']}); "
                            "a view's samples must share one tokenizer: rebuild one of them")
        if m.geometry != first.geometry:
            raise ViewError(f"{m.uri} was built for image geometry {m.geometry!r}, {first.uri} "
                            f"for {first.geometry!r}; a view's image tokens must be counted for "
                            "one tower: rebuild one of them with the other's `vision:`")
    return mixtures


def _manifest(mixture: mf.Mixture) -> pa.Table:
    raw = storage.read_bytes(storage.join(mixture.uri, mf.MANIFEST))
    if sha256_bytes(raw) != mixture.info["manifest"]["sha256"]:
        raise ViewError(f"{mixture.uri}/{mf.MANIFEST}: sha256 differs from mixture.json's "
                        f"{mixture.info['manifest']['sha256']}; the mixture is damaged")
    return pq.read_table(io.BytesIO(raw))


def _map_strings(column: pa.ChunkedArray, fn: Any) -> pa.Array:
    """fn applied to each distinct value of a string column (shard names: few of them)."""
    encoded = pc.dictionary_encode(column.combine_chunks())
    mapped = pa.array([fn(v) for v in encoded.dictionary.to_pylist()], pa.string())
    return mapped.take(encoded.indices)


def select(mixture: mf.Mixture, index: int, weights: dict[str, float],
           seed: int) -> tuple[pa.Table, list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Mixture number `index` of a view, weighted: (its view manifest rows, the shards they
    read as mixture.json lists them but named by URI, per source weight/available/samples)."""
    table = _manifest(mixture)
    copies = np.zeros(table.num_rows, dtype=np.int64)
    stats: dict[str, dict[str, Any]] = {}
    for source, weight in sorted(weights.items()):
        mine = pc.equal(table["source"], source)
        rows = np.flatnonzero(mine.to_numpy(zero_copy_only=False))
        keys = table["key"].filter(mine).to_pylist()  # one source's, while its draws are made
        copies[rows] = weighted_copies(keys, weight, seed, mixture.digest, source)
        stats[source] = {"weight": weight, "available": len(rows), "samples": int(copies[rows].sum())}
    take = np.repeat(np.arange(table.num_rows), copies)
    view_copy = np.arange(len(take)) - np.repeat(np.cumsum(copies) - copies, copies)
    picked = table.take(pa.array(take, pa.int64()))
    copy_text = pc.cast(pa.array(view_copy, pa.int32()), pa.string())
    columns = {f.name: picked[f.name] for f in mf.MANIFEST_SCHEMA if f.name in picked.column_names}
    if "license" not in columns:  # a mixture built before manifests carried licences
        by_source = mixture.info["counts"]["by_source"]
        columns["license"] = _map_strings(picked["source"], lambda s: by_source.get(s, {}).get(
            "license", "unknown"))
    for name in ("image_phash", "question_keys"):  # a mixture built before manifests had them
        if name not in columns:
            columns[name] = pa.nulls(len(take), mf.MANIFEST_SCHEMA.field(name).type)
    columns.update({
        "key": pc.binary_join_element_wise(f"m{index}", picked["key"], copy_text, "-"),
        "shard": _map_strings(picked["shard"], mixture.shard_uri),
        "mixture": pa.repeat(pa.scalar(mixture.uri, pa.string()), len(take)),
        "member": picked["key"],
        "view_copy": pa.array(view_copy, pa.int32()),
    })
    used = set(pc.unique(picked["shard"]).to_pylist())
    shards = [{**s, "name": mixture.shard_uri(s["name"])} for s in mixture.info["shards"]
              if s["name"] in used]
    return pa.Table.from_pydict(columns, schema=mf.VIEW_MANIFEST_SCHEMA), shards, stats


def _by_source(table: pa.Table) -> dict[str, dict[str, int]]:
    sums = table.group_by("source").aggregate([("key", "count"), ("n_tokens", "sum"),
                                               ("n_target_tokens", "sum"), ("n_image_tokens", "sum")])
    return {r["source"]: {"samples": r["key_count"], "tokens": r["n_tokens_sum"],
                          "target_tokens": r["n_target_tokens_sum"],
                          "image_tokens": r["n_image_tokens_sum"]}
            for r in sorted(sums.to_pylist(), key=lambda r: r["source"])}


# ---- making one ------------------------------------------------------------------------------

def make_view(mixture_uris: Sequence[str], weights: dict[str, float], out_uri: str, *,
              seed: int = 0, name: str | None = None, overwrite: bool = False) -> mf.View:
    """Commit a view of `mixture_uris` under `weights` and `seed` at `out_uri`: its
    manifest.parquet, then view.json last. Making a view that is already committed there is a
    no-op; a different one there is refused unless `overwrite`. Writes no shard."""
    mixtures = _open_inputs(mixture_uris)
    name = name or "+".join(m.info["name"] for m in mixtures) + "-view"
    per_mixture = resolve_weights([(m.info["name"], list(m.info["counts"]["by_source"]))
                                   for m in mixtures], weights)
    tables, shards, entries = [], [], []
    for j, (mixture, applied) in enumerate(zip(mixtures, per_mixture)):
        table, used, stats = select(mixture, j, applied, seed)
        tables.append(table)
        shards += used
        entries.append({"uri": mixture.uri, "digest": mixture.digest, "name": mixture.info["name"],
                        "sources": stats})
    table = pa.concat_tables(tables)
    if table.num_rows == 0:
        raise ViewError(f"view {name}: the weights {weights} select no sample")
    manifest_bytes = mf.table_to_bytes(table)
    by_source = _by_source(table)
    for m in mixtures:   # each source's licence, as its mixture recorded it
        for source, counts in m.info["counts"]["by_source"].items():
            if source in by_source:
                by_source[source].setdefault("license", counts.get("license", "unknown"))
    info = {
        "format": mf.VIEW_FORMAT,
        "name": name,
        "mixtures": entries,
        "weights": {k: float(v) for k, v in sorted(weights.items())},
        "seed": seed,
        "tokenizer": mixtures[0].info["tokenizer"],
        "geometry": mixtures[0].geometry.model_dump(mode="json"),
        "counts": {"samples": table.num_rows, "shards": len(shards),
                   "tokens": sum(c["tokens"] for c in by_source.values()), "by_source": by_source,
                   "by_license": mf.license_counts(by_source)},
        "shards": shards,
        "manifest": {"name": mf.MANIFEST, "sha256": sha256_bytes(manifest_bytes),
                     "rows": table.num_rows},
    }
    return _commit(out_uri, name, manifest_bytes, pretty_json(info), overwrite)


def _commit(out_uri: str, name: str, manifest_bytes: bytes, view_json: bytes,
            overwrite: bool) -> mf.View:
    with lease(out_uri, f"view {name}") as held:
        if storage.exists(storage.join(out_uri, mf.MIXTURE_JSON)):
            raise ViewError(f"{out_uri} holds a built mixture; write the view elsewhere")
        index = storage.join(out_uri, mf.VIEW_JSON)
        try:
            committed: bytes | None = storage.read_bytes(index)
        except FileNotFoundError:
            committed = None
        if committed is not None and committed != view_json:
            if not overwrite:
                raise ViewError(f"{out_uri} already holds a different committed view; choose "
                                "another --out, or pass --overwrite to replace it")
            storage.delete(index)  # uncommit before replacing the manifest
        if committed != view_json:
            storage.write_bytes(storage.join(out_uri, mf.MANIFEST), manifest_bytes)
            held.check()  # a writer that lost its lease must not commit over another's files
            storage.write_bytes(index, view_json)  # the commit
    view = mf.open_mixture(out_uri)
    assert isinstance(view, mf.View)
    return view
