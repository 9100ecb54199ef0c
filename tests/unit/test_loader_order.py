"""The loader's order and split as pure functions: no shards, no Ray, no DataLoader."""

from __future__ import annotations

import random
from itertools import zip_longest

import pytest

from lladav.data.loader import (epoch_batches, epoch_order, length_bucket, padding_fraction,
                                rank_batches, shard_blocks, worker_positions)

KEYS = [f"{i:09d}" for i in range(203)]  # prime-ish count: a short tail batch for most sizes
SHARD_OF = [f"shards/shard-{i // 7:06d}.tar" for i in range(len(KEYS))]  # 29 shards of 7


def _lengths(n: int, seed: int = 0) -> list[int]:
    """Spliced lengths like a stage-2 mixture: log-normal text plus 0, 1 or 2 images' tokens."""
    rng = random.Random(seed)
    return [int(rng.lognormvariate(5.0, 0.8)) + rng.choice([0, 729, 1485, 2929]) for _ in range(n)]


def _round_robin(streams: list[list[int]]) -> list[int]:
    """What a DataLoader hands over when its workers take turns (torch's in-order dispatch)."""
    return [x for group in zip_longest(*streams) for x in group if x is not None]


def test_order_is_a_seeded_permutation_that_changes_with_epoch_and_seed():
    order = epoch_order(KEYS, seed=7, epoch=0)
    assert sorted(order) == list(range(len(KEYS)))
    assert order == epoch_order(list(KEYS), seed=7, epoch=0)
    assert order != epoch_order(KEYS, seed=7, epoch=1)
    assert order != epoch_order(KEYS, seed=8, epoch=0)
    assert order != list(range(len(KEYS)))
    # A sample's place depends on its key alone: dropping other keys keeps the relative order.
    subset = KEYS[::3]
    assert [subset[i] for i in epoch_order(subset, 7, 0)] == [KEYS[i] for i in order if i % 3 == 0]


@pytest.mark.parametrize("group_window", [0, 4])
@pytest.mark.parametrize("batch_size", [1, 4, 7])
def test_the_batch_sequence_is_the_same_for_every_world_size(batch_size, group_window):
    lengths = _lengths(len(KEYS))
    batches = epoch_batches(KEYS, lengths, 3, 2, batch_size, group_window)
    assert sorted(i for b in batches for i in b) == list(range(len(KEYS)))
    assert all(len(b) == batch_size for b in batches[:-1]) and 0 < len(batches[-1]) <= batch_size
    if group_window == 0:
        assert [i for b in batches for i in b] == epoch_order(KEYS, 3, 2)
    for world_size in (1, 2, 3, 5):
        ranks = [rank_batches(batches, batch_size, r, world_size) for r in range(world_size)]
        # Interleaving the ranks step by step gives back a prefix of the one global sequence.
        assert _round_robin(ranks) == list(range(len(_round_robin(ranks))))


@pytest.mark.parametrize("world_size,num_workers,batch_size",
                         [(1, 0, 4), (1, 3, 4), (2, 2, 3), (3, 1, 5), (4, 3, 2), (5, 2, 8),
                          (7, 4, 1)])
@pytest.mark.parametrize("drop_last", [True, False])
def test_union_of_rank_and_worker_streams_is_the_epoch_once(world_size, num_workers, batch_size,
                                                            drop_last):
    batches = epoch_batches(KEYS, _lengths(len(KEYS)), 0, 1, batch_size)
    n_full = len(KEYS) // batch_size
    seen: list[int] = []
    counts = []
    for rank in range(world_size):
        mine = rank_batches(batches, batch_size, rank, world_size, drop_last)
        assert all(g % world_size == rank for g in mine)
        counts.append(len(mine))
        streams = [worker_positions(len(mine), 0, w, num_workers)
                   for w in range(max(num_workers, 1))]
        positions = [p for s in streams for p in s]
        assert sorted(positions) == list(range(len(mine)))     # each batch by exactly one worker
        assert _round_robin(streams) == list(range(len(mine)))  # and handed over in order
        seen += [i for p in positions for i in batches[mine[p]]]
    assert len(seen) == len(set(seen))
    if drop_last:
        kept = n_full // world_size * world_size
        assert len(set(counts)) == 1                           # every rank steps together
        assert set(seen) == {i for b in batches[:kept] for i in b}
        assert len(seen) == kept * batch_size
    else:
        assert set(seen) == set(range(len(KEYS)))
        assert max(counts) - min(counts) <= 1


