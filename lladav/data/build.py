"""`lladav data build`: a recipe -> a committed, tokenized WebDataset mixture at a URI.

The stages, each a function below:
    plan     (driver)     enumerate every source, refuse the records of the recipe's takedown
                          list unread, apply weights, fix the mixture order by
                          sha256(seed, source, record, copy): a pure function of the data
    scan     (Ray tasks)  read, validate, filter, hash and tokenize each planned record, and
                          cache each chunk's samples (token ids, targets, image bytes) as one
                          Arrow file under `_build/scan/`
    dedup    (driver)     of the samples with the same (image sha256s, normalized text), keep the
                          record first in the corpus; reject the others as its duplicates; with
                          `near_dedup`, the same for images within a perceptual-hash distance
                          (data/near_dedup.py)
    assign   (driver)     survivors, in plan order, cut into shards of `samples_per_shard`
    write    (Ray tasks)  each shard's samples from the chunk caches that hold them, the tar
                          written atomically
    commit   (driver)     manifest.parquet, rejects.parquet, then mixture.json, last

Each record is read, decoded and tokenized once. Dedup must see every record before any shard
is cut, and cutting shards from the global survivor list is what makes the output independent
of how many workers ran (byte-identical with 1 or 20); holding the samples on the driver would
not scale, so the scan leaves them in its chunk caches (plan-order ranges of records, `scan_chunk_size`,
so a shard reads the few consecutive chunks its survivors came from). The caches cost the
mixture's bytes once more in `_build/` until the commit; reading every record a second time
cost a source read, an image check and a tokenizer call per sample (bench/data_build.py).

Resume: each written shard leaves a small done-marker (`_build/shard-N.json`, with the digest of
the plan it was written from) after its tar; a rerun skips shards whose marker matches. Nothing
looks committed until mixture.json exists, and `_build/` is removed after the commit.

One writer per output: from plan to commit the build holds the lease on its output URI
(lladav/lease.py), so a second build to the same URI refuses at once, naming this one.

Owns: the build's order of work and its guarantees. Does not own: reading formats
(data/sources.py), image and template rules (data/images.py, data/conversation.py), or the
files' schemas (data/manifest.py).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from lladav import Progress, storage
from lladav.config import Recipe, Source
from lladav.data import RecordError
from lladav.data import manifest as mf
from lladav.data.conversation import (ChatTokenizer, Turn, add_tag, normalize_turns,
                                      normalized_text, question_keys, tokenize)
from lladav.data.tokenizer import load_tokenizer, tokenizer_digest
from lladav.data.images import BadImage, image_token_count, inspect_image
from lladav.data.sources import (RecordRef, Unreadable, check_source, enumerate_source,
                                 load_record, printable)
from lladav.digest import (canonical_json, code_version, digest_obj, hash_unit,
                           pretty_json, sha256_bytes)
from lladav.lease import Lease, lease
from lladav.ray_cluster import ensure_ray

log = logging.getLogger(__name__)

SCAN_CHUNK = 64          # fewest records per scan task (see scan_chunk_size)
MAX_SCAN_CHUNK = 512     # most records per scan task: bounds a task's memory (its samples' bytes)
BUILD_DIR = "_build"     # resume markers and scan caches; removed after the commit
SCAN_DIR = "scan"        # _build/scan/chunk-N.arrow: one scan task's samples
_WAIT_SLICE_S = 5.0      # how long _run_tasks waits on Ray before it lets signal handlers run


class BuildError(RuntimeError):
    """The build cannot start or cannot finish; the message names the URI and the fix."""


@dataclass(frozen=True, slots=True)
class Scanned:
    """A scan result, brought back to the driver for every record, so kept small (~120 bytes):
    a reject's reason, or an accepted sample's dedup key (`dedup_key`)."""

    index: int
    reason: str | None = None
    detail: str = ""
    key: bytes = b""
    phash: bytes = b""  # each image's 128-bit perceptual hash, 16 big-endian bytes (near dedup)
    text_key: bytes = b""  # 8 bytes of the normalized text's sha256 (near dedup's text match)


def dedup_key(image_sha256: tuple[str, ...], text_sha256: str) -> bytes:
    """16 bytes standing for (image sha256s, normalized-text sha256): what makes two samples
    the same for dedup (a collision needs ~2^64 samples)."""
    return hashlib.sha256("\n".join((*image_sha256, text_sha256)).encode()).digest()[:16]


@dataclass
class Sample:
    entry: PlanEntry
    images: list[tuple[bytes, str, int, int]]  # (bytes, ext, width, height)
    image_sha256: tuple[str, ...]
    turns: list[Turn]
    text_sha256: str
    ids: np.ndarray
    targets: np.ndarray
    n_image_tokens: int
    orientations: tuple[int, ...] = ()  # EXIF orientation per image, applied when decoded
    image_phash: tuple[int, ...] = ()   # perceptual hash per image (images.perceptual_hash)
    question_keys: tuple[str, ...] = ()  # conversation.question_key per user turn


# ---- plan -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)  # slots: built per task, a chunk or a shard at a time
class PlanEntry:
    index: int        # position in the mixture order
    ref: RecordRef
    copy: int         # repeat index for weight > 1


_BATCH = 65_536  # records buffered as Python objects while enumerating, then made columns


class _Records:
    """Every enumerated record as columns, in enumeration order (sources one after another):
    record id, location (an interned prefix index + suffix, e.g. `data.jsonl#` + `byte=17`) and
    locator (an interned file index + the rest: two integer columns when it is two integers, as
    for JSON byte spans and parquet rows, else compact JSON, as for a tar's member list). About
    50 bytes per record where a RecordRef object took ~470; a record's source and ordinal
    follow from its row."""

    def __init__(self) -> None:
        self.sources: list[str] = []
        self.starts: list[int] = []        # first row of each source
        self.prefixes: dict[str, int] = {}
        self.files: dict[str, int] = {}
        self._parts: dict[str, list] = {k: [] for k in ("rid", "prefix", "suffix", "file", "a", "b",
                                                           "loc")}
        self._buf: dict[str, list] = {k: [] for k in self._parts}
        self.n = 0
        self.columns: dict[str, Any] = {}

    def start_source(self, name: str) -> None:
        self.sources.append(name)
        self.starts.append(self.n)

    def add(self, ref: RecordRef) -> None:
        head, sep, tail = ref.location.rpartition("#")
        b = self._buf
        b["rid"].append(ref.record_id)
        b["prefix"].append(self.prefixes.setdefault(head + sep, len(self.prefixes)))
        b["suffix"].append(tail)
        b["file"].append(self.files.setdefault(ref.locator[0], len(self.files)))
        rest = ref.locator[1:]
        if len(rest) == 2 and all(type(v) is int for v in rest):
            b["a"].append(rest[0])
            b["b"].append(rest[1])
            b["loc"].append("")
        else:
            b["a"].append(0)
            b["b"].append(0)
            b["loc"].append(json.dumps(rest, separators=(",", ":")))
        self.n += 1
        if len(b["rid"]) >= _BATCH:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        b = self._buf
        if not b["rid"]:
            return
        for k in ("rid", "suffix", "loc"):
            self._parts[k].append(pa.array(b[k], pa.string()))
        for k in ("prefix", "file"):
            self._parts[k].append(np.asarray(b[k], dtype=np.int32))
        for k in ("a", "b"):
            self._parts[k].append(np.asarray(b[k], dtype=np.int64))
        for k in b:
            b[k] = []

    def finish(self) -> None:
        import pyarrow as pa

        self._flush()
        for k in ("rid", "suffix", "loc"):
            self.columns[k] = (pa.concat_arrays(self._parts[k]) if self._parts[k]
                               else pa.array([], pa.string()))
        for k, dtype in (("prefix", np.int32), ("file", np.int32), ("a", np.int64), ("b", np.int64)):
            self.columns[k] = (np.concatenate(self._parts[k]) if self._parts[k]
                               else np.zeros(0, dtype))
        self._parts = {}
        self.prefix_list = list(self.prefixes)
        self.file_list = list(self.files)
        self.starts_arr = np.asarray(self.starts, dtype=np.int64)

    def source_of(self, rows: np.ndarray) -> np.ndarray:
        """Source index of each record row."""
        return np.searchsorted(self.starts_arr, rows, side="right") - 1

    def refs(self, rows: np.ndarray) -> list[RecordRef]:
        rows = np.asarray(rows, dtype=np.int64)
        c = self.columns
        rids = c["rid"].take(rows).to_pylist()
        suffixes = c["suffix"].take(rows).to_pylist()
        locs = c["loc"].take(rows).to_pylist()
        src = self.source_of(rows).tolist()
        prefixes, files = c["prefix"][rows].tolist(), c["file"][rows].tolist()
        a, b = c["a"][rows].tolist(), c["b"][rows].tolist()
        out = []
        for k, row in enumerate(rows.tolist()):
            s = src[k]
            rest = (a[k], b[k]) if not locs[k] else _tuples(json.loads(locs[k]))
            out.append(RecordRef(self.sources[s], row - self.starts[s], rids[k],
                                 self.prefix_list[prefixes[k]] + suffixes[k],
                                 (self.file_list[files[k]], *rest)))
        return out

    def locations(self, rows: np.ndarray) -> list[str]:
        c = self.columns
        rows = np.asarray(rows, dtype=np.int64)
        suffixes = c["suffix"].take(rows).to_pylist()
        return [self.prefix_list[p] + s for p, s in zip(c["prefix"][rows].tolist(), suffixes)]


def _tuples(value: Any) -> Any:
    """A locator read back from JSON, with its lists as the tuples the readers built."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


class Plan:
    """The mixture order: one row per planned sample, as the record row it copies and the copy
    number (12 bytes per sample), over the enumerated records' columns (`_Records`). PlanEntry
    objects are made only for the rows a task is given (`entries[a:b]`, `take`)."""

    def __init__(self, records: _Records, rows: np.ndarray, copies: np.ndarray,
                 unreadable: list[Unreadable], counts: Counter,
                 taken_down: list[RecordRef] | None = None):
        self.records_table, self.rows, self.copies = records, rows, copies
        self.unreadable, self.records = unreadable, counts
        self.taken_down = taken_down or []
        """Records refused at plan time by the recipe's takedown list (`Recipe.taken_down`)."""
        self.entries = _PlanEntries(self)

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, indices: np.ndarray | list[int]) -> list[PlanEntry]:
        indices = np.asarray(indices, dtype=np.int64)
        refs = self.records_table.refs(self.rows[indices])
        return [PlanEntry(int(i), ref, int(c))
                for i, ref, c in zip(indices.tolist(), refs, self.copies[indices].tolist())]

    def sources(self, indices: np.ndarray | None = None) -> np.ndarray:
        """Source index of each planned sample (of `indices`, or of all)."""
        rows = self.rows if indices is None else self.rows[indices]
        return self.records_table.source_of(rows)

    def selected(self) -> Counter:
        """Planned samples per source name."""
        names = self.records_table.sources
        counts = np.bincount(self.sources(), minlength=len(names))
        return Counter({names[i]: int(n) for i, n in enumerate(counts) if n})


