"""The masked-diffusion objective of LLaDA-V: the forward (masking) process and the CE/p loss.

    targets (B, L) --sample_t, mask_targets--> masked (B, L), p (B,)
    inputs_embeds (B, L, D) --apply_mask--> noisy embeds --model--> logits (B, L, V)
    logits, labels, masked, targets, p --diffusion_loss--> scalar

Per sample, t ~ U[0, 1) and p = (1 - EPS) t + EPS; every target position is masked independently
with probability p, in embedding space (after the image features are spliced in), and

    loss = 1/B Σ_b Σ_{masked i of b} CE(logits_bi, label_bi) / p_b / n_targets_b

(digest §3.1; the reference's `forward_process_embeds`). Draw order: rand(B) then rand(B, L) over
the full spliced length, so a generator seeded like the reference's gives the same masks.

Training draws per sample instead (`sample_masks`): each sample has its own generator seeded
from (stage seed, epoch, sample key) (`mask_seed`), draws its t, then u over its own positions
first, so its masks do not depend on the world size, the loader workers, its batch or its rank
(NeMo's per-sample corruption seed; elastic resume needs it). Options beside the paper's
default: t drawn from a sub-range of [0, 1), and complementary masking (LaViDa): a second mask
that is exactly the complement within the targets, weighted by its own p = 1 - p1.

Only the masked rows' cross-entropy enters the loss: `row_loss` weights per-row values (from
the chunked head, model/head.py, or from full logits in `diffusion_loss`).

Owns: t, the masks, replacing masked inputs by [M], the loss. Does not own: which positions are
targets (data/conversation.py, train/step.py), the model, or sampling (sampler.py). The mask
token id and its embedding are always arguments, never literals.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lladav.digest import hash_key

EPS = 1e-3
"""Floor of the masking probability, p = (1 - EPS) t + EPS, so no sample has p = 0 and 1/p stays
finite (LLaDA GUIDELINES.md and LLaDA-V `modeling_llada.py`, `eps=1e-3`; digest §3.1)."""


def _draw_device(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    return generator.device if generator is not None else fallback


def sample_t(batch_size: int, generator: torch.Generator | None = None,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """t ~ U[0, 1), one per sample: (B,) float32, on the generator's device if one is given."""
    return torch.rand(batch_size, generator=generator,
                      device=_draw_device(generator, torch.device(device)))


