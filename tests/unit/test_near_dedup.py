"""Near-duplicate images (data/near_dedup.py) on generated images that are not the demo's:
resized, re-encoded and cropped copies are found, distinct images are not, and the answer
depends on the corpus order alone. The build with 1 and 2 workers is in
tests/integration/test_build.py."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from lladav.config import ImageLimits, NearDedup
from lladav.data.images import hash_halves, inspect_image
from lladav.data.near_dedup import near_duplicates

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from near_copies import KINDS, copy, distinct, encode  # noqa: E402

MAX = NearDedup().max_distance


def phash(data: bytes) -> tuple[int, int]:
    return hash_halves(inspect_image(data, ImageLimits()).phash)


@pytest.fixture(scope="module")
def originals_and_copies() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    originals = distinct(200, seed=7)
    a = np.array([phash(encode(img)) for img in originals], dtype=np.uint64)
    b = np.array([phash(copy(img, k % len(KINDS), rng)) for k, img in enumerate(originals)],
                 dtype=np.uint64)
    return a, b


def test_resized_reencoded_and_cropped_copies_are_refused_naming_their_original(originals_and_copies):
    a, b = originals_and_copies
    hashes = np.concatenate([a, b])
    owner, distance = near_duplicates(hashes, np.arange(400), np.ones(400, np.uint64), MAX)
    assert (owner[:200] == -1).all()                               # every original is kept
    found = owner[200:] == np.arange(200)
    assert found.mean() >= 0.95, {KINDS[k]: float(found[k::4].mean()) for k in range(4)}
    assert (owner[200:][~found] == -1).all()                      # a miss is kept, not misnamed
    assert (distance[200:][found] <= MAX).all()
    # interleaved (each copy right after its original) the answer is the same
    rank = np.concatenate([np.arange(200) * 2, np.arange(200) * 2 + 1])
    again, _ = near_duplicates(hashes, rank, np.ones(400, np.uint64), MAX)
    assert (again == owner).all()


def test_a_thousand_distinct_images_are_all_kept():
    hashes = np.array([phash(encode(img)) for img in distinct(1000, seed=11)], dtype=np.uint64)
    owner, _ = near_duplicates(hashes, np.arange(1000), np.ones(1000, np.uint64), MAX)
    assert (owner == -1).all()


def brute_force(hashes, rank, group, limit):
    """The keep rule over every pair, in corpus order: the reference the LSH search must match."""
    n = len(hashes)
    owner = np.full(n, -1)
    by_rank = np.argsort(rank, kind="stable")
    for j in by_rank:
        for i in by_rank:
            if rank[i] >= rank[j]:
                break
            far = max(int(hashes[i, 0] ^ hashes[j, 0]).bit_count(),
                      int(hashes[i, 1] ^ hashes[j, 1]).bit_count())
            if owner[i] == -1 and group[i] == group[j] and far <= limit:
                owner[j] = i
                break
    return owner


def flip(rng, h, k):
    bits = rng.choice(64, k, replace=False).astype(np.uint64)
    return h ^ np.bitwise_or.reduce(np.uint64(1) << bits, initial=np.uint64(0))


def test_the_search_finds_what_comparing_every_pair_finds():
    rng = np.random.default_rng(3)
    base = rng.integers(0, 2**63, (150, 2), dtype=np.uint64) * 2 + rng.integers(0, 2, (150, 2), dtype=np.uint64)
    near = []
    for p, d in base[:100]:      # copies at distance 0..MAX on each half, a few just beyond it
        near.append([flip(rng, p, int(rng.integers(0, MAX + 3))),
                     flip(rng, d, int(rng.integers(0, MAX + 3)))])
    for p, d in base[100:120]:   # phash close, dhash far: not copies
        near.append([flip(rng, p, 2), flip(rng, d, 20)])
    hashes = np.concatenate([base, np.array(near, dtype=np.uint64)])
    n = len(hashes)
    rank = rng.permutation(n)
    group = rng.integers(0, 2, n).astype(np.uint64)              # two texts: a match needs both
    owner, distance = near_duplicates(hashes, rank, group, MAX)
    assert (owner == brute_force(hashes, rank, group, MAX)).all()
    assert (owner >= 0).sum() > 30 and (distance <= MAX).all()
    # the input's order is not the corpus's: shuffling the arrays changes nothing
    perm = rng.permutation(n)
    shuffled, _ = near_duplicates(hashes[perm], rank[perm], group[perm], MAX)
    back = np.where(shuffled >= 0, perm[np.maximum(shuffled, 0)], -1)
    assert (back == owner[perm]).all()


def test_copies_of_one_record_identical_runs_and_extra_images():
    h = np.array([[5, 1], [5, 1], [5, 1], [5, 1], [2**40, 1]], dtype=np.uint64)
    rank = np.array([0, 0, 1, 2, 3])                            # 0 and 1: two copies of a record
    owner, _ = near_duplicates(h, rank, np.zeros(5, np.uint64), 2)
    assert owner.tolist() == [-1, -1, 0, 0, -1]
    # two-image samples: the second images must match too
    more = {0: np.array([[7, 7]], np.uint64), 1: np.array([[7 ^ 1, 7]], np.uint64),
            2: np.array([[2**50, 7]], np.uint64)}
    h = np.array([[9, 9]] * 3, dtype=np.uint64)
    owner, distance = near_duplicates(h, np.arange(3), np.full(3, 2, np.uint64), 2, more)
    assert owner.tolist() == [-1, 0, -1] and distance[1] == 1
