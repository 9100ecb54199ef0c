"""A ZeRO-3 checkpoint folder -> a consolidated Hugging Face folder, without holding the model.

    <ckpt>/ckpt/zero_pp_rank_R_mp_rank_00_{model,optim}_states.pt  (train/engine.save_checkpoint)
    --export_consolidated--> config.json + model-0000N-of-0000M.safetensors + index

A checkpoint holds, per rank, the fp32 master slices of all trained parameters back to back
(`fp32_flat_groups`, in `param_shapes` order) and the slices of frozen ones
(`frozen_param_fragments`). The export maps the rank files (torch.load(mmap=True)), joins each
tensor's slices straight into its shard file and hands the file pages back, so it never holds
the model, nor even a shard.

Hand-written rather than DeepSpeed's, for memory alone (issue 16). bench/consolidate.py,
2026-12-08, 150.5M parameters (574 MiB fp32), 2 CPU cores under a CI run's load, medians of 3
rounds, two runs: peak RSS above baseline 69 MiB (0 MiB of it anonymous) here, 1152 MiB (574)
for `get_fp32_state_dict_from_zero_checkpoint`, and 1152 MiB (575) for DeepSpeed 0.19.8's lazy
`convert_zero_checkpoint_to_state_dict(safe_serialization=True)` at our 5 GiB shards: it makes
each shard whole in memory (here the whole model) and leaves every mmap'ed page it read in RSS;
835 MiB (257) with 128 MiB shards. That is 12-17x our peak and 4-7x our time (0.4-0.5 s vs
1.9-3.5 s); the tensors are bit-identical. S3 does not separate them: DeepSpeed's converter
needs a local output folder, and this export too stages a local folder and then uploads it.
Switching would replace `_zero3_tensors`..`_write_safetensors` (~115 lines) by one call plus
config.json, the index and publishing, and `read_tensors` by `lazy_mode=True`, for one shard
in memory (5 GiB at 8B) plus the mapped pages.

Owns: reading ZeRO-3 checkpoint files and writing safetensors shards atomically. Does not own: the
live engine (train/engine.py) or where the export is published (train/launch.py).
"""

from __future__ import annotations

import copy
import ctypes
import glob
import json
import math
import mmap
import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lladav import storage
from lladav.train.engine import TAG

INDEX = "model.safetensors.index.json"


@dataclass
class _Tensor:
    """A tensor to write: 1-D pieces whose concatenation (cut to its size) is its data; `mapped`
    pieces are views of a torch.load(mmap=True) file, whose pages can go back to the kernel."""

    name: str
    shape: tuple[int, ...]
    pieces: list[torch.Tensor]
    mapped: bool

    def dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype if self.pieces[0].is_floating_point() else self.pieces[0].dtype

    def nbytes(self, dtype: torch.dtype) -> int:
        return math.prod(self.shape) * self.dtype(dtype).itemsize


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
              torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
              torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def _rank_files(folder: str, suffix: str) -> list[str]:
    files = glob.glob(os.path.join(folder, f"*{suffix}"))  # natural order: rank 2 before 10
    return sorted(files, key=lambda f: [int(t) if t.isdigit() else t
                                        for t in re.split(r"(\d+)", f)])


def _zero3_tensors(folder: str) -> list[_Tensor]:
    """Every tensor of the ZeRO-3 checkpoint in `folder` (the save folder or its tag folder),
    as lazy pieces of the ranks' mmap'ed files."""
    from deepspeed.checkpoint import constants as C

    latest = os.path.join(folder, "latest")
    tag = Path(latest).read_text().strip() if os.path.isfile(latest) else TAG
    folder = os.path.join(folder, tag) if os.path.isdir(os.path.join(folder, tag)) else folder
    load = lambda f: torch.load(f, map_location="cpu", mmap=True, weights_only=False)  # noqa: E731
    models = [load(f) for f in _rank_files(folder, "_model_states.pt")]
    optims = [load(f)[C.OPTIMIZER_STATE_DICT] for f in _rank_files(folder, "_optim_states.pt")]
    if not optims or optims[0].get(C.ZERO_STAGE) != 3:
        raise ValueError(f"{folder}: not a ZeRO-3 checkpoint (no zero_stage 3 optimizer shards)")
    world = optims[0][C.PARTITION_COUNT]
    world = max(world) if isinstance(world, list) else world
    if not len(models) == len(optims) == world:
        raise ValueError(f"{folder}: {len(models)} model and {len(optims)} optimizer shards for "
                         f"a world of {world}; a rank's files are missing or from another run")
    flats = [o[C.FP32_FLAT_GROUPS] for o in optims]  # per rank: fp32 master slices, back to back
    out, offset = [], 0
    for name, shape in ((n, s) for group in models[0][C.PARAM_SHAPES] for n, s in group.items()):
        part = math.ceil(shape.numel() / world)
        pieces = [p for rank_flat in flats for p in _span(rank_flat, offset, part)]
        out.append(_Tensor(name, tuple(shape), pieces or [torch.empty(0)], mapped=True))
        offset += part
    if offset != sum(t.numel() for t in flats[0]):
        raise ValueError(f"{folder}: param_shapes cover {offset} of "
                         f"{sum(t.numel() for t in flats[0])} flat elements per rank")
    for name, shape in (models[0].get(C.FROZEN_PARAM_SHAPES) or {}).items():
        pieces = [m[C.FROZEN_PARAM_FRAGMENTS][name].reshape(-1) for m in models]
        out.append(_Tensor(name, tuple(shape), pieces, mapped=True))
    for name in models[0][C.BUFFER_NAMES]:  # whole on every rank
        buffer = models[0]["module"][name]
        out.append(_Tensor(name, tuple(buffer.shape), [buffer.reshape(-1)], mapped=False))
    return out


