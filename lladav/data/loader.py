"""The training loader: a committed mixture -> per-rank batches, resumable to the exact batch.

Stages, each a function below:
    order   epoch_order: a pure function of (manifest keys and shards, seed, epoch, block size);
            world size and worker count never enter it. `global`: the keys sorted by
            sha256(seed, "epoch", epoch, key). `block` (the stages' default, config.Shuffle):
            the shards sorted by sha256(seed, "shards", epoch, name) and cut into blocks of
            block_shards, then the samples sorted by (block, the same per-key hash), so a stretch
            of the order reads at most one block's shards (two across a boundary)
    batch   epoch_batches: the order cut into micro-batches of `batch_size` (optionally grouped
            by length, below), then one short tail batch if the count does not divide
    split   rank_batches: global batch g goes to rank g % world_size; worker_positions: a rank's
            DataLoader worker w decodes its remaining positions start+w, start+w+nw, ... (counted
            from the resume point, so torch's round-robin hands them over in order)
    read    data/shard_cache.py: a shard is read from the node's shared cache folder, downloaded
            from S3 once per node (verified against its mixture.json sha256 as it is written) or,
            for a local mixture, read in place and verified once per node; a prefetch thread
            fetches the next shards in this rank's order ahead of use, and a byte cap evicts the
            least recently used shards no loader holds; tar members are indexed per shard (a
            small LRU) and samples read by offset while the shard is pinned
    decode  ids/targets .npy and images -> tiles (data/images.image_tiles) -> collate: each
            sample's EOS tail (config.EndOfAnswer, eos_tail_length), then batch padding

Why an order read by random access: every world size and worker count sees the same micro-batch
sequence, and resume is (epoch, position) rather than offsets into shard streams. Why blocks:
a global order touches every shard in every stretch, so a node had to hold the whole mixture
(and fetched it all before the first batch); the block order needs about 2 x block_shards +
prefetch_shards shards on disk, whatever the size of the mixture, and the cache cap changes
only what is on disk, never the batches. A mixture of at most block_shards shards gets exactly
the global order. Why round-robin: a global step takes batches g..g+world_size-1 from one
stretch of the order.

drop_last (default True) keeps the first floor(n_full / step_batches) * step_batches full
batches, step_batches being the micro-batches of one optimizer step over all ranks (world size x
accumulation; default the world size): every rank gets the same count (ZeRO-3 ranks step
together), and a run at 2 workers x 1 accumulation and one at 1 x 2 use the same batches each
epoch (elastic resume); which samples fall off changes every epoch. drop_last=False keeps every batch, the tail too; rank counts may then differ by one.

Length grouping: the full batches' part of the order is cut into windows of batch_size *
group_window samples (not scaled by world size, so the batch sequence stays independent of it);
each window is sorted by length bucket (manifest n_tokens within 5%, `length_bucket`; the
epoch's random order within a bucket, so equal lengths do not make one-answer batches) and cut
into batches, which are then put in seeded-hash order within the window so the long ones are
not all last. No sample moves out of its window (keep a window well under a block's samples).
Padding fraction over spliced lengths (text + image tokens): 4096 log-normal stage-2-like
lengths, batch 8, window 32: 0.51 -> 0.05 (tests/unit/test_loader_order.py); the synthetic
mixture of tests/integration/test_loader.py (99 samples), batch 4, window 4: 0.13 -> 0.07.

Resume: state_dict() = identity + {epoch, position, world_size}; position is this rank's next
batch in the epoch (global index position * world_size + rank). The world size is not part of
the identity: a state saved at world size w resumes at w' when the global batches consumed,
position x w, are a multiple of w' (they are at any optimizer-step boundary of the same
step_batches), at position x w / w'. It advances when a batch is handed to the
consumer, never when a worker prefetches one; in lockstep every rank holds the same state. The
identity names the order ("global", or "block:N"; a state without it is from the global order).

Owns: order, split, the read path over the shard cache, decoding, tiling and collation. Does
not own: the cache folder, its locks and cap (data/shard_cache.py), splicing image features or
the spliced labels (model/lladav.py, train/step.py), or what a shard holds (data/build.py).
Never substitutes a sample: a bad shard is an error naming it.
"""

from __future__ import annotations

import io
import math
import os
import tarfile
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch

