"""The training loader over a real built mixture: decoding, exact resume, corruption, S3."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lladav.config import EndOfAnswer, ShardCacheSettings, Shuffle, VisionGeometry, load_recipe
from lladav.data.build import build
from lladav.data.images import grid_pinpoints, image_tiles, select_best_resolution
from lladav.data.loader import MixtureLoader, ShardError

pytestmark = pytest.mark.usefixtures("ray_cluster")

GEOMETRY = VisionGeometry(tile_size=32, patch_size=8, max_grid=2)
SIZES = [(48, 48), (90, 40), (30, 100), (64, 33), (120, 120), (40, 70)]


def _recipe(tmp: Path, synth: Path) -> Path:
    """The synthetic qa + captions corpora plus a few images of other sizes and aspect ratios."""
    rng = np.random.default_rng(0)
    records = []
    for i, (w, h) in enumerate(SIZES):
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp / f"odd-{i}.png")
        records.append({"id": f"odd-{i}", "image": f"odd-{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\nHow wide is picture {i}?"},
            {"from": "gpt", "value": f"It is {w} pixels wide and {h} high." * (i + 1)}]})
    (tmp / "odd.json").write_text(json.dumps(records))
    corpus = synth / "corpus"
    data = {"name": "loader", "tokenizer": str(synth / "tokenizer"), "max_length": 512,
            "samples_per_shard": 16, "seed": 3, "vision": GEOMETRY.model_dump(exclude_none=True),
            "sources": [{"name": "qa", "kind": "llava_json", "location": str(corpus / "qa.json")},
                        {"name": "captions", "kind": "llava_json", "weight": 0.5,
                         "location": str(corpus / "captions.json")},
                        {"name": "odd", "kind": "llava_json", "location": str(tmp / "odd.json")}]}
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory, synth_dir) -> Path:
    return _recipe(tmp_path_factory.mktemp("loader_corpus"), synth_dir)


@pytest.fixture(scope="module")
def mixture_uri(tmp_path_factory, recipe_path, ray_cluster) -> str:
    out = tmp_path_factory.mktemp("loader_mix") / "mix"
    mixture = build(load_recipe(recipe_path), str(out), num_workers=2)
    assert mixture.info["counts"]["shards"] >= 5
    return str(out)


def _loader(uri: str, **kwargs) -> MixtureLoader:
    args = {"batch_size": 4, "rank": 0, "world_size": 1, "num_workers": 0, "seed": 11}
    return MixtureLoader(uri, **{**args, **kwargs})


def _raw_samples(uri: str) -> dict[str, dict[str, bytes]]:
    """Every sample's members, read with plain tarfile (independent of the loader's index)."""
    out: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(Path(uri, "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, _, suffix = m.name.partition(".")
                out.setdefault(key, {})[suffix] = tar.extractfile(m).read()
    return out


@pytest.mark.parametrize("policy", [EndOfAnswer(), EndOfAnswer(policy="pad_to_longest")],
                         ids=["eos_tail", "pad_to_longest"])
def test_batches_decode_pad_with_eos_and_tile_every_image(mixture_uri, policy):
    loader = _loader(mixture_uri, end_of_answer=policy)
    tail = policy.eos_tokens if policy.policy == "eos_tail" else 0
    raw = _raw_samples(mixture_uri)
    eos = loader.mixture.info["tokenizer"]["special_ids"]["eos"]
    manifest = {r["key"]: r for r in loader.mixture.manifest().to_pylist()}
    sizes_seen, padded_rows, n = set(), 0, 0
    for batch in loader:
        n += 1
        b, length = batch.ids.shape
        assert batch.ids.dtype == torch.long and batch.targets.dtype == torch.bool
        assert batch.targets.shape == (b, length) and b == len(batch.keys) == 4
        assert batch.n_tokens == [manifest[k]["n_tokens"] for k in batch.keys]
        for row, key in enumerate(batch.keys):
            ids = np.load(io.BytesIO(raw[key]["ids.npy"]))
            targets = np.load(io.BytesIO(raw[key]["targets.npy"]))
            own = len(ids)
            assert batch.ids[row, :own].tolist() == ids.tolist()
            assert batch.targets[row, :own].tolist() == targets.astype(bool).tolist()
            assert batch.answer[row, :own].tolist() == (targets == 2).tolist()
            assert batch.lengths[row] == own + tail
            assert (batch.ids[row, own:] == eos).all()
            assert batch.targets[row, own:own + tail].all()          # the sample's own EOS tail
            # batch padding: EOS targets for the reference, inert under eos_tail
            assert bool(batch.targets[row, own + tail:].all()) == batch.pads_are_targets or (
                own + tail == length)
            assert not batch.targets[row, own + tail:].any() or batch.pads_are_targets
            padded_rows += own + tail < length
            names = sorted(s for s in raw[key] if s.startswith("img"))
            assert len(batch.images[row]) == len(names) == len(manifest[key]["image_widths"])
            for tiles, size, name in zip(batch.images[row], batch.image_sizes[row], names):
                picture = Image.open(io.BytesIO(raw[key][name]))
                assert size == picture.size
                assert size == (manifest[key]["image_widths"][0], manifest[key]["image_heights"][0])
                canvas_w, canvas_h = select_best_resolution(*size, grid_pinpoints(GEOMETRY))
                assert tiles.shape == (1 + (canvas_w // 32) * (canvas_h // 32), 3, 32, 32)
                assert tiles.dtype == torch.float32
                assert torch.equal(tiles, torch.from_numpy(
                    image_tiles(picture, GEOMETRY, "anyres_max_4", 1)))
                sizes_seen.add(size)
        longest = max(batch.n_tokens)
        assert batch.padding_fraction == pytest.approx(
            sum(longest - t for t in batch.n_tokens) / (4 * longest))
    assert n == len(loader) == len(raw) // 4
    assert padded_rows > 0 and len(sizes_seen) >= 4  # padding and several tile grids exercised
    assert loader.epoch == 1


def test_length_grouping_pads_less_on_the_built_mixture(mixture_uri):
    plain = [_loader(mixture_uri).padding_fraction(e) for e in range(3)]
    grouped = [_loader(mixture_uri, group_by_length=True, group_window=4).padding_fraction(e)
               for e in range(3)]
    print(f"padding fraction, batch 4: {sum(plain) / 3:.3f} plain, {sum(grouped) / 3:.3f} grouped")
    assert all(g < p for g, p in zip(grouped, plain))


def _keys(loader: MixtureLoader, until_epoch: int, limit: int | None = None) -> list[list[str]]:
    out: list[list[str]] = []
    while loader.epoch < until_epoch:
        for batch in loader:
            out.append(batch.keys)
            if limit is not None and len(out) == limit:
                return out
    return out


@pytest.mark.parametrize("world_size,num_workers,group,block",
                         [(1, 0, False, 16), (2, 0, True, 16), (2, 2, False, 2), (3, 1, True, 2)])
def test_stop_save_and_resume_gives_exactly_the_rest_of_the_stream(mixture_uri, world_size,
                                                                   num_workers, group, block):
    """block 16 holds the mixture's 7 shards (the global order); block 2 has four blocks."""
    kwargs = {"world_size": world_size, "num_workers": num_workers, "group_by_length": group,
              "group_window": 2, "shuffle": Shuffle(block_shards=block)}
    epoch_keys: list[list[str]] = [[], []]
    for rank in range(world_size):
        full = _loader(mixture_uri, rank=rank, **kwargs)
        per_epoch = len(full)
        stream_a = _keys(full, until_epoch=2)
        assert len(stream_a) == 2 * per_epoch
        for e in range(2):
            epoch_keys[e] += [k for b in stream_a[e * per_epoch:(e + 1) * per_epoch] for k in b]
        for stop in (1 + rank, per_epoch + 1):  # mid-epoch, and just past the epoch boundary
            first = _loader(mixture_uri, rank=rank, **kwargs)
            head = _keys(first, until_epoch=2, limit=stop)
            state = json.loads(json.dumps(first.state_dict()))
            again = _loader(mixture_uri, rank=rank, **kwargs)
            again.load_state_dict(state)
            assert head + _keys(again, until_epoch=2) == stream_a, (rank, stop)
    n = len(_loader(mixture_uri).keys)
    steps = n // 4 // world_size
    for keys in epoch_keys:
        assert len(keys) == len(set(keys)) == steps * world_size * 4  # drop_last: whole steps
    assert epoch_keys[0] != epoch_keys[1]


