"""One masked-diffusion training step of LLaDA-V, as a function the loop calls blindly.

    batch (ids with IMAGE_PLACEHOLDER_ID, targets, image tiles) --model.embed_multimodal-->
    inputs_embeds + image positions --splice_targets--> labels, targets on the spliced length
    --forward_process--> masked, p --apply_mask--> noisy embeds --model--> logits --loss-->

Owns: gluing the model (logits only) to the objective (diffusion.py) for one batch, and the
metrics a step reports. Does not own: the optimizer, DeepSpeed or the data order (train/loop.py,
train/engine.py, data/loader.py).
"""

from __future__ import annotations

from typing import Any

import torch

from lladav.data.conversation import IMAGE_PLACEHOLDER_ID
from lladav.diffusion import apply_mask, diffusion_loss, forward_process


def splice_targets(ids: torch.Tensor, targets: torch.Tensor, image_positions: torch.Tensor,
                   eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Carry token labels and the target mask onto the spliced sequence.

    ids, targets: (B, L) with IMAGE_PLACEHOLDER_ID where images go; image_positions: (B, L')
    from the splice. Text positions keep their order, image positions are never targets, and
    the positions past a sample's own length are EOS pads, which are targets (the reference's
    EOS padding). Returns labels (B, L') long and targets (B, L') bool.
    """
    b, length = image_positions.shape
    labels = torch.full((b, length), eos_id, dtype=torch.long, device=ids.device)
    out_targets = torch.ones((b, length), dtype=torch.bool, device=ids.device)
    for i in range(b):
        text = ids[i] != IMAGE_PLACEHOLDER_ID
        text_ids, text_targets = ids[i][text], targets[i][text].bool()
        slots = (~image_positions[i]).nonzero().flatten()[: len(text_ids)]
        labels[i, slots] = text_ids
        out_targets[i, slots] = text_targets
        out_targets[i, image_positions[i]] = False
        labels[i, image_positions[i]] = eos_id  # never read: not a target
    return labels, out_targets


def diffusion_step(model: Any, batch: Any, generator: torch.Generator | None = None,
                   aspect: str | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one batch under a fresh draw of t and masks; returns (loss, metrics)."""
    eos_id = model.config.text_config.eos_token_id
    embeds, image_pos = model.embed_multimodal(list(batch.ids), batch.images, batch.image_sizes,
                                               aspect=aspect)
    labels, targets = splice_targets(batch.ids, batch.targets, image_pos.cpu(), eos_id)
    labels, targets = labels.to(embeds.device), targets.to(embeds.device)
    masked, p, _ = forward_process(targets, generator)
    noisy = apply_mask(embeds, masked.to(embeds.device), model.mask_embedding)
    logits = model(inputs_embeds=noisy).logits
    loss = diffusion_loss(logits, labels, masked, targets, p.to(logits.device))
    n_tokens = targets.numel()
    return loss, {"loss": float(loss.detach()), "masked_tokens": int(masked.sum()),
                  "target_tokens": int(targets.sum()), "tokens": n_tokens,
                  "image_tokens": int(image_pos.sum())}
