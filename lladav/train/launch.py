"""`lladav train STAGE.yaml`: a stage as a Ray Train job, then its consolidated export.

    TorchTrainer(ScalingConfig(workers, GPUs, resources), RunConfig(name, storage, FailureConfig,
    CheckpointConfig)) -> each worker: train/loop.run_worker -> checkpoints to the storage URI
    -> after fit: the last checkpoint -> export.export_consolidated -> the stage's output URI

Resuming: a lost worker makes Ray Train restart the whole group (up to `max_failures` times);
each new worker finds the last reported checkpoint with `ray.train.get_checkpoint()` and the
loop continues from it. Rerunning a stage with the same run name and storage (the pipeline's
step key) makes Ray Train restore that run's latest checkpoint the same way (Ray 2.60, Train V2:
`resume_from_checkpoint` is gone; a run snapshot in storage is picked up by name). The rerun
may use another `scaling.workers`: the loop keeps the checkpoint's global batch by recomputing
the accumulation (train/loop.py, elastic resume) or stops saying which worker counts can.

A damaged checkpoint does not block the stage: before loading, the workers verify the one Ray
hands back against its ranks' integrity files (train/checkpoints.py), each rank hashing its own
shards; if any problem is found, rank 0 logs a warning naming the checkpoint and the problems,
and the workers try the run's older checkpoints in storage, newest first, and resume from the
first intact one (the skipped one keeps its slot of `checkpoint.keep` until Ray rotates it out).
None intact fails the stage with every checkpoint and its problems.

This is the only module that imports `ray.train` (STYLE item 6).
Owns: turning a StageConfig into a Ray Train job and publishing the export. Does not own: what a
worker does (train/loop.py) or DeepSpeed (train/engine.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable

from lladav import storage
from lladav.config import ConfigError, StageConfig
from lladav.ray_cluster import ensure_ray
from lladav.train import checkpoints

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    export_uri: str
    checkpoint_path: str
    metrics: dict[str, Any]


def _worker_entry(config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker: wires Ray's context into the plain loop."""
    import ray.train
    from ray.train import Checkpoint

    from lladav.config import StageConfig
    from lladav.train.loop import WorkerContext, run_worker

    stage = StageConfig.model_validate(config["stage"])
    context = ray.train.get_context()

    def report(metrics: dict[str, Any], folder: str | None) -> None:
        checkpoint = Checkpoint.from_directory(folder) if folder else None
        ray.train.report(metrics, checkpoint=checkpoint)
        if checkpoint is not None:
            # Train V2 passes results to the controller through a one-slot queue drained once
            # per poll (2 s). A second report returns only when the checkpoint's result has been
            # taken, so a worker lost right after a checkpoint still resumes from it. The loop
            # reports only at checkpoints, so this wait is paid per checkpoint, not per step.
            ray.train.report(metrics)

    rank, world = context.get_world_rank(), context.get_world_size()
    restored = ray.train.get_checkpoint() or config.get("resume_from")
    if restored is None:
        run_worker(stage, WorkerContext(rank, world, report, on_step=config.get("on_step")))
        return
    skipped: list[tuple[str, list[str]]] = []
    for candidate in _resume_candidates(restored, rank, world):
        with contextlib.ExitStack() as opened:
            try:
                folder = opened.enter_context(candidate.as_directory())
                mine = checkpoints.verify(folder, share=(rank, world))
            except Exception as e:  # noqa: BLE001 - a folder deleted half way, a storage error
                folder, mine = "", [f"unreadable: {type(e).__name__}: {e}"]
            problems = _union_over_ranks(mine, world)  # every rank decides on the same list
            if not problems:
                if skipped and rank == 0:
                    log.warning("stage %s resumes from %s (step %s), the newest intact checkpoint",
                                stage.name, _uri(candidate), checkpoints.read_step(folder))
                run_worker(stage, WorkerContext(rank, world, report, restore_dir=folder,
                                                on_step=config.get("on_step")))
                return
        skipped.append((_uri(candidate), problems))
        if rank == 0:
            log.warning("stage %s skips checkpoint %s: %s", stage.name, _uri(candidate),
                        "; ".join(problems))
    reasons = "\n".join(f"  {uri}: {'; '.join(problems)}" for uri, problems in skipped)
    raise RuntimeError(f"stage {stage.name}: no intact checkpoint to resume from:\n{reasons}\n"
                       "Restore one of them, or start over under another run name (or after "
                       "deleting the run's folder).")