def read_tensors(checkpoint_folder: str, names: set[str]) -> dict[str, torch.Tensor]:
    """Whole tensors `names` of a ZeRO-3 checkpoint (trained ones in fp32), e.g. the frozen
    parameters an elastic resume must restore (train/engine.load_universal)."""
    out = {}
    for t in _zero3_tensors(checkpoint_folder):
        if t.name in names:
            out[t.name] = torch.cat(t.pieces)[:math.prod(t.shape)].clone().view(t.shape)
    if missing := names - out.keys():
        raise KeyError(f"{checkpoint_folder}: no tensor named {sorted(missing)[:5]}")
    return out


def _span(flat_groups: list[torch.Tensor], start: int, length: int) -> list[torch.Tensor]:
    """Elements [start, start + length) of the concatenation of `flat_groups`, as views."""
    pieces, base = [], 0
    for flat in flat_groups:
        lo, hi = max(start, base), min(start + length, base + flat.numel())
        if lo < hi:
            pieces.append(flat[lo - base:hi - base])
        base += flat.numel()
    return pieces


_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None


def _drop_pages(t: torch.Tensor) -> None:
    """Release the whole pages under `t`, a read-only view of a mmap'ed file. Clean file pages
    are re-read if touched again; kept, they count in RSS (1.07 GiB instead of 0.55 in the
    bench). Never call it on anonymous memory: MADV_DONTNEED would zero it."""
    if _LIBC is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = -(-t.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (t.data_ptr() + t.numel() * t.element_size()) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


def _write_safetensors(path: str, tensors: list[_Tensor], dtype: torch.dtype) -> None:
    """The safetensors layout (u64 header size, JSON header, raw little-endian data) written
    piece by piece: safetensors.save_file would need the shard whole in memory."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    position = 0
    for t in tensors:
        header[t.name] = {"dtype": _ST_DTYPES[t.dtype(dtype)], "shape": list(t.shape),
                          "data_offsets": [position, position + t.nbytes(dtype)]}
        position += t.nbytes(dtype)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors:
            left = math.prod(t.shape)
            for piece in t.pieces:
                chunk = piece[:left].contiguous().to(t.dtype(dtype))  # copies only to cast
                left -= chunk.numel()
                f.write(chunk.view(torch.uint8).numpy().data)
                if t.mapped:
                    _drop_pages(piece)
            if left:
                raise ValueError(f"{path}: {t.name} is {left} elements short in the checkpoint")


def export_consolidated(checkpoint_folder: str, out_folder: str, config: Any, *,
                        max_shard_bytes: int = 5 * 2**30,
                        dtype: torch.dtype = torch.float32) -> list[str]:
    """Write a Hugging Face folder (config.json, safetensors shards, index) from a ZeRO-3
    checkpoint; returns the tensor names (the model's state_dict names).

    Values are the fp32 master weights (frozen tensors as stored), floating ones cast to `dtype`.
    The folder appears whole or not at all: locally a sibling temp folder is renamed into place;
    for s3:// a local copy is uploaded with the index last.
    """
    with storage.local_folder(checkpoint_folder) as local:
        tensors = _zero3_tensors(str(local))
        shards: list[list[_Tensor]] = [[]]
        size = 0
        for t in tensors:
            if shards[-1] and size + t.nbytes(dtype) > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += t.nbytes(dtype)
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        index = {"metadata": {"total_size": sum(t.nbytes(dtype) for t in tensors)},
                 "weight_map": {t.name: f for f, shard in zip(files, shards) for t in shard}}
        config = copy.deepcopy(config)
        config.dtype = dtype

        def write(folder: str) -> None:
            os.makedirs(folder, exist_ok=True)
            config.save_pretrained(folder)
            for file, shard in zip(files, shards):
                _write_safetensors(os.path.join(folder, file), shard, dtype)
            Path(folder, INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

        storage.publish_written_folder(out_folder, INDEX, write)
    return [t.name for t in tensors]
