"""A node's shard cache: content-addressed, shared by every rank and loader worker, byte-capped,
filled ahead of use by a prefetcher that follows the sample order.

    <folder>/<sha256>.tar        a shard's bytes, named only after their sha256 matched mixture.json
    <folder>/<sha256>.tar.part   a download in flight, created at its full size under the cache
                                 lock: the bytes it will take are reserved before the first byte
    <folder>/locks/<sha256>      the shard's lock: shared while a reader reads the file (a pin),
                                 exclusive while one process downloads, verifies or evicts it;
                                 its mtime is the shard's last use (the eviction order)
    <folder>/locks/cache         the cache lock: usage is counted and room made under it
    <folder>/windows/<id>.json   each live loader's protected shards (in use, or next in its
                                 order), beside <id>.lock, which the loader holds while it lives
    <folder>/verified/<h>.json   a local shard read in place, verified once: path, size, mtime

Why one folder per node: the loader used to verify and copy every shard an epoch touches into a
folder of its own before the first batch, so 8 ranks on a node kept 8 copies of the mixture and
the time to the first batch grew with it. Here a rank that needs a shard takes its lock; the
first one downloads (hashing as it writes, renaming into place only if the digest matches) and
the others find the file when the lock comes free: one download per shard per node. The name is
the proof of verification: a cached file is trusted while its size is the one mixture.json gives
(a file rewritten in place at the same size is not detected; remove it or the folder).

The cap: before a download reserves room, the cache lock is taken, the folder's .tar and .part
bytes are summed, and shards are evicted, least recently used first, until the new one fits.
A shard is never evicted while a reader holds its pin or a process downloads it (the evictor's
lock attempt does not wait), and shards some live loader protects go last; a prefetch (`must`
false) never evicts those and gives up instead of waiting, a reader waits for pins to clear.
Every step that adds bytes or renames a file (a reservation, .part -> .tar) holds the cache lock,
so a count under it sees each shard exactly once, and usage never exceeds the cap; the .part of
a killed download counts until a scan finds no process holding its shard's lock and removes it.

Locks are flock(2) locks on open file descriptions; a DataLoader worker forked while a thread
holds one would keep it alive, so every lock descriptor is registered and closed in a forked
child (the parent's hold is unaffected).

Owns: the cache folder, its locks, cap and counters, and the prefetch thread. Does not own the
order of shards (data/loader.py hands the prefetcher each shard's first and last use) or what a
shard holds.
"""

from __future__ import annotations

import bisect
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

from lladav import storage
from lladav.digest import sha256_bytes, sha256_file

log = logging.getLogger(__name__)

CACHE_ENV = "LLADAV_SHARD_CACHE"
WAIT_S = 600.0           # a reader waits this long for room (pins to clear) before it fails
PIN_ATTEMPTS = 8         # a shard evicted between its download and its read is fetched again
DOWNLOAD_THREADS = 8     # concurrent prefetches; I/O bound, hashlib releases the GIL
_CHUNK = 1 << 20


class ShardError(RuntimeError):
    """A committed shard is missing, unreadable or not the bytes mixture.json names."""


@dataclass(frozen=True)
class ShardRef:
    """A shard as mixture.json names it: where it is, its digest and its size in bytes."""

    uri: str
    sha256: str
    size: int

    @property
    def remote(self) -> bool:
        return storage.is_s3(self.uri)

    def error(self, what: str) -> ShardError:
        return ShardError(f"shard {self.uri} (sha256 {self.sha256}): {what}")


def default_folder() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(),
                                                      f"lladav-shard-cache-{os.getuid()}")


# ---- flock with fork safety ---------------------------------------------------------------------

_held: set[int] = set()               # lock descriptors open in this process
_held_lock = threading.Lock()
_stats_lock = threading.Lock()


def _before_fork() -> None:
    _held_lock.acquire()


def _after_fork_in_parent() -> None:
    _held_lock.release()


def _after_fork_in_child() -> None:
    """Close the inherited lock descriptors: the locks stay the parent's alone."""
    global _held_lock, _stats_lock
    for fd in _held:
        with suppress(OSError):
            os.close(fd)
    _held.clear()
    _held_lock, _stats_lock = threading.Lock(), threading.Lock()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)


