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
import json
import os
import posixpath
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from lladav import storage
from lladav.config import Source
from lladav.data import RecordError

_CHUNK = 1 << 20
_MAX_ELEMENT = 64 << 20  # a JSON array element larger than this fails its source
_BOM = "\ufeff"
# Every format data/images.py accepts, so a tar image is never ignored where a JSON one is read.
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "mpo")
# Image extensions we cannot decode: a tar record holding one is rejected, not read without it.
_UNSUPPORTED_IMAGE_EXTS = ("heic", "heif", "avif", "jxl", "svg", "ico", "jp2", "psd", "raw")
DEFAULT_MAX_IMAGE_BYTES = 64 * 2**20  # ImageLimits.max_bytes' default: reads are capped by it


@dataclass(frozen=True, slots=True)  # slots: the build's plan holds one per record
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
                with_images: bool = True,
                max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> LoadedRecord:
    """One record back from its ref. `with_images=False` skips reading image bytes (the images
    list then holds blobs with empty data): for text-only passes such as training a tokenizer.
    An image larger than `max_image_bytes` is refused while reading, never read whole."""
    cache = {} if cache is None else cache
    loader = {"llava_json": _load_llava, "parquet": _load_parquet,
              "webdataset": _load_tar}[source.kind]
    return loader(source, ref, cache, with_images, max_image_bytes)


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


