"""Bytes at URIs: one store for local paths, `file://` URIs and `s3://bucket/key`.

Owns: reading (whole, by byte range, streamed), atomic publishing (a reader sees the old object,
the new object, or nothing; never a half-written one), recursive listing, deletion, and handing
out a pyarrow filesystem or a local copy of an S3 folder, and riding out a flaky or briefly
absent S3 endpoint (below).
Does not own: what the bytes mean (data/manifest.py), their identity (digest.py), or which write
counts as the commit of a larger artifact (the caller writes its index file last).

S3 endpoint and credentials come only from the standard AWS environment variables
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`), never
from arguments or configs, which get logged. A prefix is a folder: `s3://b/p` covers `s3://b/p/...`
but not `s3://b/px`. On both backends a missing object raises FileNotFoundError naming the URI;
any other failure raises StorageError naming the URI.

Retries. Every S3 call runs under a deadline: a transient failure (connection refused, reset or
dropped, a read timeout, HTTP 5xx or 429, SlowDown and the other throttling codes, a body cut
off before its Content-Length) is retried with exponential back-off (0.25 s doubling to 4 s,
jittered) until `LLADAV_STORAGE_RETRY_S` seconds (default 120) have passed since the first
attempt, and at least once; 0 turns retrying off. A 4xx (NoSuchKey, AccessDenied, InvalidRange)
is never retried. When the budget is spent the StorageError names the URI, the action, the
attempts and the last cause. A streamed read (`open_read`) that breaks mid-body resumes with a
Range GET from the byte it reached, provided the object's ETag is unchanged (else StorageError).
Under the deadline botocore keeps its "standard" mode with 3 attempts per call, and timeouts are
short (connect 5 s, read 20 s) so an outage is noticed in seconds, not minutes. pyarrow's S3
filesystem (`arrow_filesystem`, used for parquet) retries on its own, with an attempt count
scaled to the same budget. A Ray job hands this process's storage settings to its workers
through its runtime_env (`worker_env`, ray_cluster.py `ensure_ray`), so the workers of an
existing cluster use the same endpoint, credentials and budget.
"""

from __future__ import annotations

import http.client
import io
import logging
import math
import os
import posixpath
import random
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar
from urllib.parse import urlparse

if TYPE_CHECKING:
    import pyarrow.fs

MULTIPART_THRESHOLD = 64 * 2**20  # above this an upload is multipart (S3 allows 5 GiB per PUT)
MULTIPART_CHUNKSIZE = 16 * 2**20  # part size; S3 requires >= 5 MiB per part except the last
_CHUNK = 1 << 20
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_TEMP_SUFFIX = re.compile(r"\.tmp-[0-9a-f]{32}$")  # in-flight local writes; never listed

RETRY_ENV = "LLADAV_STORAGE_RETRY_S"
DEFAULT_RETRY_S = 120.0  # rides out an endpoint restart or a load balancer failover
WORKER_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
              "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
              RETRY_ENV)
"""The environment that configures this module, handed to Ray workers (`worker_env`)."""
_BACKOFF_FIRST, _BACKOFF_MAX = 0.25, 4.0  # seconds; doubling, jittered to 50-100%
# S3's and botocore's retryable error codes (botocore/retries/standard.py and S3's error list).
_TRANSIENT_CODES = frozenset({
    "InternalError", "ServiceUnavailable", "SlowDown", "Throttling", "ThrottlingException",
    "ThrottledException", "RequestThrottled", "RequestThrottledException", "RequestLimitExceeded",
    "TooManyRequestsException", "BandwidthLimitExceeded", "RequestTimeout",
    "RequestTimeoutException", "PriorRequestNotComplete", "TransactionInProgressException",
})

log = logging.getLogger(__name__)
T = TypeVar("T")


class BucketNotFound(FileNotFoundError):
    """The URI's bucket does not exist (a placeholder, or storage this machine does not see)."""


class StorageError(Exception):
    """A storage operation failed for a reason other than a missing object; names the URI."""


# ---- addresses --------------------------------------------------------------------------------

