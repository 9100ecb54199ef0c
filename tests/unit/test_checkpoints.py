"""Checkpoint integrity files: an intact checkpoint verifies; each kind of damage is named."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lladav.train.checkpoints import fallback_order, integrity_name, read_step, seal, verify

SHARD0 = "ckpt/zero_pp_rank_0_mp_rank_00_optim_states.pt"
SHARD1 = "ckpt/zero_pp_rank_1_mp_rank_00_optim_states.pt"


def _write(folder: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """Two ranks save and seal in folders of their own; the upload merges them into one."""
    rank0, rank1, merged = tmp_path / "rank0", tmp_path / "rank1", tmp_path / "checkpoint_1"
    _write(rank0, {SHARD0: bytes(range(256)) * 40, "config.json": b"{}", "latest": b"ckpt"})
    _write(rank1, {SHARD1: b"\x07" * 5000, "ledger-rank1.json": b"[]"})
    seal(rank0, 0, 2, step=6)
    seal(rank1, 1, 2, step=6)
    shutil.copytree(rank0, merged)
    shutil.copytree(rank1, merged, dirs_exist_ok=True)
    return merged


def test_an_intact_checkpoint_verifies(checkpoint):
    assert verify(checkpoint) == []
    assert read_step(checkpoint) == 6
    assert verify(checkpoint, share=(0, 2)) == [] and verify(checkpoint, share=(1, 2)) == []


def test_a_truncated_shard_is_a_size_mismatch(checkpoint):
    data = (checkpoint / SHARD1).read_bytes()
    (checkpoint / SHARD1).write_bytes(data[:1000])
    assert verify(checkpoint) == [f"size mismatch in {SHARD1}: 1000 bytes, sealed with 5000"]


def test_a_flipped_byte_is_a_digest_mismatch(checkpoint):
    data = bytearray((checkpoint / SHARD0).read_bytes())
    data[4321] ^= 0xFF
    (checkpoint / SHARD0).write_bytes(bytes(data))
    [problem] = verify(checkpoint)
    assert problem.startswith(f"digest mismatch in {SHARD0}")


def test_a_missing_file_is_named(checkpoint):
    (checkpoint / "ledger-rank1.json").unlink()
    assert verify(checkpoint) == ["missing file ledger-rank1.json"]


def test_a_missing_integrity_file_is_named(checkpoint):
    (checkpoint / integrity_name(1)).unlink()
    assert verify(checkpoint) == [f"missing {integrity_name(1)} (saved by 2 ranks)"]


def test_no_integrity_file_at_all_fails(checkpoint):
    for rank in (0, 1):
        (checkpoint / integrity_name(rank)).unlink()
    [problem] = verify(checkpoint)
    assert problem.startswith("no integrity file")
    assert read_step(checkpoint) is None


def test_an_unreadable_integrity_file_is_named(checkpoint):
    (checkpoint / integrity_name(0)).write_bytes(b'{"rank": 0, "files": ')
    [problem] = verify(checkpoint)
    assert problem.startswith(f"unreadable {integrity_name(0)}: JSONDecodeError")


def test_shares_split_the_hashing_and_together_give_the_whole_verdict(checkpoint):
    (checkpoint / SHARD1).write_bytes(b"\x07" * 4999 + b"\x08")  # same size, other bytes
    (checkpoint / integrity_name(0)).unlink()
    first, second = verify(checkpoint, share=(0, 2)), verify(checkpoint, share=(1, 2))
    assert first == [f"missing {integrity_name(0)} (saved by 2 ranks)"]
    assert [p.split(":")[0] for p in second] == [f"digest mismatch in {SHARD1}"]


def test_fallback_tries_older_checkpoints_newest_first():
    names = ["checkpoint_2026-01-01_10-00-03.000001", "checkpoint_2026-01-01_10-00-01.500000",
             "checkpoint_2026-01-01_10-00-09.000000", "checkpoint_2026-01-01_10-00-02.000000",
             "checkpoint_manager_snapshot.json", "other"]
    assert fallback_order(names[0], names) == [names[3], names[1]]
