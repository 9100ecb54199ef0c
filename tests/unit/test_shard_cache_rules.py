"""The node's shard cache on its own: cap and eviction order, pins, protection windows, one
download per shard across processes, killed downloads, local shards verified once per node."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest

from lladav import storage
from lladav.data.shard_cache import Prefetcher, ShardCache, ShardError, ShardRef, ShardUse
from lladav.digest import sha256_bytes

SIZE = 4096


def _blobs(bucket: str, n: int, prefix: str = "shards") -> list[ShardRef]:
    refs = []
    for i in range(n):
        data = bytes([i % 256]) * SIZE
        uri = f"{bucket}/{prefix}/shard-{i:03d}.tar"
        storage.write_bytes(uri, data)
        refs.append(ShardRef(uri, sha256_bytes(data), SIZE))
    return refs


def _on_disk(folder) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.endswith(".tar")}


def test_the_cap_evicts_the_least_recently_used_shard_and_never_a_pinned_one(s3_bucket, tmp_path):
    refs = _blobs(s3_bucket, 5)
    cache = ShardCache(str(tmp_path), limit_bytes=3 * SIZE, wait_s=0.5)
    for ref in refs[:3]:
        assert cache.ensure(ref)
        time.sleep(0.01)                                  # distinct last-use times
    with cache.pin(refs[0]) as path:                      # use 0 again: 1 is now the oldest
        assert open(path, "rb").read() == bytes([0]) * SIZE
    cache.ensure(refs[3])
    assert _on_disk(tmp_path) == {f"{r.sha256}.tar" for r in (refs[0], refs[2], refs[3])}
    with cache.pin(refs[0]):                              # 0 is the oldest but pinned: 2 goes
        os.utime(tmp_path / "locks" / refs[0].sha256, (0, 0))
        cache.ensure(refs[4])
        assert _on_disk(tmp_path) == {f"{r.sha256}.tar" for r in (refs[0], refs[3], refs[4])}
    assert cache.usage() <= 3 * SIZE and cache.stats.peak_bytes <= 3 * SIZE
    assert cache.stats.evictions == 2 and sum(cache.stats.downloads.values()) == 5


def test_a_reader_that_finds_no_room_waits_then_fails_naming_the_cap(s3_bucket, tmp_path):
    refs = _blobs(s3_bucket, 2)
    cache = ShardCache(str(tmp_path), limit_bytes=SIZE, wait_s=0.3)
    with cache.pin(refs[0]):
        with pytest.raises(ShardError) as err:
            cache.ensure(refs[1])
    assert "limit_bytes" in str(err.value) and refs[1].sha256 in str(err.value)
    assert not list(tmp_path.glob("*.part")) and cache.usage() == SIZE


def test_protected_shards_go_last_and_a_prefetch_never_evicts_them(s3_bucket, tmp_path):
    refs = _blobs(s3_bucket, 4)
    owner = ShardCache(str(tmp_path), limit_bytes=2 * SIZE)
    other = ShardCache(str(tmp_path), limit_bytes=2 * SIZE)   # another rank on the node
    owner.ensure(refs[0])
    time.sleep(0.01)
    other.ensure(refs[1])
    owner.protect([refs[0].sha256, refs[1].sha256])
    assert other.protected() == {refs[0].sha256, refs[1].sha256}
    assert not other.ensure(refs[2], must=False)                  # both protected: gives up
    assert _on_disk(tmp_path) == {f"{refs[0].sha256}.tar", f"{refs[1].sha256}.tar"}
    owner.protect([refs[1].sha256])
    assert other.ensure(refs[2], must=False)                      # 0 is fair game now
    assert _on_disk(tmp_path) == {f"{refs[1].sha256}.tar", f"{refs[2].sha256}.tar"}
    assert other.ensure(refs[3], must=True)                       # unprotected 2 goes first
    assert _on_disk(tmp_path) == {f"{refs[1].sha256}.tar", f"{refs[3].sha256}.tar"}
    owner.close()
    assert other.protected() == set()


def test_a_dead_loaders_window_protects_nothing(s3_bucket, tmp_path):
    def child() -> None:
        ShardCache(str(tmp_path)).protect(["a" * 64])
        os._exit(0)                                               # no close(): killed

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join()
    assert list((tmp_path / "windows").glob("*.json"))
    assert ShardCache(str(tmp_path)).protected() == set()
    assert not list((tmp_path / "windows").iterdir())


def _fetch_all(folder: str, refs: list[ShardRef], out) -> None:
    cache = ShardCache(folder)
    for ref in refs:
        with cache.pin(ref) as path:
            assert os.path.getsize(path) == ref.size
    out.put(dict(cache.stats.downloads))


def test_processes_on_one_node_download_each_shard_once(s3_bucket, tmp_path):
    refs = _blobs(s3_bucket, 6)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_fetch_all, args=(str(tmp_path), refs[::step], out))
             for step in (1, 2, -1)]
    for p in procs:
        p.start()
    counts = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join()
        assert p.exitcode == 0
    total = {r.sha256: sum(c.get(r.sha256, 0) for c in counts) for r in refs}
    assert total == {r.sha256: 1 for r in refs}


def test_a_damaged_shard_is_refused_and_leaves_nothing(s3_bucket, tmp_path):
    ref = _blobs(s3_bucket, 1)[0]
    bad = ShardRef(ref.uri, "0" * 64, ref.size)
    cache = ShardCache(str(tmp_path))
    with pytest.raises(ShardError) as err:
        cache.ensure(bad)
    assert ref.uri in str(err.value) and "0" * 64 in str(err.value)
    assert ref.sha256 in str(err.value)                           # the bytes' actual digest
    assert not _on_disk(tmp_path) and not list(tmp_path.glob("*.part"))
    missing = ShardRef(f"{s3_bucket}/shards/none.tar", "1" * 64, 10)
    with pytest.raises(ShardError, match="unreadable"):
        cache.ensure(missing)


def test_a_killed_download_leaves_no_reservation_behind(s3_bucket, tmp_path):
    refs = _blobs(s3_bucket, 2)
    stale = tmp_path / f"{'f' * 64}.tar.part"
    with open(stale, "wb") as f:
        f.truncate(10 * SIZE)                                     # nobody holds its lock
    cache = ShardCache(str(tmp_path), limit_bytes=2 * SIZE)
    cache.ensure(refs[0])
    cache.ensure(refs[1])
    assert not stale.exists() and cache.usage() == 2 * SIZE
    # A wrong-size copy (a torn write, an edit) is not trusted: fetched again.
    (tmp_path / f"{refs[0].sha256}.tar").write_bytes(b"torn")
    with cache.pin(refs[0]) as path:
        assert os.path.getsize(path) == SIZE
    assert cache.stats.downloads[refs[0].sha256] == 2


def test_a_local_shard_is_read_in_place_and_verified_once_per_node(tmp_path):
    shard = tmp_path / "mix" / "shard.tar"
    shard.parent.mkdir()
    shard.write_bytes(b"x" * 100)
    ref = ShardRef(str(shard), sha256_bytes(b"x" * 100), 100)
    first, second = ShardCache(str(tmp_path / "c")), ShardCache(str(tmp_path / "c"))
    with first.pin(ref) as path:
        assert path == str(shard)
    assert first.stats.verified == 1
    second.ensure(ref)
    assert second.stats.verified == 0 and not _on_disk(tmp_path / "c")
    shard.write_bytes(b"y" * 100)                                 # changed in place: hashed again
    with pytest.raises(ShardError, match="damaged"):
        ShardCache(str(tmp_path / "c")).ensure(ref)
    shard.unlink()
    with pytest.raises(ShardError, match="unreadable"):
        ShardCache(str(tmp_path / "c")).ensure(ref)


def test_the_prefetch_window_follows_first_use_and_keeps_open_shards(s3_bucket, tmp_path):
    refs = _blobs(s3_bucket, 6)
    # positions: 0 and 1 open over 0..3, 2 over 2..5, then 3, 4, 5 one after another
    spans = [(0, 3), (0, 3), (2, 5), (4, 6), (6, 7), (7, 7)]
    uses = [ShardUse(a, b, r) for (a, b), r in zip(spans, refs)]
    sha = [r.sha256 for r in refs]
    window = Prefetcher(ShardCache(str(tmp_path)), uses, 0, ahead=2)
    protected, ahead = window.window(0)
    assert protected == {sha[0], sha[1]} and set(ahead) == {refs[0], refs[1]}
    assert window.window(1)[0] == {sha[0], sha[1], sha[2], sha[3]}
    assert window.window(4)[0] == {sha[2], sha[3], sha[4]}
    assert window.window(7) == ({sha[4], sha[5]}, [refs[5]])

    cache = ShardCache(str(tmp_path / "c"))
    prefetcher = Prefetcher(cache, uses, 0, ahead=2).start()
    try:
        _until(lambda: {r.sha256 for r in refs[:2]} <= set(cache.stats.downloads))
        prefetcher.advance(5)                    # ahead now: 4 and 5; 2 and 3 are in use
        _until(lambda: {r.sha256 for r in refs[4:]} <= set(cache.stats.downloads))
        _until(lambda: cache.protected() == {sha[2], sha[3], sha[4], sha[5]})
    finally:
        prefetcher.close()
    assert cache.protected() == set()
    assert cache.stats.downloads == {s: 1 for s in (sha[0], sha[1], sha[4], sha[5])}


def _until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.02)
