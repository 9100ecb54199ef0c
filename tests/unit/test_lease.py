"""lladav.lease: one writer per output prefix, locally (flock) and on S3 (the moto server over HTTP,
conditional writes). A crashed holder is a real process killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lladav import storage
from lladav.lease import LEASE_FILE, LeaseHeld, LeaseLost, acquire, holder_of, lease

HOLD = """
import sys, time
from lladav.lease import acquire
held = acquire(sys.argv[1], "held by a child", ttl=float(sys.argv[2]))
print("held", flush=True)
time.sleep(600)
"""


def _hold_in_child(uri: str, ttl: float = 60) -> subprocess.Popen:
    """A process that takes the lease, says so and sleeps until killed."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, uri, str(ttl)], stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def _kill(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait()


def _names(message: str, pid: int, purpose: str) -> None:
    assert f"pid {pid} on {socket.gethostname()}" in message, message
    assert purpose in message and "since" in message, message


# ---- local: flock ----------------------------------------------------------------------------

def test_local_second_writer_refuses_naming_the_holder(tmp_path):
    out = str(tmp_path / "mix")
    with lease(out, "build recipe a") as held:
        assert json.loads(Path(out, LEASE_FILE).read_text())["holder"] == held.holder
        with pytest.raises(LeaseHeld) as refused:
            acquire(out, "build recipe b")
        _names(str(refused.value), os.getpid(), "build recipe a")
        assert "wait for it to finish" in str(refused.value)
        assert refused.value.holder["token"] == held.holder["token"]
        held.check()
    # released: the file is gone, and so is the folder the lease had to make
    assert not Path(out).exists()
    with lease(out, "build recipe b") as held:
        assert holder_of(out)["purpose"] == "build recipe b"


def test_local_lease_is_released_when_the_block_fails(tmp_path):
    out = tmp_path / "mix"
    out.mkdir()
    with pytest.raises(RuntimeError, match="boom"), lease(str(out), "build recipe a"):
        raise RuntimeError("boom")
    assert out.is_dir() and not (out / LEASE_FILE).exists()  # a folder it did not make stays
    acquire(str(out), "build recipe b").release()


def test_local_lease_of_a_killed_holder_is_taken_over_at_once(tmp_path):
    out = str(tmp_path / "mix")
    child = _hold_in_child(out)
    try:
        with pytest.raises(LeaseHeld) as refused:
            acquire(out, "build recipe b")
        _names(str(refused.value), child.pid, "held by a child")
    finally:
        _kill(child)
    assert holder_of(out)["pid"] == child.pid  # the crash left its file behind...
    with lease(out, "build recipe b") as held:  # ...but not its lock
        assert holder_of(out)["token"] == held.holder["token"]
    assert not Path(out, LEASE_FILE).exists()


def test_local_lost_lease_is_detected(tmp_path):
    out = str(tmp_path / "mix")
    with lease(out, "build recipe a") as held:
        os.remove(Path(out, LEASE_FILE))
        with pytest.raises(LeaseLost, match="not committing"):
            held.check()
        with lease(out, "build recipe b"):  # the removed file excluded nobody
            pass


# ---- S3: conditional writes on the moto server -----------------------------------------------

def _client():
    return storage._client()


def _put_foreign(uri: str, ttl: float, pid: int = 999_999) -> None:
    """A lease object as another writer leaves it: a holder that crashed `ttl` seconds before."""
    body = {"format": "lladav.lease/1", "uri": uri, "ttl": ttl, "renewed": time.time(),
            "expires": time.time() + ttl,
            "holder": {"host": "elsewhere", "pid": pid, "user": "someone",
                       "purpose": "crashed build", "since": time.time(), "token": "f" * 32}}
    bucket, key = storage._split_s3(storage.join(uri, LEASE_FILE))
    _client().put_object(Bucket=bucket, Key=key, Body=json.dumps(body).encode())