def test_a_state_resumes_at_another_world_size_with_the_same_global_batches(mixture_uri):
    """Elastic resume: 2 ranks x 1 micro-batch per step, stopped after 3 steps, continue as one
    rank taking 2 micro-batches per step, and the other way; the global batches are the same."""
    def run(world, steps_before, new_world):
        first = [_loader(mixture_uri, world_size=world, rank=r, step_batches=2) for r in range(world)]
        streams = [iter(ld) for ld in first]
        per_rank = 2 // world
        head = [b.index for _ in range(steps_before * per_rank) for s in streams for b in [next(s)]]
        state = first[0].state_dict()
        second = [_loader(mixture_uri, world_size=new_world, rank=r, step_batches=2)
                  for r in range(new_world)]
        for ld in second:
            ld.load_state_dict(state)
        tail = [b.index for ld in second for b in ld]
        return sorted(head + tail)

    everything = run(2, 3, 2)
    assert run(2, 3, 1) == everything == run(1, 3, 2)
    assert everything == list(range(len(everything)))            # each global batch once
    bad = _loader(mixture_uri, world_size=2, rank=0, step_batches=2)
    it = iter(bad)
    next(it)
    odd = {**bad.state_dict(), "world_size": 1}                    # one batch: not a whole step
    with pytest.raises(ValueError, match="do not split over 2 ranks"):
        _loader(mixture_uri, world_size=2, rank=1, step_batches=2).load_state_dict(odd)


