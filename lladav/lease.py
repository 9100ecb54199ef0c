"""One writer per output: an exclusive, expiring lease on an output prefix.

Two writers under one prefix interleave their files: two builds of different recipes to one
`--out` commit a mixture whose shard digests do not match its shards; two runs of one pipeline
train a stage twice. So a writer first takes `<prefix>/_lease.json`, and a second writer refuses
at once with LeaseHeld, naming the holder (pid, host, user, purpose, since, expiry).

    s3://   The lease object is created with PutObject(IfNoneMatch="*"): of several creators
            exactly one succeeds. A heartbeat thread renews it every ttl/3 with
            PutObject(IfMatch=<the ETag it last wrote>). A lease not renewed for its ttl is stale
            (its holder crashed or stalled) and a taker replaces it with PutObject(IfMatch=<the
            stale ETag>), so of several takers exactly one wins. Staleness is judged on the
            server's clock (the reply's Date minus the object's Last-Modified, 1 s resolution),
            so clocks that differ between hosts do not matter. Release deletes the object only
            while it still carries this holder's token (DeleteObject(IfMatch)).
    local   The lease file is locked with flock(2). The kernel drops the lock when the holding
            process dies, so a crash (kill -9 included) leaves nothing stale: the next writer
            takes over at once, and no heartbeat is needed. The file's content only names the
            holder for the refusal. flock excludes processes of one host; on a filesystem
            shared by several hosts (NFS) it may not, so multi-host writers use an s3:// output.

A holder that lost its lease (renewals failed for a whole ttl, or a taker replaced it after a
stall) must not commit: the caller calls `Lease.check()` right before each commit, which raises
LeaseLost. On S3 check() renews first, so the commit that follows has a whole ttl to land.

A lease covers its own prefix, not the prefixes nested in it: a pipeline step leases its step
folder and the build it runs leases the mixture folder inside, both from one process. The lease
file is deleted on release, so a committed output never lists it; only a crashed writer's output
keeps one, until the next writer releases the prefix.

TTL: the `ttl` argument, else $LLADAV_LEASE_TTL (seconds), else 60; renewed every ttl/3.
Owns: the lease file, its lifecycle and the refusal message. Does not own: what the prefix holds
or when its commit happens (the caller's check() marks that).
"""

from __future__ import annotations

import email.utils
import fcntl
import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

from lladav import storage

log = logging.getLogger(__name__)

LEASE_FILE = "_lease.json"
LEASE_FORMAT = "lladav.lease/1"
DEFAULT_TTL = 60.0
TTL_ENV = "LLADAV_LEASE_TTL"
# S3 answers a failed condition with 412 PreconditionFailed (409 ConditionalRequestConflict when
# two conditional writes race), and an If-Match on a missing key with 404.
_CONFLICT = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404"}


class LeaseHeld(RuntimeError):
    """Another writer holds the output's lease; the message names it and when to retry."""

    def __init__(self, uri: str, holder: dict[str, Any], expires: float | None):
        self.uri, self.holder, self.expires = uri, holder, expires
        super().__init__(refusal(uri, holder, expires))


class LeaseLost(RuntimeError):
    """This writer no longer holds its lease (not renewed in time, or taken over): it must not
    commit, since another writer may be writing the same output."""


# ---- the holder and the message ------------------------------------------------------------

def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return str(os.getuid())


def _identity(purpose: str) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "user": _user(),
            "purpose": purpose, "since": time.time(), "token": uuid.uuid4().hex}


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def describe(holder: dict[str, Any], more: str = "") -> str:
    """'pid 4242 on host-a (user bob, build recipe qa, since 2025-01-01 12:00:00 UTC<more>)'."""
    if not holder:
        return f"an unknown writer (its lease names no holder{more})"
    since = holder.get("since")
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} (user "
            f"{holder.get('user', '?')}, {holder.get('purpose', 'no purpose given')}, since "
            f"{_when(since) if isinstance(since, (int, float)) else '?'}{more})")


def refusal(uri: str, holder: dict[str, Any], expires: float | None) -> str:
    """The one-line message a second writer fails with."""
    if expires is None:  # a local lock: it lives exactly as long as its process
        held = describe(holder, ", a local lock held until it exits")
        return (f"{uri} is being written by {held}; wait for it to finish (a crashed holder's "
                "lock is released at once, so a retry then succeeds)")
    held = describe(holder, f", lease expires {_when(expires)} unless renewed")
    return (f"{uri} is being written by {held}; wait for it or, if it crashed, retry after "
            f"{_when(expires)}")


