"""Corpus readers: LLaVA JSON/JSONL + image files, parquet with image bytes, WebDataset tars.

Each reader does two things, split so a Ray build can plan on the driver and read in tasks:
- `enumerate_source(source)` streams the corpus once and yields a small `RecordRef` per record
  (id, human-readable location, and a locator to read it back by byte range), or an
  `Unreadable` for what cannot even be split into records (a line that is not JSON, a tar
  member whose name escapes its folder). Nothing is held in memory but the refs.
- `load_record(source, ref, cache)` reads one record back: its raw LLaVA `conversations` and
  its images' bytes, or raises `BadRecord` with the reject reason (missing image, bad path, ...).

Owns: the three on-disk layouts and their quirks. Does not own: validating images
(data/images.py) or conversations (data/conversation.py), or where bytes live (storage.py).
"""

from __future__ import annotations

import codecs
import io
import json
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from lladav import storage
from lladav.config import Source
from lladav.data import RecordError

_CHUNK = 1 << 20
_MAX_ELEMENT = 64 << 20  # a JSON record larger than this is treated as malformed
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class RecordRef:
    """Where one record lives. `locator` is reader-specific and enough to read it back."""

    source: str
    ordinal: int          # position in the source's enumeration order
    record_id: str
    location: str         # e.g. s3://b/data.jsonl#L17, file.parquet#row=3, shards.tar#key
    locator: tuple


@dataclass(frozen=True)
class Unreadable:
    """Part of a corpus that could not be split into a record; becomes a reject row."""

    source: str
    location: str
    code: str
    detail: str


class BadRecord(RecordError):
    """A record that cannot be used; `code` is the reject reason."""


@dataclass
class ImageBlob:
    location: str
    data: bytes


@dataclass
class LoadedRecord:
    conversations: Any
    images: list[ImageBlob] = field(default_factory=list)
    fields: dict[str, Any] = field(default_factory=dict)
    """The record's other top-level fields (e.g. a test set's `choices`), as read."""


class SourceError(RuntimeError):
    """A source as a whole is unusable (missing location, unknown layout): fails the build."""


def check_source(source: Source) -> None:
    """Fail fast, before any work, when a source's location does not exist."""
    if not (storage.exists(source.location) or storage.list_uris(source.location)):
        raise SourceError(f"source {source.name!r}: location {source.location} does not exist")


def enumerate_source(source: Source) -> Iterator[RecordRef | Unreadable]:
    reader = {"llava_json": _enumerate_llava, "parquet": _enumerate_parquet,
              "webdataset": _enumerate_tars}[source.kind]
    yield from reader(source)


def load_record(source: Source, ref: RecordRef, cache: dict | None = None, *,
                with_images: bool = True) -> LoadedRecord:
    """One record back from its ref. `with_images=False` skips reading image bytes (the images
    list then holds blobs with empty data): for text-only passes such as training a tokenizer."""
    cache = {} if cache is None else cache
    loader = {"llava_json": _load_llava, "parquet": _load_parquet,
              "webdataset": _load_tar}[source.kind]
    return loader(source, ref, cache, with_images)


KIND_BY_SUFFIX = {".json": "llava_json", ".jsonl": "llava_json", ".parquet": "parquet",
                  ".tar": "webdataset"}


def corpus_source(uri: str, *, name: str = "corpus", image_root: str | None = None) -> Source:
    """A Source for a corpus given by its URI alone (a CLI's --corpus, a test file): the format
    follows the file's suffix, or the suffix of the files in a folder."""
    suffix = next((s for s in KIND_BY_SUFFIX if uri.endswith(s)), None)
    if suffix is None:
        found = {s for u in storage.list_uris(uri) for s in KIND_BY_SUFFIX if u.endswith(s)}
        kinds = {KIND_BY_SUFFIX[s] for s in found}
        if len(kinds) != 1:
            raise SourceError(f"{uri}: cannot tell the corpus format; expected a .json/.jsonl, "
                              f".parquet or .tar file, or a folder of one kind of them "
                              f"(found {sorted(found) or 'none'})")
        kind = kinds.pop()
    else:
        kind = KIND_BY_SUFFIX[suffix]
    return Source(name=name, kind=kind, location=uri, image_root=image_root)


def _files(location: str, suffixes: tuple[str, ...]) -> list[str]:
    if storage.exists(location) and location.endswith(suffixes):
        return [location]
    files = [u for u in storage.list_uris(location) if u.endswith(suffixes)]
    if not files:
        raise SourceError(f"{location}: no {'/'.join(suffixes)} files found")
    return files


def _record_id(obj: dict, fallback: str) -> str:
    rid = obj.get("id")
    return str(rid) if rid is not None and str(rid) != "" else fallback


# ---- LLaVA JSON / JSONL ---------------------------------------------------------------------

