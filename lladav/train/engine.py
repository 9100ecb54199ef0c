"""Everything DeepSpeed in a live job: config, ZeRO-3 construction, the engine, checkpoints.

    template --render_ds_config--> ds_config --build_model (zero.Init)--> partitioned model
    --load_state_into--> weights --initialize (AdamW per component, cosine)--> engine
    --save_checkpoint--> <folder>/ckpt/zero_pp_rank_R_mp_rank_00_{model,optim}_states.pt
    (train/export.py turns that folder into a Hugging Face export, offline)

ZeRO-3 keeps each parameter as `p.ds_tensor`, this rank's slice of ceil(numel / world) elements
(the last one padded); `p.numel() == 0` outside a gather. A checkpoint holds, per rank, the fp32
master slices of all trained parameters back to back (`fp32_flat_groups`, in `param_shapes`
order) and the slices of frozen ones (`frozen_param_fragments`).

Owns: every `deepspeed` call, the "auto" fields (infra/deepspeed/README.md), the optimizer and
the learning-rate schedule, the checkpoint tag. Does not own: which components train at which
rate (train/stage.py), the loop and its client_state (train/loop.py), Ray (train/launch.py),
the model (model/), data. The rank and world size are read only in `init_distributed`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lladav import REPO_ROOT, storage
from lladav.config import merge

TAG = "ckpt"  # one fixed tag: a checkpoint folder holds exactly one checkpoint
BUCKET_FLOOR = 2**20
"""Fewest elements in a reduce/prefetch bucket. Hugging Face's "auto" rule (hidden²: 16.7M for
LLaDA-8B) gives a 64-wide model 4,096-element buckets, one collective per few parameters:
measured on flavor tiny, micro-batch 32, one CPU worker, 80 samples/s with it, 139 with the floor.
The floor leaves every model with hidden >= 1024 at the rule."""


# ---- config ------------------------------------------------------------------------------------

def resolve_template(name: str | Path) -> dict[str, Any]:
    """A stage's `deepspeed:` template: a path (as given, else from the repo root) or a URI."""
    name = str(name)
    if storage.is_s3(name) or os.path.isfile(name):
        return json.loads(storage.read_bytes(name))
    if (REPO_ROOT / name).is_file():
        return json.loads((REPO_ROOT / name).read_text())
    raise FileNotFoundError(f"DeepSpeed template {name!r}: not found as given nor in {REPO_ROOT}")