# ---- the lease -------------------------------------------------------------------------------

class Lease:
    """A held lease on `uri`; `check()` before committing, `release()` when done (the `lease`
    context manager does both ends)."""

    uri: str
    lease_uri: str
    holder: dict[str, Any]

    @property
    def lost(self) -> str | None:
        """Why this writer no longer holds the lease, as far as it knows without asking."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise LeaseLost unless this writer still holds the lease."""
        raise NotImplementedError

    def release(self) -> None:
        """Give the lease up (only while it is still this writer's); never raises."""
        raise NotImplementedError


def _ttl(ttl: float | None) -> float:
    value = ttl if ttl is not None else float(os.environ.get(TTL_ENV) or DEFAULT_TTL)
    if value <= 0:
        raise ValueError(f"lease ttl must be positive, got {value} (argument or ${TTL_ENV})")
    return value


def acquire(uri: str, purpose: str, *, ttl: float | None = None,
            renew_every: float | None = None) -> Lease:
    """Take the lease on the output prefix `uri`, or raise LeaseHeld at once."""
    if storage.is_s3(uri):
        ttl = _ttl(ttl)
        every = renew_every if renew_every is not None else ttl / 3
        if not 0 < every < ttl:
            raise ValueError(f"lease renew_every must be in (0, ttl={ttl}), got {every}")
        return _S3Lease.acquire(uri, purpose, ttl, every)
    return _LocalLease.acquire(uri, purpose)


@contextmanager
def lease(uri: str, purpose: str, *, ttl: float | None = None,
          renew_every: float | None = None) -> Iterator[Lease]:
    """`with lease(out_uri, "build recipe qa") as held: ...; held.check(); commit()`:
    held for the block, released however it exits."""
    held = acquire(uri, purpose, ttl=ttl, renew_every=renew_every)
    try:
        yield held
    finally:
        held.release()


def holder_of(uri: str) -> dict[str, Any] | None:
    """The holder named by the prefix's lease file, if there is one (held or left by a crash)."""
    if storage.is_s3(uri):
        current = _s3_read(storage.join(uri, LEASE_FILE))
        return current.holder if current else None
    try:
        return json.loads(storage.read_bytes(storage.join(uri, LEASE_FILE))).get("holder")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# ---- local: flock --------------------------------------------------------------------------

def _same_file(fd: int, path: str) -> bool:
    """Is the file we opened (and locked) still the one at `path`? A releasing holder unlinks
    it, and a lock on an unlinked file excludes nobody."""
    try:
        at_path = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (at_path.st_dev, at_path.st_ino)


def _read_locked_holder(fd: int) -> dict[str, Any]:
    """The holder's identity from the lock file; it writes it just after locking, so an empty
    or half-written file is read again for up to a second."""
    for _ in range(20):
        try:
            return json.loads(os.pread(fd, 1 << 16, 0)).get("holder") or {}
        except (json.JSONDecodeError, AttributeError):
            time.sleep(0.05)
    return {}


class _LocalLease(Lease):
    def __init__(self, uri: str, path: str, fd: int, holder: dict[str, Any], made_folder: bool):
        self.uri, self.lease_uri, self.holder = uri, path, holder
        self._fd: int | None = fd
        self._made_folder = made_folder

    @classmethod
    def acquire(cls, uri: str, purpose: str) -> _LocalLease:
        path = os.path.abspath(storage._local_path(storage.join(uri, LEASE_FILE)))
        folder = os.path.dirname(path)
        made_folder = not os.path.isdir(folder)
        try:
            for _ in range(20):
                os.makedirs(folder, exist_ok=True)
                try:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # close-on-exec by default
                except FileNotFoundError:
                    continue  # a releasing holder removed the folder it had made
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read_locked_holder(fd)
                    os.close(fd)
                    raise LeaseHeld(uri, holder, None) from None
                if _same_file(fd, path):
                    break
                os.close(fd)  # released and unlinked between our open and our lock: again
            else:
                raise storage.StorageError(f"{uri}: its lease file {path} keeps being replaced")
            holder = _identity(purpose)
            data = json.dumps({"format": LEASE_FORMAT, "uri": uri, "holder": holder}, indent=1)
            os.ftruncate(fd, 0)
            os.pwrite(fd, data.encode(), 0)
            os.fsync(fd)
        except OSError as e:
            raise storage.StorageError(f"{uri}: taking its lease ({path}) failed: {e}") from e
        return cls(uri, path, fd, holder, made_folder)

    @property
    def lost(self) -> str | None:
        if self._fd is None or not _same_file(self._fd, self.lease_uri):
            return (f"{self.uri}: this writer's lease file {self.lease_uri} was released or "
                    "removed; not committing")
        return None

    def check(self) -> None:
        if why := self.lost:
            raise LeaseLost(why)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if _same_file(fd, self.lease_uri):
                os.unlink(self.lease_uri)  # while still locked: a waiter then finds no file
        except OSError as e:
            log.warning("%s: could not remove the lease file: %s", self.uri, e)
        finally:
            os.close(fd)
        if self._made_folder:  # leave no empty output folder behind a refused or failed write
            with suppress(OSError):
                os.rmdir(os.path.dirname(self.lease_uri))


