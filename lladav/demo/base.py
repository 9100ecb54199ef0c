"""Tiny base checkpoints for the CPU demo: what LLaDA-8B-Instruct and SigLIP2 are to the paper.

LLaDA-V's stage 1 starts from two pretrained checkpoints and trains only the projector between
them (lladav_reference.md "Stages"). The demo cannot download them, and a randomly initialised
tower is a poor stand-in: measured on the shapes corpus, a random tiny tower trained end to end
through the language model learns colour within ~500 steps but stays at chance on position after
3,000 (the answer-word gradient reaching the tower through the LM is too weak and too noisy),
whereas from a tower pretrained as below the same model answers all three factors on its training
set within ~200 steps. So the demo pretrains its tower first, like SigLIP does: a sigmoid
image-text contrastive loss (Zhai et al. 2023) between the tower's image features and the
captions of the synthetic images.

    write_base(corpus, tokenizer, out, flavor="tiny") -> {"language_model": out/llada,
                                                          "vision_tower": out/siglip}

The tower is a plain `SiglipVisionModel` folder and the LM a `LLaDAModelLM` folder, loaded by
`LLaDAVModel.from_components` exactly as the real ones are (a stage's `init.language_model` /
`init.vision_tower`). The image embedding is the mean of the features LLaDA-V consumes (the
`vision_feature_layer` hidden state, not SigLIP's attention-pooling head), so what the
projector reads is what was trained; the text side is a bag of caption tokens, enough to tell
the 27 captions apart. The language model stays a random initialisation: its template and
answer words are learnt in seconds by the stages, and a tiny pretrained LM would add nothing the
demo checks.

Owns: the two base folders and the tower's pretraining. Does not own: drawing the corpus or the
tokenizer (data/synthetic.py), the architectures (llada.py, lladav.py).
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn


class _CaptionEncoder(nn.Module):
    """Bag of caption tokens -> embedding: the tiny 'text tower' of the contrastive loss."""

    def __init__(self, vocab_size: int, width: int, dim: int):
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab_size, width, mode="mean")
        self.proj = nn.Linear(width, dim)

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(ids, offsets))


def sigmoid_contrastive_loss(img: torch.Tensor, txt: torch.Tensor, same: torch.Tensor,
                             log_scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """SigLIP's loss: -mean over images of sum over texts of log sigmoid(z * (s <i, t> + b)),
    z = +1 for matching pairs and -1 otherwise. img, txt (B, E) L2-normalised; same (B, B) bool
    (captions repeat in the synthetic corpus, so every equal caption is a match)."""
    logits = img @ txt.T * log_scale.exp() + bias
    z = same.float() * 2 - 1
    return -F.logsigmoid(z * logits).sum(dim=1).mean()


def write_base(corpus: str | Path, tokenizer: str | Path, out: str | Path, *,
               flavor: str = "tiny", steps: int = 600, batch_size: int = 32, lr: float = 1e-3,
               seed: int = 0) -> dict[str, str]:
    """Pretrain the flavour's vision tower on corpus/captions.json and write both base folders.

    Returns {"language_model": folder, "vision_tower": folder}; the pretraining's settings and
    its first and final loss go to out/pretrain.json. Same arguments give the same weights.
    """
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from lladav.data.conversation import ChatTokenizer
    from lladav.data.images import image_tiles
    from lladav.model.flavors import FLAVORS, lladav_config_for
    from lladav.model.llada import LLaDAModelLM

    corpus, out = Path(corpus), Path(out)
    tok = ChatTokenizer.from_folder(tokenizer)
    entry = FLAVORS[flavor]
    config = lladav_config_for(flavor, tok)
    geometry, layer = config.geometry, entry["llada_v"]["vision_feature_layer"]

    records = [r for r in json.loads((corpus / "captions.json").read_text(encoding="utf-8"))
               if "image" in r]
    if len(records) < 2:
        raise ValueError(f"{corpus / 'captions.json'}: need at least 2 image records to "
                         f"pretrain the tower, found {len(records)}")
    pixels = torch.from_numpy(np.concatenate([
        image_tiles(Image.open(corpus / r["image"]).convert("RGB"), geometry, "square", 1)
        for r in records]))                                                    # (N, 3, T, T)
    texts = [r["conversations"][1]["value"] for r in records]
    caption_ids = [torch.tensor(tok.tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    caption_class = {t: i for i, t in enumerate(sorted(set(texts)))}
    classes = torch.tensor([caption_class[t] for t in texts])

    torch.manual_seed(seed)
    # No attention-pooling head: LLaDA-V never runs it, and an untrained one would only mislead.
    tower = SiglipVisionModel(SiglipVisionConfig(**entry["vision_tower"], vision_use_head=False))
    width = tower.config.hidden_size
    head = nn.Linear(width, width)
    text = _CaptionEncoder(len(tok.tokenizer), width, width)
    log_scale = nn.Parameter(torch.tensor(float(np.log(10.0))))
    bias = nn.Parameter(torch.tensor(-10.0))
    params = [*tower.parameters(), *head.parameters(), *text.parameters(), log_scale, bias]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = random.Random(seed)
    tower.train()
    loss, first_loss = torch.tensor(float("nan")), float("nan")
    for step in range(steps):
        idx = torch.tensor(order.sample(range(len(records)), min(batch_size, len(records))))
        hidden = tower(pixel_values=pixels[idx], output_hidden_states=True).hidden_states[layer]
        img = F.normalize(head(hidden.mean(dim=1)), dim=-1)
        ids = [caption_ids[i] for i in idx.tolist()]
        offsets = torch.tensor([0, *np.cumsum([len(x) for x in ids[:-1]])], dtype=torch.long)
        txt = F.normalize(text(torch.cat(ids), offsets), dim=-1)
        loss = sigmoid_contrastive_loss(img, txt, classes[idx, None] == classes[None, idx],
                                        log_scale, bias)
        if step == 0:
            first_loss = float(loss.detach())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tower.eval()

    # Written aside and published whole (storage.publish_folder): a crash mid-write leaves the
    # previous base folder, or none, never half of one.
    from lladav import storage

    summary: dict[str, Any] = {"flavor": flavor, "steps": steps, "batch_size": batch_size,
                               "lr": lr, "seed": seed, "first_loss": first_loss,
                               "final_loss": float(loss.detach()), "images": len(records)}
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp)
        tower.save_pretrained(staged / "siglip")
        torch.manual_seed(seed)
        LLaDAModelLM(config.text_config).save_pretrained(staged / "llada")
        (staged / "pretrain.json").write_text(json.dumps(summary, indent=1) + "\n",
                                              encoding="utf-8")
        storage.publish_folder(staged, str(out), last="pretrain.json")
    paths = {"language_model": out / "llada", "vision_tower": out / "siglip"}
    return {k: str(v) for k, v in paths.items()}
