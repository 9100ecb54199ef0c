"""The per-worker training loop of a stage; reads top to bottom like the recipe it is.

    tokenizer -> model skeleton (zero.Init) -> init weights -> freeze per stage -> DeepSpeed
    -> loader -> [resume] -> step, step, ... checkpoint every K -> last checkpoint

No Ray import: distribution arrives as a `WorkerContext` (rank, world size, where to report,
what to resume from), built by train/launch.py under Ray Train or by a test in-process.

A checkpoint is DeepSpeed's sharded checkpoint plus, in each rank's client state, the loader's
state, the RNG state of the masking generator, the step and the ledger of sample keys this rank
consumed: restoring it continues with exactly the next sample and the same random draws. Each
rank seals its files last (train/checkpoints.py), so a resume can tell an intact checkpoint from
a damaged one.

Owns: the order of work inside one worker. Does not own: the step's math (train/step.py),
DeepSpeed calls (train/engine.py), the data order (data/loader.py), Ray (train/launch.py).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lladav.config import StageConfig

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    rank: int
    world_size: int
    report: Callable[[dict[str, Any], str | None], None]
    """report(metrics, checkpoint_dir): every rank calls it at each checkpoint (and the last step)."""
    restore_dir: str | None = None
    """A local folder holding the checkpoint to resume from (all ranks' shards), or None."""
    on_step: Callable[[int, int, dict], None] | None = None
    """Hook called as on_step(step, rank, metrics) after each optimizer step (tests use it to
    record losses and to kill a worker); metrics["checkpoint"] is True when this step's
    checkpoint is about to be written."""
    tmp_root: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def mixture_tokenizer(mixture_uri: str) -> Any:
    """The ChatTokenizer a mixture was tokenized with (its URI is in mixture.json)."""
    from lladav.data.manifest import open_mixture
    from lladav.data.tokenizer import load_tokenizer

    return load_tokenizer(open_mixture(mixture_uri).info["tokenizer"]["uri"])


def prepare_model(stage: StageConfig, world_size: int) -> tuple[Any, list[dict], list[dict], dict]:
    """Everything before the first step, on every rank: the process group, the model built under
    ZeRO-3 with its init weights, frozen per stage. Returns (model, param_groups, table rows,
    rendered DeepSpeed config). bench/train_step.py's bare-DeepSpeed baseline starts here too."""
    from lladav.data.manifest import open_mixture
    from lladav.model.lladav import LLaDAVModel
    from lladav.train import engine as eng
    from lladav.train.stage import apply_stage, initial_weights

    eng.init_distributed()
    tok = mixture_tokenizer(stage.mixture)
    torch.manual_seed(stage.seed)
    config, weights = initial_weights(stage, tok, open_mixture(stage.mixture).geometry)
    ds_config = eng.render_ds_config(
        eng.resolve_template(stage.deepspeed), micro_batch=stage.micro_batch,
        grad_accum=stage.grad_accum, world_size=world_size,
        gradient_clipping=stage.gradient_clipping, precision=stage.precision,
        hidden_size=config.text_config.hidden_size, overrides=stage.deepspeed_overrides)
    model = eng.build_model(lambda: LLaDAVModel(config), ds_config)
    if weights is not None:
        eng.load_state_into(model, weights)
    if stage.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    groups, rows = apply_stage(model, stage)
    return model, groups, rows, ds_config


def run_worker(stage: StageConfig, ctx: WorkerContext) -> dict[str, Any]:
    from lladav.data.loader import MixtureLoader
    from lladav.train import engine as eng
    from lladav.train.checkpoints import seal
    from lladav.train.stage import format_table
    from lladav.train.step import diffusion_step

    model, groups, rows, ds_config = prepare_model(stage, ctx.world_size)
    if ctx.rank == 0:
        log.info("stage %s\n%s", stage.name, format_table(rows))

    loader = MixtureLoader(stage.mixture, batch_size=stage.micro_batch, rank=ctx.rank,
                           world_size=ctx.world_size, num_workers=stage.loader_workers,
                           seed=stage.seed, group_by_length=stage.group_by_length,
                           end_of_answer=stage.end_of_answer, shuffle=stage.shuffle,
                           shard_cache=stage.shard_cache, packing=stage.packing)
    steps_per_epoch = max(1, len(loader) // stage.grad_accum)
    total = stage.max_steps or stage.epochs * steps_per_epoch
    engine = eng.initialize(model, groups, ds_config, total_steps=total,
                            warmup_ratio=stage.warmup_ratio, betas=stage.betas,
                            eps=stage.adam_eps, weight_decay=stage.weight_decay)

    step, ledger = 0, []
    if ctx.restore_dir:
        client = eng.load_checkpoint(engine, ctx.restore_dir)
        step, ledger = int(client["step"]), list(client["ledger"])
        loader.load_state_dict(client["loader"])
        log.info("rank %d resumed at step %d (epoch %d)", ctx.rank, step, loader.epoch)

    local_fraction = _local_fraction(engine.module)
    micro, window = 0, _Window()
    while step < total:
        for batch in loader:
            loss, metrics = diffusion_step(engine.module, batch, stage.seed, loader.aspect,
                                           stage.objective)
            engine.backward(loss)
            engine.step()
            ledger.extend(batch.keys)
            window.add(metrics, batch)
            micro += 1
            if micro % stage.grad_accum:
                continue
            step += 1
            checkpoint = step % stage.checkpoint.every_steps == 0 or step == total
            report = {"step": step, "total_steps": total, "epoch": loader.epoch, "lr": engine.get_lr()[0],
                      "local_param_fraction": local_fraction, **window.flush(ctx.world_size)}
            if ctx.on_step is not None:  # told whether a checkpoint follows (not a metric)
                ctx.on_step(step, ctx.rank, {**report, "checkpoint": checkpoint})
            if checkpoint:
                with tempfile.TemporaryDirectory(dir=ctx.tmp_root) as folder:
                    eng.save_checkpoint(engine, folder, {
                        "step": step, "loader": loader.state_dict(),
                        "ledger": ledger, "stage": stage.name})
                    if ctx.rank == 0:  # the export needs the config beside the shards
                        engine.module.config.save_pretrained(folder)
                    with open(os.path.join(folder, f"ledger-rank{ctx.rank}.json"), "w") as f:
                        json.dump(ledger, f)  # the samples this rank consumed, for audits
                    seal(folder, ctx.rank, ctx.world_size, step)  # last: lists the files above
                    ctx.report(report, folder)
            # No report between checkpoints: Ray Train V2 takes one result per controller poll
            # (every 2 s), so reporting every step made each step wait for the poll (bench/
            # train_step.py measured ~2 s per tiny step). Per-step metrics go to on_step.
            if step >= total:
                break
    return {"step": step, "ledger": ledger}


def _local_fraction(model: Any) -> float:
    """Share of the parameters this rank holds: ~1/world_size under ZeRO-3 partitioning."""
    full = local = 0
    for p in model.parameters():
        n = int(getattr(p, "ds_numel", p.numel()))
        full += n
        local += int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else n
    return local / max(full, 1)


class _Window:
    """Throughput, padding and the answer-only metrics over the micro-batches of one optimizer
    step. answer_loss / answer_accuracy: mean cross-entropy and argmax accuracy at the masked
    positions inside the assistant's words (NaN-free: absent when no such position was masked);
    a model that learnt the template but not the answers shows a low total loss beside a high
    answer_loss."""

    def __init__(self) -> None:
        self.t0, self.samples, self.tokens, self.pad, self.losses = time.perf_counter(), 0, 0, 0.0, []
        self.answer_masked, self.answer_ce, self.answer_correct = 0, 0.0, 0

    def add(self, metrics: dict[str, Any], batch: Any) -> None:
        self.samples += len(batch.keys)
        self.tokens += metrics["tokens"]
        self.pad += batch.padding_fraction * len(batch.keys)
        self.losses.append(metrics["loss"])
        self.answer_masked += metrics["answer_masked"]
        self.answer_ce += metrics["answer_ce"]
        self.answer_correct += metrics["answer_correct"]

    def flush(self, world_size: int) -> dict[str, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        out = {"loss": sum(self.losses) / len(self.losses),
               "samples_per_s": self.samples * world_size / dt,
               "tokens_per_s": self.tokens * world_size / dt,
               "padding_fraction": self.pad / max(self.samples, 1)}
        if self.answer_masked:
            out["answer_loss"] = self.answer_ce / self.answer_masked
            out["answer_accuracy"] = self.answer_correct / self.answer_masked
        self.__init__()
        return out