def _open_lock(path: str) -> int:
    with _held_lock:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        _held.add(fd)
    return fd


def _close_lock(fd: int) -> None:
    with _held_lock:
        _held.discard(fd)
        os.close(fd)                  # releases the flock


@contextmanager
def _flock(path: str, mode: int, wait: bool = True) -> Iterator[int | None]:
    """Hold flock `mode` on `path` (created if missing); yields the fd, or None if `wait` is
    false and another holder is in the way."""
    fd = _open_lock(path)
    try:
        try:
            fcntl.flock(fd, mode if wait else mode | fcntl.LOCK_NB)
        except BlockingIOError:
            got = None
        else:
            got = fd
        yield got
    finally:
        _close_lock(fd)


# ---- the cache ----------------------------------------------------------------------------------

@dataclass
class CacheStats:
    """What this process's cache object did (DataLoader workers count in their own copies)."""

    downloads: Counter = field(default_factory=Counter)   # sha256 -> downloads
    bytes_downloaded: int = 0
    evictions: int = 0
    verified: int = 0          # local shards hashed in place
    peak_bytes: int = 0        # most bytes in the folder after a reservation made here


@dataclass(frozen=True)
class _Entry:
    sha256: str
    size: int
    last_use: float


class ShardCache:
    """One node's shard folder; any number of objects in any processes may share it."""

    def __init__(self, folder: str | None = None, limit_bytes: int | None = None,
                 wait_s: float = WAIT_S):
        self.folder = os.path.abspath(folder or default_folder())
        self.limit_bytes, self.wait_s = limit_bytes, wait_s
        for sub in ("locks", "windows", "verified"):
            os.makedirs(os.path.join(self.folder, sub), exist_ok=True)
        self.stats = CacheStats()
        self._window: tuple[str, int] | None = None    # (id, fd of its held lock)
        self._verified_here: dict[str, tuple] = {}       # path -> fingerprint, this process

    # -- names ----------------------------------------------------------------------------------
    def path(self, sha256: str) -> str:
        return os.path.join(self.folder, f"{sha256}.tar")

    def _lock(self, sha256: str) -> str:
        return os.path.join(self.folder, "locks", sha256)

    @property
    def _cache_lock(self) -> str:
        return os.path.join(self.folder, "locks", "cache")

    def present(self, ref: ShardRef) -> bool:
        """Whether the shard is ready to read: in place (local) or cached at its size (S3)."""
        if not ref.remote:
            return self._fingerprint_ok(ref)
        try:
            return os.stat(self.path(ref.sha256)).st_size == ref.size
        except FileNotFoundError:
            return False

    def usage(self) -> int:
        """Bytes of shards and reserved downloads in the folder now."""
        with _flock(self._cache_lock, fcntl.LOCK_EX):
            entries, reserved = self._scan(None)
        return sum(e.size for e in entries) + reserved

    # -- reading --------------------------------------------------------------------------------
    def ensure(self, ref: ShardRef, must: bool = True, cancel: threading.Event | None = None
               ) -> bool:
        """Make the shard readable: download and verify it (S3) or verify it in place (local).
        With `must` false (a prefetch) it neither waits for another process's download nor
        evicts a protected shard; it returns False when it did not make the shard ready."""
        if not ref.remote:
            self._verify_in_place(ref)
            return True
        with _flock(self._lock(ref.sha256), fcntl.LOCK_EX, wait=must) as fd:
            if fd is None:
                return False
            if self.present(ref):
                os.utime(fd)
                return True
            with suppress(FileNotFoundError):
                os.remove(self.path(ref.sha256))         # a damaged copy: not its size
            if not self._reserve(ref, must):
                return False
            done = self._download(ref, cancel)
            if done:
                os.utime(fd)
            return done

    @contextmanager
    def pin(self, ref: ShardRef) -> Iterator[str]:
        """A verified local path of the shard, never evicted while the `with` block runs."""
        if not ref.remote:
            yield self._verify_in_place(ref)
            return
        for _ in range(PIN_ATTEMPTS):
            with _flock(self._lock(ref.sha256), fcntl.LOCK_SH) as fd:
                if self.present(ref):
                    os.utime(fd)
                    yield self.path(ref.sha256)
                    return
            self.ensure(ref, must=True)
        raise ref.error(f"evicted {PIN_ATTEMPTS} times between download and read: the shard "
                        f"cache limit {self.limit_bytes} bytes is too small for the shards in use "
                        f"on this node (raise shard_cache.limit_bytes)")

    # -- download -------------------------------------------------------------------------------
    def _download(self, ref: ShardRef, cancel: threading.Event | None) -> bool:
        """Stream the shard into its reserved .part, hashing as it goes; rename it into place
        only if the digest matches. Called holding the shard's exclusive lock."""
        part, h, n = self.path(ref.sha256) + ".part", hashlib.sha256(), 0
        try:
            with storage.open_read(ref.uri) as src, open(part, "r+b") as dst:
                while chunk := src.read(_CHUNK):
                    if cancel is not None and cancel.is_set():
                        os.remove(part)
                        return False
                    h.update(chunk)
                    dst.write(chunk)
                    n += len(chunk)
                dst.truncate(n)
        except (OSError, storage.StorageError) as e:
            with suppress(FileNotFoundError):
                os.remove(part)
            raise ref.error(f"unreadable: {e}") from e
        if h.hexdigest() != ref.sha256 or n != ref.size:
            os.remove(part)
            raise ref.error(f"its bytes have sha256 {h.hexdigest()} ({n} bytes, mixture.json "
                            f"says {ref.size}); the mixture is damaged (restore the shard or "
                            "rebuild the mixture; no sample is substituted)")
        with _flock(self._cache_lock, fcntl.LOCK_EX):     # a scan never sees it in neither name
            os.replace(part, self.path(ref.sha256))
        with _stats_lock:
            self.stats.downloads[ref.sha256] += 1
            self.stats.bytes_downloaded += n
        return True

    def _reserve(self, ref: ShardRef, must: bool) -> bool:
        """Room for the shard under the cap: evict until it fits, then create its .part at full
        size. A prefetch gives up at once; a reader waits for pins to clear, up to wait_s."""
        deadline = time.monotonic() + self.wait_s
        while True:
            with _flock(self._cache_lock, fcntl.LOCK_EX):
                entries, reserved = self._scan(ref.sha256)
                used = sum(e.size for e in entries) + reserved
                if self.limit_bytes is not None and used + ref.size > self.limit_bytes:
                    protected = self.protected()
                    for e in sorted(entries, key=lambda e: (e.sha256 in protected, e.last_use)):
                        if used + ref.size <= self.limit_bytes or (
                                e.sha256 in protected and not must):
                            break
                        if self._evict(e):
                            used -= e.size
                if self.limit_bytes is None or used + ref.size <= self.limit_bytes:
                    with open(self.path(ref.sha256) + ".part", "wb") as f:
                        f.truncate(ref.size)               # sparse: counted, not yet written
                    with _stats_lock:
                        self.stats.peak_bytes = max(self.stats.peak_bytes, used + ref.size)
                    return True
            if not must:
                return False
            if time.monotonic() > deadline:
                raise ref.error(f"no room in the shard cache {self.folder} within "
                                f"{self.wait_s:.0f} s: {used} of {self.limit_bytes} bytes are in "
                                f"use or reserved and the shard needs {ref.size} (raise "
                                "shard_cache.limit_bytes, or fewer loader workers per node)")
            time.sleep(0.05)

    def _scan(self, own: str | None) -> tuple[list[_Entry], int]:
        """The folder's shards (with last use) and the bytes reserved by live downloads; a .part
        whose shard lock nobody holds is left by a killed process and removed."""
        entries, reserved = [], 0
        for name in os.listdir(self.folder):
            sha, _, suffix = name.partition(".")
            try:
                if suffix == "tar":
                    size = os.stat(os.path.join(self.folder, name)).st_size
                    try:
                        last = os.stat(self._lock(sha)).st_mtime
                    except FileNotFoundError:
                        last = 0.0
                    entries.append(_Entry(sha, size, last))
                elif suffix == "tar.part" and sha != own:
                    with _flock(self._lock(sha), fcntl.LOCK_EX, wait=False) as fd:
                        if fd is not None:
                            os.remove(os.path.join(self.folder, name))
                            continue
                    reserved += os.stat(os.path.join(self.folder, name)).st_size
            except FileNotFoundError:
                continue                                   # gone while we looked
        return entries, reserved

    def _evict(self, entry: _Entry) -> bool:
        with _flock(self._lock(entry.sha256), fcntl.LOCK_EX, wait=False) as fd:
            if fd is None:
                return False                               # pinned, or being downloaded
            with suppress(FileNotFoundError):
                os.remove(self.path(entry.sha256))
        with _stats_lock:
            self.stats.evictions += 1
        return True

    # -- local shards, verified in place once per node ------------------------------------------
    def _fingerprint(self, ref: ShardRef) -> tuple:
        path = ref.uri.removeprefix("file://")
        try:
            st = os.stat(path)
        except OSError as e:
            raise ref.error(f"unreadable: {e}") from e
        return (path, st.st_size, st.st_mtime_ns, st.st_ino)

    def _marker(self, path: str) -> str:
        return os.path.join(self.folder, "verified", sha256_bytes(path.encode()) + ".json")

    def _fingerprint_ok(self, ref: ShardRef) -> bool:
        try:
            fingerprint = self._fingerprint(ref)
        except ShardError:
            return False                                   # missing: ensure() says so
        if self._verified_here.get(fingerprint[0]) == (ref.sha256, *fingerprint):
            return True
        try:
            with open(self._marker(fingerprint[0])) as f:
                ok = tuple(json.load(f)) == (ref.sha256, *fingerprint)
        except (OSError, ValueError):
            return False
        if ok:
            self._verified_here[fingerprint[0]] = (ref.sha256, *fingerprint)
        return ok

    def _verify_in_place(self, ref: ShardRef) -> str:
        if self._fingerprint_ok(ref):
            return ref.uri.removeprefix("file://")
        with _flock(self._lock(ref.sha256), fcntl.LOCK_EX):
            if self._fingerprint_ok(ref):
                return ref.uri.removeprefix("file://")
            fingerprint = self._fingerprint(ref)
            try:
                actual = sha256_file(fingerprint[0])
            except OSError as e:
                raise ref.error(f"unreadable: {e}") from e
            with _stats_lock:
                self.stats.verified += 1
            if actual != ref.sha256:
                raise ref.error(f"its bytes have sha256 {actual}; the mixture is damaged "
                                "(restore the shard or rebuild the mixture; no sample is "
                                "substituted)")
            if self._fingerprint(ref) == fingerprint:   # unchanged while it was hashed
                marker = self._marker(fingerprint[0])
                tmp = f"{marker}.tmp-{uuid.uuid4().hex}"
                with open(tmp, "w") as f:
                    json.dump([ref.sha256, *fingerprint], f)
                os.replace(tmp, marker)
                self._verified_here[fingerprint[0]] = (ref.sha256, *fingerprint)
        return fingerprint[0]

    # -- protection windows ---------------------------------------------------------------------
    def protect(self, shas: Sequence[str]) -> None:
        """Publish this loader's protected shards (in use, or next in its order): evictions by
        any process on the node take them last, and prefetches never."""
        windows = os.path.join(self.folder, "windows")
        if self._window is None:
            wid = uuid.uuid4().hex
            fd = _open_lock(os.path.join(windows, f"{wid}.lock"))
            fcntl.flock(fd, fcntl.LOCK_EX)                 # held while this loader lives
            self._window = (wid, fd)
        path = os.path.join(windows, f"{self._window[0]}.json")
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(sorted(shas), f)
        os.replace(tmp, path)

    def protected(self) -> set[str]:
        """Union of the live loaders' windows; windows of dead loaders are removed."""
        windows, out = os.path.join(self.folder, "windows"), set()
        for name in os.listdir(windows):
            if not name.endswith(".json"):
                continue
            wid = name.removesuffix(".json")
            with _flock(os.path.join(windows, f"{wid}.lock"), fcntl.LOCK_EX, wait=False) as fd:
                if fd is not None:                          # its loader is gone
                    for stale in (name, f"{wid}.lock"):
                        with suppress(FileNotFoundError):
                            os.remove(os.path.join(windows, stale))
                    continue
            with suppress(OSError, ValueError), open(os.path.join(windows, name)) as f:
                out.update(json.load(f))
        return out

    def close(self) -> None:
        """Withdraw this object's protection window (its shards become ordinary LRU entries)."""
        if self._window is not None:
            wid, fd = self._window
            self._window = None
            for name in (f"{wid}.json", f"{wid}.lock"):
                with suppress(FileNotFoundError):
                    os.remove(os.path.join(self.folder, "windows", name))
            _close_lock(fd)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_window": None}          # a copy never owns the window