def _wait_stale(ttl: float) -> None:
    time.sleep(ttl + 2.1)  # the server's clock counts in whole seconds


def test_s3_second_writer_refuses_naming_the_holder(s3_bucket):
    out = f"{s3_bucket}/mixtures/qa"
    with lease(out, "build recipe a") as held:
        with pytest.raises(LeaseHeld) as refused:
            acquire(out, "build recipe b")
        message = str(refused.value)
        _names(message, os.getpid(), "build recipe a")
        assert "lease expires" in message and "if it crashed, retry after" in message
        assert refused.value.expires > time.time()
        held.check()
        assert storage.list_uris(out) == [f"{out}/{LEASE_FILE}"]
    assert storage.list_uris(out) == []  # released
    with lease(out, "build recipe b"):
        assert holder_of(out)["purpose"] == "build recipe b"


def test_s3_lease_of_a_killed_holder_is_taken_over_after_its_ttl(s3_bucket):
    out = f"{s3_bucket}/mixtures/qa"
    child = _hold_in_child(out, ttl=2)
    _kill(child)
    with pytest.raises(LeaseHeld) as refused:  # not stale yet: the holder may be alive
        acquire(out, "build recipe b")
    _names(str(refused.value), child.pid, "held by a child")
    deadline = time.monotonic() + 30
    while True:
        try:
            held = acquire(out, "build recipe b")
            break
        except LeaseHeld:
            assert time.monotonic() < deadline, "the dead holder's lease never went stale"
            time.sleep(0.5)
    assert holder_of(out)["token"] == held.holder["token"]
    held.release()
    assert storage.list_uris(out) == []


def test_s3_expired_lease_has_exactly_one_taker(s3_bucket):
    out = f"{s3_bucket}/mixtures/qa"
    _put_foreign(out, ttl=1)
    with pytest.raises(LeaseHeld, match="pid 999999 on elsewhere"):
        acquire(out, "build recipe b")
    _wait_stale(1)
    start = threading.Barrier(4)
    won, refused = [], []

    def take(i: int) -> None:
        start.wait()
        try:
            won.append(acquire(out, f"taker {i}"))
        except LeaseHeld as e:
            refused.append(e)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 3
    assert all(e.holder["token"] == won[0].holder["token"] for e in refused)
    assert holder_of(out)["token"] == won[0].holder["token"]
    won[0].check()
    won[0].release()


def test_s3_heartbeat_keeps_the_lease_past_its_ttl(s3_bucket):
    out = f"{s3_bucket}/mixtures/qa"
    with lease(out, "build recipe a", ttl=2) as held:
        _wait_stale(2)
        with pytest.raises(LeaseHeld):
            acquire(out, "build recipe b")
        held.check()
    assert storage.list_uris(out) == []


def test_s3_lost_lease_is_detected_and_not_released(s3_bucket):
    out = f"{s3_bucket}/mixtures/qa"
    with lease(out, "build recipe a", ttl=30) as held:
        _put_foreign(out, ttl=30)  # a taker replaced it (as after a stall longer than the ttl)
        with pytest.raises(LeaseLost, match="taken over by pid 999999 on elsewhere"):
            held.check()
        with pytest.raises(LeaseLost):
            held.check()
    assert holder_of(out)["pid"] == 999_999  # releasing a lost lease leaves the taker's alone


def test_s3_heartbeat_notices_a_lost_lease(s3_bucket):
    out = f"{s3_bucket}/mixtures/qa"
    held = acquire(out, "build recipe a", ttl=3)
    try:
        _put_foreign(out, ttl=30)
        deadline = time.monotonic() + 30
        while held.lost is None:  # nobody calls check(): the heartbeat finds out by itself
            assert time.monotonic() < deadline, "the heartbeat did not notice the taker"
            time.sleep(0.2)
        assert "taken over by pid 999999" in held.lost
        with pytest.raises(LeaseLost):
            held.check()
    finally:
        held.release()
    assert holder_of(out)["pid"] == 999_999