def test_workers_resume_mid_epoch_in_position_order():
    for n, start, workers in [(10, 3, 2), (10, 0, 3), (11, 7, 4), (5, 4, 2), (6, 6, 2)]:
        streams = [worker_positions(n, start, w, workers) for w in range(workers)]
        assert _round_robin(streams) == list(range(start, n))


def test_drop_last_keeps_whole_steps_only():
    batches = epoch_batches(KEYS, _lengths(len(KEYS)), 0, 0, 10)   # 20 full + a tail of 3
    assert [len(b) for b in batches[-2:]] == [10, 3]
    assert rank_batches(batches, 10, 0, 3) == [0, 3, 6, 9, 12, 15]  # 18 of 20 full batches used
    assert rank_batches(batches, 10, 2, 3) == [2, 5, 8, 11, 14, 17]
    assert rank_batches(batches, 10, 2, 3, drop_last=False) == [2, 5, 8, 11, 14, 17, 20]
    assert rank_batches(batches, 10, 0, 1) == list(range(20))      # the short tail is dropped


def test_length_grouping_cuts_padding_and_moves_samples_within_a_window_only():
    keys = [f"{i:09d}" for i in range(4096)]
    lengths = _lengths(len(keys), seed=1)
    batch_size, window = 8, 32
    plain = epoch_batches(keys, lengths, 5, 0, batch_size)
    grouped = epoch_batches(keys, lengths, 5, 0, batch_size, group_window=window)
    pad_plain, pad_grouped = padding_fraction(plain, lengths), padding_fraction(grouped, lengths)
    print(f"padding fraction, batch {batch_size}, window {window} batches: "
          f"{pad_plain:.3f} without grouping, {pad_grouped:.3f} with")
    assert pad_grouped < pad_plain / 3
    assert sorted(i for b in grouped for i in b) == list(range(len(keys)))
    # Same samples per window as the plain order, so nothing drifts further than one window.
    span = batch_size * window
    flat_plain = [i for b in plain for i in b]
    flat_grouped = [i for b in grouped for i in b]
    for start in range(0, len(keys), span):
        assert sorted(flat_plain[start:start + span]) == sorted(flat_grouped[start:start + span])
    # A batch is a slice of its window sorted by length bucket (5% wide); within a bucket the
    # epoch's random order stays, so equal lengths do not form runs.
    assert all([length_bucket(lengths[i]) for i in b] == sorted(length_bucket(lengths[i]) for i in b)
               for b in grouped)
    assert any([lengths[i] for i in b] != sorted(lengths[i] for i in b) for b in grouped)
    # Across a window the batches are not sorted (the long ones do not all come last).
    first_window = [max(lengths[i] for i in b) for b in grouped[:window]]
    assert first_window != sorted(first_window)
    assert grouped != epoch_batches(keys, lengths, 5, 1, batch_size, group_window=window)


def test_padding_fraction_counts_pads_over_the_padded_area():
    lengths = [10, 4, 6, 6]
    assert padding_fraction([[0, 1], [2, 3]], lengths) == pytest.approx(6 / 32)
    assert padding_fraction([[0], [1], [2], [3]], lengths) == 0.0


# ---- the block order ----------------------------------------------------------------------------

def _runs(values: list) -> list:
    """Consecutive distinct values: [a, a, b, a] -> [a, b, a]."""
    return [v for j, v in enumerate(values) if j == 0 or values[j - 1] != v]