# ---- the prefetcher -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardUse:
    """A shard's first and last use, as positions in one rank's batch sequence."""

    first: int
    last: int
    ref: ShardRef


class Prefetcher:
    """Background thread: keeps the next `ahead` shards of a rank's order (by first use from the
    consumer's position) fetched, and publishes the protected set (shards in use, those ahead).

    Positions move only forward (`advance`); the open set is kept with two pointers over the
    uses sorted by first and by last use, so an epoch costs O(shards), not O(shards x batches).
    """

    def __init__(self, cache: ShardCache, uses: Sequence[ShardUse], start: int, ahead: int,
                 protect: bool = True, threads: int = DOWNLOAD_THREADS):
        self.cache, self.ahead, self._threads = cache, ahead, max(1, min(threads, ahead))
        self._by_first = sorted(uses, key=lambda u: (u.first, u.ref.sha256))
        self._firsts = [u.first for u in self._by_first]
        self._by_last = sorted(uses, key=lambda u: u.last)
        self._i_first = self._i_last = 0
        self._open: set[str] = set()
        self._position = start
        self._wake, self._stop = threading.Event(), threading.Event()
        self._pool = ThreadPoolExecutor(self._threads, "lladav-prefetch")
        self._inflight: dict[str, Future] = {}
        self._failed: set[str] = set()
        self._protect = protect and any(u.ref.remote for u in uses)
        self._thread = threading.Thread(target=self._run, name="lladav-prefetcher", daemon=True)

    def start(self) -> "Prefetcher":
        self._thread.start()
        return self

    def advance(self, position: int) -> None:
        """The consumer's next position (batches handed over so far in this epoch)."""
        self._position = position
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.cache.close()

    def window(self, position: int) -> tuple[set[str], list[ShardRef]]:
        """(protected shas, refs ahead) at `position`; call with non-decreasing positions."""
        self._advance_open(position)
        ahead = self._ahead(position)
        return self._open | {r.sha256 for r in ahead}, ahead

    def _ahead(self, position: int) -> list[ShardRef]:
        i = bisect.bisect_left(self._firsts, position)
        return [u.ref for u in self._by_first[i:i + self.ahead]]

    def _advance_open(self, position: int) -> None:
        by_first, by_last = self._by_first, self._by_last
        while self._i_first < len(by_first) and by_first[self._i_first].first < position:
            self._open.add(by_first[self._i_first].ref.sha256)
            self._i_first += 1
        while self._i_last < len(by_last) and by_last[self._i_last].last < position:
            self._open.discard(by_last[self._i_last].ref.sha256)
            self._i_last += 1

    def _run(self) -> None:
        published: set[str] | None = None
        while not self._stop.is_set():
            self._wake.clear()
            position = self._position
            if self._protect:       # not under the global order: every shard is in use there
                protected, ahead = self.window(position)
                if protected != published:
                    self.cache.protect(sorted(protected))
                    published = protected
            else:
                ahead = self._ahead(position)
            for ref in ahead:
                if len(self._inflight) >= self._threads:
                    break
                if ref.sha256 in self._inflight or ref.sha256 in self._failed:
                    continue
                if self.cache.present(ref):
                    continue
                future = self._pool.submit(self.cache.ensure, ref, False, self._stop)
                self._inflight[ref.sha256] = future
                future.add_done_callback(lambda _: self._wake.set())
            self._wake.wait(timeout=1.0)
            for sha, future in list(self._inflight.items()):
                if future.done():
                    del self._inflight[sha]
                    if future.exception() is not None:   # the reader raises it, with context
                        log.debug("prefetch of %s failed: %s", sha, future.exception())
                        self._failed.add(sha)