from lladav import storage
from lladav.config import EndOfAnswer, Packing, ShardCacheSettings, Shuffle, VisionGeometry
from lladav.data import manifest as mf
from lladav.data.conversation import ANSWER_TARGET, IMAGE_PLACEHOLDER_ID, NOT_TARGET
from lladav.data.images import decode_rgb, image_tiles
from lladav.data.shard_cache import Prefetcher, ShardCache, ShardError, ShardRef, ShardUse
from lladav.digest import hash_key, hash_unit, sha256_bytes

STATE_FORMAT = "lladav.loader/1"
INDEX_SLOTS_MIN = 16  # tar indexes kept per process: the working set's shards, at least this many


# ---- order and split: pure functions of the manifest ------------------------------------------

def shard_blocks(shards: Sequence[str], seed: int, epoch: int, block_shards: int
                 ) -> dict[str, int]:
    """Each shard's block in `epoch`: the distinct shard names sorted by sha256(seed, "shards",
    epoch, name), cut into consecutive runs of `block_shards` (the last may be shorter)."""
    ordered = sorted(set(shards), key=lambda s: hash_key(seed, "shards", epoch, s))
    return {s: i // block_shards for i, s in enumerate(ordered)}


def epoch_order(keys: Sequence[str], seed: int, epoch: int, shard_of: Sequence[str] | None = None,
                block_shards: int = 0) -> list[int]:
    """Indices into `keys` in this epoch's order.

    block_shards == 0 (or no `shard_of`): the global order, keys sorted by sha256(seed, "epoch",
    epoch, key). Otherwise the block order: sorted by (the block of the sample's shard,
    shard_blocks; the same per-key hash), so each block's samples are contiguous and shuffled
    among themselves. With one block (block_shards >= the shard count) both orders are equal.
    """
    def sample_key(i: int) -> str:
        return hash_key(seed, "epoch", epoch, keys[i])

    if block_shards > 0 and shard_of is not None:
        block = shard_blocks(shard_of, seed, epoch, block_shards)
        return sorted(range(len(keys)), key=lambda i: (block[shard_of[i]], sample_key(i)))
    return sorted(range(len(keys)), key=sample_key)


LENGTH_TOLERANCE = 0.05
"""Length grouping sorts by length buckets 5% wide, not by exact length (see length_bucket)."""


def length_bucket(n_tokens: int, tolerance: float = LENGTH_TOLERANCE) -> int:
    """The length bucket grouping sorts by: lengths within a factor (1 + tolerance) share one.

    Not the exact length: in a corpus of short answers, equal lengths come from the same
    question wording (and often the same answer), and batches cut from a run of equal lengths
    are all alike. Measured on a 10-colour corpus of 2,000 images (tiny flavour, micro-batch 32,
    400 steps, in-process): exact-length grouping left the model at chance (10%), 5% buckets
    reached 48/59/71% (seeds 0/1/2), ungrouped batches 93/93/85%. Within a bucket the epoch's
    random order stays; 4096 log-normal lengths pad 4.9% (exact: 4.0%, 10% buckets: 6.2%)."""
    return int(math.log(max(n_tokens, 1)) / math.log1p(tolerance))


def epoch_batches(keys: Sequence[str], n_tokens: Sequence[int], seed: int, epoch: int,
                  batch_size: int, group_window: int = 0, shard_of: Sequence[str] | None = None,
                  block_shards: int = 0) -> list[list[int]]:
    """The epoch's micro-batches (indices into `keys`); group_window > 0 groups by length
    within windows of the order (epoch_order's, global or block)."""
    order = epoch_order(keys, seed, epoch, shard_of, block_shards)
    n_full = len(order) // batch_size * batch_size
    body, tail = order[:n_full], order[n_full:]
    window = batch_size * group_window if group_window > 0 else n_full
    batches: list[list[int]] = []
    for w, start in enumerate(range(0, n_full, max(window, 1))):
        part = body[start:start + window]
        if group_window > 0:  # stable: the epoch's random order within a bucket
            part = sorted(part, key=lambda i: length_bucket(n_tokens[i]))
        cut = [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
        if group_window > 0:
            cut.sort(key=lambda b: hash_key(seed, "window", epoch, w, keys[b[0]]))
        batches += cut
    return batches + ([tail] if tail else [])


def pack_batches(keys: Sequence[str], lengths: Sequence[int], seed: int, epoch: int,
                 rows_per_batch: int, budget: int, window: int,
                 shard_of: Sequence[str] | None = None, block_shards: int = 0
                 ) -> list[list[list[int]]]:
    """The epoch's packed micro-batches: each a list of `rows_per_batch` rows (the last batch
    maybe fewer), each row a list of sample indices whose `lengths` sum to at most `budget`.

    The epoch order (epoch_order) is cut into windows of `window` samples; each window is packed
    first-fit by decreasing length (ties in epoch order), and its rows are put in seeded-hash
    order. World size and workers never enter, so packs are the same at any world size. A sample
    longer than the budget is an error naming it.
    """
    too_long = [i for i in range(len(keys)) if lengths[i] > budget]
    if too_long:
        worst = max(too_long, key=lambda i: lengths[i])
        raise ValueError(f"packing: {len(too_long)} sample(s) longer than token_budget {budget}, "
                         f"e.g. {keys[worst]} with {lengths[worst]} tokens; raise the budget")
    order = epoch_order(keys, seed, epoch, shard_of, block_shards)
    rows: list[list[int]] = []
    for w, start in enumerate(range(0, len(order), window)):
        part = sorted(order[start:start + window], key=lambda i: -lengths[i])
        used: list[int] = []
        packed: list[list[int]] = []
        for i in part:
            slot = next((r for r, u in enumerate(used) if u + lengths[i] <= budget), None)
            if slot is None:
                used.append(0)
                packed.append([])
                slot = len(packed) - 1
            used[slot] += lengths[i]
            packed[slot].append(i)
        packed.sort(key=lambda r: hash_key(seed, "pack", epoch, w, keys[r[0]]))
        rows += packed
    return [rows[j:j + rows_per_batch] for j in range(0, len(rows), rows_per_batch)]


def rank_batches(batches: Sequence[Sequence[int]], batch_size: int, rank: int, world_size: int,
                 drop_last: bool = True, step_batches: int | None = None) -> list[int]:
    """Global batch indices of `rank`: g % world_size == rank (see drop_last in the module doc)."""
    n = len(batches)
    if drop_last:
        n_full = sum(len(b) == batch_size for b in batches)
        multiple = step_batches or world_size
        n = n_full // multiple * multiple
    return list(range(rank, n, world_size))


def worker_positions(n_rank_batches: int, start: int, worker: int, num_workers: int) -> list[int]:
    """This worker's positions in the rank's batch list, from `start` on.

    Counted from `start`, not from 0, so the DataLoader's round-robin over workers hands batches
    over in position order after a resume too; which worker decodes a batch never changes it.
    """
    return list(range(start + worker, n_rank_batches, max(num_workers, 1)))


def eos_tail_length(policy: EndOfAnswer, seed: int, epoch: int, key: str) -> int:
    """EOS targets after sample `key` in `epoch` under `policy`: 0 for pad_to_longest, else
    eos_tokens, or a draw uniform in [min_eos_tokens, eos_tokens] from sha256(seed, "eos", epoch,
    key) alone: a sample's tail never depends on its batch, its rank or its loader worker."""
    if policy.policy != "eos_tail":
        return 0
    low = policy.eos_tokens if policy.min_eos_tokens is None else policy.min_eos_tokens
    span = policy.eos_tokens - low + 1
    return low + min(int(hash_unit(seed, "eos", epoch, key) * span), span - 1)


def padding_fraction(batches: Sequence[Sequence[int]], n_tokens: Sequence[int]) -> float:
    """Pad tokens / all tokens when each batch (indices into `n_tokens`, one row each) is padded
    to its longest row: the one padding rule, for samples (unpacked) and packed rows alike."""
    pad = total = 0
    for b in batches:
        longest = max(n_tokens[i] for i in b)
        pad += sum(longest - n_tokens[i] for i in b)
        total += longest * len(b)
    return pad / total if total else 0.0


# ---- read: shards pinned in the node's cache, random access by tar offsets ---------------------

@dataclass(frozen=True)
class _Shard:
    uri: str
    sha256: str
    path: str                                          # local, verified, pinned while read
    members: dict[str, dict[str, tuple[int, int]]]     # key -> {suffix: (offset, size)}

    def error(self, what: str) -> ShardError:
        return ShardError(f"shard {self.uri} (sha256 {self.sha256}): {what}")


def _index(ref: ShardRef, path: str) -> dict[str, dict[str, tuple[int, int]]]:
    """A shard's tar members: key -> {suffix: (data offset, size)}."""
    members: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if m.isfile():
                    key, _, suffix = m.name.partition(".")
                    members.setdefault(key, {})[suffix] = (m.offset_data, m.size)
    except (OSError, tarfile.TarError) as e:
        raise ref.error(f"not a readable tar: {e}") from e
    return members


class _Reader:
    """Samples' raw bytes by (shard name, key in it): the shard pinned in the cache only while
    its members are read, its tar index kept in a small LRU (content-addressed, so an index
    outlives an eviction and a new download of the same bytes)."""

    def __init__(self, cache: ShardCache, refs: dict[str, ShardRef], index_slots: int):
        self.cache, self.refs, self.index_slots = cache, refs, index_slots
        self._indexes: OrderedDict[str, dict[str, dict[str, tuple[int, int]]]] = OrderedDict()

    def read(self, name: str, key: str) -> tuple[_Shard, tuple[bytes, bytes, list[bytes]]]:
        ref = self.refs[name]
        with self.cache.pin(ref) as path:
            members = self._indexes.get(ref.sha256)
            if members is None:
                members = _index(ref, path)
                self._indexes[ref.sha256] = members
                if len(self._indexes) > self.index_slots:
                    self._indexes.popitem(last=False)
            else:
                self._indexes.move_to_end(ref.sha256)
            shard = _Shard(ref.uri, ref.sha256, path, members)
            return shard, _read_sample(shard, key)


def _read_sample(shard: _Shard, key: str) -> tuple[bytes, bytes, list[bytes]]:
    """One sample's ids.npy and targets.npy bytes and its images' bytes, by tar member offsets."""
    members = shard.members.get(key)
    if members is None:
        raise shard.error(f"sample {key} is not in the shard")
    try:
        fd = os.open(shard.path, os.O_RDONLY)  # one per sample: thousands of shards, few fds

        def read(suffix: str) -> bytes:
            offset, size = members[suffix]
            return os.pread(fd, size, offset)

        try:
            names = sorted((s for s in members if s.startswith("img")),
                           key=lambda s: int(s[3:].partition(".")[0]))
            return read("ids.npy"), read("targets.npy"), [read(s) for s in names]
        finally:
            os.close(fd)
    except (OSError, KeyError, ValueError) as e:
        raise shard.error(f"sample {key} is unreadable: {type(e).__name__}: {e}") from e


# ---- decode, tile, batch ----------------------------------------------------------------------

@dataclass
class Batch:
    """One rank's micro-batch. ids/targets are text-level (images are spliced by the model).

    Row b holds sample b's ids, then its EOS tail (EndOfAnswer, targets), then batch padding up
    to the longest row: `lengths[b]` counts the first two. With `pads_are_targets` (the
    reference's pad_to_longest) the padding is EOS targets that everything attends to;
    otherwise it is inert: no target, and the model is given an attention mask hiding it.
    """

    ids: torch.Tensor                          # (B, L) long, right-padded with EOS
    targets: torch.Tensor                      # (B, L) bool
    answer: torch.Tensor                       # (B, L) bool: targets in the assistant's words
    images: list[list[torch.Tensor]]           # per sample, per image: (n_tiles, 3, T, T) float32
    image_sizes: list[list[tuple[int, int]]]   # per sample, per image: (W, H)
    keys: list[str]
    n_tokens: list[int]                        # spliced lengths (text + image tokens), manifest
    epoch: int
    index: int                                 # global batch index in the epoch
    position: int                              # this rank's batch position in the epoch
    lengths: list[int] | None = None           # text positions of each sample incl. its EOS tail
    pads_are_targets: bool = True
    packs: list[list[int]] | None = None       # packed: the samples of each row, in row order
    eos_tails: list[int] | None = None         # each sample's EOS tail length

    @property
    def padding_fraction(self) -> float:
        """Padding / all positions the model runs over: unpacked, each row padded to the longest
        spliced sample; packed, each row (samples with their EOS tails) to the longest row."""
        if self.packs is None:
            return padding_fraction([range(len(self.n_tokens))], self.n_tokens)
        tails = self.eos_tails or [0] * len(self.n_tokens)
        own = [n + t for n, t in zip(self.n_tokens, tails)]
        rows = [sum(own[i] for i in row) for row in self.packs]
        return padding_fraction([range(len(rows))], rows)


@dataclass(frozen=True)
class _Planned:
    epoch: int
    index: int
    position: int
    samples: tuple[tuple[str, str, int, int], ...]   # (key, shard name, n_tokens, n_images)
    members: tuple[str, ...] | None = None           # keys inside the shards, when not `key` (a view)
    rows: tuple[tuple[int, ...], ...] | None = None  # packed: indices into samples, per row


_Decoded = tuple[np.ndarray, np.ndarray, list[torch.Tensor], list[tuple[int, int]]]


def _decode(shard: _Shard, key: str, raw: tuple[bytes, bytes, list[bytes]], n_images: int,
            geometry: VisionGeometry, aspect: str) -> _Decoded:
    """One sample's ids, targets, image tiles and image sizes from its raw member bytes."""
    ids_bytes, targets_bytes, blobs = raw
    try:
        ids = np.load(io.BytesIO(ids_bytes), allow_pickle=False)
        targets = np.load(io.BytesIO(targets_bytes), allow_pickle=False)
        pictures = [decode_rgb(b) for b in blobs]
        tiles = [torch.from_numpy(image_tiles(p, geometry, aspect, len(pictures)))
                 for p in pictures]
    except Exception as e:  # numpy, PIL, OSError and KeyError all mean: this sample is unreadable
        raise shard.error(f"sample {key} is unreadable: {type(e).__name__}: {e}") from e
    n_slots = int((ids == IMAGE_PLACEHOLDER_ID).sum())
    if ids.shape != targets.shape or len(pictures) != n_images or n_slots != n_images:
        raise shard.error(f"sample {key}: {ids.shape} ids, {targets.shape} targets, "
                          f"{len(pictures)} images, {n_slots} placeholders, manifest {n_images}")
    return ids, targets, tiles, [p.size for p in pictures]


def _collate(samples: list[_Decoded], eos_id: int, planned: _Planned, policy: EndOfAnswer,
             seed: int) -> Batch:
    """Each sample's ids + its EOS tail (targets), then EOS padding to the longest row: targets
    and attended under pad_to_longest, inert under eos_tail (see Batch)."""
    keys = [k for k, _, _, _ in planned.samples]
    lengths = [len(s[0]) + eos_tail_length(policy, seed, planned.epoch, key)
               for s, key in zip(samples, keys)]
    pads_are_targets = policy.policy == "pad_to_longest"
    length = max(lengths)
    ids = torch.full((len(samples), length), eos_id, dtype=torch.long)
    targets = torch.full((len(samples), length), pads_are_targets, dtype=torch.bool)
    answer = torch.zeros((len(samples), length), dtype=torch.bool)
    for row, ((sample_ids, codes, _, _), own) in enumerate(zip(samples, lengths)):
        n = len(sample_ids)
        ids[row, :n] = torch.from_numpy(sample_ids.astype(np.int64))
        targets[row, :n] = torch.from_numpy(codes != NOT_TARGET)
        targets[row, n:own] = True                         # the sample's own EOS tail
        answer[row, :n] = torch.from_numpy(codes == ANSWER_TARGET)
    packs = [list(r) for r in planned.rows] if planned.rows is not None else None
    return Batch(ids, targets, answer, [s[2] for s in samples], [s[3] for s in samples], keys,
                 [n for _, _, n, _ in planned.samples], planned.epoch, planned.index,
                 planned.position, lengths, pads_are_targets, packs,
                 [own - len(s[0]) for s, own in zip(samples, lengths)])


class _EpochStream(torch.utils.data.IterableDataset):
    """A rank's remaining batches of one epoch; in a DataLoader each worker takes its share."""

    def __init__(self, plan: list[_Planned], start: int, reader: _Reader, eos_id: int,
                 geometry: VisionGeometry, aspect: str, num_workers: int, policy: EndOfAnswer,
                 seed: int):
        self.plan, self.start, self.reader, self.eos_id = plan, start, reader, eos_id
        self.geometry, self.aspect, self.num_workers = geometry, aspect, num_workers
        self.policy, self.seed = policy, seed

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        for pos in worker_positions(len(self.plan), self.start, worker, self.num_workers):
            planned = self.plan[pos]
            members = planned.members or [key for key, _, _, _ in planned.samples]
            samples = [self._sample(shard, member, n_images)
                       for (_, shard, _, n_images), member in zip(planned.samples, members)]
            yield _collate(samples, self.eos_id, planned, self.policy, self.seed)

    def _sample(self, shard_name: str, key: str, n_images: int) -> _Decoded:
        shard, raw = self.reader.read(shard_name, key)   # pinned only while its bytes are read
        return _decode(shard, key, raw, n_images, self.geometry, self.aspect)


def _row_slices(rows: list[list[int]]) -> tuple[tuple[int, ...], ...]:
    """Rows of sample indices -> the same rows as positions in the batch's flat sample list."""
    out, k = [], 0
    for row in rows:
        out.append(tuple(range(k, k + len(row))))
        k += len(row)
    return tuple(out)


def _as_is(batch: Batch) -> Batch:
    return batch


# ---- the loader -------------------------------------------------------------------------------

class MixtureLoader:
    """Batches of one rank over a committed mixture; iterate once per epoch, resume by state.

    `for batch in loader` yields the rest of the current epoch and then moves to the next
    epoch, so `for epoch in range(n): for batch in loader: ...` trains n epochs; `loader.epoch`
    says where it stands. Stop anywhere, save `state_dict()`, and a new loader given
    `load_state_dict(state)` continues with exactly the batch that would have come next.

    `shuffle` picks the order (config.Shuffle; default the block order), `shard_cache` the
    node's cache folder, its byte cap and the prefetch window (config.ShardCacheSettings);
    `cache` is this loader's view of that folder (its `stats` count this process's downloads).
    """

    def __init__(self, mixture_uri: str, *, batch_size: int, rank: int, world_size: int,
                 num_workers: int, seed: int = 0, geometry: VisionGeometry | None = None,
                 aspect: str | None = None, group_by_length: bool = False, group_window: int = 32,
                 drop_last: bool = True, prefetch_factor: int = 2,
                 end_of_answer: EndOfAnswer | None = None, shuffle: Shuffle | None = None,
                 shard_cache: ShardCacheSettings | None = None, packing: Packing | None = None,
                 step_batches: int | None = None):
        if not (0 <= rank < world_size) or min(batch_size, group_window) < 1 or num_workers < 0:
            raise ValueError(f"need 0 <= rank={rank} < world_size={world_size}, batch_size="
                             f"{batch_size} >= 1, group_window={group_window} >= 1, num_workers="
                             f"{num_workers} >= 0")
        self.mixture = mf.open_mixture(mixture_uri)
        info = self.mixture.info
        built_geometry = self.mixture.geometry
        built_aspect = built_geometry.image_aspect
        self.geometry = geometry or built_geometry
        self.aspect = aspect or (geometry.image_aspect if geometry else None) or built_aspect
        if (self.geometry.model_dump(exclude={"image_aspect"}) !=
                built_geometry.model_dump(exclude={"image_aspect"})) or self.aspect != built_aspect:
            raise ValueError(f"{mixture_uri}: built for {built_geometry!r}, aspect {built_aspect!r}"
                             f", but asked for {self.geometry!r}, aspect {self.aspect!r}; the "
                             "manifest's token counts hold only for the former (rebuild it)")
        raw = storage.read_bytes(storage.join(mixture_uri, mf.MANIFEST))
        if sha256_bytes(raw) != info["manifest"]["sha256"]:
            raise ShardError(f"{mixture_uri}/{mf.MANIFEST}: sha256 differs from mixture.json's "
                             f"{info['manifest']['sha256']}; the mixture is damaged")
        manifest = pq.read_table(io.BytesIO(raw),
                                 columns=["key", "shard", "n_tokens", "image_widths",
                                          *(["member"] if isinstance(self.mixture, mf.View) else [])])
        self.keys: list[str] = manifest["key"].to_pylist()
        self.shard_of: list[str] = manifest["shard"].to_pylist()
        self.n_tokens: list[int] = manifest["n_tokens"].to_pylist()
        self.n_images = [len(w) for w in manifest["image_widths"].to_pylist()]
        # A view's rows read other mixtures' shards (full URIs) under their own keys there.
        self.member_of: list[str] | None = (manifest["member"].to_pylist()
                                            if "member" in manifest.column_names else None)
        self.eos_id = int(info["tokenizer"]["special_ids"]["eos"])
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers, self.seed, self.prefetch_factor = num_workers, seed, prefetch_factor
        self.group_window = group_window if group_by_length else 0
        self.drop_last = drop_last
        self.step_batches = step_batches or world_size
        if self.step_batches % world_size:
            raise ValueError(f"step_batches {self.step_batches} is not a multiple of world_size "
                             f"{world_size}")
        self.end_of_answer = end_of_answer or EndOfAnswer()
        self.packing = packing
        if packing is not None and self.end_of_answer.policy != "eos_tail":
            raise ValueError("packing needs the eos_tail end-of-answer policy (config.Packing)")
        self._refs = {s["name"]: ShardRef(self.mixture.shard_uri(s["name"]), s["sha256"],
                                          int(s["bytes"])) for s in info["shards"]}
        self.shuffle = shuffle or Shuffle()
        n_shards = len(set(self.shard_of))
        # One block holding every shard is the global order: say so in the resume identity.
        self.block_shards = (self.shuffle.block_shards if self.shuffle.kind == "block"
                             and self.shuffle.block_shards < n_shards else 0)
        self.cache, self.prefetch_shards = self._shard_cache(shard_cache or ShardCacheSettings())
        self._epoch, self._position = 0, 0
        self._plans: dict[int, tuple[list[list[int]], list[_Planned]]] = {}
        if len(self) == 0:
            raise ValueError(f"{mixture_uri}: {len(self.keys)} samples give rank {rank} no batch "
                             f"of {batch_size} with world_size {world_size} (drop_last="
                             f"{drop_last}); use a smaller batch or fewer ranks")

    # -- plan --------------------------------------------------------------------------------
    def _plan(self, epoch: int) -> tuple[list[list[int]], list[_Planned]]:
        if epoch not in self._plans:
            packed: list[list[list[int]]] | None = None
            if self.packing is not None:
                lengths = [n + eos_tail_length(self.end_of_answer, self.seed, epoch, k)
                           for n, k in zip(self.n_tokens, self.keys)]
                packed = pack_batches(self.keys, lengths, self.seed, epoch, self.batch_size,
                                      self.packing.token_budget, self.packing.window,
                                      self.shard_of, self.block_shards)
                batches = [[i for row in rows for i in row] for rows in packed]
                # drop_last counts a batch as full by its rows, not its samples
                mine = rank_batches([[0] * len(rows) for rows in packed], self.batch_size,
                                    self.rank, self.world_size, self.drop_last, self.step_batches)
            else:
                batches = epoch_batches(self.keys, self.n_tokens, self.seed, epoch,
                                        self.batch_size, self.group_window, self.shard_of,
                                        self.block_shards)
                mine = rank_batches(batches, self.batch_size, self.rank, self.world_size,
                                    self.drop_last, self.step_batches)
            member_of = self.member_of
            plan = [_Planned(epoch, g, pos, tuple((self.keys[i], self.shard_of[i],
                                                   self.n_tokens[i], self.n_images[i])
                                                  for i in batches[g]),
                             tuple(member_of[i] for i in batches[g]) if member_of else None,
                             _row_slices(packed[g]) if packed is not None else None)
                    for pos, g in enumerate(mine)]
            self._plans = {epoch: (batches, plan)}  # keep one epoch's plan in memory
        return self._plans[epoch]

    def __len__(self) -> int:
        """This rank's batches per epoch (the same every epoch)."""
        return len(self._plan(self._epoch)[1])

    def padding_fraction(self, epoch: int | None = None) -> float:
        """Pad fraction over spliced lengths of all of an epoch's global batches (packed: over
        each batch's rows padded to its longest row, EOS tails counted as the samples')."""
        epoch = self._epoch if epoch is None else epoch
        batches, plan = self._plan(epoch)
        if self.packing is None:
            return padding_fraction(batches, self.n_tokens)
        own = {k: n + eos_tail_length(self.end_of_answer, self.seed, epoch, k)
               for p in plan for k, _, n, _ in p.samples}
        rows: list[int] = []        # every packed row's length, batch after batch
        batches_of_rows: list[range] = []
        for p in plan:   # this rank's batches: a sample of the epoch, like any rank's
            first = len(rows)
            rows += [sum(own[p.samples[i][0]] for i in row) for row in p.rows or ()]
            batches_of_rows.append(range(first, len(rows)))
        return padding_fraction(batches_of_rows, rows)

    # -- read --------------------------------------------------------------------------------
    def _shard_cache(self, settings: ShardCacheSettings) -> tuple[ShardCache, int]:
        """The node's cache under its cap: as set, or the block order's working set (shards
        open at once, up to two blocks, plus the prefetch window) times the largest shard."""
        largest = max(r.size for r in self._refs.values())
        limit = settings.limit_bytes
        if limit is None and self.shuffle.kind == "block":
            limit = (2 * self.shuffle.block_shards + settings.prefetch_shards) * largest
        if limit is not None and limit < 2 * largest:
            raise ValueError(f"shard_cache.limit_bytes {limit} is under two of the largest shard "
                             f"of {self.mixture.uri} ({largest} bytes): no room to read one "
                             "shard while the next arrives; raise it")
        return ShardCache(settings.folder, limit), settings.prefetch_shards

    def _uses(self, plan: list[_Planned], start: int) -> list[ShardUse]:
        """Each shard's first and last position in the rest of this rank's epoch."""
        first: dict[str, int] = {}
        last: dict[str, int] = {}
        for planned in plan[start:]:
            for _, shard, _, _ in planned.samples:
                first.setdefault(shard, planned.position)
                last[shard] = planned.position
        return [ShardUse(first[s], last[s], self._refs[s]) for s in first]

    # -- iterate and resume -------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self._epoch

    def __iter__(self) -> Iterator[Batch]:
        epoch, start = self._epoch, self._position
        plan = self._plan(epoch)[1]
        uses = self._uses(plan, start)
        reader = _Reader(self.cache, self._refs,
                         max(INDEX_SLOTS_MIN, 2 * (self.block_shards or len(uses))
                             + self.prefetch_shards))
        stream = _EpochStream(plan, start, reader, self.eos_id, self.geometry, self.aspect,
                              self.num_workers, self.end_of_answer, self.seed)
        source: Iterator[Batch] = iter(stream)
        if self.num_workers > 0:  # forks the workers now, before the prefetch threads start
            source = iter(torch.utils.data.DataLoader(
                stream, batch_size=None, num_workers=self.num_workers, collate_fn=_as_is,
                prefetch_factor=self.prefetch_factor))
        prefetcher = None
        if self.prefetch_shards > 0:
            prefetcher = Prefetcher(self.cache, uses, start, self.prefetch_shards,
                                    protect=self.block_shards > 0).start()
        try:
            for batch in source:
                if (batch.epoch, batch.position) != (self._epoch, self._position):
                    raise RuntimeError(f"loader out of order: got batch {batch.position} of epoch "
                                       f"{batch.epoch}, expected {self._position} of {self._epoch}")
                self._position += 1                 # counted when handed over, not prefetched
                if prefetcher is not None:
                    prefetcher.advance(self._position)
                if self._position == len(plan):
                    self._epoch, self._position = epoch + 1, 0
                yield batch
        finally:
            if prefetcher is not None:
                prefetcher.close()
            del source  # shuts DataLoader workers down when the consumer stops early

    def _identity(self) -> dict:
        return {"format": STATE_FORMAT, "mixture": self.mixture.digest, "seed": self.seed,
                "batch_size": self.batch_size, "step_batches": self.step_batches,
                "group_window": self.group_window, "drop_last": self.drop_last,
                **({"packing": self.packing.model_dump()} if self.packing else {}),
                "order": f"block:{self.block_shards}" if self.block_shards else "global"}

    def state_dict(self) -> dict:
        """JSON-able: where the next batch comes from, plus what must match to resume."""
        return {**self._identity(), "epoch": self._epoch, "position": self._position,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` stopped, at this loader's world size if it can (see Resume)."""
        # states saved before block orders / step_batches existed
        state = {"order": "global", "step_batches": state.get("world_size"), **state}
        wrong = {k: (state.get(k), v) for k, v in self._identity().items() if state.get(k) != v}
        if wrong:
            raise ValueError("loader state does not match this loader (saved, current): "
                             + ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in wrong.items()))
        consumed = int(state["position"]) * int(state["world_size"])   # global batches
        if consumed % self.world_size:
            raise ValueError(f"loader state: {consumed} global batches consumed at world size "
                             f"{state['world_size']} do not split over {self.world_size} ranks")
        position = consumed // self.world_size
        if not 0 <= position < len(self):
            raise ValueError(f"loader state: position {position} outside 0..{len(self) - 1}")
        self._epoch, self._position = int(state["epoch"]), position