def printable(text: str) -> str:
    """`text` as valid Unicode: lone surrogates (scraped JSON, non-UTF-8 file names) become
    backslash escapes, so ids and locations can always be written to parquet and JSON."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _record_id(obj: dict, fallback: str) -> str:
    rid = obj.get("id")
    return printable(str(rid)) if rid is not None and str(rid) != "" else fallback


# ---- LLaVA JSON / JSONL ---------------------------------------------------------------------

def _enumerate_llava(source: Source) -> Iterator[RecordRef | Unreadable]:
    ordinal = 0
    for uri in _files(source.location, (".json", ".jsonl")):
        spans = _jsonl_spans(uri) if uri.endswith(".jsonl") else _json_array_spans(uri)
        for offset, length, obj, error in spans:
            location = f"{printable(uri)}#byte={offset}"
            if error is not None:
                code, _, detail = error.partition(": ")
                yield Unreadable(source.name, location, code, detail)
                continue
            if not isinstance(obj, dict):
                yield Unreadable(source.name, location, "malformed_record",
                                 f"expected a JSON object, got {type(obj).__name__}")
                continue
            yield RecordRef(source.name, ordinal, _record_id(obj, f"{posixpath.basename(uri)}:{ordinal}"),
                            location, (uri, offset, length))
            ordinal += 1


def _jsonl_spans(uri: str) -> Iterator[tuple[int, int, Any, str | None]]:
    """(offset, length, object, None) per non-blank line, or (..., None, "code: detail") for a
    line that is not one JSON value. A UTF-8 byte-order mark before the first line is skipped."""
    offset, lineno, pending = 0, 0, b""
    with storage.open_read(uri) as f:
        while True:
            chunk = f.read(_CHUNK)
            pending += chunk
            lines = pending.split(b"\n")
            pending = lines.pop() if chunk else b""
            for line in lines:
                lineno += 1
                start, body = offset, line
                if lineno == 1 and body.startswith(codecs.BOM_UTF8):
                    start, body = offset + 3, body[3:]
                if body.strip():
                    yield (start, len(body), *_parse_line(body, lineno))
                offset += len(line) + 1
            if not chunk:
                return


def _parse_line(line: bytes, lineno: int) -> tuple[Any, str | None]:
    try:
        return json.loads(line), None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, f"malformed_json: line {lineno}: {e}"
    except RecursionError:
        return None, f"too_deep: line {lineno}: nested deeper than the JSON parser's limit"


def _json_array_spans(uri: str) -> Iterator[tuple[int, int, Any, str | None]]:
    """Stream the elements of a top-level JSON array with their byte spans.

    The stdlib decoder parses one element at a time from a sliding text buffer, so a 10M-record
    file is never held whole (the reference's json.load of one giant file is what we replace).
    Every byte is accounted for: an element nested too deep for the parser is skipped by bracket
    counting and yielded as an error ("too_deep: ..."), a UTF-8 byte-order mark is skipped, and
    anything that makes the rest of the file unknowable (a syntax error, invalid UTF-8, an
    element over 64 MiB, content after the closing `]`) raises SourceError with the byte offset,
    so no record is ever dropped silently.
    """
    decoder = json.JSONDecoder()
    text_decoder = codecs.getincrementaldecoder("utf-8")()
    with storage.open_read(uri) as f:
        buf, pos, base, eof = "", 0, 0, False  # base: byte offset of buf[0]

        def byte_at(i: int) -> int:
            return base + len(buf[:i].encode("utf-8", "surrogatepass"))

        def fail(i: int, why: str) -> SourceError:
            return SourceError(f"{printable(uri)}: byte {byte_at(i)}: {why}; the file cannot be "
                               "read past this point, so the source fails rather than lose "
                               "the records after it")

        def more(at_least: int = 0) -> bool:
            nonlocal buf, eof
            chunk = f.read(max(_CHUNK, at_least))
            eof = not chunk
            try:
                buf += text_decoder.decode(chunk, final=eof)
            except UnicodeDecodeError as e:
                raise fail(len(buf), f"invalid UTF-8 ({e.reason})") from None
            return not eof

        def skip_ws() -> None:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or not more():
                    return

        skip_ws()
        if buf.startswith(_BOM):
            pos += 1
            skip_ws()
        if pos >= len(buf) or buf[pos] != "[":
            raise fail(pos, "the file is not a JSON array (use .jsonl for JSON Lines)")
        pos += 1
        first = True
        while True:
            skip_ws()
            if pos < len(buf) and buf[pos] == "]":
                pos += 1
                skip_ws()
                if pos < len(buf):
                    raise fail(pos, f"content after the array's closing ']' ({buf[pos:pos + 20]!r}...)")
                return
            if not first:
                if pos >= len(buf) or buf[pos] != ",":
                    raise fail(pos, "expected ',' or ']'" if pos < len(buf) else "the array is not closed")
                pos += 1
                skip_ws()
            if pos >= len(buf):
                raise fail(pos, "the array is not closed")
            first = False
            error = None
            while True:
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as e:
                    # Any error may just mean the element continues past the buffer (even mid
                    # `\u` escape): read more, doubling, until EOF or the element is too big.
                    if len(buf) - pos >= _MAX_ELEMENT:
                        raise fail(pos, f"an element larger than {_MAX_ELEMENT >> 20} MiB") from None
                    if not eof and more(len(buf) - pos):
                        continue
                    raise fail(e.pos, e.msg) from None
                except RecursionError:
                    end = _value_end(buf, pos)
                    if end is None and len(buf) - pos < _MAX_ELEMENT and not eof and more(len(buf) - pos):
                        continue
                    if end is None:
                        raise fail(pos, "an element nested too deep to parse, whose end was not "
                                        "found") from None
                    obj, error = None, "too_deep: nested deeper than the JSON parser's limit"
                    break
            start = byte_at(pos)
            length = len(buf[pos:end].encode("utf-8", "surrogatepass"))
            yield start, length, obj, error
            # Drop the consumed text so the buffer stays one element long.
            base = start + length
            buf, pos = buf[end:], 0


def _value_end(text: str, pos: int) -> int | None:
    """The index just past the array or object starting at text[pos], by counting brackets
    outside strings (no parsing, so no recursion); None if `text` ends first. Used only for
    elements too deep for the stdlib parser, so its Python loop never runs on normal records."""
    depth, i, in_string = 0, pos, False
    while i < len(text):
        c = text[i]
        if in_string:
            if c == "\\":
                i += 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _safe_relative(path: str) -> str | None:
    """The normalised relative path, or None when it is absolute or escapes its root."""
    if not path or path.startswith(("/", "\\")) or "://" in path:
        return None
    norm = posixpath.normpath(path.replace("\\", "/"))
    if norm == ".." or norm.startswith("../"):
        return None
    return norm


def read_image(root: str, rel: str, max_bytes: int) -> tuple[str, bytes]:
    """(uri, bytes) of the image at `rel` below `root`, read safely from untrusted paths.

    Local roots: symbolic links are followed only while they resolve inside the real path of
    the image root (a link to /etc or /dev/zero is refused as unsafe_path), anything but a
    regular file (a folder, FIFO, device) is refused before it is opened, and at most
    `max_bytes` + 1 bytes are read. S3 has no links or special files; its reads are capped too.
    """
    safe = _safe_relative(rel) if isinstance(rel, str) else None
    if safe is None:
        raise BadRecord("unsafe_path", f"image path {printable(repr(rel))} is not a relative path "
                                       "inside image_root")
    uri = storage.join(root, safe)
    if storage.is_s3(uri):
        try:
            with storage.open_read(uri) as f:
                data = f.read(max_bytes + 1)
        except FileNotFoundError:
            raise BadRecord("image_missing", f"{uri} does not exist") from None
    else:
        data = _read_local_image(root, uri, max_bytes)
    if len(data) > max_bytes:
        raise BadRecord("image_too_large", f"{printable(uri)}: more than max_bytes {max_bytes} bytes")
    return uri, data


def _read_local_image(root: str, uri: str, max_bytes: int) -> bytes:
    strip = (lambda u: u[len("file://"):] if u.startswith("file://") else u)
    real_root, real = os.path.realpath(strip(root)), os.path.realpath(strip(uri))
    shown = printable(uri)
    if os.path.commonpath([real_root, real]) != real_root:
        raise BadRecord("unsafe_path", f"{shown} is a link that resolves outside image_root {root}")
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW: `real` has no links
        # left, so one appearing after the check (a race) fails instead of being followed.
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise BadRecord("image_missing", f"{shown} does not exist") from None
    except IsADirectoryError:
        raise BadRecord("image_not_file", f"{shown} is a folder, not an image file") from None
    except OSError as e:
        raise BadRecord("image_unreadable", f"{shown}: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                    else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
            raise BadRecord("image_not_file", f"{shown} is {kind}, not an image file")
        chunks, left = [], max_bytes + 1
        while left > 0 and (chunk := os.read(fd, min(left, _CHUNK))):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _load_llava(source: Source, ref: RecordRef, cache: dict, with_images: bool,
                max_image_bytes: int) -> LoadedRecord:
    uri, offset, length = ref.locator
    try:
        obj = json.loads(storage.read_range(uri, offset, length))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRecord("malformed_json", str(e)) from None
    except RecursionError:
        raise BadRecord("too_deep", "nested deeper than the JSON parser's limit") from None
    if "video" in obj:
        raise BadRecord("unsupported_modality", "video records are not supported")
    images = obj.get("image")
    images = [] if images is None else images if isinstance(images, list) else [images]
    root = source.image_root or (storage.parent(source.location)
                                 if source.location.endswith((".json", ".jsonl")) else source.location)
    blobs = []
    for rel in images:
        if with_images:
            blobs.append(ImageBlob(*read_image(root, rel, max_image_bytes)))
        else:
            safe = _safe_relative(rel) if isinstance(rel, str) else None
            blobs.append(ImageBlob(storage.join(root, safe) if safe else str(rel), b""))
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


def _load_parquet(source: Source, ref: RecordRef, cache: dict, with_images: bool,
                  max_image_bytes: int) -> LoadedRecord:
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
        if len(data) > max_image_bytes:
            raise BadRecord("image_too_large", f"image {k}: {len(data)} bytes > max_bytes {max_image_bytes}")
        blobs.append(ImageBlob(f"{ref.location}/image{k}", bytes(data)))
    fields = {k: v for k, v in row.items() if k not in ("conversations", "image", "images")}
    return LoadedRecord(row.get("conversations"), blobs, fields)


# ---- WebDataset tars (img2dataset layout) -----------------------------------------------------

def _split_key(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is everything before the first dot of the base name."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower()


def _member_problem(info: tarfile.TarInfo) -> tuple[str, str] | None:
    """(reason, detail) when a tar member cannot be part of a record, else None."""
    if info.issym() or info.islnk():
        return "tar_link", f"member {info.name!r} is a link (to {info.linkname!r}); links are not followed"
    if not info.isfile():
        return "tar_special_member", f"member {info.name!r} is a device, FIFO or other special file"
    if _safe_relative(info.name) is None:
        return "unsafe_path", f"member name {info.name!r} is absolute or escapes the tar's folder"
    ext = _split_key(info.name)[1].rpartition(".")[2]
    if ext in _UNSUPPORTED_IMAGE_EXTS:
        return "image_format", f"member {info.name!r}: .{ext} images are not supported"
    return None


def _enumerate_tars(source: Source) -> Iterator[RecordRef | Unreadable]:
    """One record per run of members sharing a key (webdataset's grouping). A record with any
    member that cannot be used (a link, a device, an escaping name, an unsupported image) is one
    reject row: it is never trained with part of its members missing. Folders are skipped."""
    ordinal = 0
    for uri in _files(source.location, (".tar",)):
        shown = printable(uri)
        group_key: str | None = None
        members: list[tuple[str, int, int]] = []
        problem: tuple[str, str] | None = None

        def flush() -> RecordRef | Unreadable | None:
            nonlocal ordinal
            if group_key is None:
                return None
            location = f"{shown}#{printable(group_key)}"
            if problem is not None:
                return Unreadable(source.name, location, *problem)
            exts = [ext for ext, _, _ in members]
            if len(set(exts)) != len(exts):
                return Unreadable(source.name, location, "tar_duplicate_member",
                                  f"members with the same extension under one key: {sorted(exts)}")
            ref = RecordRef(source.name, ordinal, printable(group_key), location, (uri, tuple(members)))
            ordinal += 1
            return ref

        try:
            with storage.open_read(uri) as f, tarfile.open(fileobj=f, mode="r|") as tar:
                for info in tar:
                    if info.isdir():
                        continue
                    key, ext = _split_key(info.name)
                    if key != group_key:
                        if (item := flush()) is not None:
                            yield item
                        group_key, members, problem = key, [], None
                    problem = problem or _member_problem(info)
                    members.append((ext, info.offset_data, info.size))
                if (item := flush()) is not None:
                    yield item
        except tarfile.TarError as e:
            raise SourceError(f"{shown}: not a readable tar after {ordinal} records ({e}); a "
                              "truncated or non-tar file fails its source rather than lose the "
                              "records after the damage") from None


def _load_tar(source: Source, ref: RecordRef, cache: dict, with_images: bool,
              max_image_bytes: int) -> LoadedRecord:
    uri, members = ref.locator
    parts = {}
    for ext, offset, size in members:
        if ext in _IMAGE_EXTS and size > max_image_bytes:
            raise BadRecord("image_too_large", f"{ref.location}.{ext}: {size} bytes > max_bytes "
                                               f"{max_image_bytes}")
        parts[ext] = (storage.read_range(uri, offset, size) if with_images or ext not in _IMAGE_EXTS
                      else b"")
    meta: dict = {}
    if "json" in parts:
        try:
            meta = json.loads(parts["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRecord("malformed_json", f"{ref.location}.json: {e}") from None
        except RecursionError:
            raise BadRecord("too_deep", f"{ref.location}.json: nested deeper than the JSON "
                                        "parser's limit") from None
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