def mask_targets(targets: torch.Tensor, t: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each target position with probability p = (1 - EPS) t + EPS.

    targets (B, L) bool, t (B,). Returns masked (B, L) bool (a subset of targets) and p (B,),
    both on targets' device. u is drawn over the full length, targets or not (reference order).
    """
    b, length = targets.shape
    p = (1 - EPS) * t + EPS  # (B,)
    u = torch.rand(b, length, generator=generator,
                   device=_draw_device(generator, targets.device))  # (B, L)
    masked = (u < p.to(u.device)[:, None]).to(targets.device) & targets.bool()
    return masked, p.to(targets.device)


def forward_process(targets: torch.Tensor, generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sample_t then mask_targets: returns masked (B, L) bool, p (B,), t (B,)."""
    t = sample_t(targets.shape[0], generator, targets.device)
    masked, p = mask_targets(targets, t, generator)
    return masked, p, t.to(targets.device)


def apply_mask(inputs_embeds: torch.Tensor, masked: torch.Tensor,
               mask_embedding: torch.Tensor) -> torch.Tensor:
    """Replace masked positions by the [M] embedding: (B, L, D), (B, L) bool, (D,) -> (B, L, D).

    A `where`, not an in-place write, so gradients reach both the unmasked inputs and the [M] row.
    """
    return torch.where(masked[..., None], mask_embedding.to(inputs_embeds.dtype), inputs_embeds)


def apply_mask_ids(ids: torch.Tensor, masked: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Token-id variant for text-only inputs: (B, L) long, (B, L) bool -> (B, L) long."""
    return ids.masked_fill(masked, mask_id)


def mask_seed(seed: int, epoch: int, key: str) -> int:
    """The 63-bit seed of one sample's masks in one epoch (sha256 of seed, "mask", epoch, key)."""
    return int(hash_key(seed, "mask", epoch, key)[:16], 16) >> 1


def sample_masks(targets: torch.Tensor, sample_of: torch.Tensor, seeds: list[int],
                 t_range: tuple[float, float] = (0.0, 1.0)
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample draws: masked (B, L) bool, p (S,), t (S,), on targets' device.

    sample_of (B, L) long: the sample index of each position (0..S-1; -1 where no sample is,
    never masked): a row per sample, or several packed samples per row. Sample s's generator is
    seeded with seeds[s]; it draws t = lo + (hi - lo) U[0, 1), then one u per position of s in
    row-major order (its own tokens before any batch padding it owns), so a sample's masks never
    depend on what it is batched or packed with.
    """
    lo, hi = t_range
    where = sample_of.cpu()
    t = torch.empty(len(seeds))
    u = torch.ones(targets.shape)                       # u = 1 is never < p: never masked
    for i, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(int(seed))
        t[i] = lo + (hi - lo) * torch.rand(1, generator=g)[0]
        mine = where == i
        u[mine] = torch.rand(int(mine.sum()), generator=g)
    p = (1 - EPS) * t + EPS                              # (S,)
    p_at = torch.where(where >= 0, p[where.clamp(min=0)], torch.zeros(()))   # (B, L)
    masked = (u < p_at).to(targets.device) & targets.bool()
    return masked, p.to(targets.device), t.to(targets.device)


def complement(targets: torch.Tensor, masked: torch.Tensor, p: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The complementary mask: every target not in `masked`, with its masking probability
    1 - p (floored at EPS like p). Each target is then masked in exactly one of the pair."""
    return targets.bool() & ~masked, (1 - p).clamp(min=EPS)


def row_loss(token_ce: torch.Tensor, sample: torch.Tensor, p: torch.Tensor,
             n_targets: torch.Tensor) -> torch.Tensor:
    """Σ_masked CE / p_s / n_targets_s over the samples, divided by their number S (a scalar).

    token_ce (N,): the cross-entropy of each masked position; sample (N,): its sample index;
    p (S,) and n_targets (S,): each sample's masking probability and target count (pads
    included when they are targets, digest §3.1). No masked token gives 0 (attached to the
    graph when token_ce is).
    """
    dev = token_ce.device
    weight = 1.0 / (p.to(dev).float() * n_targets.to(dev).float().clamp(min=1))   # (S,)
    return (token_ce * weight[sample.to(dev)]).sum() / len(p)


def diffusion_loss(logits: torch.Tensor, labels: torch.Tensor, masked: torch.Tensor,
                   targets: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Σ_masked CE / p_b / n_targets_b, summed over the batch and divided by B (a scalar).

    logits (B, L, V) any float dtype (the CE runs in float32, as in the reference), labels (B, L)
    long (read only where masked), masked and targets (B, L) bool, p (B,). Only the masked rows
    enter the CE: the same value as the reference's full (B, L, V) float32 CE, without building
    it. No masked token gives 0, still attached to the graph (zero gradient, no NaN).
    """
    masked, targets = masked.to(logits.device), targets.to(logits.device)
    if bool((masked & ~targets).any()):
        raise ValueError("diffusion_loss: some masked positions are not targets; mask with "
                         "mask_targets(targets, ...) so only targets can be masked")
    rows, cols = masked.nonzero(as_tuple=True)  # (N,), (N,): the masked tokens
    token_ce = F.cross_entropy(logits[rows, cols].float(), labels.to(logits.device)[rows, cols],
                               reduction="none")  # (N,)
    return row_loss(token_ce, rows, p, targets.sum(dim=1))