def _enumerate_llava(source: Source) -> Iterator[RecordRef | Unreadable]:
    ordinal = 0
    for uri in _files(source.location, (".json", ".jsonl")):
        spans = _jsonl_spans(uri) if uri.endswith(".jsonl") else _json_array_spans(uri)
        for offset, length, obj, error in spans:
            location = f"{uri}#byte={offset}"
            if error is not None:
                yield Unreadable(source.name, location, "malformed_json", error)
                continue
            if not isinstance(obj, dict):
                yield Unreadable(source.name, location, "malformed_record",
                                 f"expected a JSON object, got {type(obj).__name__}")
                continue
            yield RecordRef(source.name, ordinal, _record_id(obj, f"{posixpath.basename(uri)}:{ordinal}"),
                            location, (uri, offset, length))
            ordinal += 1


def _jsonl_spans(uri: str) -> Iterator[tuple[int, int, Any, str | None]]:
    offset, lineno, pending = 0, 0, b""
    with storage.open_read(uri) as f:
        while True:
            chunk = f.read(_CHUNK)
            pending += chunk
            lines = pending.split(b"\n")
            pending = lines.pop() if chunk else b""
            for line in lines:
                lineno += 1
                if line.strip():
                    try:
                        yield offset, len(line), json.loads(line), None
                    except (json.JSONDecodeError, UnicodeDecodeError) as e:
                        yield offset, len(line), None, f"line {lineno}: {e}"
                offset += len(line) + 1
            if not chunk:
                return


def _json_array_spans(uri: str) -> Iterator[tuple[int, int, Any, str | None]]:
    """Stream the elements of a top-level JSON array with their byte spans.

    The stdlib decoder parses one element at a time from a sliding text buffer, so a 10M-record
    file is never held whole (the reference's json.load of one giant file is what we replace).
    A syntax error inside the array cannot be resynchronised: it is reported once, with its byte
    offset, and the rest of that file is not read (an error says so loudly).
    """
    decoder = json.JSONDecoder()
    text_decoder = codecs.getincrementaldecoder("utf-8")()
    with storage.open_read(uri) as f:
        buf, pos, base, eof = "", 0, 0, False  # base: byte offset of buf[0]

        def more(at_least: int = 0) -> bool:
            nonlocal buf, eof
            chunk = f.read(max(_CHUNK, at_least))
            eof = not chunk
            buf += text_decoder.decode(chunk, final=eof)
            return not eof

        def skip_ws() -> None:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or not more():
                    return

        def byte_at(i: int) -> int:
            return base + len(buf[:i].encode("utf-8"))

        skip_ws()
        if pos >= len(buf) or buf[pos] != "[":
            yield 0, 0, None, "the file is not a JSON array (use .jsonl for JSON Lines)"
            return
        pos += 1
        first = True
        while True:
            skip_ws()
            if pos < len(buf) and buf[pos] == "]":
                return
            if not first:
                if pos >= len(buf) or buf[pos] != ",":
                    yield byte_at(pos), 0, None, f"expected ',' or ']' at byte {byte_at(pos)}; the rest of the file was not read"
                    return
                pos += 1
                skip_ws()
            first = False
            while True:
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as e:
                    # Any error may just mean the element continues past the buffer (even mid
                    # `\u` escape): read more, doubling, until EOF or the element is too big.
                    if not eof and len(buf) - pos < _MAX_ELEMENT and more(len(buf) - pos):
                        continue
                    yield byte_at(pos), 0, None, f"byte {byte_at(e.pos)}: {e.msg}; the rest of the file was not read"
                    return
            start = byte_at(pos)
            length = len(buf[pos:end].encode("utf-8"))
            yield start, length, obj, None
            # Drop the consumed text so the buffer stays one element long.
            base = start + length
            buf, pos = buf[end:], 0


def _safe_relative(path: str) -> str | None:
    """The normalised relative path, or None when it is absolute or escapes its root."""
    if not path or path.startswith(("/", "\\")) or "://" in path:
        return None
    norm = posixpath.normpath(path.replace("\\", "/"))
    if norm == ".." or norm.startswith("../"):
        return None
    return norm


def _load_llava(source: Source, ref: RecordRef, cache: dict, with_images: bool) -> LoadedRecord:
    uri, offset, length = ref.locator
    try:
        obj = json.loads(storage.read_range(uri, offset, length))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRecord("malformed_json", str(e)) from None
    if "video" in obj:
        raise BadRecord("unsupported_modality", "video records are not supported")
    images = obj.get("image")
    images = [] if images is None else images if isinstance(images, list) else [images]
    root = source.image_root or (storage.parent(source.location)
                                 if source.location.endswith((".json", ".jsonl")) else source.location)
    blobs = []
    for rel in images:
        safe = _safe_relative(rel) if isinstance(rel, str) else None
        if safe is None:
            raise BadRecord("unsafe_path", f"image path {rel!r} is not a relative path inside image_root")
        image_uri = storage.join(root, safe)
        try:
            blobs.append(ImageBlob(image_uri, storage.read_bytes(image_uri) if with_images else b""))
        except FileNotFoundError:
            raise BadRecord("image_missing", f"{image_uri} does not exist") from None
    fields = {k: v for k, v in obj.items() if k not in ("conversations", "image")}
    return LoadedRecord(obj.get("conversations"), blobs, fields)