def test_a_samples_masks_are_bit_identical_at_one_and_two_workers(mixture_uri):
    """Issue 14: the step's masks come from (seed, epoch, key), so the same sample gets the same
    masks whichever rank and world size trains it (the loader and step as the loop runs them)."""
    from lladav.config import Objective
    from lladav.data.conversation import ChatTokenizer
    from lladav.data.manifest import open_mixture
    from lladav.model.flavors import lladav_config_for
    from lladav.model.lladav import LLaDAVModel
    from lladav.train import step as st

    tok = ChatTokenizer.from_folder(open_mixture(mixture_uri).info["tokenizer"]["uri"])
    torch.manual_seed(0)
    model = LLaDAVModel(lladav_config_for("tiny", tok)).eval()
    geometry = open_mixture(mixture_uri).geometry          # as train/stage.initial_weights does
    model.config.image_aspect = geometry.image_aspect
    model.config.max_grid, model.config.max_tiles_area = geometry.max_grid, geometry.max_tiles_area

    def masks(world: int) -> dict[str, torch.Tensor]:
        out = {}
        for rank in range(world):
            loader = _loader(mixture_uri, world_size=world, rank=rank, step_batches=2,
                             end_of_answer=EndOfAnswer(policy="eos_tail"))
            for batch, _ in zip(loader, range(6 // world)):
                with torch.no_grad():
                    rows = st.batch_rows(model, batch, loader.aspect)
                (masked, _), = st.batch_masks(rows, batch.keys, 0, batch.epoch, Objective())
                for i, key in enumerate(batch.keys):
                    out[key] = masked[i, :batch.n_tokens[i] + batch.eos_tails[i]].clone()
        return out

    one, two = masks(1), masks(2)
    assert len(one) == 24 and one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert sum(int(m.sum()) for m in one.values()) > 24


def test_state_of_another_split_or_mixture_setup_is_refused(mixture_uri):
    state = _loader(mixture_uri, world_size=2, rank=1).state_dict()
    with pytest.raises(ValueError, match="step_batches: 2 vs 1"):   # another global batch
        _loader(mixture_uri).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        _loader(mixture_uri, world_size=2, seed=12).load_state_dict(state)
    with pytest.raises(ValueError, match="built for"):
        _loader(mixture_uri, geometry=VisionGeometry(tile_size=64, patch_size=8, max_grid=2))
    # A state saved before block orders existed is the global order's: a block order of one
    # block (16 >= the mixture's 7 shards) is that order and resumes it, four blocks do not.
    old = {k: v for k, v in _loader(mixture_uri).state_dict().items() if k != "order"}
    _loader(mixture_uri).load_state_dict(old)
    with pytest.raises(ValueError, match="order: 'global' vs 'block:2'"):
        _loader(mixture_uri, shuffle=Shuffle(block_shards=2)).load_state_dict(old)


def test_a_corrupted_or_missing_shard_is_an_error_naming_it_and_its_digest(mixture_uri, tmp_path):
    copy = tmp_path / "mix"
    shutil.copytree(mixture_uri, copy)
    shards = json.loads((copy / "mixture.json").read_text())["shards"]
    victim = shards[2]
    path = copy / victim["name"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError) as err:  # when the epoch first reads it (or its prefetch)
        list(_loader(str(copy)))
    assert str(path) in str(err.value) and victim["sha256"] in str(err.value)
    path.unlink()
    with pytest.raises(ShardError) as err:
        list(_loader(str(copy)))
    assert str(path) in str(err.value) and victim["sha256"] in str(err.value)


def test_an_s3_mixture_reads_like_the_local_one_through_a_verified_cache(
        mixture_uri, recipe_path, s3_bucket, tmp_path):
    remote = build(load_recipe(recipe_path), f"{s3_bucket}/mixtures/loader", num_workers=2)
    cache = tmp_path / "cache"
    settings = ShardCacheSettings(folder=str(cache))
    for rank in range(2):
        local = _loader(mixture_uri, rank=rank, world_size=2)
        s3 = _loader(remote.uri, rank=rank, world_size=2, num_workers=1, shard_cache=settings)
        a, b = list(local), list(s3)
        assert [x.keys for x in a] == [x.keys for x in b] and len(a) == len(local) > 0
        assert all(torch.equal(x.ids, y.ids) for x, y in zip(a, b))
    digests = sorted(s["sha256"] for s in remote.info["shards"])
    assert sorted(p.name for p in cache.glob("*.tar*")) == [f"{d}.tar" for d in digests]
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.tar")}
    again = _loader(remote.uri, shard_cache=settings)
    next(iter(again))  # read from the cache, not fetched
    assert again.cache.stats.bytes_downloaded == 0
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.tar")} == stamps
    # A damaged cache file (not its size) is not trusted: it is fetched again and verified.
    victim = cache / f"{digests[0]}.tar"
    victim.write_bytes(b"garbage")
    list(_loader(remote.uri, shard_cache=settings))
    assert os.path.getsize(victim) == next(s["bytes"] for s in remote.info["shards"]
                                           if s["sha256"] == digests[0])
