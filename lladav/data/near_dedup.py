"""Near-duplicate images: which samples repeat an earlier one's images up to resizing,
re-encoding or a slight crop, by a perceptual hash.

Each image has a perceptual hash of two 64-bit halves (`images.perceptual_hash`: imagehash's
DCT phash and its difference hash). Two images are copies when both halves are within
`max_distance` bits (Hamming) of the other's; two samples are near-duplicates when they hold the
same number of images, each a copy of the other's, and (with `compare: images_and_text`) their
normalized texts are the same. Of a set of near-duplicates the one first in the corpus is kept
(as exact dedup keeps it): a sample is refused when a kept sample before it is its near-duplicate.

Finding the pairs without comparing every pair (10M images are 5e13 pairs): samples whose group
(text key, image count) and first image's hash are identical collapse onto the first of them (a
corpus's blank or placeholder images would otherwise make one huge bucket); the rest go through
bit-sampling LSH: each of L tables keys a sample by B fixed bit positions of its first image's
phash (with its group), and samples that share a key in any table are candidates, verified exactly. A pair at
distance d shares one table's key with probability p = (1 - d/64)^B, so it is found with
probability 1 - (1 - p)^L; `lsh_shape` picks B = 24 (16 above d = 8) and the L that makes that
0.99 at d = max_distance, at most 128 tables (d = 8: L = 112; d = 12: L = 126; d = 16: recall 0.72).
Closer pairs are found more surely. In a bucket larger than `WINDOW` samples each is compared with
the `WINDOW` before it only, which bounds the work at n x L x WINDOW comparisons (10M samples,
d = 8: about four minutes of sorting on one core). The tables are fixed (not seeded by the
recipe), so the result is a function of the hashes and the corpus order alone: the same with any
number of workers, and with any seed.

Owns: the pair search and the keep rule. Does not own: computing hashes (data/images.py) or
the reject rows (data/build.py).
"""

from __future__ import annotations

import math

import numpy as np

WINDOW = 64
MAX_TABLES = 128
RECALL = 0.99
_TABLE_SEED = 0x11ADA5  # fixed: the tables are part of the algorithm, not of a recipe


def lsh_shape(max_distance: int) -> tuple[int, int]:
    """(bits per table, tables) for a pair at `max_distance` to be found with RECALL."""
    bits = 24 if max_distance <= 8 else 16
    p = (1 - max_distance / 64) ** bits
    if p >= 1:  # d = 0: identical hashes always share every key
        return bits, 1
    tables = math.ceil(math.log(1 - RECALL) / math.log1p(-p))
    return bits, max(1, min(MAX_TABLES, tables))


def _tables(max_distance: int) -> list[np.ndarray]:
    bits, tables = lsh_shape(max_distance)
    rng = np.random.default_rng(_TABLE_SEED)
    return [np.sort(rng.choice(64, bits, replace=False)).astype(np.uint64) for _ in range(tables)]


def _sample_bits(hashes: np.ndarray, bits: np.ndarray) -> np.ndarray:
    out = np.zeros(len(hashes), dtype=np.uint64)
    for k, b in enumerate(bits):
        out |= ((hashes >> b) & np.uint64(1)) << np.uint64(k)
    return out