@pytest.mark.parametrize("block_shards", [1, 4, 5])
def test_block_order_reads_one_block_of_shards_at_a_time(block_shards):
    order = epoch_order(KEYS, 7, 2, SHARD_OF, block_shards)
    assert sorted(order) == list(range(len(KEYS)))
    blocks = shard_blocks(SHARD_OF, 7, 2, block_shards)
    assert sorted(blocks.values()) == sorted(i // block_shards for i in range(29))
    # Each block's samples are one contiguous stretch, blocks in order, so any stretch of the
    # order inside a block touches at most block_shards shards.
    along = [blocks[SHARD_OF[i]] for i in order]
    assert _runs(along) == list(range(-(-29 // block_shards)))
    for b in range(max(along) + 1):
        assert len({SHARD_OF[i] for i in order if blocks[SHARD_OF[i]] == b}) <= block_shards
    # Within a block: the global order's per-key hash, so samples of a shard are spread out.
    assert [i for i, b in zip(order, along) if b == 0] == [
        i for i in epoch_order(KEYS, 7, 2) if blocks[SHARD_OF[i]] == 0]
    if block_shards > 1:
        assert len(_runs([SHARD_OF[i] for i in order])) > len(_runs(along)) * block_shards


def test_block_order_is_a_pure_function_of_keys_shards_seed_epoch_and_block_size():
    order = epoch_order(KEYS, 7, 0, SHARD_OF, 4)
    assert order == epoch_order(list(KEYS), 7, 0, list(SHARD_OF), 4)
    for other in (epoch_order(KEYS, 7, 1, SHARD_OF, 4), epoch_order(KEYS, 8, 0, SHARD_OF, 4),
                  epoch_order(KEYS, 7, 0, SHARD_OF, 3)):
        assert other != order
    # The manifest's row order does not matter: same keys, same shards, same sequence of keys.
    perm = sorted(range(len(KEYS)), key=lambda i: (i * 37) % len(KEYS))
    keys, shards = [KEYS[i] for i in perm], [SHARD_OF[i] for i in perm]
    assert [keys[i] for i in epoch_order(keys, 7, 0, shards, 4)] == [KEYS[i] for i in order]
    # Blocks regroup every epoch: shards that shared a block in epoch 0 mostly do not in 1.
    def pairs(block: dict[str, int]) -> set[tuple[str, str]]:
        return {(s, t) for s in block for t in block if s < t and block[s] == block[t]}

    b0, b1 = pairs(shard_blocks(SHARD_OF, 7, 0, 4)), pairs(shard_blocks(SHARD_OF, 7, 1, 4))
    assert len(b0 & b1) < len(b0) / 2


def test_one_block_holding_every_shard_is_the_global_order():
    for block_shards in (29, 30, 1000):
        assert epoch_order(KEYS, 3, 1, SHARD_OF, block_shards) == epoch_order(KEYS, 3, 1)
    assert epoch_order(KEYS, 3, 1, SHARD_OF, 0) == epoch_order(KEYS, 3, 1)


@pytest.mark.parametrize("group_window", [0, 2])
@pytest.mark.parametrize("batch_size", [1, 4, 7])
def test_block_batches_are_the_same_for_every_world_size_and_worker_count(batch_size,
                                                                          group_window):
    lengths = _lengths(len(KEYS))
    batches = epoch_batches(KEYS, lengths, 3, 2, batch_size, group_window, SHARD_OF, 4)
    assert sorted(i for b in batches for i in b) == list(range(len(KEYS)))
    if group_window == 0:
        assert [i for b in batches for i in b] == epoch_order(KEYS, 3, 2, SHARD_OF, 4)
    for world_size in (1, 2, 3, 5):
        ranks = [rank_batches(batches, batch_size, r, world_size) for r in range(world_size)]
        assert _round_robin(ranks) == list(range(len(_round_robin(ranks))))
        for num_workers in (0, 1, 3):
            for mine in ranks:
                streams = [worker_positions(len(mine), 0, w, num_workers)
                           for w in range(max(num_workers, 1))]
                assert _round_robin(streams) == list(range(len(mine)))


@pytest.mark.parametrize("group_window", [0, 2])
def test_shards_open_at_once_stay_within_two_blocks_with_length_grouping(group_window):
    """The working set: shards with a use before and after a point of the batch sequence."""
    keys = [f"{i:09d}" for i in range(2000)]
    shard_of = [f"s{i % 100:03d}" for i in range(2000)]        # 100 shards of 20, interleaved
    lengths = _lengths(len(keys), seed=2)
    block_shards, batch_size = 5, 4
    batches = epoch_batches(keys, lengths, 0, 0, batch_size, group_window, shard_of,
                            block_shards)
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for g, b in enumerate(batches):
        for i in b:
            first.setdefault(shard_of[i], g)
            last[shard_of[i]] = g
    most_open = max(sum(first[s] <= g <= last[s] for s in first) for g in range(len(batches)))
    assert most_open <= 2 * block_shards
    if group_window:  # grouping still cuts padding under the block order
        plain = epoch_batches(keys, lengths, 0, 0, batch_size, 0, shard_of, block_shards)
        assert padding_fraction(batches, lengths) < padding_fraction(plain, lengths)