def render_ds_config(template: str | Path | dict, *, micro_batch: int, grad_accum: int,
                     world_size: int, gradient_clipping: float, precision: str,
                     hidden_size: int, overrides: dict | None = None) -> dict[str, Any]:
    """The template with `overrides` merged in (nested dicts or "a.b" keys), every "auto" filled.

    Stage fields (batch sizes, clipping, bf16) are set even when absent, and a template value
    contradicting the stage is an error; tuning fields are filled only where they say "auto".
    """
    source = "<dict>" if isinstance(template, dict) else str(template)
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision {precision!r}: expected 'bf16' or 'fp32' (no fp16 on CPU)")
    config = copy.deepcopy(template) if isinstance(template, dict) else resolve_template(template)
    for path, value in (overrides or {}).items():
        nested = copy.deepcopy(value)       # "a.b": v is {"a": {"b": v}}, deep-merged as such
        for key in reversed(path.split(".")):
            nested = {key: nested}
        config = merge(config, nested)
    for block in ("optimizer", "scheduler"):
        if block in config:
            raise ValueError(f"{source}: remove the '{block}' block; lladav passes its own AdamW "
                             "and cosine schedule to deepspeed.initialize")
    if _get(config, "fp16.enabled", False) is not False:
        raise ValueError(f"{source}: fp16.enabled must be false; use precision bf16 or fp32")
    stage = {"train_micro_batch_size_per_gpu": micro_batch,
             "gradient_accumulation_steps": grad_accum,
             "train_batch_size": micro_batch * grad_accum * world_size,
             "gradient_clipping": gradient_clipping, "bf16.enabled": precision == "bf16"}
    for path, value in stage.items():
        current = _get(config, path, "auto")
        if current != "auto" and current != value:
            raise ValueError(f"{source}: {path} is {current!r} but the stage gives {value!r}; "
                             'set it to "auto" so the stage decides')
        _set(config, path, value)
    bucket = max(hidden_size**2, BUCKET_FLOOR)
    tuning = {"zero_optimization.reduce_bucket_size": bucket,
              "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * bucket),
              "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size}
    for path, value in tuning.items():
        if _get(config, path, None) == "auto":
            _set(config, path, value)
    if left := _auto_paths(config):
        raise ValueError(f'{source}: no rule fills "auto" in {left}; give a value or an override')
    return config


def _get(config: dict, path: str, default: Any) -> Any:
    for key in path.split("."):
        if not isinstance(config, dict) or key not in config:
            return default
        config = config[key]
    return config


def _set(config: dict, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for key in parents:
        config = config.setdefault(key, {})
    config[last] = value


def _auto_paths(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _auto_paths(v, f"{prefix}{k}.")]
    return [prefix[:-1]] if node == "auto" else []


def lr_multiplier(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up 0 -> 1 over `warmup_steps`, then cosine 1 -> 0 at `total_steps`, then 0."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


# ---- process group, model, engine ----------------------------------------------------------------

def init_distributed() -> tuple[int, int]:
    """Join the process group (gloo on CPU, nccl with CUDA); returns (rank, world_size).

    Without RANK/WORLD_SIZE in the env (a unit test, a notebook) this process becomes a world
    of one; otherwise DeepSpeed would look for MPI (mpi4py).
    """
    import deepspeed
    import torch.distributed as dist

    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    if not torch.cuda.is_available():
        # DeepSpeed's CPU backend JIT-compiles its shared-memory all-reduce op on every new
        # install path (~25 s quiet, ~100 s under load: a fresh clone's first stage), and uses it
        # only in inference_all_reduce, which training never calls; gloo does the rest. Marking
        # the op incompatible in DeepSpeed's probe cache (a module dict it documents as
        # editable) makes TorchBackend skip the build.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def build_model(factory: Callable[[], nn.Module], ds_config: dict) -> nn.Module:
    """`factory()`, under zero.Init when ZeRO stage is 3 so no rank ever holds the whole model.

    transformers initialises weights in `post_init`, at the end of a model's __init__, when
    zero.Init has already cut its children to empty slices (SigLIP's init then raises). That
    step is deferred and run module by module on gathered weights, as `_from_config` does under
    ZeRO-3; leaf modules keep torch's own init meanwhile.
    """
    if _get(ds_config, "zero_optimization.stage", 0) != 3:
        return factory()
    import deepspeed
    from transformers import PreTrainedModel
    from transformers.integrations.deepspeed import (initialize_weights_zero3,
                                                     prevent_arange_dtype_change)

    hf_init = PreTrainedModel.init_weights
    PreTrainedModel.init_weights = lambda self: None  # type: ignore[method-assign]
    try:  # arange keeps its dtype: bf16 zero.Init would round SigLIP's position ids above 256
        with prevent_arange_dtype_change(), deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = factory()
    finally:
        PreTrainedModel.init_weights = hf_init  # type: ignore[method-assign]
    if isinstance(model, PreTrainedModel):
        initialize_weights_zero3(model)
        model.tie_weights()
    return model


def _owned(module: nn.Module) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """The module's own parameters and persistent buffers (not its children's)."""
    buffers = [(n, b) for n, b in module.named_buffers(recurse=False)
               if n not in module._non_persistent_buffers_set]
    return list(module.named_parameters(recurse=False)), buffers


def load_state_into(model: nn.Module, state_dict: dict[str, torch.Tensor],
                    strict: bool = True) -> tuple[list[str], list[str]]:
    """Copy full weights into a (possibly ZeRO-3-partitioned) model, one module whole at a time.

    Every rank calls it with the same keys; parameter values come from rank 0 (broadcast),
    buffers are copied on every rank. Returns (missing, unexpected) names; with `strict` either
    raises before anything is copied.
    """
    import deepspeed

    modules = [(f"{prefix}." if prefix else "", m) for prefix, m in model.named_modules()]
    expected = {dot + n for dot, m in modules for group in _owned(m) for n, _ in group}
    missing, unexpected = sorted(expected - state_dict.keys()), sorted(state_dict.keys() - expected)
    if strict and (missing or unexpected):
        raise KeyError(f"state dict does not fit the model: missing {missing[:10]} "
                       f"({len(missing)}), unexpected {unexpected[:10]} ({len(unexpected)})")
    for dot, module in modules:
        params, buffers = _owned(module)
        writer = _rank() == 0 or not any(hasattr(p, "ds_id") for _, p in params)
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0):
            for name, tensor in (params if writer else []) + buffers:
                source = state_dict.get(dot + name)
                if source is not None and tuple(source.shape) != tuple(tensor.shape):
                    raise ValueError(f"{dot}{name}: shape {tuple(source.shape)} in the state "
                                     f"dict, {tuple(tensor.shape)} in the model")
                if source is not None:
                    with torch.no_grad():
                        tensor.copy_(source)
    return missing, unexpected


def _check_groups(model: nn.Module, param_groups: list[dict]) -> None:
    names = {id(p): n for n, p in model.named_parameters()}
    seen: set[int] = set()
    for group in param_groups:
        if "lr" not in group or "name" not in group:
            raise ValueError(f"parameter group {group.get('name', '?')}: needs 'name' and 'lr'")
        for p in group["params"]:
            if id(p) in seen or not p.requires_grad or id(p) not in names:
                raise ValueError(f"group {group['name']}: {names.get(id(p), 'a tensor')} is in "
                                 "two groups, frozen (requires_grad False) or not the model's")
            seen.add(id(p))
    loose = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if loose:
        raise ValueError(f"{len(loose)} trainable parameters are in no group, e.g. {loose[:5]}: "
                         "freeze them (requires_grad_(False)) or put them in a group")


def initialize(model: nn.Module, param_groups: list[dict], ds_config: dict, total_steps: int,
               warmup_ratio: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
               weight_decay: float = 0.0) -> Any:
    """The DeepSpeed engine over AdamW (one group per trained component, each with its "lr" and
    "name") and a cosine schedule with linear warm-up, stepped once per optimizer step."""
    import deepspeed

    if not param_groups:
        raise ValueError("no parameter group: the stage trains nothing")
    _check_groups(model, param_groups)
    groups = [dict(g, params=list(g["params"])) for g in param_groups]
    adam = dict(lr=groups[0]["lr"], betas=betas, eps=eps, weight_decay=weight_decay)
    if _get(ds_config, "zero_optimization.offload_optimizer.device", "none") in ("cpu", "nvme"):
        # DeepSpeed refuses torch's AdamW on offloaded states; its CPU Adam is JIT-built (~40 s).
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, adamw_mode=True, **adam)
    else:
        optimizer = torch.optim.AdamW(groups, **adam)
    warmup = math.ceil(warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, warmup, total_steps))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=ds_config)
    return engine