class _PlanEntries:
    """`plan.entries[i]`, `plan.entries[a:b]` and `len(plan.entries)`, made on demand."""

    def __init__(self, the_plan: Plan):
        self._plan = the_plan

    def __len__(self) -> int:
        return len(self._plan)

    def __getitem__(self, key: int | slice) -> PlanEntry | list[PlanEntry]:
        if isinstance(key, slice):
            return self._plan.take(np.arange(*key.indices(len(self._plan)), dtype=np.int64))
        return self._plan.take([key])[0]


def plan(recipe: Recipe) -> Plan:
    """Enumerate the sources, apply weights, and fix the order of the mixture.

    Weight w keeps floor(w) copies of every record plus one more copy of the round(frac(w)*n)
    records with the smallest seeded hash: an exact, seeded fraction. The order is the sort of
    sha256(seed, "order", source, ordinal, record id, copy). The records are held as columns
    (`_Records`), the order as two integer arrays: ~60-80 bytes per planned sample.
    """
    records = _Records()
    unreadable: list[Unreadable] = []
    taken_down: list[RecordRef] = []
    counts: Counter = Counter()
    planned = 0.0
    rows_parts, copy_parts, key_parts = [], [], []
    for source in recipe.sources:
        records.start_source(source.name)
        first = records.n
        whole, frac = int(math.floor(source.weight)), source.weight - math.floor(source.weight)
        # Keys accumulate as raw bytes (16 per key), not as Python objects.
        keys, draws, extra_keys = bytearray(), bytearray(), bytearray()
        n = 0
        taken = frozenset(recipe.taken_down.get(source.name, ()))
        for item in enumerate_source(source):
            counts[source.name] += 1
            if isinstance(item, Unreadable):
                unreadable.append(item)
                continue
            if item.record_id in taken:  # refused before it is read: nothing of it is kept
                taken_down.append(item)
                continue
            records.add(item)
            n += 1
            if planned + n * source.weight > recipe.max_planned:
                raise BuildError(f"recipe {recipe.name}: the plan passes max_planned "
                                 f"{recipe.max_planned} samples while enumerating source "
                                 f"{source.name} ({n} records x weight {source.weight:g}"
                                 f" so far); lower the weights or raise max_planned")
            for copy in range(whole):
                keys += _order_key(recipe.seed, item, copy)
            if frac:  # the draw, and the key the extra copy gets if the draw selects it
                draws += _raw_key(recipe.seed, "weight", source.name, item.ordinal,
                                  item.record_id)[:8]
                extra_keys += _order_key(recipe.seed, item, whole)
        planned += n * source.weight
        if whole and n:
            rows_parts.append(np.repeat(np.arange(first, first + n, dtype=np.int64), whole))
            copy_parts.append(np.tile(np.arange(whole, dtype=np.int32), n))
            key_parts.append(np.frombuffer(bytes(keys), dtype=">u8").reshape(-1, 2))
        if frac and n:
            draw = np.frombuffer(bytes(draws), dtype=">u8")
            extra = np.sort(np.lexsort((np.arange(n), draw))[:round(frac * n)])
            rows_parts.append(first + extra)
            copy_parts.append(np.full(len(extra), whole, dtype=np.int32))
            key_parts.append(np.frombuffer(bytes(extra_keys), dtype=">u8").reshape(-1, 2)[extra])
        del keys, draws, extra_keys
    records.finish()
    if key_parts:
        key = np.concatenate(key_parts)
        order = np.lexsort((key[:, 1], key[:, 0]))
        del key
        rows = np.concatenate(rows_parts)[order]
        copies = np.concatenate(copy_parts)[order]
    else:
        rows, copies = np.zeros(0, np.int64), np.zeros(0, np.int32)
    return Plan(records, rows, copies, unreadable, counts, taken_down)