# ---- S3: conditional writes ------------------------------------------------------------------

@dataclass(frozen=True)
class _Current:
    """The lease object as read: body, ETag and age on the server's clock (None if unknown)."""

    body: dict[str, Any]
    etag: str
    age: float | None

    @property
    def holder(self) -> dict[str, Any]:
        return self.body.get("holder") or {}

    @property
    def ttl(self) -> float:
        ttl = self.body.get("ttl")
        return float(ttl) if isinstance(ttl, (int, float)) else DEFAULT_TTL

    @property
    def expires(self) -> float:
        """When it goes stale, on this host's clock."""
        if self.age is not None:
            return time.time() + self.ttl - self.age
        expires = self.body.get("expires")
        return float(expires) if isinstance(expires, (int, float)) else 0.0

    @property
    def stale(self) -> bool:
        return self.age > self.ttl if self.age is not None else time.time() > self.expires


def _code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


def _s3_put(lease_uri: str, body: bytes, **condition: str) -> str | None:
    """A conditional PUT of the lease object: its new ETag, or None if the condition failed.
    storage._s3 retries transient failures; a retry of a PUT that had landed fails its
    condition, which the callers resolve by reading the token back."""
    from botocore.exceptions import ClientError

    bucket, key = storage._split_s3(lease_uri)

    def put() -> str | None:
        try:
            return storage._client().put_object(Bucket=bucket, Key=key, Body=body,
                                                ContentType="application/json",
                                                **condition)["ETag"]
        except ClientError as e:
            if _code(e) in _CONFLICT:
                return None
            raise

    return storage._s3(lease_uri, "lease write", put)


def _s3_read(lease_uri: str) -> _Current | None:
    from botocore.exceptions import ClientError

    bucket, key = storage._split_s3(lease_uri)

    def get() -> tuple[dict[str, Any], bytes] | None:
        try:
            reply = storage._client().get_object(Bucket=bucket, Key=key)
            return reply, reply["Body"].read()
        except ClientError as e:
            if _code(e) in ("NoSuchKey", "404"):
                return None
            raise

    got = storage._s3(lease_uri, "lease read", get)
    if got is None:
        return None
    reply, raw = got
    try:
        body = json.loads(raw)
        body = body if isinstance(body, dict) else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = {}  # not a lease we wrote: it goes stale after the default ttl
    age = None
    date = reply.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if date and reply.get("LastModified"):
        age = (email.utils.parsedate_to_datetime(date) - reply["LastModified"]).total_seconds()
    return _Current(body, reply["ETag"], age)


def _s3_delete(lease_uri: str, etag: str) -> bool:
    """Delete the lease object if its ETag is still `etag`; False if the condition failed."""
    from botocore.exceptions import ClientError

    bucket, key = storage._split_s3(lease_uri)

    def delete() -> bool:
        try:
            storage._client().delete_object(Bucket=bucket, Key=key, IfMatch=etag)
            return True
        except ClientError as e:
            if _code(e) in _CONFLICT:
                return False
            raise

    return storage._s3(lease_uri, "lease release", delete)