# ---- parquet (LLaVA-OneVision layout) ---------------------------------------------------------

def _enumerate_parquet(source: Source) -> Iterator[RecordRef | Unreadable]:
    import pyarrow.parquet as pq

    ordinal = 0
    for uri in _files(source.location, (".parquet",)):
        fs, path = storage.arrow_filesystem(uri)
        pf = pq.ParquetFile(path, filesystem=fs)
        names = pf.schema_arrow.names
        if "conversations" not in names:
            raise SourceError(f"{uri}: parquet has no `conversations` column (columns: {names})")
        row = 0
        for rg in range(pf.num_row_groups):
            n = pf.metadata.row_group(rg).num_rows
            ids = pf.read_row_group(rg, columns=["id"]).column(0).to_pylist() if "id" in names else [None] * n
            for i, rid in enumerate(ids):
                yield RecordRef(source.name, ordinal, str(rid) if rid not in (None, "") else f"row{row}",
                                f"{uri}#row={row}", (uri, rg, i))
                ordinal += 1
                row += 1


def _load_parquet(source: Source, ref: RecordRef, cache: dict, with_images: bool) -> LoadedRecord:
    import pyarrow.parquet as pq

    uri, rg, i = ref.locator
    key = ("parquet", uri, rg)
    if key not in cache:  # a shard reads many rows of few row groups: keep the last ones
        if len(cache) > 8:
            cache.clear()
        fs, path = storage.arrow_filesystem(uri)
        cache[key] = pq.ParquetFile(path, filesystem=fs).read_row_group(rg)
    row = cache[key].slice(i, 1).to_pylist()[0]
    raw = row.get("image", row.get("images"))
    raw = [] if raw is None else raw if isinstance(raw, list) else [raw]
    blobs = []
    for k, item in enumerate(raw):
        data = item.get("bytes") if isinstance(item, dict) else item
        if not isinstance(data, (bytes, bytearray)) or not data:
            raise BadRecord("image_missing", f"image {k} has no bytes")
        blobs.append(ImageBlob(f"{ref.location}/image{k}", bytes(data)))
    fields = {k: v for k, v in row.items() if k not in ("conversations", "image", "images")}
    return LoadedRecord(row.get("conversations"), blobs, fields)


# ---- WebDataset tars (img2dataset layout) -----------------------------------------------------

def _split_key(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is everything before the first dot of the base name."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower()


def _enumerate_tars(source: Source) -> Iterator[RecordRef | Unreadable]:
    ordinal = 0
    for uri in _files(source.location, (".tar",)):
        group_key, members = None, []

        def flush():
            nonlocal ordinal
            if group_key is None:
                return None
            ref = RecordRef(source.name, ordinal, group_key, f"{uri}#{group_key}", (uri, tuple(members)))
            ordinal += 1
            return ref

        with storage.open_read(uri) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                if _safe_relative(info.name) is None:
                    yield Unreadable(source.name, f"{uri}#{info.name}", "unsafe_path",
                                     f"tar member name {info.name!r} escapes the folder")
                    continue
                key, ext = _split_key(info.name)
                if key != group_key:
                    if (ref := flush()) is not None:
                        yield ref
                    group_key, members = key, []
                members.append((ext, info.offset_data, info.size))
        if (ref := flush()) is not None:
            yield ref


def _load_tar(source: Source, ref: RecordRef, cache: dict, with_images: bool) -> LoadedRecord:
    uri, members = ref.locator
    parts = {ext: storage.read_range(uri, offset, size) if with_images or ext not in _IMAGE_EXTS
             else b"" for ext, offset, size in members}
    meta: dict = {}
    if "json" in parts:
        try:
            meta = json.loads(parts["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRecord("malformed_json", f"{ref.location}.json: {e}") from None
        if not isinstance(meta, dict):
            raise BadRecord("malformed_record", f"{ref.location}.json is not an object")
    images = [ImageBlob(f"{ref.location}.{ext}", parts[ext]) for ext in _IMAGE_EXTS if ext in parts]
    fields = {k: v for k, v in meta.items() if k != "conversations"}
    if "conversations" in meta:
        return LoadedRecord(meta["conversations"], images, fields)
    caption = meta.get("caption")
    if caption is None and "txt" in parts:
        caption = parts["txt"].decode("utf-8", errors="replace")
    if not isinstance(caption, str) or not caption.strip():
        raise BadRecord("no_assistant_turn", "no caption (txt or json `caption`) and no conversations")
    prompt = ("<image>\n" if images else "") + source.caption_prompt
    return LoadedRecord([{"from": "human", "value": prompt}, {"from": "gpt", "value": caption.strip()}],
                        images, fields)
