"""Tiny base checkpoints for any corpus: what LLaDA-8B-Instruct and SigLIP2 are to the paper.

LLaDA-V's stage 1 starts from two pretrained checkpoints and trains only the projector between
them (lladav_reference.md "Stages"). The demo cannot download them, and a randomly initialised
tower is a poor stand-in: measured on the shapes corpus, a random tiny tower trained end to end
through the language model learns colour within ~500 steps but stays at chance on position after
3,000 (the answer-word gradient reaching the tower through the LM is too weak and too noisy),
whereas from a tower pretrained as below the same model answers all three factors on its training
set within ~200 steps. So the demo pretrains its tower first, like SigLIP does: a sigmoid
image-text contrastive loss (Zhai et al. 2023) between the tower's image features and the
texts of the corpus's own images: by default each record's last assistant turn (a caption, or
the one-word answer of a classification-style corpus; `caption_turn` picks another).

    write_base(sources, tokenizer, out, flavor="tiny") -> {"language_model": out/llada,
                                                           "vision_tower": out/siglip}

`lladav base init`, the pipeline's `base` step and the demo's synth step (on the shapes'
captions.json) call it.

The tower is a plain `SiglipVisionModel` folder and the LM a `LLaDAModelLM` folder, loaded by
`LLaDAVModel.from_components` exactly as the real ones are (a stage's `init.language_model` /
`init.vision_tower`). The image embedding is the mean of the features LLaDA-V consumes (the
`vision_feature_layer` hidden state, not SigLIP's attention-pooling head), so what the
projector reads is what was trained; the text side is a bag of caption tokens, enough to tell
the 27 captions apart. The language model stays a random initialisation: its template and
answer words are learnt in seconds by the stages, and a tiny pretrained LM would add nothing the
demo checks. Records are read with the build's readers (data/sources.py); those without exactly
one usable image, or whose chosen turn is missing, are skipped and counted in pretrain.json.
At most `max_images` images are used: their tiles are held in memory (12 KB each at 32 px).

Owns: the two base folders and the tower's pretraining. Does not own: reading corpora
(data/sources.py), the tokenizer (data/tokenizer.py), the architectures (llada.py, lladav.py).
"""

from __future__ import annotations

import itertools
import json
import random
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lladav.config import Source


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


def image_text_pairs(sources: Sequence[Source], caption_turn: str | int, skipped: Counter
                     ) -> Iterator[tuple[bytes, str]]:
    """(image bytes, text) of the sources' records with one image, in reading order: the text is
    the assistant turn `caption_turn` picks ("last", "first" or an index among the assistant
    turns). Records it passes over are counted in `skipped` by reason."""
    from lladav.data import RecordError
    from lladav.data.conversation import normalize_turns
    from lladav.data.sources import Unreadable, enumerate_source, load_record

    index = -1 if caption_turn == "last" else 0 if caption_turn == "first" else int(caption_turn)
    for source in sources:
        for ref in enumerate_source(source):
            if isinstance(ref, Unreadable):
                skipped[ref.code] += 1
                continue
            try:
                record = load_record(source, ref)
                turns = normalize_turns(record.conversations, len(record.images))
            except RecordError as e:
                skipped[e.code] += 1
                continue
            answers = [t.text for t in turns if t.role == "assistant"]
            if len(record.images) != 1:
                skipped["not_one_image"] += 1
            elif not -len(answers) <= index < len(answers):
                skipped["no_caption_turn"] += 1
            else:
                yield record.images[0].data, answers[index].strip()


def write_base(sources: Sequence[Source], tokenizer: str, out: str, *, flavor: str = "tiny",
               steps: int = 600, batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
               caption_turn: str | int = "last", max_images: int = 20_000) -> dict[str, str]:
    """Pretrain the flavour's vision tower on the sources' image-text pairs and publish both
    base folders at `out` (local or URI).

    Returns {"language_model": folder, "vision_tower": folder}; the pretraining's settings, its
    first and final loss and the skipped records go to out/pretrain.json. Same arguments give
    the same weights.
    """
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from lladav import storage
    from lladav.data.images import decode_rgb, image_tiles
    from lladav.data.tokenizer import load_tokenizer
    from lladav.model.flavors import FLAVORS, lladav_config_for
    from lladav.model.llada import LLaDAModelLM

    tok = load_tokenizer(str(tokenizer))
    entry = FLAVORS[flavor]
    config = lladav_config_for(flavor, tok)
    geometry, layer = config.geometry, entry["llada_v"]["vision_feature_layer"]

    skipped: Counter = Counter()
    tiles, texts = [], []
    for blob, text in itertools.islice(image_text_pairs(sources, caption_turn, skipped),
                                       max_images):
        try:
            tiles.append(image_tiles(decode_rgb(blob), geometry, "square", 1))
        except Exception:  # noqa: BLE001 - PIL raises many types; a build would reject it too
            skipped["image_undecodable"] += 1
            continue
        texts.append(text)
    if len(texts) < 2:
        where = ", ".join(s.location for s in sources)
        raise ValueError(f"{where}: need at least 2 records with one image and an assistant turn "
                         f"to pretrain the tower, found {len(texts)} (skipped: {dict(skipped)})")
    pixels = torch.from_numpy(np.concatenate(tiles))                         # (N, 3, T, T)
    del tiles
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
        idx = torch.tensor(order.sample(range(len(texts)), min(batch_size, len(texts))))
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
    summary: dict[str, Any] = {"flavor": flavor, "steps": steps, "batch_size": batch_size,
                               "lr": lr, "seed": seed, "first_loss": first_loss,
                               "final_loss": float(loss.detach()), "images": len(texts),
                               "classes": len(caption_class), "caption_turn": caption_turn,
                               "skipped": dict(sorted(skipped.items())),
                               "sources": [s.location for s in sources]}
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp)
        tower.save_pretrained(staged / "siglip")
        torch.manual_seed(seed)
        LLaDAModelLM(config.text_config).save_pretrained(staged / "llada")
        (staged / "pretrain.json").write_text(json.dumps(summary, indent=1) + "\n",
                                              encoding="utf-8")
        storage.publish_folder(staged, str(out), last="pretrain.json")
    return {"language_model": storage.join(str(out), "llada"),
            "vision_tower": storage.join(str(out), "siglip")}
