"""One masked-diffusion training step of LLaDA-V, as a function the loop calls blindly.

    batch (ids with IMAGE_PLACEHOLDER_ID, targets, image tiles) --model.embed_multimodal-->
    inputs_embeds + image positions --splice_targets--> labels, targets, own positions on the
    spliced length --[pack_rows]--> rows --sample_masks (per sample: seed, epoch, key)--> masked, p
    [--complement--> a second, disjoint mask] --apply_mask--> noisy rows (both masks stacked)
    --model (logits=False; attention hidden from inert padding / kept inside each packed sample)
    --> hidden --lm_head(masked rows, labels) (chunked, model/head.py)--> CE per row --row_loss-->

Never builds (B, L, V) logits: the head and its cross-entropy run only on the masked rows, in
chunks, in one module call (under ZeRO-3 the head's weight is gathered once per step).

Owns: gluing the model to the objective (diffusion.py) for one batch, packing spliced samples
into rows, and the metrics a step reports, the answer-only ones included. Does not own: the
optimizer, DeepSpeed or the data order (train/loop.py, train/engine.py, data/loader.py), or
the end-of-answer policy (config.EndOfAnswer, applied by data/loader.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lladav.config import Objective
from lladav.data.conversation import IMAGE_PLACEHOLDER_ID
from lladav.diffusion import apply_mask, complement, mask_seed, row_loss, sample_masks


@dataclass
class Spliced:
    """Text-level masks carried onto the spliced sequence: (B, L') each."""

    labels: torch.Tensor   # long: the token at each text position, EOS elsewhere (never read)
    targets: torch.Tensor  # bool: training targets
    answer: torch.Tensor   # bool: targets in the assistant's own words
    own: torch.Tensor      # bool: the sample's own positions (text, images, EOS tail)


def splice_targets(ids: torch.Tensor, targets: torch.Tensor, image_positions: torch.Tensor,
                   eos_id: int, answer: torch.Tensor | None = None,
                   lengths: list[int] | None = None, pads_are_targets: bool = True) -> Spliced:
    """Carry token labels and the target masks onto the spliced sequence.

    ids, targets, answer: (B, L) with IMAGE_PLACEHOLDER_ID where images go; image_positions:
    (B, L') from the splice. Text positions keep their order and image positions are never
    targets. `lengths[b]` is how many text positions belong to sample b (its tokens and its EOS
    tail; default: all L). Positions past a sample's own ones are batch padding: EOS targets when
    `pads_are_targets` (the reference's EOS padding), inert otherwise.
    """
    b, length = image_positions.shape
    lengths = lengths or [ids.shape[1]] * b
    answer = torch.zeros_like(targets, dtype=torch.bool) if answer is None else answer
    labels = torch.full((b, length), eos_id, dtype=torch.long, device=ids.device)
    out_targets = torch.full((b, length), pads_are_targets, dtype=torch.bool, device=ids.device)
    out_answer = torch.zeros((b, length), dtype=torch.bool, device=ids.device)
    own = torch.zeros((b, length), dtype=torch.bool, device=ids.device)
    for i in range(b):
        row = slice(0, lengths[i])
        text = ids[i, row] != IMAGE_PLACEHOLDER_ID
        text_ids = ids[i, row][text]
        slots = (~image_positions[i]).nonzero().flatten()[: len(text_ids)]
        labels[i, slots] = text_ids
        out_targets[i, slots] = targets[i, row][text].bool()
        out_answer[i, slots] = answer[i, row][text].bool()
        out_targets[i, image_positions[i]] = False
        own[i, : len(text_ids) + int(image_positions[i].sum())] = True
    return Spliced(labels, out_targets, out_answer, own)


@dataclass
class Rows:
    """What the language model sees: (R, W) per position, R rows of width W. Unpacked, a row is
    a sample (R = S); packed, a row holds several samples, each at positions 0.. of its own."""

    embeds: torch.Tensor      # (R, W, D)
    labels: torch.Tensor      # long
    targets: torch.Tensor     # bool
    answer: torch.Tensor      # bool
    sample_of: torch.Tensor   # long: the sample (0..S-1) at each position, -1 on row padding
    attention: torch.Tensor | None   # (R, W) bool key mask (unpacked own-tail batches), or None
    positions: torch.Tensor | None   # (R, W) RoPE positions (packed), or None: 0..W-1
    segments: torch.Tensor | None    # (R, W) long: attention blocks (packed), or None
    tokens: int = 0                  # the samples' own positions (no padding)
    image_tokens: int = 0


def pack_rows(embeds: torch.Tensor, s: Spliced, packs: list[list[int]]) -> Rows:
    """Lay each pack's samples side by side in one row: sample i's own positions (its text,
    image tokens and EOS tail, `s.own[i]`, a prefix of its row) at offsets 0, n_0, n_0 + n_1, ...
    Row padding is zeros in a segment of its own (-1): no sample attends to it, nothing trains
    on it. The index copy keeps gradients flowing to the spliced embeddings."""
    n_samples, length, dim = embeds.shape
    own = s.own.sum(dim=1).tolist()
    width = max(sum(own[i] for i in pack) for pack in packs)
    pad = n_samples * length                                      # index of the zero vector
    index = torch.full((len(packs), width), pad, dtype=torch.long)
    sample_of = torch.full((len(packs), width), -1, dtype=torch.long)
    positions = torch.zeros((len(packs), width), dtype=torch.long)
    for r, pack in enumerate(packs):
        off = 0
        for i in pack:
            n = own[i]
            index[r, off:off + n] = i * length + torch.arange(n)
            sample_of[r, off:off + n] = i
            positions[r, off:off + n] = torch.arange(n)
            off += n
    flat = torch.cat([embeds.reshape(-1, dim), embeds.new_zeros(1, dim)])
    device = embeds.device

    def take(x: torch.Tensor, fill: Any) -> torch.Tensor:
        flat_x = torch.cat([x.reshape(-1), x.new_full((1,), fill)])
        return flat_x[index.to(x.device)]

    return Rows(flat[index.to(device)], take(s.labels, 0), take(s.targets, False),
                take(s.answer, False), sample_of.to(device), None, positions.to(device),
                sample_of.to(device))


def batch_rows(model: Any, batch: Any, aspect: str | None = None) -> Rows:
    """Splice the batch's images and lay its samples out in rows (packed when `batch.packs`)."""
    eos_id = model.config.text_config.eos_token_id
    embeds, image_pos = model.embed_multimodal(list(batch.ids), batch.images, batch.image_sizes,
                                               aspect=aspect)
    s = splice_targets(batch.ids, batch.targets, image_pos.cpu(), eos_id, batch.answer,
                       batch.lengths, batch.pads_are_targets)
    device = embeds.device
    s = Spliced(*(x.to(device) for x in (s.labels, s.targets, s.answer, s.own)))
    counts = {"tokens": int(s.own.sum()), "image_tokens": int(image_pos.sum())}
    packs = getattr(batch, "packs", None)
    if packs is not None:
        if not getattr(model, "supports_packing", False):
            raise TypeError(f"{type(model).__name__} cannot keep packed samples apart (no "
                            "`supports_packing`: per-row positions and a per-sample attention "
                            "block); train this stage without `packing:`")
        rows = pack_rows(embeds, s, packs)
        rows.tokens, rows.image_tokens = counts["tokens"], counts["image_tokens"]
        return rows
    n = embeds.shape[0]
    sample_of = torch.arange(n, device=device)[:, None].expand(n, embeds.shape[1])
    # The reference's EOS padding is attended by everything; an own-tail batch hides its padding.
    hide = not batch.pads_are_targets and not bool(s.own.all())
    return Rows(embeds, s.labels, s.targets, s.answer, sample_of, s.own if hide else None,
                None, None, **counts)


def batch_masks(rows: Rows, keys: list[str], seed: int, epoch: int,
                objective: Objective) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(masked (R, W), p (S,))], one pair, or two disjoint ones under complementary masking;
    every sample's draws come from mask_seed(seed, epoch, key): no rank, no batch-mate enters."""
    seeds = [mask_seed(seed, epoch, key) for key in keys]
    masked, p, _ = sample_masks(rows.targets, rows.sample_of, seeds, objective.t_range)
    passes = [(masked, p)]
    if objective.complementary:
        passes.append(complement(rows.targets, masked, p))
    return passes