def _raw_key(*parts: Any) -> bytes:
    """sha256 of the parts as length-prefixed strings: unambiguous, and ~4x cheaper than
    digest.hash_key's JSON, which matters at one call per planned sample."""
    return hashlib.sha256("".join(f"{len(t)}:{t}" for t in map(str, parts))
                          .encode("utf-8", "surrogatepass")).digest()


def _order_key(seed: int, ref: RecordRef, copy: int) -> bytes:
    """16 bytes of the sample's order hash (sorting them sorts as the full digest does)."""
    return _raw_key(seed, "order", ref.source, ref.ordinal, ref.record_id, copy)[:16]


# ---- per-record processing (shared by scan and write, so both see the same sample) -----------

def _apply_filters(source: Source, turns: list[Turn], n_images: int, record_id: str) -> None:
    f = source.filters
    if f.require_image and n_images == 0:
        raise RecordError("filtered", "require_image: the record has no image")
    if f.text_only and n_images > 0:
        raise RecordError("filtered", "text_only: the record has images")
    if f.max_turns is not None and len(turns) > f.max_turns:
        raise RecordError("filtered", f"max_turns: {len(turns)} > {f.max_turns}")
    answer = sum(len(t.text) for t in turns if t.role == "assistant")
    if f.min_response_chars is not None and answer < f.min_response_chars:
        raise RecordError("filtered", f"min_response_chars: {answer} < {f.min_response_chars}")
    if record_id in f.exclude_ids:
        raise RecordError("filtered", "exclude_ids")


def process(recipe: Recipe, entry: PlanEntry, tok: ChatTokenizer, cache: dict) -> Sample:
    """Read, validate, filter, template and tokenize one planned record, or raise RecordError
    (the readers', image checks' and template's own, or `filtered` / `too_long` from here)."""
    ref = entry.ref
    source = next(s for s in recipe.sources if s.name == ref.source)
    loaded = load_record(source, ref, cache, max_image_bytes=recipe.images.max_bytes)
    infos = []
    for blob in loaded.images:
        try:
            infos.append(inspect_image(blob.data, recipe.images))
        except BadImage as e:  # the record may hold several images: say which one
            raise RecordError(e.code, f"{e.detail} ({blob.location})") from None
    turns = normalize_turns(loaded.conversations, len(infos))
    _apply_filters(source, turns, len(infos), ref.record_id)
    text_sha = sha256_bytes(normalized_text(turns).encode())
    questions = tuple(question_keys(turns))  # before the tag: the question as the corpus asks it
    if source.tag:
        n_user = sum(t.role == "user" for t in turns)
        draws = [hash_unit(recipe.seed, "tag", ref.source, ref.ordinal, ref.record_id, entry.copy, k)
                 < source.tag_probability for k in range(n_user)]
        turns = add_tag(turns, source.tag, draws)
    tokens = tokenize(turns, tok, recipe.template)
    n_image_tokens = sum(image_token_count(i.width, i.height, recipe.vision, recipe.image_aspect,
                                           len(infos)) for i in infos)
    n_total = tokens.n_text_tokens + n_image_tokens
    if n_total > recipe.max_length:
        raise RecordError("too_long", f"{n_total} tokens ({tokens.n_text_tokens} text + "
                                      f"{n_image_tokens} image) > max_length {recipe.max_length}")
    images = [(b.data, i.ext, i.width, i.height) for b, i in zip(loaded.images, infos)]
    return Sample(entry, images, tuple(sha256_bytes(b.data) for b in loaded.images), turns,
                  text_sha, tokens.ids, tokens.targets, n_image_tokens,
                  tuple(i.orientation for i in infos), tuple(i.phash for i in infos), questions)


# ---- scan and write (Ray task bodies; plain functions so they also run in-process) ----------