def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def _local_path(uri: str) -> str:
    if uri.startswith("file://"):
        return uri[len("file://"):]
    if _SCHEME.match(uri) or not uri:
        raise StorageError(f"{uri!r}: not a local path, file:// or s3:// URI")
    return uri


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: an S3 URI needs a bucket (s3://bucket/key)")
    return bucket, key


def join(base: str, *parts: str) -> str:
    """`base/part/...`: for s3:// without doubled slashes; for local paths os.path.join's rules."""
    if not is_s3(base):
        return os.path.join(base, *parts)
    pieces = [base.rstrip("/")] + [p.strip("/") for p in parts]
    return "/".join(p for p in pieces if p)


def basename(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/")) if is_s3(uri) else os.path.basename(uri.rstrip("/"))


def parent(uri: str) -> str:
    """The folder holding `uri`; the parent of a bucket root is the bucket root."""
    if not is_s3(uri):
        return os.path.dirname(uri.rstrip("/"))
    bucket, key = _split_s3(uri)
    return join(f"s3://{bucket}", posixpath.dirname(key.rstrip("/")))


# ---- S3 client and error translation ----------------------------------------------------------

_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


def _new_lock_in_child() -> None:  # a lock held by another thread at fork time stays held
    global _clients_lock
    _clients_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_in_child)


def _endpoint() -> str | None:
    # botocore's own precedence: the service-specific variable wins over the global one.
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def worker_env() -> dict[str, str]:
    """This process's storage settings (WORKER_ENV) that are set: what a Ray job passes its
    workers in runtime_env["env_vars"], since workers of an existing cluster were started with
    the cluster's environment, not ours."""
    return {k: os.environ[k] for k in WORKER_ENV if os.environ.get(k)}


def _client() -> Any:
    """One boto3 S3 client per process and per endpoint/credential/region environment.

    Keyed by pid so a forked worker (Ray, multiprocessing) builds its own client instead of
    sharing the parent's connection pool; nothing here is ever pickled, Ray workers re-import
    the module. Keyed by the env values so a test that changes them gets a fresh client.
    """
    env = tuple(os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_DEFAULT_REGION"))
    key = (os.getpid(), _endpoint(), *env)
    with _clients_lock:
        if key not in _clients:
            import boto3
            from botocore.config import Config

            # botocore >= 1.31 (we pin boto3 1.44.5) reads AWS_ENDPOINT_URL[_S3] itself, so no
            # endpoint_url is passed. A custom endpoint (moto, MinIO) is addressed path-style:
            # virtual-host style would need DNS for <bucket>.<host>. botocore's own retries stay
            # few (3 attempts in all) so that _s3's deadline, not an attempt count, governs.
            s3 = {"addressing_style": "path"} if _endpoint() else {}
            config = Config(retries={"mode": "standard", "total_max_attempts": 3},
                            connect_timeout=5, read_timeout=20, s3=s3)
            _clients[key] = boto3.session.Session().client("s3", config=config)
        return _clients[key]


# ---- retries and error translation -------------------------------------------------------------

class _ShortBody(Exception):
    """A body that ended before its Content-Length: the connection broke mid-transfer."""


def retry_budget() -> float:
    """Seconds a failing S3 call keeps being retried: $LLADAV_STORAGE_RETRY_S, default 120."""
    raw = os.environ.get(RETRY_ENV, "").strip()
    if not raw:
        return DEFAULT_RETRY_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise StorageError(f"{RETRY_ENV}={raw!r}: expected a number of seconds >= 0 "
                           f"(default {DEFAULT_RETRY_S:g})")
    return value


def _causes(error: BaseException) -> Iterator[BaseException]:
    """The error, then what it wraps: s3transfer's last_exception, __cause__, and the
    __context__ of boto3's and s3transfer's own wrappers (S3UploadFailedError is raised inside
    the `except ClientError`); not the context of other errors, so a bug in an except block is
    not mistaken for the network error it was handling."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [getattr(e, "last_exception", None), e.__cause__]
        if type(e).__module__.startswith(("boto3", "s3transfer")):
            todo.append(e.__context__)


def _is_transient(error: BaseException) -> bool:
    """True when the same call may well succeed if made again: see the module docstring."""
    import urllib3.exceptions as u3
    from botocore.exceptions import (ChecksumError, ClientError, FlexibleChecksumError,
                                     HTTPClientError, IncompleteReadError, SSLError)
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(error, StorageError):  # already decided (e.g. an object changed mid-read)
        return False
    for e in _causes(error):
        if isinstance(e, ClientError):
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            code = str(e.response.get("Error", {}).get("Code", ""))
            return code in _TRANSIENT_CODES or status >= 500 or status == 429
        if isinstance(e, SSLError):  # a certificate does not fix itself
            return False
        if isinstance(e, (_ShortBody, BotoConnectionError, HTTPClientError, IncompleteReadError,
                          ChecksumError, FlexibleChecksumError, u3.ProtocolError,
                          u3.TimeoutError, http.client.IncompleteRead, ConnectionError,
                          TimeoutError)):
            return True
    return False


def _redact(text: str) -> str:
    """No secret in an error message: URL passwords and the secret/token values are blanked."""
    text = re.sub(r"(://)[^/@\s]+@", r"\1***@", text)
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        if len(value := os.environ.get(name, "")) >= 4:
            text = text.replace(value, "***")
    return text


def _translate(uri: str, action: str, error: Exception, retried: str) -> Exception | None:
    """The exception to raise for a failed S3 call, or None to re-raise `error` unchanged."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(error, (StorageError, FileNotFoundError)):
        return None
    if isinstance(error, ClientError):
        err = error.response.get("Error", {})
        code = str(err.get("Code", ""))
        if code == "NoSuchBucket":
            return BucketNotFound(f"{uri}: bucket does not exist")
        if code in ("NoSuchKey", "404", "NotFound"):
            return FileNotFoundError(f"{uri}: no such object")
        return StorageError(_redact(f"{uri}: {action} failed{retried}: {code} "
                                    f"{err.get('Message', '')}"))
    if isinstance(error, (BotoCoreError, Boto3Error)) or retried:
        return StorageError(_redact(
            f"{uri}: {action} failed{retried}: {type(error).__name__}: {error} (the endpoint and "
            "credentials come from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"))
    return None


def _s3(uri: str, action: str, call: Callable[[], T]) -> T:
    """call(), retried while it fails transiently and the budget lasts; errors named by `uri`.

    `call` must be safe to repeat (every S3 call here is: a GET, a PUT of the same bytes, a
    DELETE). The budget runs from the first attempt.
    """
    budget = retry_budget()
    start = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except Exception as e:
            transient = _is_transient(e)
            elapsed = time.monotonic() - start
            if transient and budget > 0 and (attempt == 1 or elapsed < budget):
                delay = min(_BACKOFF_MAX, _BACKOFF_FIRST * 2 ** (attempt - 1))
                delay = min(delay * random.uniform(0.5, 1.0), max(0.0, budget - elapsed))
                log_at = logging.WARNING if attempt == 1 else logging.DEBUG
                log.log(log_at, "%s", _redact(f"{uri}: {action} failed ({type(e).__name__}: "
                                              f"{e}); retrying for up to {budget:g} s"))
                time.sleep(delay)
                continue
            retried = (f" after {attempt} attempt{'s' * (attempt > 1)} in {elapsed:.1f} s "
                       f"(retry budget {budget:g} s, {RETRY_ENV})" if transient else "")
            translated = _translate(uri, action, e, retried)
            if translated is None:
                raise
            raise translated from e


@contextmanager
def _local_errors(uri: str, action: str) -> Iterator[None]:
    try:
        yield
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{uri}: no such file or folder") from e
    except OSError as e:
        raise StorageError(f"{uri}: {action} failed: {e}") from e


class _S3Reader(io.RawIOBase):
    """An S3 object as a raw stream (io.BufferedReader gives it a local file's methods) that
    survives a broken connection: a body that stops early is reopened with a Range GET from the
    byte it reached, if the object's ETag is still the one the read started with."""

    def __init__(self, uri: str) -> None:
        self._uri = uri
        self._bucket, self._key = _split_s3(uri)
        reply = _s3(uri, "open", lambda: _client().get_object(Bucket=self._bucket, Key=self._key))
        self._body: Any = reply["Body"]
        self._size: int = reply["ContentLength"]
        self._etag: str | None = reply.get("ETag")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._body is None and self._pos >= self._size:
            return 0
        data = _s3(self._uri, f"read at byte {self._pos} of {self._size}",
                   lambda: self._read(len(buffer)))
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def _read(self, n: int) -> bytes:
        if self._body is None:
            self._reopen()
        try:
            # Reading on to the empty chunk at the end lets botocore check the body's checksum.
            data = self._body.read(n)
            if not data and self._pos < self._size:
                raise _ShortBody(f"the body ended at byte {self._pos} of {self._size}")
        except Exception:
            self._drop_body()
            raise
        return data

    def _reopen(self) -> None:
        span = f"bytes={self._pos}-"
        reply = _client().get_object(Bucket=self._bucket, Key=self._key, Range=span)
        if self._etag is not None and reply.get("ETag") != self._etag:
            reply["Body"].close()
            raise StorageError(f"{self._uri}: the object changed while it was read (ETag "
                               f"{self._etag} became {reply.get('ETag')} at byte {self._pos}); "
                               "read it again")
        log.info("%s: resuming the read at byte %d of %d", self._uri, self._pos, self._size)
        self._body = reply["Body"]

    def _drop_body(self) -> None:
        if self._body is not None:
            with suppress(Exception):
                self._body.close()
            self._body = None

    def close(self) -> None:
        if not self.closed:
            self._drop_body()
        super().close()


# ---- reading ----------------------------------------------------------------------------------

def exists(uri: str) -> bool:
    """True if an object (a file, not a folder) is at `uri`."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        try:
            _s3(uri, "head", lambda: _client().head_object(Bucket=bucket, Key=key))
        except FileNotFoundError:
            return False
        return True
    return os.path.isfile(_local_path(uri))


def read_bytes(uri: str) -> bytes:
    with open_read(uri) as f:
        return f.read()


def read_range(uri: str, offset: int, length: int) -> bytes:
    """Exactly `length` bytes from `offset` (an S3 Range GET); StorageError if it is shorter."""
    if length == 0:
        return b""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        span = f"bytes={offset}-{offset + length - 1}"  # HTTP ranges are inclusive

        def get() -> bytes:
            reply = _client().get_object(Bucket=bucket, Key=key, Range=span)
            body = reply["Body"].read()
            if len(body) < reply["ContentLength"]:  # cut off: retried; a short object is not
                raise _ShortBody(f"got {len(body)} of {reply['ContentLength']} bytes")
            return body

        data = _s3(uri, f"read of bytes {offset}+{length}", get)
    else:
        with _local_errors(uri, "read"), open(_local_path(uri), "rb") as f:
            f.seek(offset)
            data = f.read(length)
    if len(data) != length:
        raise StorageError(f"{uri}: asked for bytes {offset}+{length}, got {len(data)}: "
                           "the object is shorter than expected")
    return data


@contextmanager
def open_read(uri: str) -> Iterator[BinaryIO]:
    """A streamed binary reader (read(n), readline, iteration); it does not seek on S3.

    On S3 a connection that breaks mid-body is resumed from the byte reached (module docstring).
    """
    if is_s3(uri):
        with io.BufferedReader(_S3Reader(uri), buffer_size=_CHUNK) as f:
            yield f  # type: ignore[misc]
    else:
        with _local_errors(uri, "open"):
            f = open(_local_path(uri), "rb")
        with f:
            yield f


def list_uris(prefix_uri: str, suffix: str | None = None) -> list[str]:
    """Every object below the folder `prefix_uri` (recursive), as sorted full URIs.

    Each result is `join(prefix_uri, relative_name)`, so it starts with `prefix_uri` as given.
    A missing folder lists as []; folder-marker keys ending in "/" and in-flight temp files of
    this module are skipped.
    """
    rels: list[str] = []
    if is_s3(prefix_uri):
        bucket, key = _split_s3(prefix_uri)
        folder = key.rstrip("/") + "/" if key.strip("/") else ""

        def list_all() -> list[str]:  # a failed page restarts the listing: it is one answer
            pages = _client().get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                        Prefix=folder)
            return [o["Key"][len(folder):] for page in pages for o in page.get("Contents", [])
                    if not o["Key"].endswith("/")]

        rels = _s3(prefix_uri, "list", list_all)
    else:
        root = _local_path(prefix_uri)
        for folder, _, names in os.walk(root):
            rels += [os.path.relpath(os.path.join(folder, n), root) for n in names
                     if not _TEMP_SUFFIX.search(n)]
    uris = [join(prefix_uri, r) for r in rels]
    return sorted(u for u in uris if suffix is None or u.endswith(suffix))


# ---- writing ----------------------------------------------------------------------------------
# Local files are written to `<name>.tmp-<uuid>` in the target's folder, fsynced, then renamed
# with os.replace, which is atomic within one filesystem. S3 needs no temp key: an object becomes
# visible only when its PUT (or CompleteMultipartUpload) succeeds, and s3transfer aborts a failed
# multipart upload, so a crash publishes nothing and a reader never sees a partial object.

@contextmanager
def _local_atomic(uri: str) -> Iterator[BinaryIO]:
    path = _local_path(uri)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with _local_errors(uri, "write"):
        os.makedirs(folder, exist_ok=True)
        f = open(tmp, "wb")
    try:
        with f:
            yield f
        with _local_errors(uri, "write"):
            fd = os.open(tmp, os.O_RDONLY)  # the writer may have closed f itself (tar writers do)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    with suppress(OSError):  # make the rename durable; not every filesystem allows a folder fsync
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_bytes(uri: str, data: bytes) -> None:
    """Publish `data` at `uri` atomically, creating parent folders; replaces an existing object."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        if len(data) <= MULTIPART_THRESHOLD:
            _s3(uri, "write", lambda: _client().put_object(Bucket=bucket, Key=key, Body=data))
            return
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD,
                                multipart_chunksize=MULTIPART_CHUNKSIZE)
        _s3(uri, "upload", lambda: _client().upload_fileobj(io.BytesIO(data), bucket, key,
                                                             Config=config))
        return
    with _local_atomic(uri) as f:
        f.write(data)


def write_file(uri: str, local_path: str | Path, multipart_threshold: int = MULTIPART_THRESHOLD,
               multipart_chunksize: int = MULTIPART_CHUNKSIZE) -> None:
    """Publish a copy of the local file `local_path` at `uri` atomically.

    On S3 a file larger than `multipart_threshold` goes up in parts of `multipart_chunksize`.
    """
    if not os.path.isfile(local_path):
        raise FileNotFoundError(f"{local_path}: no such file to upload to {uri}")
    if is_s3(uri):
        from boto3.s3.transfer import TransferConfig

        bucket, key = _split_s3(uri)
        config = TransferConfig(multipart_threshold=multipart_threshold,
                                multipart_chunksize=multipart_chunksize)
        _s3(uri, f"upload of {local_path}",
            lambda: _client().upload_file(str(local_path), bucket, key, Config=config))
        return
    with _local_atomic(uri) as f, _local_errors(str(local_path), "read"), \
            open(local_path, "rb") as src:
        shutil.copyfileobj(src, f, _CHUNK)


@contextmanager
def open_write(uri: str) -> Iterator[BinaryIO]:
    """A binary writer whose content is published at `uri` only when the block exits cleanly.

    On an exception nothing is published and the temp file is removed. S3 content is spooled
    to a local temp file and uploaded on exit, so the local disk must hold one object.
    """
    if not is_s3(uri):
        with _local_atomic(uri) as f:
            yield f
        return
    _split_s3(uri)  # fail before the caller writes anything
    fd, tmp = tempfile.mkstemp(prefix="lladav-upload-")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        write_file(uri, tmp)
    finally:
        os.remove(tmp)


def delete(uri: str) -> None:
    """Remove the object at `uri`; a missing object is fine."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        _s3(uri, "delete", lambda: _client().delete_object(Bucket=bucket, Key=key))
        return
    with suppress(FileNotFoundError), _local_errors(uri, "delete"):
        os.remove(_local_path(uri))


def delete_prefix(prefix_uri: str) -> None:
    """Remove every object below the folder `prefix_uri`; refuses a bucket root or "/"."""
    if is_s3(prefix_uri):
        bucket, key = _split_s3(prefix_uri)
        if not key.strip("/"):
            raise StorageError(f"{prefix_uri}: refusing to delete a whole bucket")
        uris = list_uris(prefix_uri)
        for start in range(0, len(uris), 1000):  # DeleteObjects takes at most 1000 keys
            keys = [{"Key": _split_s3(u)[1]} for u in uris[start:start + 1000]]
            reply = _s3(prefix_uri, "delete", lambda: _client().delete_objects(
                Bucket=bucket, Delete={"Objects": keys, "Quiet": True}))
            errors = reply.get("Errors")
            if errors:
                raise StorageError(f"{prefix_uri}: could not delete {len(errors)} objects, "
                                   f"first: {errors[0].get('Key')}: {errors[0].get('Message')}")
        return
    path = _local_path(prefix_uri)
    if os.path.abspath(path) == os.path.abspath(os.sep):
        raise StorageError(f"{prefix_uri}: refusing to delete the filesystem root")
    with suppress(FileNotFoundError), _local_errors(prefix_uri, "delete"):
        shutil.rmtree(path)


# ---- handing bytes to other libraries ---------------------------------------------------------

@contextmanager
def local_folder(uri: str) -> Iterator[Path]:
    """The folder at `uri` on local disk: itself if local, else a temp copy kept while open.

    For loading whole folders (a Hugging Face tokenizer) with libraries that only read paths.
    """
    if not is_s3(uri):
        path = Path(_local_path(uri))
        if not path.is_dir():
            raise FileNotFoundError(f"{uri}: no such folder")
        yield path
        return
    uris = list_uris(uri)
    if not uris:
        raise FileNotFoundError(f"{uri}: no objects below this prefix")
    with tempfile.TemporaryDirectory(prefix="lladav-folder-") as tmp:
        root = Path(tmp).resolve()
        for object_uri in uris:
            dest = (root / object_uri[len(uri):].lstrip("/")).resolve()
            if not dest.is_relative_to(root):
                raise StorageError(f"{object_uri}: key escapes its folder; refusing to download")
            dest.parent.mkdir(parents=True, exist_ok=True)
            bucket, key = _split_s3(object_uri)
            _s3(object_uri, "download", lambda: _client().download_file(bucket, key, str(dest)))
        yield root


def arrow_filesystem(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """`(filesystem, path)` for pyarrow and Ray Data: S3 as "bucket/key", local as an absolute path.

    The S3 filesystem takes the endpoint from AWS_ENDPOINT_URL and leaves credentials to the
    AWS SDK's own chain (the AWS_* variables first), so no secret is held by the object. Its
    calls bypass `_s3`: the SDK's standard retry strategy gets one attempt per 10 s of the
    retry budget (backing off up to 20 s each), which approximates the deadline.
    """
    import pyarrow.fs as pafs

    if not is_s3(uri):
        return pafs.LocalFileSystem(), os.path.abspath(_local_path(uri))
    bucket, key = _split_s3(uri)
    attempts = max(3, math.ceil(retry_budget() / 10))
    kwargs: dict[str, Any] = {"connect_timeout": 5,
                              "retry_strategy": pafs.AwsStandardS3RetryStrategy(attempts)}
    if region := os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION"):
        kwargs["region"] = region
    if endpoint := _endpoint():
        parsed = urlparse(endpoint)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise StorageError(f"{uri}: AWS_ENDPOINT_URL must look like http(s)://host:port")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    return pafs.S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")


def _replace_local_folder(target: Path, fill: Callable[[str], Any]) -> None:
    """`fill(staging)` a folder beside `target`, then rename it into place (replacing an existing
    target): a reader sees the old folder, the new one or nothing. The staging folder is removed
    if `fill` fails."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex}"
    try:
        fill(str(staging))
        if target.exists():
            os.replace(target, old)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def publish_written_folder(uri: str, last: str, write: Callable[[str], None]) -> None:
    """Publish at `uri`, complete or absent, the folder `write(path)` creates and fills (as
    publish_folder, `last` at the end on S3). Locally it is written straight into the staging
    folder beside the target, so a large folder (an export's safetensors) is written once, not
    written and then copied."""
    if is_s3(uri):
        with tempfile.TemporaryDirectory(prefix="lladav-publish-") as tmp:
            write(tmp)
            publish_folder(tmp, uri, last)
    else:
        _replace_local_folder(Path(_local_path(uri)), write)


def publish_folder(local_dir: str | Path, uri: str, last: str) -> None:
    """Publish a finished local folder at `uri` so that it looks complete or absent.

    Local: the folder is copied beside the target under a temporary name and renamed into place
    (an existing target is replaced). S3: every file is uploaded, `last` (the file readers open
    first, e.g. config.json) at the very end, so a reader never finds it before the rest.
    """
    local_dir = Path(local_dir)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    if not any(p.relative_to(local_dir).as_posix() == last for p in files):
        raise StorageError(f"{local_dir}: has no {last} to publish last")
    if not is_s3(uri):
        _replace_local_folder(Path(_local_path(uri)),
                              lambda staging: shutil.copytree(local_dir, staging))
        return
    delete(join(uri, last))  # uncommit a previous version first
    ordered = [p for p in files if p.relative_to(local_dir).as_posix() != last]
    ordered.append(local_dir / last)
    for p in ordered:
        write_file(join(uri, p.relative_to(local_dir).as_posix()), p)