def diffusion_step(model: Any, batch: Any, seed: int = 0, aspect: str | None = None,
                   objective: Objective | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one batch under its samples' masks for this epoch; returns (loss, metrics).

    Metrics: the loss, token counts, and the answer-only sums (`answer_masked`, `answer_ce`,
    `answer_correct`: masked positions in the assistant's words, their summed cross-entropy and
    argmax hits) that make a model which learnt the template but not the answers visible.
    """
    objective = objective or Objective()
    rows = batch_rows(model, batch, aspect)
    passes = batch_masks(rows, list(batch.keys), seed, batch.epoch, objective)
    mask_embedding = model.mask_embedding
    k = len(passes)

    def per_pass(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else torch.cat([x] * k)

    noisy = torch.cat([apply_mask(rows.embeds, m, mask_embedding) for m, _ in passes])
    hidden = model(inputs_embeds=noisy, attention_mask=per_pass(rows.attention),
                   positions=per_pass(rows.positions), segments=per_pass(rows.segments),
                   logits=False).hidden                                      # (k R, W, D)
    n_rows = rows.embeds.shape[0]
    where = [m.nonzero(as_tuple=True) for m, _ in passes]                   # masked (row, col)
    picked = torch.cat([hidden[r + j * n_rows, c] for j, (r, c) in enumerate(where)])
    labels = torch.cat([rows.labels[r, c] for r, c in where])
    ce, correct = model.language_model.lm_head(picked, labels, objective.head_chunk)   # (N,)
    n_samples = len(batch.keys)
    n_targets = torch.zeros(n_samples, device=ce.device).index_add_(
        0, rows.sample_of[rows.targets].to(ce.device),
        torch.ones(int(rows.targets.sum()), device=ce.device))
    loss, start = ce.sum() * 0.0, 0
    for (r, c), (_, p) in zip(where, passes):
        end = start + len(r)
        loss = loss + row_loss(ce[start:end], rows.sample_of[r, c], p, n_targets) / k
        start = end
    with torch.no_grad():
        in_answer = torch.cat([rows.answer[r, c] for r, c in where])
        answer_ce = float(ce[in_answer].sum()) if bool(in_answer.any()) else 0.0
        answer_correct = int(correct[in_answer].sum())
    return loss, {"loss": float(loss.detach()), "masked_tokens": len(labels),
                  "target_tokens": int(rows.targets.sum()), "tokens": rows.tokens,
                  "image_tokens": rows.image_tokens, "answer_masked": int(in_answer.sum()),
                  "answer_ce": answer_ce, "answer_correct": answer_correct}
