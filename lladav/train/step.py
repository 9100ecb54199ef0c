"""One masked-diffusion training step of LLaDA-V, as a function the loop calls blindly.

    batch (ids with IMAGE_PLACEHOLDER_ID, targets, image tiles) --model.embed_multimodal-->
    inputs_embeds + image positions --splice_targets--> labels, targets, own positions on the
    spliced length --forward_process--> masked, p --apply_mask--> noisy embeds
    --model (attention hidden from inert padding)--> logits --loss-->

Owns: gluing the model (logits only) to the objective (diffusion.py) for one batch, and the
metrics a step reports, the answer-only ones included. Does not own: the optimizer, DeepSpeed or
the data order (train/loop.py, train/engine.py, data/loader.py), or the end-of-answer policy
(config.EndOfAnswer, applied by data/loader.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lladav.data.conversation import IMAGE_PLACEHOLDER_ID
from lladav.diffusion import apply_mask, diffusion_loss, forward_process


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


def diffusion_step(model: Any, batch: Any, generator: torch.Generator | None = None,
                   aspect: str | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one batch under a fresh draw of t and masks; returns (loss, metrics).

    Metrics: the loss, token counts, and the answer-only sums (`answer_masked`, `answer_ce`,
    `answer_correct`: masked positions in the assistant's words, their summed cross-entropy and
    argmax hits) that make a model which learnt the template but not the answers visible.
    """
    eos_id = model.config.text_config.eos_token_id
    embeds, image_pos = model.embed_multimodal(list(batch.ids), batch.images, batch.image_sizes,
                                               aspect=aspect)
    s = splice_targets(batch.ids, batch.targets, image_pos.cpu(), eos_id, batch.answer,
                       batch.lengths, batch.pads_are_targets)
    device = embeds.device
    labels, targets = s.labels.to(device), s.targets.to(device)
    masked, p, _ = forward_process(targets, generator)
    noisy = apply_mask(embeds, masked.to(device), model.mask_embedding)
    # The reference's EOS padding is attended by everything; an own-tail batch hides its padding.
    hide = not batch.pads_are_targets and not bool(s.own.all())
    attention = s.own.to(device) if hide else None
    logits = model(inputs_embeds=noisy, attention_mask=attention).logits
    loss = diffusion_loss(logits, labels, masked, targets, p.to(logits.device))
    with torch.no_grad():
        rows, cols = (masked & s.answer.to(device)).nonzero(as_tuple=True)
        picked = logits[rows, cols].float()                                      # (N, V)
        answer_ce = F.cross_entropy(picked, labels[rows, cols], reduction="sum") if len(rows) else 0.0
        answer_correct = (picked.argmax(-1) == labels[rows, cols]).sum() if len(rows) else 0
    return loss, {"loss": float(loss.detach()), "masked_tokens": int(masked.sum()),
                  "target_tokens": int(targets.sum()), "tokens": int(s.own.sum()),
                  "image_tokens": int(image_pos.sum()), "answer_masked": int(len(rows)),
                  "answer_ce": float(answer_ce), "answer_correct": int(answer_correct)}