class _S3Lease(Lease):
    def __init__(self, uri: str, holder: dict[str, Any], ttl: float, renew_every: float):
        self.uri, self.lease_uri, self.holder = uri, storage.join(uri, LEASE_FILE), holder
        self.ttl, self.renew_every = ttl, renew_every
        self._etag = ""
        self._renewed = time.monotonic()  # when the last renewal that succeeded was sent
        self._lost: str | None = None
        self._released = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease {uri}", daemon=True)

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({"format": LEASE_FORMAT, "uri": self.uri, "holder": self.holder,
                           "ttl": self.ttl, "renewed": now, "expires": now + self.ttl},
                          indent=1).encode()

    def _start(self, etag: str, sent: float) -> _S3Lease:
        self._etag, self._renewed = etag, sent
        self._thread.start()
        return self

    @classmethod
    def acquire(cls, uri: str, purpose: str, ttl: float, renew_every: float) -> _S3Lease:
        lease = cls(uri, _identity(purpose), ttl, renew_every)
        for _ in range(5):
            sent = time.monotonic()
            if etag := _s3_put(lease.lease_uri, lease._body(), IfNoneMatch="*"):
                return lease._start(etag, sent)
            current = _s3_read(lease.lease_uri)
            if current is None:
                continue  # released between our write and our read
            if current.holder.get("token") == lease.holder["token"]:
                return lease._start(current.etag, sent)  # a retried write of ours had landed
            if not current.stale:
                raise LeaseHeld(uri, current.holder, current.expires)
            log.warning("%s: taking over the stale lease of %s", uri, describe(current.holder))
            sent = time.monotonic()
            if etag := _s3_put(lease.lease_uri, lease._body(), IfMatch=current.etag):
                return lease._start(etag, sent)
            # another taker won, or the holder renewed after all: read it again
        raise storage.StorageError(f"{uri}: its lease object {lease.lease_uri} kept changing "
                                   "while this writer tried to take it; retry")

    def _renew(self) -> None:
        with self._lock:
            if self._lost:
                raise LeaseLost(self._lost)
            if self._released:
                raise LeaseLost(f"{self.uri}: this writer already released its lease")
            sent = time.monotonic()
            etag = _s3_put(self.lease_uri, self._body(), IfMatch=self._etag)
            if etag is None:
                current = _s3_read(self.lease_uri)
                if current is not None and current.holder.get("token") == self.holder["token"]:
                    etag = _s3_put(self.lease_uri, self._body(), IfMatch=current.etag)
                if etag is None:
                    taker = (f"taken over by {describe(current.holder)}" if current
                             else "deleted by someone else")
                    self._lost = (f"{self.uri}: this writer lost its lease ({self.lease_uri} was "
                                  f"{taker}); not committing")
                    raise LeaseLost(self._lost)
            self._etag, self._renewed = etag, sent

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.renew_every):
            try:
                self._renew()
            except LeaseLost as e:
                log.error("%s", e)
                return
            except Exception as e:  # noqa: BLE001 - a transient failure; retried next beat
                if time.monotonic() - self._renewed > self.ttl:
                    with self._lock:
                        self._lost = (f"{self.uri}: this writer could not renew its lease for "
                                      f"{self.ttl:.0f} s ({e}); not committing")
                    log.error("%s", self._lost)
                    return
                log.warning("%s: lease renewal failed, retrying: %s", self.uri, e)

    @property
    def lost(self) -> str | None:
        return self._lost

    def check(self) -> None:
        try:
            self._renew()
        except (storage.StorageError, FileNotFoundError) as e:
            # Renewed within one beat: the lease is ours for at least 2/3 of a ttl still.
            if time.monotonic() - self._renewed > self.renew_every:
                raise LeaseLost(f"{self.uri}: cannot confirm this writer's lease ({e}); "
                                "not committing") from e
            log.warning("%s: lease renewal at a commit point failed: %s", self.uri, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            if self._released or self._lost:
                self._released = True
                return
            self._released = True
            try:
                self._delete()
            except Exception as e:  # noqa: BLE001 - it goes stale after its ttl anyway
                log.warning("%s: could not release its lease (it expires in %.0f s): %s",
                            self.uri, self.ttl, e)

    def _delete(self) -> None:
        etag = self._etag
        for _ in range(2):
            if _s3_delete(self.lease_uri, etag):
                return
            # A renewal whose reply was lost may have landed: delete it if it is still ours.
            current = _s3_read(self.lease_uri)
            if current is None or current.holder.get("token") != self.holder["token"]:
                return
            etag = current.etag
