"""The per-worker training loop of a stage; reads top to bottom like the recipe it is.

    tokenizer -> model skeleton (zero.Init) -> init weights -> freeze per stage -> DeepSpeed
    -> loader -> [resume] -> step, step, ... checkpoint every K -> last checkpoint

No Ray import: distribution arrives as a `WorkerContext` (rank, world size, where to report,
what to resume from), built by train/launch.py under Ray Train or by a test in-process.

A checkpoint is DeepSpeed's sharded checkpoint plus, in each rank's client state, the loader's
state, the step and the ledger of sample keys this rank consumed: restoring it continues with
exactly the next sample, and the masks need no saved state (each sample's come from (seed,
epoch, key), diffusion.mask_seed). Each rank seals its files last with the run's topology
(train/checkpoints.py), so a resume can tell an intact checkpoint from a damaged one, and one at
another world size can keep the global batch (elastic resume, `_restore`).

Every optimizer step all-reduces its metrics (the global mean loss, throughput, padding, the
answer-only sums), adds DeepSpeed's global gradient norm and each group's learning rate, passes
them to `on_step` (MLflow in a pipeline) and prints a step line on rank 0 every `log_every`.

Owns: the order of work inside one worker. Does not own: the step's math (train/step.py),
DeepSpeed calls (train/engine.py), the data order (data/loader.py), Ray (train/launch.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
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


def mixture_tokenizer(mixture_uri: str) -> Any:
    """The ChatTokenizer a mixture was tokenized with (its URI and digest are in mixture.json);
    TokenizerMismatch, naming both digests, when that folder has changed since the build."""
    from lladav.data.manifest import open_mixture
    from lladav.data.tokenizer import checked_tokenizer

    info = open_mixture(mixture_uri).info["tokenizer"]
    return checked_tokenizer(info["uri"], info["digest"], f"mixture {mixture_uri}")


def prepare_model(stage: StageConfig, world_size: int, grad_accum: int | None = None,
                  load_universal: bool = False) -> tuple[Any, list[dict], list[dict], dict]:
    """Everything before the first step, on every rank: the process group, the model built under
    ZeRO-3 with its init weights, frozen per stage. Returns (model, param_groups, table rows,
    rendered DeepSpeed config). bench/train_step.py's bare-DeepSpeed baseline starts here too.
    grad_accum overrides the stage's (an elastic resume); load_universal sets DeepSpeed's
    checkpoint.load_universal for loading a universal checkpoint."""
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
        grad_accum=grad_accum or stage.grad_accum, world_size=world_size,
        gradient_clipping=stage.gradient_clipping, precision=stage.precision,
        hidden_size=config.text_config.hidden_size,
        overrides={**stage.deepspeed_overrides,
                   **({"checkpoint.load_universal": True} if load_universal else {})})
    model = eng.build_model(lambda: LLaDAVModel(config), ds_config)
    if weights is not None:
        eng.load_state_into(model, weights)
    if stage.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    groups, rows = apply_stage(model, stage)
    return model, groups, rows, ds_config


class ElasticError(RuntimeError):
    """A checkpoint cannot resume at this world size with its global batch."""


def resume_accumulation(saved: dict, micro_batch: int, world_size: int) -> int:
    """The gradient accumulation that keeps a checkpoint's global batch (saved world size x
    micro-batch x accumulation, train/checkpoints.read_topology) at `world_size`; ElasticError
    saying why when none does."""
    micro, accum = saved["micro_batch"] or micro_batch, saved["grad_accum"]
    if accum is None:
        raise ElasticError(f"the checkpoint was saved at {saved['world_size']} workers without "
                           "its batch topology (an older lladav); resume it at that world size")
    global_batch = saved["world_size"] * micro * accum
    if micro != micro_batch or global_batch % (world_size * micro):
        raise ElasticError(
            f"the checkpoint was trained with a global batch of {global_batch} samples ("
            f"{saved['world_size']} workers x micro_batch {micro} x grad_accum {accum}); "
            f"{world_size} workers x micro_batch {micro_batch} cannot make it with a whole "
            f"accumulation. Resume with a worker count dividing {global_batch // micro} and "
            f"micro_batch {micro}")
    return global_batch // (world_size * micro)


def run_worker(stage: StageConfig, ctx: WorkerContext) -> dict[str, Any]:
    from lladav.data.loader import MixtureLoader
    from lladav.train import engine as eng
    from lladav.train.checkpoints import read_topology, seal
    from lladav.train.stage import format_table
    from lladav.train.step import diffusion_step

    accum, elastic = stage.grad_accum, False
    if ctx.restore_dir:
        saved = read_topology(ctx.restore_dir)
        if saved["world_size"] != ctx.world_size:
            accum, elastic = resume_accumulation(saved, stage.micro_batch, ctx.world_size), True
        elif saved["grad_accum"] is not None:
            accum = saved["grad_accum"]
    model, groups, rows, ds_config = prepare_model(stage, ctx.world_size, accum, elastic)
    if ctx.rank == 0:
        log.info("stage %s\n%s", stage.name, format_table(rows))

    loader = MixtureLoader(stage.mixture, batch_size=stage.micro_batch, rank=ctx.rank,
                           world_size=ctx.world_size, num_workers=stage.loader_workers,
                           seed=stage.seed, group_by_length=stage.group_by_length,
                           end_of_answer=stage.end_of_answer, shuffle=stage.shuffle,
                           shard_cache=stage.shard_cache, packing=stage.packing,
                           step_batches=ctx.world_size * accum)
    steps_per_epoch = max(1, len(loader) // accum)
    total = stage.max_steps or stage.epochs * steps_per_epoch
    engine = eng.initialize(model, groups, ds_config, total_steps=total,
                            warmup_ratio=stage.warmup_ratio, betas=stage.betas,
                            eps=stage.adam_eps, weight_decay=stage.weight_decay)

    step, ledger = 0, []
    if ctx.restore_dir:
        client, ledger = _restore(engine, ctx, groups, elastic)
        step = int(client["step"])
        loader.load_state_dict(client["loader"])
        log.info("rank %d resumed at step %d (epoch %d)%s", ctx.rank, step, loader.epoch,
                 f", elastic: {ctx.world_size} workers x {accum} accumulation" if elastic else "")

    local_fraction = _local_fraction(engine.module)
    names = [g["name"] for g in groups]
    micro = 0
    window = _Window(sum(int(getattr(p, "ds_numel", p.numel())) for p in engine.module.parameters()))
    while step < total:
        for batch in loader:
            eng.start_micro_batch(engine)
            loss, metrics = diffusion_step(engine.module, batch, stage.seed, loader.aspect,
                                           stage.objective)
            engine.backward(loss)
            rates = engine.get_lr()     # this step's rates: engine.step() moves the schedule on
            engine.step()
            ledger.extend(batch.keys)
            window.add(metrics, batch)
            micro += 1
            if micro % accum:
                continue
            step += 1
            checkpoint = step % stage.checkpoint.every_steps == 0 or step == total
            report = {"step": step, "total_steps": total, "epoch": loader.epoch,
                      "local_param_fraction": local_fraction,
                      **_learning_rates(rates, names), **_grad_norm(engine),
                      **window.flush(ctx.world_size)}
            if ctx.rank == 0 and (step % stage.log_every == 0 or step in (1, total)):
                # Ray Train sends its workers' INFO logs to the driver's console once (a print
                # came out twice) and to the worker's log file.
                log.info(step_line(stage.name, report))
            if ctx.on_step is not None:  # told whether a checkpoint follows (not a metric)
                ctx.on_step(step, ctx.rank, {**report, "checkpoint": checkpoint})
            if checkpoint:
                with tempfile.TemporaryDirectory(dir=ctx.tmp_root) as folder:
                    eng.save_checkpoint(engine, folder, {
                        "step": step, "loader": loader.state_dict(), "ledger": ledger,
                        "stage": stage.name})
                    if ctx.rank == 0:  # the export needs the config beside the shards
                        engine.module.config.save_pretrained(folder)
                    with open(os.path.join(folder, f"ledger-rank{ctx.rank}.json"), "w") as f:
                        json.dump(ledger, f)  # the samples this rank consumed, for audits
                    seal(folder, ctx.rank, ctx.world_size, step,  # last: lists the files above
                         {"micro_batch": stage.micro_batch, "grad_accum": accum})
                    ctx.report(report, folder)
            # No report between checkpoints: Ray Train V2 takes one result per controller poll
            # (every 2 s), so reporting every step made each step wait for the poll (bench/
            # train_step.py measured ~2 s per tiny step). Per-step metrics go to on_step.
            if step >= total:
                break
    return {"step": step, "ledger": ledger}


def _restore(engine: Any, ctx: WorkerContext, groups: list[dict],
             elastic: bool) -> tuple[dict, list[str]]:
    """Load the checkpoint in ctx.restore_dir; returns (client state, this rank's ledger).

    Same world size: DeepSpeed's own load, each rank its own shard and client state. Another
    world size (elastic): the checkpoint is converted to DeepSpeed's universal layout once per
    node (a file lock beside it), loaded by every rank (train/engine.load_universal), and the
    consumed-sample ledgers of all saved ranks go to rank 0 (the others start empty), so the
    union of the ledgers stays the run's.
    """
    from lladav.train import engine as eng

    if not elastic:
        client = eng.load_checkpoint(engine, ctx.restore_dir)
        return client, list(client["ledger"])
    import glob

    import torch.distributed as dist
    from filelock import FileLock

    universal = ctx.restore_dir.rstrip("/") + ".universal"
    with FileLock(universal + ".lock"):
        if not os.path.exists(os.path.join(universal, "converted")):
            eng.to_universal(ctx.restore_dir, universal)
            open(os.path.join(universal, "converted"), "w").close()
    if dist.is_initialized():
        dist.barrier()
    client = eng.load_universal(engine, universal, ctx.restore_dir, [g["name"] for g in groups])
    if dist.is_initialized():
        dist.barrier()                       # every rank has read it: the copy can go
    shutil.rmtree(universal, ignore_errors=True)
    ledger: list[str] = []
    if ctx.rank == 0:
        names = sorted(glob.glob(os.path.join(ctx.restore_dir, "ledger-rank*.json")),
                       key=lambda n: int(n.rsplit("rank", 1)[1].split(".")[0]))
        for name in names:
            with open(name) as f:
                ledger += json.load(f)
    return client, ledger


def _learning_rates(rates: list[float], names: list[str]) -> dict[str, float]:
    """lr (the first group's, as before) and lr/<group> for each trained component."""
    return {"lr": rates[0], **{f"lr/{n}": r for n, r in zip(names, rates)}}


def _grad_norm(engine: Any) -> dict[str, float]:
    """The global gradient norm of the step (before clipping), when DeepSpeed computed one."""
    norm = engine.get_global_grad_norm()
    return {} if norm is None else {"grad_norm": float(norm)}


def step_line(stage: str, r: dict[str, Any]) -> str:
    """One readable line per logging interval (the same values go to MLflow through on_step)."""
    parts = [f"stage {stage} step {r['step']}/{r['total_steps']}", f"loss {r['loss']:.4f}"]
    if "answer_loss" in r:
        parts.append(f"answer_loss {r['answer_loss']:.4f}")
    if "grad_norm" in r:
        parts.append(f"grad_norm {r['grad_norm']:.3g}")
    parts.append("lr " + " ".join(f"{k[3:]}={v:.2e}" for k, v in r.items() if k.startswith("lr/")))
    parts += [f"{r['samples_per_s']:.1f} samples/s", f"{r['tokens_per_s']:.0f} tokens/s",
              f"pad {100 * r['padding_fraction']:.1f}%"]
    if "mfu" in r:
        parts.append(f"mfu {100 * r['mfu']:.1f}%")
    return " | ".join(parts)


def _local_fraction(model: Any) -> float:
    """Share of the parameters this rank holds: ~1/world_size under ZeRO-3 partitioning."""
    full = local = 0
    for p in model.parameters():
        n = int(getattr(p, "ds_numel", p.numel()))
        full += n
        local += int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else n
    return local / max(full, 1)


PEAK_BF16_FLOPS = {"H100": 989e12, "H800": 989e12, "H200": 989e12, "A100": 312e12,
                   "A800": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}
"""Dense bf16 peak per GPU by device-name fragment (vendor data sheets), for the MFU estimate."""


def _peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def _all_reduce_sum(values: list[float]) -> list[float]:
    """Sums over all ranks (one small collective; every rank calls it at every step)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
    return t.cpu().tolist()


class _Window:
    """The metrics of one optimizer step, summed over its micro-batches and all ranks: the global
    mean loss (every rank reports the same value), throughput, padding, and the answer-only
    metrics. answer_loss / answer_accuracy: mean cross-entropy and argmax accuracy at the masked
    positions inside the assistant's words (absent when no such position was masked); a model
    that learnt the template but not the answers shows a low loss beside a high answer_loss.
    mfu (GPU only): 6 x parameters x tokens/s over the GPUs' dense bf16 peak."""

    FIELDS = ("loss", "micro", "samples", "tokens", "pad", "answer_masked", "answer_ce",
              "answer_correct")

    def __init__(self, parameters: int = 0) -> None:
        self.parameters = parameters
        self.t0 = time.perf_counter()
        self.sums = dict.fromkeys(self.FIELDS, 0.0)

    def add(self, metrics: dict[str, Any], batch: Any) -> None:
        n = len(batch.keys)
        for key, value in (("loss", metrics["loss"]), ("micro", 1), ("samples", n),
                           ("tokens", metrics["tokens"]), ("pad", batch.padding_fraction * n),
                           ("answer_masked", metrics["answer_masked"]),
                           ("answer_ce", metrics["answer_ce"]),
                           ("answer_correct", metrics["answer_correct"])):
            self.sums[key] += value

    def flush(self, world_size: int) -> dict[str, float]:
        total = dict(zip(self.FIELDS, _all_reduce_sum([self.sums[k] for k in self.FIELDS])))
        dt = max(time.perf_counter() - self.t0, 1e-9)
        out = {"loss": total["loss"] / max(total["micro"], 1),
               "samples_per_s": total["samples"] / dt, "tokens_per_s": total["tokens"] / dt,
               "padding_fraction": total["pad"] / max(total["samples"], 1)}
        if total["answer_masked"]:
            out["answer_loss"] = total["answer_ce"] / total["answer_masked"]
            out["answer_accuracy"] = total["answer_correct"] / total["answer_masked"]
        peak = _peak_flops()
        if peak and self.parameters:
            out["mfu"] = 6 * self.parameters * out["tokens_per_s"] / (world_size * peak)
        self.__init__(self.parameters)
        return out