def _resume_candidates(latest: Any, rank: int, world: int) -> Iterator[Any]:
    """The checkpoint Ray hands back, then (only if asked for) the run's older ones in storage,
    newest first. Rank 0 lists them and sends the Checkpoint objects to all ranks: every rank
    tries the same ones, and ranks on one node share each download (as_directory keys it by
    the object's id)."""
    import torch.distributed as dist
    from pyarrow.fs import FileSelector, FileType
    from ray.train import Checkpoint

    yield latest
    older: list[Any] = [None]
    if rank == 0:
        parent, name = posixpath.split(latest.path.rstrip("/"))
        try:
            infos = latest.filesystem.get_file_info(FileSelector(parent, allow_not_found=True))
            siblings = [i.base_name for i in infos if i.type == FileType.Directory]
            older = [[Checkpoint(posixpath.join(parent, n), filesystem=latest.filesystem)
                      for n in checkpoints.fallback_order(name, siblings)]]
        except Exception as e:  # noqa: BLE001 - sent to the other ranks, which would wait forever
            older = [f"could not list the run's checkpoints in {parent}: {type(e).__name__}: {e}"]
    if world > 1:
        dist.broadcast_object_list(older, src=0)
    if isinstance(older[0], str):
        raise RuntimeError(older[0])
    yield from older[0]


def _union_over_ranks(problems: list[str], world: int) -> list[str]:
    if world == 1:
        return problems
    import torch.distributed as dist

    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, problems)  # Ray Train set up the process group already
    return list(dict.fromkeys(p for mine in everyone for p in mine))


def _uri(checkpoint: Any) -> str:
    kind = checkpoint.filesystem.type_name
    return checkpoint.path if kind == "local" else f"{kind}://{checkpoint.path}"


def checkpoint_root(stage: StageConfig) -> str:
    return stage.checkpoint.uri or storage.join(storage.parent(stage.output), f"{stage.name}-checkpoints")


def preflight(stage: StageConfig) -> None:
    """What can fail a stage before any worker starts, failing here rather than 90 s in: a
    mixture counted for another tower (ConfigError naming both), a tokenizer changed since the
    mixture was built (data/tokenizer.TokenizerMismatch naming both digests), and a sample
    longer than the stage's max_length (ConfigError naming both lengths)."""
    from lladav.data.manifest import open_mixture
    from lladav.train.loop import mixture_tokenizer
    from lladav.train.stage import check_geometry, tower_geometry

    mixture = open_mixture(stage.mixture)
    check_geometry(stage.name, tower_geometry(stage.init), mixture.geometry, stage.mixture)
    mixture_tokenizer(stage.mixture)
    longest = mixture.longest_sample()
    if longest > stage.max_length:
        raise ConfigError(f"stage {stage.name}: mixture {stage.mixture} holds a sample of "
                          f"{longest} tokens, more than the stage's max_length {stage.max_length}; "
                          "raise max_length, or rebuild the mixture with a lower `max_length`")


def run_stage(stage: StageConfig, *, run_name: str | None = None,
              on_step: Callable[[int, int, dict[str, Any]], None] | None = None) -> StageResult:
    """Train `stage` on the Ray cluster and publish its consolidated export to `stage.output`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from lladav.model.lladav import LLaDAVConfig
    from lladav.train.export import export_consolidated
    from lladav.train.loop import mixture_tokenizer

    preflight(stage)
    ensure_ray()
    scaling = stage.scaling
    resources = {"CPU": scaling.cpus_per_worker, **scaling.resources}
    if scaling.gpus_per_worker:
        resources["GPU"] = scaling.gpus_per_worker
    trainer = TorchTrainer(
        _worker_entry,
        train_loop_config={"stage": stage.model_dump(mode="json"), "on_step": on_step},
        torch_config=TorchConfig(backend="nccl" if scaling.gpus_per_worker else "gloo"),
        scaling_config=ScalingConfig(num_workers=scaling.workers,
                                     use_gpu=bool(scaling.gpus_per_worker),
                                     resources_per_worker=resources),
        run_config=RunConfig(name=run_name or stage.name, storage_path=checkpoint_root(stage),
                             failure_config=FailureConfig(max_failures=stage.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=stage.checkpoint.keep)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"stage {stage.name}: the run reported no checkpoint")
    tok = mixture_tokenizer(stage.mixture)
    with result.checkpoint.as_directory() as folder, tempfile.TemporaryDirectory() as tmp:
        config = LLaDAVConfig.from_pretrained(folder)  # rank 0 saved it beside the shards
        export_consolidated(folder, os.path.join(tmp, "export"), config)
        tok.tokenizer.save_pretrained(os.path.join(tmp, "export"))
        storage.publish_folder(os.path.join(tmp, "export"), stage.output, last="config.json")
    return StageResult(stage.output, result.checkpoint.path, dict(result.metrics or {}))
