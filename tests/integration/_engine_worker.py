"""One rank of the ZeRO-3 engine test: `torchrun --nproc_per_node=2 _engine_worker.py --out DIR`.

Also runs as a plain `python _engine_worker.py --out DIR`: a world of one, set up in-process.

Trains the tiny LLaDA-V (vision tower frozen, projector and language model at their own rates)
for STEPS steps on a fixed batch per rank, saving a checkpoint after SAVE_AT steps; then a fresh
engine loads that checkpoint and repeats the remaining steps. Writes, per rank, DIR/rank{R}.json
with what tests/integration/test_engine.py asserts, and on rank 0 the tensors it compares:
DIR/final/ (last checkpoint + config.json), DIR/gathered.pt, DIR/engine_logits.pt, DIR/probe.pt.
Last, `load_state_into` fills a fresh partitioned model with seeded full weights.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lladav.model.flavors import lladav_config
from lladav.model.lladav import LLaDAVModel
from lladav.train import engine as eng

STEPS, SAVE_AT = 10, 6
RATES = {"projector": 1e-3, "language_model": 3e-3}  # the vision tower is frozen


def config():
    return lladav_config("tiny", vocab_size=64, mask_token_id=2, eos_token_id=1)


def batch(seed: int) -> torch.Tensor:
    return torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(seed))


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    """Text-only samples as training runs them: a dummy tile through the tower, no splice."""
    embeds, _ = model.embed_multimodal(list(ids), [[] for _ in ids], [[] for _ in ids])
    return model(inputs_embeds=embeds).logits  # (B, L, V)


def loss_of(model, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_of(model, ids).flatten(0, 1), ids.flatten())


def new_engine(ds_config: dict):
    torch.manual_seed(0)
    model = eng.build_model(lambda: LLaDAVModel(config()), ds_config)
    groups = []
    for component, named in model.component_parameters().items():
        for _, p in named:
            p.requires_grad_(component in RATES)
        if component in RATES:
            groups.append({"name": component, "params": [p for _, p in named],
                           "lr": RATES[component]})
    return eng.initialize(model, groups, ds_config, total_steps=STEPS, warmup_ratio=0.1)


def train(engine, ids: torch.Tensor, steps: range) -> tuple[list[float], list[list[float]]]:
    losses, lrs = [], []
    for _ in steps:
        loss = loss_of(engine.module, ids)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
        lrs.append(list(engine.get_lr()))
    return losses, lrs


def tower(engine) -> dict[str, torch.Tensor]:
    full = eng.gather_full_state_dict(engine)
    return {k: v for k, v in full.items() if k.startswith("vision_tower.")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = parser.parse_args().out
    rank, world = eng.init_distributed()
    ds_config = eng.render_ds_config(
        "infra/deepspeed/zero3.json", micro_batch=2, grad_accum=1, world_size=world,
        gradient_clipping=1.0, precision="fp32", hidden_size=64,
        overrides={"zero_optimization.stage3_param_persistence_threshold": 0})
    ids = batch(100 + rank)  # each rank its own data
    result: dict = {"rank": rank, "world": world}
    from deepspeed.comm import comm as ds_comm

    result["shm_comm_built"] = ds_comm.cdb.shm_comm_op is not None

    engine = new_engine(ds_config)
    result["partition"] = {n: [int(p.ds_numel), int(p.ds_tensor.numel()), int(p.numel())]
                           for n, p in engine.module.named_parameters()}
    tower_before = tower(engine)
    losses, lrs = train(engine, ids, range(SAVE_AT))
    rng = torch.Generator().manual_seed(7)
    eng.save_checkpoint(engine, os.path.join(out, "mid"), {"step": SAVE_AT, "rank": rank,
                                                          "rng": rng.get_state()})
    more, more_lrs = train(engine, ids, range(SAVE_AT, STEPS))
    result.update(losses=losses + more, lrs=lrs + more_lrs)

    tower_after = tower(engine)
    if rank == 0:
        result["tower_identical"] = sorted(tower_before) == sorted(tower_after) and all(
            torch.equal(tower_before[k], tower_after[k]) for k in tower_before)
        result["tower_tensors"] = len(tower_before)

    eng.save_checkpoint(engine, os.path.join(out, "final"), {"step": STEPS})
    probe = batch(999)
    engine.module.eval()
    with torch.no_grad():
        logits = logits_of(engine.module, probe)
    gathered = eng.gather_full_state_dict(engine)
    if rank == 0:
        torch.save(gathered, os.path.join(out, "gathered.pt"))
        torch.save(logits, os.path.join(out, "engine_logits.pt"))
        torch.save(probe, os.path.join(out, "probe.pt"))
        engine.module.config.save_pretrained(os.path.join(out, "final"))
    else:
        result["gathered_elsewhere"] = len(gathered)
    engine.module.train()

    resumed = new_engine(ds_config)
    client = eng.load_checkpoint(resumed, os.path.join(out, "mid"))
    result["client"] = {"step": client["step"], "rank": client["rank"],
                        "rng_ok": torch.equal(client["rng"], rng.get_state())}
    result["resumed_losses"], result["resumed_lrs"] = train(resumed, ids, range(SAVE_AT, STEPS))

    torch.manual_seed(1)  # the same full weights on every rank; rank 0's are the ones loaded
    weights = LLaDAVModel(config()).state_dict()
    target = eng.build_model(lambda: LLaDAVModel(config()), ds_config)
    result["load_report"] = eng.load_state_into(target, weights)
    loaded = eng.gather_full_state_dict(target)
    if rank == 0:
        result["load_exact"] = sorted(loaded) == sorted(weights) and all(
            torch.equal(loaded[k], v) for k, v in weights.items())
    try:
        eng.load_state_into(target, {**weights, "extra.weight": torch.zeros(1)})
    except KeyError as e:
        result["strict_error"] = str(e)

    result["head"] = head_vs_full_logits(ds_config, rank)

    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()


def head_vs_full_logits(ds_config: dict, rank: int) -> dict:
    """The training step's loss (hidden states, head on the masked rows in chunks) and the
    pre-change path's (full (B, L, V) logits, then diffusion_loss), each on a fresh engine from
    the same init, under the same masks: the loss and every full gradient (safe_get_full_grad,
    after backward) compared on rank 0."""
    from deepspeed.utils import safe_get_full_grad

    from lladav.config import Objective
    from lladav.data.loader import Batch
    from lladav.diffusion import diffusion_loss
    from lladav.train import step as st

    ids = torch.randint(3, 64, (3, 24), generator=torch.Generator().manual_seed(50 + rank))
    targets = torch.zeros_like(ids, dtype=torch.bool)
    targets[:, 8:] = True
    batch = Batch(ids, targets, targets.clone(), [[], [], []], [[], [], []],
                  [f"r{rank}s{i}" for i in range(3)], [24] * 3, 0, 0, 0, [24] * 3, True)
    objective = Objective(head_chunk=5)
    out = {}
    for path in ("rows", "full"):
        engine = new_engine(ds_config)
        eng.start_micro_batch(engine)
        model = engine.module
        if path == "rows":
            loss, _ = st.diffusion_step(model, batch, seed=9, objective=objective)
        else:
            rows = st.batch_rows(model, batch)
            (masked, p), = st.batch_masks(rows, batch.keys, 9, 0, objective)
            noisy = torch.where(masked[..., None], model.mask_embedding, rows.embeds)
            logits = model(inputs_embeds=noisy).logits
            loss = diffusion_loss(logits, rows.labels, masked, rows.targets, p)
        engine.backward(loss)
        grads = {n: safe_get_full_grad(p) for n, p in model.named_parameters() if p.requires_grad}
        out[path] = (float(loss), {n: g.detach().clone() for n, g in grads.items() if g is not None})
    (loss_rows, g_rows), (loss_full, g_full) = out["rows"], out["full"]
    return {"loss_rows": loss_rows, "loss_full": loss_full, "params": len(g_full),
            "same_names": sorted(g_rows) == sorted(g_full),
            "max_grad_diff": max(float((g_rows[n] - g_full[n]).abs().max()) for n in g_full),
            "max_grad": max(float(g.abs().max()) for g in g_full.values())}


if __name__ == "__main__":
    main()