def _run_pairs(key_a: np.ndarray, key_b: np.ndarray, rank: np.ndarray, idx: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (earlier, later) of `idx` that share (key_a, key_b), each compared with at most the
    WINDOW before it in rank order."""
    order = np.lexsort((rank, key_b, key_a))
    ka, kb, members = key_a[order], key_b[order], idx[order]
    firsts, seconds = [], []
    for s in range(1, WINDOW + 1):
        same = (ka[:-s] == ka[s:]) & (kb[:-s] == kb[s:])
        if not same.any():
            break
        firsts.append(members[:-s][same])
        seconds.append(members[s:][same])
    if not firsts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(firsts), np.concatenate(seconds)


def near_duplicates(hashes: np.ndarray, rank: np.ndarray, group: np.ndarray, max_distance: int,
                    more: dict[int, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(owner, distance) per sample: owner[i] is the index of the kept sample that i is a
    near-duplicate of (-1: kept), distance the largest image Hamming distance to it.

    hashes: (n, 2) uint64, each sample's first image's (phash, dhash). rank: (n,) int64, the
    corpus order (equal for the copies of one record, which are never each other's
    duplicates). group: (n,) uint64, what must match exactly (the image count, and the text
    when compared). more: sample index -> (m, 2) uint64 hashes of its images after the first.
    Distance: the largest Hamming distance of any half of any image.
    """
    n = len(hashes)
    more = more or {}
    owner = np.full(n, -1, dtype=np.int64)
    distance = np.zeros(n, dtype=np.int64)
    if n < 2:
        return owner, distance
    idx = np.arange(n, dtype=np.int64)
    # 1. identical (group, hash) of one-image samples collapse onto the first in corpus order
    single = np.ones(n, dtype=bool)
    single[np.fromiter(more, dtype=np.int64, count=len(more))] = False
    order = np.lexsort((rank, hashes[:, 1], hashes[:, 0], group))
    g, h, r = group[order], hashes[order], rank[order]
    head = np.ones(n, dtype=bool)
    head[1:] = ((g[1:] != g[:-1]) | (h[1:] != h[:-1]).any(axis=1) | ~single[order][1:]
                | ~single[order][:-1])
    head_of = order[np.maximum.accumulate(np.where(head, np.arange(n), 0))]
    collapsed = (head_of != order) & (rank[head_of] != r)
    rep = np.full(n, -1, dtype=np.int64)
    rep[order[collapsed]] = head_of[collapsed]
    live = idx[rep < 0]
    # 2. candidate pairs among the representatives, verified exactly
    firsts, seconds = [], []
    for bits in _tables(max_distance):
        a, b = _run_pairs(group[live], _sample_bits(hashes[live, 0], bits), rank[live], live)
        firsts.append(a)
        seconds.append(b)
    a, b = np.concatenate(firsts), np.concatenate(seconds)
    keep = rank[a] != rank[b]
    a, b = a[keep], b[keep]
    if len(a):
        pair = np.unique(np.minimum(a, b) * n + np.maximum(a, b))
        a, b = pair // n, pair % n
    dist = np.bitwise_count(hashes[a] ^ hashes[b]).max(axis=1, initial=0).astype(np.int64)
    for k in np.flatnonzero(dist <= max_distance):
        i, j = int(a[k]), int(b[k])
        if i in more or j in more:
            none = np.zeros((0, 2), np.uint64)
            mi, mj = more.get(i, none), more.get(j, none)
            extra = np.bitwise_count(mi ^ mj) if len(mi) == len(mj) else np.array([99])
            dist[k] = max(dist[k], int(extra.max(initial=0)))
    ok = dist <= max_distance
    a, b, dist = a[ok], b[ok], dist[ok]
    # 3. the keep rule, in corpus order: a sample goes if a kept sample before it matches it
    early = rank[a] > rank[b]
    a[early], b[early] = b[early].copy(), a[early].copy()
    walk = np.lexsort((rank[a], rank[b]))
    kept = np.ones(n, dtype=bool)
    for k in walk.tolist():
        i, j = int(a[k]), int(b[k])
        if kept[i] and kept[j]:
            kept[j], owner[j], distance[j] = False, i, dist[k]
    # 4. the collapsed samples follow their representative, or the sample it went to
    for j in np.flatnonzero(rep >= 0).tolist():
        i = int(rep[j])
        owner[j], distance[j] = (i, 0) if kept[i] else (int(owner[i]), int(distance[i]))
    return owner, distance


def matches(queries: np.ndarray, corpus: np.ndarray, max_distance: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (query, corpus) pair of images that are copies: (query index, corpus index,
    distance), sorted. queries (q, 2), corpus (m, 2) uint64 hashes. The same tables as
    `near_duplicates` (same recall), without its window: every corpus image sharing a key with a
    query is verified (contamination wants them all; q is an eval set, small)."""
    found_q, found_c = [], []
    if len(queries) and len(corpus):
        for bits in _tables(max_distance):
            ck = _sample_bits(corpus[:, 0], bits)
            order = np.argsort(ck, kind="stable")
            ck = ck[order]
            qk = _sample_bits(queries[:, 0], bits)
            lo, hi = np.searchsorted(ck, qk, "left"), np.searchsorted(ck, qk, "right")
            for hit in np.flatnonzero(hi > lo).tolist():
                found_c.append(order[lo[hit]:hi[hit]])
                found_q.append(np.full(hi[hit] - lo[hit], hit, dtype=np.int64))
    if not found_q:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    pair = np.unique(np.concatenate(found_q) * len(corpus) + np.concatenate(found_c))
    q, c = pair // len(corpus), pair % len(corpus)
    dist = np.bitwise_count(queries[q] ^ corpus[c]).max(axis=1).astype(np.int64)
    ok = dist <= max_distance
    return q[ok], c[ok], dist[ok]