def scan_chunk(recipe: Recipe, entries: list[PlanEntry], cache_uri: str | None = None) -> list[Scanned]:
    """Process each entry; every per-record failure becomes a Scanned reject, never a task error.

    Anything a record can make our code or a library raise (a parser's RecursionError, a
    tokenizer's UnicodeError, a PIL bug) is that record's reject, `record_error`, with the
    exception's type and message. Storage failures are not: a StorageError means the store,
    not the record, is unwell (retries are exhausted), so it fails the task and the build.
    With `cache_uri`, the accepted samples are written there (one Arrow file, `_cache_bytes`)
    for the write phase, which then never reads the source again.
    """
    tok, cache, out, samples = load_tokenizer(recipe.tokenizer), dict[str, Any](), [], []
    for entry in entries:
        try:
            s = process(recipe, entry, tok, cache)
            out.append(Scanned(entry.index, key=dedup_key(s.image_sha256, s.text_sha256),
                               phash=b"".join(h.to_bytes(16, "big") for h in s.image_phash),
                               text_key=bytes.fromhex(s.text_sha256[:16])))
            samples.append(s)
        except RecordError as e:
            out.append(Scanned(entry.index, e.code, printable(e.detail)))
        except storage.StorageError:
            raise
        except Exception as e:  # noqa: BLE001 - isolation is the point; see the docstring
            out.append(Scanned(entry.index, "record_error", record_error_detail(e)))
    if cache_uri is not None:
        storage.write_bytes(cache_uri, _cache_bytes(samples))
    return out


@functools.cache  # built on first use: pyarrow is imported lazily, as everywhere in build
def _cache_schema():
    import pyarrow as pa

    return pa.schema([
        ("index", pa.int64()), ("images", pa.list_(pa.binary())), ("exts", pa.list_(pa.string())),
        ("widths", pa.list_(pa.int32())), ("heights", pa.list_(pa.int32())),
        ("orientations", pa.list_(pa.int32())), ("image_sha256", pa.list_(pa.string())),
        ("image_phash", pa.list_(pa.string())), ("question_keys", pa.list_(pa.string())),
        ("turns", pa.string()), ("text_sha256", pa.string()), ("ids", pa.binary()),
        ("targets", pa.binary()), ("n_image_tokens", pa.int32())])


def _cache_bytes(samples: list[Sample]) -> bytes:
    """A chunk's samples as an Arrow IPC stream: plain columns (no pickle), read back by
    `_cached_samples`. Token ids are stored as int32 and targets as uint8, as in the tar."""
    import pyarrow as pa

    cols: dict[str, list] = {name: [] for name in _cache_schema().names}
    for s in samples:
        cols["index"].append(s.entry.index)
        cols["images"].append([d for d, _, _, _ in s.images])
        cols["exts"].append([e for _, e, _, _ in s.images])
        cols["widths"].append([w for _, _, w, _ in s.images])
        cols["heights"].append([h for _, _, _, h in s.images])
        cols["orientations"].append(list(s.orientations))
        cols["image_sha256"].append(list(s.image_sha256))
        cols["image_phash"].append([f"{h:032x}" for h in s.image_phash])
        cols["question_keys"].append(list(s.question_keys))
        cols["turns"].append(json.dumps([[t.role, t.text] for t in s.turns]))
        cols["text_sha256"].append(s.text_sha256)
        cols["ids"].append(s.ids.astype(np.int32).tobytes())
        cols["targets"].append(s.targets.astype(np.uint8).tobytes())
        cols["n_image_tokens"].append(s.n_image_tokens)
    table = pa.table(cols, schema=_cache_schema())
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _cached_samples(data: bytes, wanted: dict[int, PlanEntry]) -> dict[int, Sample]:
    """The samples of one chunk cache whose plan index is in `wanted`, keyed by plan index."""
    import pyarrow as pa

    table = pa.ipc.open_stream(data).read_all()
    found = {}
    for row in table.to_pylist():
        entry = wanted.get(row["index"])
        if entry is None:
            continue
        images = list(zip(row["images"], row["exts"], row["widths"], row["heights"]))
        turns = [Turn(role, text) for role, text in json.loads(row["turns"])]
        found[entry.index] = Sample(
            entry, images, tuple(row["image_sha256"]), turns, row["text_sha256"],
            np.frombuffer(row["ids"], dtype=np.int32), np.frombuffer(row["targets"], dtype=np.uint8),
            row["n_image_tokens"], tuple(row["orientations"]),
            tuple(int(h, 16) for h in row["image_phash"]),
            tuple(row["question_keys"]))
    return found


def _chunk_uri(out_uri: str, chunk: int) -> str:
    return storage.join(out_uri, BUILD_DIR, SCAN_DIR, f"chunk-{chunk:06d}.arrow")


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+|0x[0-9a-fA-F]{6,}")


def record_error_detail(error: BaseException) -> str:
    """`Type: message` of an unexpected per-record error, deterministic (memory addresses
    removed) and capped, so identical inputs give identical rejects.parquet bytes."""
    text = printable(f"{type(error).__name__}: {error}")
    return _ADDRESS.sub("", text)[:500]


def _manifest_row(sample: Sample, key: str, shard: str, license: str) -> dict[str, Any]:
    ref = sample.entry.ref
    return {
        "key": key, "shard": shard, "source": ref.source, "source_id": ref.record_id,
        "location": ref.location, "copy": sample.entry.copy,
        "image_sha256": list(sample.image_sha256),
        "image_widths": [w for _, _, w, _ in sample.images],
        "image_heights": [h for _, _, _, h in sample.images],
        "text_sha256": sample.text_sha256,
        "n_tokens": int(len(sample.ids)) - int((sample.ids < 0).sum()) + sample.n_image_tokens,
        "n_text_tokens": int((sample.ids >= 0).sum()),
        "n_target_tokens": int((sample.targets != 0).sum()),
        "n_image_tokens": sample.n_image_tokens,
        "image_orientations": list(sample.orientations) or [1] * len(sample.images),
        "license": license,
        "image_phash": [f"{h:032x}" for h in sample.image_phash],
        "question_keys": list(sample.question_keys),
    }


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def scan_chunk_size(n: int, num_workers: int, samples_per_shard: int) -> int:
    """Records per scan task: ~8 tasks per worker for balance, at least SCAN_CHUNK (a task's
    start costs ~10 ms: at 64 text records that was a third of the scan), at most
    MAX_SCAN_CHUNK and at most a shard (a shard's writer reads whole chunk caches)."""
    cap = max(SCAN_CHUNK, min(MAX_SCAN_CHUNK, samples_per_shard))
    return max(SCAN_CHUNK, min(cap, math.ceil(n / (8 * max(1, num_workers)))))


