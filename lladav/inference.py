"""Answering a question about an image with a LLaDA-V export: load, prompt, sample, decode.

Owns: the glue between an exported folder (model + tokenizer), the inference prompt
(data/conversation.py), the image tiles (model) and the sampler (sampler.py). Used by
`lladav generate`, the pipeline's eval step and bench/sampler.py. Does not own: the sampling
rules (sampler.py) or the template (data/conversation.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lladav.data.conversation import BOS, END_HEADER, EOS, EOT, START_HEADER, ChatTokenizer, prompt_ids
from lladav.sampler import EmbeddingDenoiser, generate


@dataclass(frozen=True)
class SamplerSettings:
    """Sampler knobs; defaults are LLaDA-V's greedy, low-confidence, pure-diffusion setting."""

    gen_length: int = 32
    block_length: int = 32
    steps: int = 32
    temperature: float = 0.0
    remasking: str = "low_confidence"
    threshold: float | None = None
    cfg_scale: float = 0.0
    use_prefix_cache: bool = False
    # LLaDA-V never predicts these at a masked position (digest §5.2); EOT stays allowed and stops.
    banned: tuple[str, ...] = (EOS, BOS, START_HEADER, END_HEADER)
    stops: tuple[str, ...] = (EOT,)
    seed: int = 0


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    forward_passes: int


def load(folder_or_uri: str) -> tuple[Any, ChatTokenizer]:
    """An exported LLaDA-V folder (local or URI) -> (model in eval mode, its tokenizer)."""
    from transformers import AutoModel

    from lladav import storage
    from lladav.model import lladav as _  # registers the Auto classes

    with storage.local_folder(folder_or_uri) as folder:
        model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
        tok = ChatTokenizer.from_folder(str(folder))
    return model, tok


@torch.no_grad()
def answer(model: Any, tok: ChatTokenizer, images: list[Any], question: str | list[dict[str, str]],
           settings: SamplerSettings = SamplerSettings(), tag: str | None = None) -> Answer:
    """Generate an answer to `question` (one user turn, or LLaVA messages ending with the user
    turn to answer) about `images` (PIL images, possibly none); `tag` is appended to every user
    turn, as a recipe source's `tag` was in training. `<image>` placeholders are added in front
    of the first user turn when the text has none."""
    ids = torch.from_numpy(prompt_ids(question, tok, n_images=len(images), tag=tag)).long()
    tiles = [model.pixel_tiles(img, n_images=len(images)) for img in images]
    embeds, _ = model.embed_multimodal([ids], [tiles], [[img.size for img in images]])
    denoiser = EmbeddingDenoiser(model.language_model, model.get_input_embeddings(), embeds,
                                 tok.mask_id)
    ids_of = tok.tokenizer.convert_tokens_to_ids
    result = generate(
        denoiser, batch_size=1, gen_length=settings.gen_length,
        block_length=settings.block_length, steps=settings.steps, mask_id=tok.mask_id,
        temperature=settings.temperature, remasking=settings.remasking,
        threshold=settings.threshold, cfg_scale=settings.cfg_scale,
        banned_ids=[ids_of(t) for t in settings.banned], stop_ids=[ids_of(t) for t in settings.stops],
        eos_id=tok.eos_id, use_prefix_cache=settings.use_prefix_cache,
        generator=torch.Generator().manual_seed(settings.seed))
    tokens = result.answers[0]
    return Answer(tok.decode(tokens).strip(), tokens, result.forward_passes)