# ---- checkpoints ---------------------------------------------------------------------------------

def save_checkpoint(engine: Any, folder: str, client_state: dict[str, Any]) -> None:
    """Every rank writes its shard of model, optimizer and scheduler, and its `client_state`,
    to the local `folder` (all ranks must call it)."""
    engine.save_checkpoint(folder, tag=TAG, client_state=client_state)


def load_checkpoint(engine: Any, folder: str) -> dict[str, Any]:
    """Restore model, optimizer and scheduler into a new engine (under ZeRO-3 never the one that
    saved); returns this rank's client_state."""
    path, client_state = engine.load_checkpoint(folder, tag=TAG)
    if path is None:
        raise FileNotFoundError(f"{folder}: no DeepSpeed checkpoint with tag {TAG!r}")
    return client_state


def start_micro_batch(engine: Any) -> None:
    """Tell ZeRO-3 a new micro-batch begins. It counts micro-steps in `engine.forward`; the
    training step calls the model's pieces directly (embed, tower, language model, head), and
    without this each micro-batch of an accumulation overwrote the previous one's gradient
    (measured: Adam's first moment equal to the last micro-batch's gradient alone)."""
    clear = getattr(engine.optimizer, "clear_backward_seen_flag", None)
    if clear is not None:
        clear()