def write_shard(recipe: Recipe, out_uri: str, shard_index: int, first_key: int,
                entries: list[PlanEntry], shard_plan: str,
                chunk_size: int = SCAN_CHUNK) -> dict[str, Any]:
    """Write one shard's tar (atomically) from the scan's chunk caches, then its done-marker;
    return the marker. The entries are consecutive survivors, so their chunks (of `chunk_size`
    plan indices, as scanned) are too."""
    import webdataset as wds

    rows = []
    name = mf.shard_name(shard_index)
    licenses = {s.name: s.license for s in recipe.sources}
    wanted = {e.index: e for e in entries}
    found: dict[int, Sample] = {}
    for chunk in sorted({e.index // chunk_size for e in entries}):
        uri = _chunk_uri(out_uri, chunk)
        try:
            data = storage.read_bytes(uri)
        except FileNotFoundError:
            raise BuildError(f"{uri}: the scan cache of shard {shard_index} is gone; was "
                             f"{out_uri}/{BUILD_DIR} removed during the build? Run it again") from None
        found.update(_cached_samples(data, wanted))
    if missing := [e.ref.location for e in entries if e.index not in found]:
        raise BuildError(f"shard {shard_index}: {len(missing)} samples are missing from the scan "
                         f"caches (e.g. {missing[0]}); run the build again")
    samples = [found[e.index] for e in entries]
    with storage.open_write(storage.join(out_uri, name)) as raw:
        f = _Hashing(raw)  # the marker's sha256 and size, without reading the tar back
        # Fixed owner, mode and mtime: the same samples give the same tar bytes. An int mtime:
        # a float one made tarfile add a 1 KiB pax header before every member.
        writer = wds.TarWriter(f, user="lladav", group="lladav", mode=0o444, mtime=0, encoder=False)
        for i, sample in enumerate(samples):
            key = f"{first_key + i:09d}"
            row = _manifest_row(sample, key, name, licenses[sample.entry.ref.source])
            rows.append(row)
            member = {"__key__": key,
                      "json": canonical_json({**row, "template": recipe.template,
                                              "turns": [{"role": t.role, "text": t.text}
                                                        for t in sample.turns]}),
                      "ids.npy": _npy(sample.ids.astype(np.int32)),
                      "targets.npy": _npy(sample.targets.astype(np.uint8))}
            for k, (data, ext, _, _) in enumerate(sample.images):
                member[f"img{k}.{ext}"] = data
            writer.write(member)
        writer.close()
    marker = {"plan": shard_plan, "name": name, "sha256": f.sha.hexdigest(), "bytes": f.size,
              "samples": len(samples), "totals": _totals(rows), "rows": rows}
    storage.write_bytes(_marker_uri(out_uri, shard_index), canonical_json(marker))
    return _light(marker)


class _Hashing(io.RawIOBase):
    """A write-only file that hashes and counts what passes through it to `raw` (closing it
    leaves `raw` open: storage.open_write publishes that one)."""

    def __init__(self, raw: Any):
        super().__init__()
        self.raw, self.sha, self.size = raw, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        data = bytes(data)
        self.sha.update(data)
        self.size += len(data)
        self.raw.write(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.raw.flush()



def _totals(rows: list[dict]) -> dict[str, list[int]]:
    """Per source: [samples, tokens, target tokens, image tokens] of a shard's manifest rows."""
    out: dict[str, list[int]] = {}
    for r in rows:
        t = out.setdefault(r["source"], [0, 0, 0, 0])
        t[0] += 1
        t[1] += r["n_tokens"]
        t[2] += r["n_target_tokens"]
        t[3] += r["n_image_tokens"]
    return out


def _light(marker: dict) -> dict:
    """A done-marker without its manifest rows: what the driver keeps per shard (the rows stay
    in the marker file until the commit streams them into manifest.parquet)."""
    return {k: v for k, v in marker.items() if k != "rows"}


def _marker_uri(out_uri: str, shard: int) -> str:
    return storage.join(out_uri, BUILD_DIR, f"shard-{shard:06d}.json")


# ---- the driver ------------------------------------------------------------------------------

def _run_tasks(fn: Callable, n: int, make_args: Callable[[int], tuple], num_workers: int,
               phase: str, progress: Progress | None,
               on_result: Callable[[int, Any], None] | None = None) -> list[Any]:
    """Run fn(*make_args(i)) for i in range(n) as Ray tasks, at most `num_workers` at a time.

    Arguments are made when a task is submitted, so the driver never holds all of them. With
    `on_result`, each result is handed to it as it arrives (in any order) and not kept;
    otherwise the results are returned in order."""
    import ray

    remote = ray.remote(num_cpus=1, max_retries=2)(fn)
    results: dict[int, Any] = {}
    pending: dict[Any, int] = {}
    submitted = finished = 0
    if progress:
        progress(phase, 0, n)
    while submitted < n or pending:
        while submitted < n and len(pending) < num_workers:
            pending[remote.remote(*make_args(submitted))] = submitted
            submitted += 1
        # Waits in slices so the process's signal handlers run (Ctrl-C, a test's timeout): one
        # wait without a timeout blocks in Ray's C++ for as long as no task finishes, and a
        # build whose tasks never came back (seen once in CI, the raylet holding no lease)
        # hung its test past the suite's timeout instead of failing it.
        done: list = []
        while not done:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=_WAIT_SLICE_S)
        for ref in done:
            i = pending.pop(ref)
            if on_result is None:
                results[i] = ray.get(ref)
            else:
                on_result(i, ray.get(ref))
            finished += 1
        if progress:
            progress(phase, finished, n)
    return [results[i] for i in range(n)] if on_result is None else []


def build(recipe: Recipe, out_uri: str | None = None, *, num_workers: int = 2,
          overwrite: bool = False, progress: Progress | None = None) -> mf.Mixture:
    """Build `recipe` into a committed mixture at `out_uri` (or `recipe.output`); see module doc."""
    out_uri = out_uri or recipe.output
    if not out_uri:
        raise BuildError("no output URI: pass --out or set `output` in the recipe")
    if not recipe.tokenizer:
        raise BuildError(f"recipe {recipe.name}: no tokenizer; set `tokenizer` in the recipe, or "
                         "name a tokenizer step in the pipeline's data step")
    for source in recipe.sources:
        check_source(source)
    try:
        tok_digest = tokenizer_digest(recipe.tokenizer)
    except FileNotFoundError as e:
        raise BuildError(str(e)) from None
    # One writer per output: a second build to this URI refuses here, naming this one.
    with lease(out_uri, f"build recipe {recipe.name}") as held:
        return _build_leased(recipe, out_uri, tok_digest, held, num_workers=num_workers,
                             overwrite=overwrite, progress=progress)


def _build_leased(recipe: Recipe, out_uri: str, tok_digest: str, held: Lease, *,
                  num_workers: int, overwrite: bool, progress: Progress | None) -> mf.Mixture:
    """The build proper (plan to commit), run while holding the lease on `out_uri`."""
    recipe_identity = recipe.identity()
    version = code_version()

    the_plan = plan(recipe)
    plan_digest = _plan_digest(recipe_identity, tok_digest, version, the_plan)
    committed = _committed_plan(out_uri)
    if committed is not None:
        if committed == plan_digest:
            log.info("%s already holds this mixture; nothing to do", out_uri)
            return mf.open_mixture(out_uri)
        if not overwrite:
            raise BuildError(f"{out_uri} already holds a different committed mixture; "
                             "choose another --out, or pass --overwrite to replace it")
        storage.delete(storage.join(out_uri, mf.MIXTURE_JSON))  # uncommit before touching shards

    ensure_ray()
    chunk = scan_chunk_size(len(the_plan), num_workers, recipe.samples_per_shard)
    survivors, rejects = _scan(recipe, out_uri, the_plan, chunk, num_workers, progress)
    if not len(survivors):
        raise BuildError(_nothing_left(recipe, the_plan, rejects))

    spp = recipe.samples_per_shard
    todo, markers = [], {}
    for s in range(math.ceil(len(survivors) / spp)):
        marker = _done_marker(out_uri, s, _shard_plan(plan_digest, s, survivors, spp))
        if marker is not None:
            markers[s] = marker
        else:
            todo.append(s)
    if markers:
        log.info("resuming: %d of %d shards already written", len(markers), len(markers) + len(todo))

    def shard_args(j: int) -> tuple:
        s = todo[j]
        entries = the_plan.take(survivors[s * spp:(s + 1) * spp])
        return (recipe, out_uri, s, s * spp, entries, _shard_plan(plan_digest, s, survivors, spp),
                chunk)

    _run_tasks(write_shard, len(todo), shard_args, num_workers, "write", progress,
               on_result=lambda j, marker: markers.__setitem__(todo[j], marker))
    shards = [markers[s] for s in sorted(markers)]
    held.check()  # a build that lost its lease must not commit over another writer's files
    return _commit(recipe, out_uri, the_plan, shards, rejects, plan_digest, tok_digest, version)


def _scan(recipe: Recipe, out_uri: str, the_plan: Plan, chunk: int, num_workers: int,
          progress: Progress | None) -> tuple[np.ndarray, list[dict]]:
    """Scan every planned sample in chunks of `chunk` (Ray tasks), then dedup: the survivors'
    plan indices and the reject rows."""
    n = len(the_plan)
    results = ScanResults(n)
    _run_tasks(scan_chunk, math.ceil(n / chunk),
               lambda k: (recipe, the_plan.entries[k * chunk:(k + 1) * chunk],
                          _chunk_uri(out_uri, k)),
               num_workers, "scan", progress, on_result=lambda _, part: results.add(part))
    return _dedup(recipe, the_plan, results)


def _shard_plan(plan_digest: str, shard: int, survivors: np.ndarray, spp: int) -> str:
    """What shard `shard` is written from: the plan and its samples' plan indices."""
    return digest_obj([plan_digest, shard, survivors[shard * spp:(shard + 1) * spp].tolist()])


def _plan_digest(recipe_identity: dict, tok_digest: str, version: dict, the_plan: Plan) -> str:
    """What the mixture is made of: recipe, tokenizer, code and every planned (location, copy),
    hashed as a stream (a JSON list of 10M locations would be ~1 GB on the driver)."""
    h = hashlib.sha256(canonical_json({"recipe": recipe_identity, "tokenizer": tok_digest,
                                       "code": version}))
    for start in range(0, len(the_plan), _BATCH):
        rows = the_plan.rows[start:start + _BATCH]
        copies = the_plan.copies[start:start + _BATCH].tolist()
        for location, copy in zip(the_plan.records_table.locations(rows), copies):
            h.update(f"{len(location)}:{location}{copy}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def vision_note(recipe: Recipe) -> str | None:
    """What a recipe without a `vision:` block counts image tokens with (the 8B tower's
    defaults), for the build summary; None when the recipe states its geometry."""
    if "vision" in recipe.model_fields_set:
        return None
    v = recipe.vision
    return (f"no `vision:` in recipe {recipe.name}: image tokens are counted for the default "
            f"(LLaDA-V 8B) tower, {v.tile_size} px tiles of {v.patch_size} px patches, "
            f"{recipe.image_aspect}, grid up to {v.max_grid}x{v.max_grid}; set `vision:` to your "
            "model's tower (e.g. {tile_size: 32, patch_size: 8, max_grid: 2} for flavor tiny)")


def _nothing_left(recipe: Recipe, the_plan: Plan, rejects: list[dict], top: int = 5) -> str:
    """The message of a build that would commit an empty mixture: the top reject reasons, with
    an example detail each, and the geometry a too_long reject was counted with."""
    reasons = Counter(r["reason"] for r in rejects)
    example = {r["reason"]: r for r in reversed(rejects)}
    lines = [f"recipe {recipe.name}: every one of the {len(rejects)} planned records was "
             f"rejected ({sum(the_plan.records.values())} read); nothing was committed. "
             "Top reasons:"]
    for reason, count in reasons.most_common(top):
        r = example[reason]
        lines.append(f"  {reason:<20} {count:>7}  e.g. {r['location']}: {r['detail']}")
    if "too_long" in reasons and (note := vision_note(recipe)):
        lines.append(f"  {note}")
    return "\n".join(lines)


def _committed_plan(out_uri: str) -> str | None:
    try:
        return mf.open_mixture(out_uri).info.get("plan_digest")
    except mf.MixtureNotCommitted:
        return None


def _done_marker(out_uri: str, shard: int, shard_plan: str) -> dict | None:
    try:
        marker = json.loads(storage.read_bytes(_marker_uri(out_uri, shard)))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if marker.get("plan") != shard_plan or not storage.exists(storage.join(out_uri, marker["name"])):
        return None
    return _light(marker)


class ScanResults:
    """The scan's results on the driver, as columns: each planned sample's 16-byte dedup key,
    and the reason of each reject (rejects only)."""

    def __init__(self, n: int):
        self.keys = np.zeros((n, 16), dtype=np.uint8)
        self.rejected: dict[int, tuple[str, str]] = {}
        # near dedup's inputs, ~26 bytes per sample: first image's hash, image count, text key
        self.phash = np.zeros((n, 2), dtype=np.uint64)
        self.n_images = np.zeros(n, dtype=np.int16)
        self.text_key = np.zeros(n, dtype=np.uint64)
        self.more_phash: dict[int, np.ndarray] = {}  # hashes after the first, multi-image samples

    def add(self, part: list[Scanned]) -> None:
        for r in part:
            if r.reason is None:
                self.keys[r.index] = np.frombuffer(r.key, dtype=np.uint8)
                hashes = np.frombuffer(r.phash, dtype=">u8").astype(np.uint64).reshape(-1, 2)
                self.n_images[r.index] = len(hashes)
                if len(hashes):
                    self.phash[r.index] = hashes[0]
                if len(hashes) > 1:
                    self.more_phash[r.index] = hashes[1:]
                if r.text_key:
                    self.text_key[r.index] = int.from_bytes(r.text_key, "big")
            else:
                self.rejected[r.index] = (r.reason, r.detail)


def _dedup(recipe: Recipe, the_plan: Plan, results: ScanResults) -> tuple[np.ndarray, list[dict]]:
    """Plan indices of the survivors, in plan order, and reject rows for everything else
    (unreadable and taken-down ones first, then in plan order).

    Of the accepted samples that share a dedup key, the record that comes first in the corpus
    (sources in recipe order, records in source order) is kept, whatever the seed; the others
    are duplicates of it (the copies of one record, weight > 1, are not duplicates of each
    other). With `near_dedup`, the survivors whose images are near-duplicates of an earlier
    survivor's go too (data/near_dedup.py). A refused copy names the key its kept sample has in
    the manifest (`duplicate_of`)."""
    rejects = [{"source": u.source, "source_id": None, "location": u.location, "copy": 0,
                "reason": u.code, "detail": u.detail} for u in the_plan.unreadable]
    rejects += [{"source": r.source, "source_id": r.record_id, "location": r.location, "copy": 0,
                 "reason": "takedown", "detail": "listed in the recipe's takedown list; not read"}
                for r in the_plan.taken_down]
    n = len(the_plan)
    _refuse_taken_down_images(recipe, results)
    accepted = np.ones(n, dtype=bool)
    accepted[list(results.rejected)] = False
    duplicate = np.zeros(n, dtype=bool)
    owner = np.full(n, -1, dtype=np.int64)
    if recipe.dedup and accepted.any():
        idx = np.flatnonzero(accepted)
        key = np.ascontiguousarray(results.keys[idx]).view(">u8").reshape(-1, 2)
        rows = the_plan.rows[idx]
        # Group equal keys, each group in corpus order; its first record owns the key.
        order = np.lexsort((rows, key[:, 1], key[:, 0]))
        k = key[order]
        starts = np.ones(len(order), dtype=bool)
        starts[1:] = (k[1:] != k[:-1]).any(axis=1)
        owners = np.empty_like(idx)
        owners[order] = idx[order[np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))]]
        dup = the_plan.rows[owners] != the_plan.rows[idx]
        duplicate[idx[dup]] = True
        owner[idx[dup]] = owners[dup]
    near, distance = _near_dedup(recipe, the_plan, results, accepted & ~duplicate, owner)
    survivors = np.flatnonzero(accepted & ~duplicate & ~near)
    bad = np.flatnonzero(~accepted | duplicate | near)
    limit = recipe.near_dedup.max_distance if recipe.near_dedup else 0
    for start in range(0, len(bad), _BATCH):
        part = bad[start:start + _BATCH]
        for entry in the_plan.take(part):
            ref, i = entry.ref, entry.index
            kept = None
            if duplicate[i] or near[i]:
                j = int(owner[i])
                where = the_plan.records_table.locations(the_plan.rows[[j]])[0]
                kept = f"{int(np.searchsorted(survivors, j)):09d}"
                reason, detail = (("duplicate", f"same images and text as {where} (key {kept})")
                                  if duplicate[i] else
                                  ("near_duplicate", f"images {distance[i]} perceptual-hash bits "
                                   f"from {where} (key {kept}; max_distance {limit})"))
            else:
                reason, detail = results.rejected[i]
            rejects.append({"source": ref.source, "source_id": ref.record_id, "location": ref.location,
                            "copy": entry.copy, "reason": reason, "detail": detail,
                            "duplicate_of": kept})
    return survivors, rejects


def _refuse_taken_down_images(recipe: Recipe, results: ScanResults) -> None:
    """Mark as `takedown` rejects the accepted samples holding a copy of an image the takedown
    list took down with its copies (`Recipe.taken_down_images`): any source, any id."""
    if not recipe.taken_down_images:
        return
    from lladav.data.near_dedup import matches

    limit = recipe.near_dedup.max_distance if recipe.near_dedup else 8
    taken = np.array([(int(h[:16], 16), int(h[16:], 16)) for h in recipe.taken_down_images],
                     dtype=np.uint64).reshape(-1, 2)
    done = np.zeros(len(results.n_images), dtype=bool)
    done[list(results.rejected)] = True
    idx = np.flatnonzero(~done & (results.n_images > 0))
    owner = [idx, *(np.full(len(h), i) for i, h in results.more_phash.items() if not done[i])]
    hashes = [results.phash[idx], *(h for i, h in results.more_phash.items() if not done[i])]
    _, hit, dist = matches(taken, np.concatenate(hashes), limit)
    for i, d in zip(np.concatenate(owner)[hit].tolist(), dist.tolist()):
        results.rejected.setdefault(int(i), ("takedown", f"an image {d} perceptual-hash bits from "
                                                         "one the takedown list took down with its copies"))


def _near_dedup(recipe: Recipe, the_plan: Plan, results: ScanResults, alive: np.ndarray,
                owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(near, distance) per plan index: which of the `alive` samples near_dedup refuses, and
    the Hamming distance to the sample kept instead. Sets `owner` for them, and moves the exact
    duplicates of a refused sample to the sample that was kept instead of it."""
    near = np.zeros(len(alive), dtype=bool)
    distance = np.zeros(len(alive), dtype=np.int64)
    cfg = recipe.near_dedup
    if cfg is None:
        return near, distance
    from lladav.data.near_dedup import near_duplicates

    idx = np.flatnonzero(alive & (results.n_images > 0))
    group = results.n_images[idx].astype(np.uint64)
    if cfg.compare == "images_and_text":
        group = group ^ (results.text_key[idx] * np.uint64(0x9E3779B97F4A7C15))
    position = {int(i): k for k, i in enumerate(idx)}
    more = {position[i]: h for i, h in results.more_phash.items() if i in position}
    local, dist = near_duplicates(results.phash[idx], the_plan.rows[idx], group,
                                  cfg.max_distance, more)
    hit = local >= 0
    near[idx[hit]] = True
    owner[idx[hit]] = idx[local[hit]]
    distance[idx[hit]] = dist[hit]
    moved = (owner >= 0) & ~near & near[np.maximum(owner, 0)]
    owner[moved] = owner[owner[moved]]
    return near, distance


def check_accounting(recipe: Recipe, the_plan: Plan, samples: Counter, rejects: list[dict]) -> None:
    """Every record read is a sample or a reject row, per source: raise BuildError otherwise.

    Per source, samples + rejected == selected + unreadable, where `selected` is the planned
    copies of the records that could be split out (records x weight) and `unreadable` the parts
    that could not, and the records a takedown refused. With weight 1 that is `accepted + rejected == records`.
    """
    selected = the_plan.selected()
    unreadable = Counter(u.source for u in the_plan.unreadable)
    unreadable.update(r.source for r in the_plan.taken_down)  # read as records, never planned
    rejected = Counter(r["source"] for r in rejects)
    for source in recipe.sources:
        n = source.name
        if samples[n] + rejected[n] != selected[n] + unreadable[n]:
            raise BuildError(f"source {n}: {samples[n]} samples + {rejected[n]} rejects != "
                             f"{selected[n]} planned + {unreadable[n]} unreadable; records were "
                             "lost between plan and commit, nothing was committed")


MANIFEST_ROW_GROUP = 100_000  # rows held at once (as Arrow columns) while the commit streams


def _write_manifest(out_uri: str, shards: list[dict]) -> tuple[str, int]:
    """Stream the shards' manifest rows, read back from their done-markers in shard order, into
    manifest.parquet (atomic; at most MANIFEST_ROW_GROUP rows in memory, as Arrow columns);
    (sha256, rows).

    Row groups of MANIFEST_ROW_GROUP rows with manifest.table_to_bytes' options: the same bytes
    as writing the whole table at once, whatever the number of shards or workers.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    pending: list[pa.Table] = []
    held = total = 0
    with storage.open_write(storage.join(out_uri, mf.MANIFEST)) as raw:
        f = _Hashing(raw)
        with pq.ParquetWriter(f, mf.MANIFEST_SCHEMA, compression="zstd", write_statistics=False,
                              store_schema=False) as writer:
            for shard in shards:
                index = int(shard["name"].rsplit("-", 1)[1].split(".")[0])
                rows = json.loads(storage.read_bytes(_marker_uri(out_uri, index)))["rows"]
                pending.append(pa.Table.from_pylist(rows, schema=mf.MANIFEST_SCHEMA))
                held += len(rows)
                while held >= MANIFEST_ROW_GROUP:
                    table = pa.concat_tables(pending)
                    writer.write_table(table.slice(0, MANIFEST_ROW_GROUP),
                                       row_group_size=MANIFEST_ROW_GROUP)
                    pending, held = [table.slice(MANIFEST_ROW_GROUP)], held - MANIFEST_ROW_GROUP
                    total += MANIFEST_ROW_GROUP
            rest = pa.concat_tables(pending) if pending else mf.MANIFEST_SCHEMA.empty_table()
            if held or total == 0:
                writer.write_table(rest, row_group_size=MANIFEST_ROW_GROUP)
                total += held
    return f.sha.hexdigest(), total


def _commit(recipe: Recipe, out_uri: str, the_plan: Plan, shards: list[dict], rejects: list[dict],
            plan_digest: str, tok_digest: str, version: dict) -> mf.Mixture:
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for shard in shards:
        for source, values in shard["totals"].items():
            totals[source] = [a + b for a, b in zip(totals[source], values)]
    check_accounting(recipe, the_plan, Counter({k: v[0] for k, v in totals.items()}), rejects)
    # Shards left over from an earlier, larger build of the same URI are not part of this one.
    names = {s["name"] for s in shards}
    for uri in storage.list_uris(storage.join(out_uri, mf.SHARD_DIR)):
        if uri[len(out_uri):].lstrip("/") not in names:
            storage.delete(uri)
    manifest_sha, n_rows = _write_manifest(out_uri, shards)
    rejects_bytes = mf.table_bytes(rejects, mf.REJECTS_SCHEMA)
    storage.write_bytes(storage.join(out_uri, mf.REJECTS), rejects_bytes)
    info = {
        "format": mf.MIXTURE_FORMAT,
        "name": recipe.name,
        "recipe": recipe.identity(),
        "recipe_digest": digest_obj(recipe.identity()),
        "plan_digest": plan_digest,
        "tokenizer": {"uri": recipe.tokenizer, "digest": tok_digest,
                      "special_ids": load_tokenizer(recipe.tokenizer).special_ids()},
        "counts": _counts(recipe, the_plan, totals, rejects, len(shards)),
        "shards": [{k: s[k] for k in ("name", "sha256", "bytes", "samples")} for s in shards],
        "manifest": {"name": mf.MANIFEST, "sha256": manifest_sha, "rows": n_rows},
        "rejects": {"name": mf.REJECTS, "sha256": sha256_bytes(rejects_bytes), "rows": len(rejects)},
        "code_version": version,
    }
    storage.write_bytes(storage.join(out_uri, mf.MIXTURE_JSON), pretty_json(info))  # the commit
    storage.delete_prefix(storage.join(out_uri, BUILD_DIR))
    return mf.open_mixture(out_uri)


def _counts(recipe: Recipe, the_plan: Plan, totals: dict[str, list[int]], rejects: list[dict],
            n_shards: int) -> dict[str, Any]:
    selected = the_plan.selected()
    by_source: dict[str, Any] = {}
    reasons: dict[str, Counter] = defaultdict(Counter)
    for r in rejects:
        reasons[r["source"]][r["reason"]] += 1
    for source in recipe.sources:
        samples, tokens, target_tokens, image_tokens = totals.get(source.name, [0, 0, 0, 0])
        by_source[source.name] = {
            "license": source.license,
            "records": the_plan.records[source.name],
            "selected": selected[source.name],
            "samples": samples,
            "rejected": sum(reasons[source.name].values()),
            "rejected_by_reason": dict(sorted(reasons[source.name].items())),
            "tokens": tokens,
            "target_tokens": target_tokens,
            "image_tokens": image_tokens,
        }
    return {"samples": sum(t[0] for t in totals.values()), "rejected": len(rejects),
            "shards": n_shards, "tokens": sum(t[1] for t in totals.values()),
            "by_source": by_source, "by_license": mf.license_counts(by_source)}