# ---- elastic resume: a checkpoint saved at one world size, loaded at another ---------------------

def to_universal(folder: str, out: str) -> None:
    """Convert the ZeRO checkpoint in `folder` (tag TAG) into DeepSpeed's universal layout in
    `out` (tag TAG): whole fp32 weights and Adam moments per trained parameter, loadable at any
    world size. DeepSpeed's own converter, in-process, one worker (it forks otherwise)."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    ds_to_universal.main(argparse.Namespace(
        input_folder=os.path.join(folder, TAG), output_folder=os.path.join(out, TAG),
        num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
        inject_missing_state=False))


def load_universal(engine: Any, folder: str, original: str,
                   group_names: list[str]) -> dict[str, Any]:
    """Load a universal checkpoint (`to_universal` of the checkpoint in `original`) into an
    engine built with {"checkpoint": {"load_universal": true}} at any world size; returns rank
    0's client state.

    DeepSpeed 0.19.8's universal load leaves three things wrong under ZeRO-3, put right here:
    frozen parameters are not in the universal files (they are read whole from `original` by
    train/export.py's reader, rank 0); every group gets group 0's lr, initial_lr and name
    (reset from the restored scheduler and `group_names`); and all groups share one Adam `step`
    tensor, which AdamW then advances once per group (each gets its own copy). Measured on the
    tiny model, 2 -> 1 and 1 -> 2 ranks: parameters, moments and the next losses equal an
    uninterrupted run's exactly (tests/integration/test_train.py)."""
    import deepspeed

    client = load_checkpoint(engine, folder)
    optimizer = engine.optimizer.optimizer
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    scheduler = engine.lr_scheduler
    for group, lr, base, name in zip(optimizer.param_groups, scheduler.get_last_lr(),
                                     scheduler.base_lrs, group_names):
        group["lr"], group["initial_lr"], group["name"] = lr, base, name
    frozen = [(n, p) for n, p in engine.module.named_parameters() if not p.requires_grad]
    if _rank() == 0 and frozen:
        from lladav.train.export import read_tensors

        full = read_tensors(original, {n for n, _ in frozen})
    else:
        full = {}
    for name, param in frozen:
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if _rank() == 0:
                with torch.no_grad():
                    param.copy_(full[name])
    return client


def gather_full_state_dict(engine_or_model: Any) -> dict[str, torch.Tensor]:
    """Whole tensors (training dtype) on rank 0, {} elsewhere; every rank must call it. For tests
    and comparisons: one module is gathered at a time, but rank 0 ends up with the whole model."""
    import deepspeed

    if hasattr(engine_or_model, "empty_partition_cache"):
        # After a forward without backward (evaluation) ZeRO-3 still has prefetched parameters
        # in flight, and gathering one fails ("Cannot partition a param in flight").
        engine_or_model.empty_partition_cache()
    model = getattr(engine_or_model, "module", engine_or_model)
    out: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        params, buffers = _owned(module)
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            for name, tensor in (params + buffers) if _rank() == 0 else []:
                out[f"{prefix}.{name}" if prefix else name] = tensor.detach().clone()
    return out
