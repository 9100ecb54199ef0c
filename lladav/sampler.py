"""Iterative unmasking: generating an answer with a masked-diffusion model.

    gen_ids (B, G) all [M] --per block, per step: denoiser -> logits -> reveal some--> tokens (B, G)

The answer span is split into blocks of `block_length`, decoded left to right (semi-autoregressive;
one block = pure diffusion); positions after the current block are never revealed early. Each
step predicts every position (argmax, Gumbel-max when temperature > 0), scores the current block's
masked positions by the softmax probability of that prediction ("low_confidence") or at random
("random"), and reveals the top k, k from `num_transfer_tokens` (digest §5.1). Options:
banned ids (LLaDA-V never predicts EOS, BOS or the header tokens at a masked position, §5.2),
stop ids (LLaDA-V's early stop, §5.2 item 5), classifier-free guidance with a prompt-masked
unconditional pass, Fast-dLLM's confidence threshold and its approximate prefix K/V cache (§5.4).

Owns: the reveal schedule, remasking, blocks, the threshold rule, early stopping, CFG and when
the prefix cache is refreshed. Does not own: the model (anything with the LLaDA LM's
`model(inputs_embeds=..., prefix_kv=..., return_kv=...)` call), image features, tokenization or
decoding the answer to text. Prompts in one batch must have the same length (no attention mask:
the reference samples one prompt at a time).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

REMASKING = ("low_confidence", "random")


class Denoiser(Protocol):
    """The model seen from the sampler: logits for the generated span given the prompt it holds.

    `__call__(gen_ids)` is one exact forward over prompt + gen_ids. `refresh_prefix(gen_ids,
    upto=s)` is one exact forward too, and also stores the keys/values of prompt + gen_ids[:, :s];
    a later `__call__(gen_ids, start=s, prefix_cache=True)` forwards only gen_ids[:, s:] against
    that store. Approximate: the stored prefix was computed next to the gen_ids of the refresh,
    not the current ones (Fast-dLLM's prefix cache, digest §5.4). Each method call is one forward
    pass. `unconditional=True` is the same with the prompt replaced by [M] (CFG), with its own
    store.
    """

    def __call__(self, gen_ids: torch.Tensor, *, start: int = 0, prefix_cache: bool = False,
                 unconditional: bool = False) -> torch.Tensor:
        """gen_ids (B, G) -> logits (B, G - start, V) for generated positions start..G-1."""
        ...

    def refresh_prefix(self, gen_ids: torch.Tensor, *, upto: int,
                       unconditional: bool = False) -> torch.Tensor:
        """Exact forward storing the prefix before gen position `upto`; logits (B, G - upto, V)."""
        ...


class EmbeddingDenoiser:
    """A Denoiser over a model that takes embeddings (LLaDA-V's sampler works on embeddings).

    model(inputs_embeds=(B, L, D), prefix_kv=..., return_kv=...) -> .logits (B, L, V), .kv;
    embed: ids (B, G) -> (B, G, D); prompt_embeds (B, P, D), image features already spliced in.
    The unconditional prompt is P copies of embed(mask_id).
    """

    def __init__(self, model: Callable[..., Any], embed: Callable[[torch.Tensor], torch.Tensor],
                 prompt_embeds: torch.Tensor, mask_id: int):
        self.model, self.embed, self.mask_id = model, embed, mask_id
        self.prompt_embeds = prompt_embeds  # (B, P, D)
        self._prefix: dict[bool, tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]] = {}

    @property
    def device(self) -> torch.device:
        return self.prompt_embeds.device

    def _prompt(self, unconditional: bool) -> torch.Tensor:
        if not unconditional:
            return self.prompt_embeds
        b, p, _ = self.prompt_embeds.shape
        masks = torch.full((b, p), self.mask_id, dtype=torch.long,
                           device=self.prompt_embeds.device)
        return self.embed(masks).to(self.prompt_embeds.dtype)  # (B, P, D)

    def _canvas(self, gen_ids: torch.Tensor, unconditional: bool) -> torch.Tensor:
        gen = self.embed(gen_ids).to(self.prompt_embeds.dtype)  # (B, G, D)
        return torch.cat([self._prompt(unconditional), gen], dim=1)  # (B, P + G, D)

    def __call__(self, gen_ids: torch.Tensor, *, start: int = 0, prefix_cache: bool = False,
                 unconditional: bool = False) -> torch.Tensor:
        if not prefix_cache:
            logits = self.model(inputs_embeds=self._canvas(gen_ids, unconditional)).logits
            return logits[:, self.prompt_embeds.shape[1] + start:]  # (B, G - start, V)
        if unconditional not in self._prefix:
            raise RuntimeError("prefix_cache=True before any refresh_prefix call")
        upto, kv = self._prefix[unconditional]
        if upto != start:
            raise ValueError(f"the prefix cache holds gen positions before {upto}, the call "
                             f"asks for start={start}: call refresh_prefix(upto={start}) first")
        gen = self.embed(gen_ids[:, start:]).to(self.prompt_embeds.dtype)  # (B, G - start, D)
        return self.model(inputs_embeds=gen, prefix_kv=kv).logits

    def refresh_prefix(self, gen_ids: torch.Tensor, *, upto: int,
                       unconditional: bool = False) -> torch.Tensor:
        out = self.model(inputs_embeds=self._canvas(gen_ids, unconditional), return_kv=True)
        keep = self.prompt_embeds.shape[1] + upto  # prompt + gen[:, :upto]
        self._prefix[unconditional] = (upto, [(k[:, :, :keep], v[:, :, :keep])
                                              for k, v in out.kv])  # (B, n_kv, keep, head_dim)
        return out.logits[:, keep:]  # (B, G - upto, V)


@dataclass(frozen=True)
class SampleResult:
    tokens: torch.Tensor
    """(B, G) generated ids; after an early stop, the positions after the stop are eos_id (or
    left as [M] when no eos_id was given)."""
    forward_passes: int
    """Denoiser calls made (a CFG step counts 2), the cost measure for threshold and cache."""
    steps: torch.Tensor
    """(B,) long: steps in which the sample had a position to reveal."""
    answers: list[list[int]]
    """Per sample, the generated ids before the first stop id (all of them if none)."""


def num_transfer_tokens(mask_counts: torch.Tensor, steps: int) -> torch.Tensor:
    """Linear reveal schedule: (B,) masked counts -> (B, steps) tokens to reveal per step.

    n // steps each, and the first n % steps steps one more (digest §5.1): (10, 4) -> [3, 3, 2, 2].
    """
    base = mask_counts // steps  # (B,)
    extra = torch.arange(steps, device=mask_counts.device)[None, :] < (mask_counts % steps)[:, None]
    return base[:, None] + extra.long()  # (B, steps)


def add_gumbel_noise(logits: torch.Tensor, temperature: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Scores whose argmax is a sample from softmax(logits / temperature); T = 0: logits as is.

    The reference's form, exp(logits) / (-log U)^T in float64 with U ~ U[0, 1) over the whole
    tensor (digest §5.1), kept as is (not the log-space l/T + Gumbel) so the same generator gives
    the same argmax; float64 keeps exp finite for logits below ~709.
    """
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand(logits.shape, generator=generator, dtype=torch.float64,
                       device=logits.device)
    return logits.exp() / (-torch.log(noise)) ** temperature


def threshold_counts(confidence: torch.Tensor, candidates: torch.Tensor,
                     threshold: float) -> torch.Tensor:
    """Fast-dLLM parallel decoding: per sample, how many candidates to reveal this step.

    confidence, candidates (B, W). Every candidate with confidence > threshold, and at least one
    (the most confident) while any is left: (B,) long.
    """
    above = (candidates & (confidence > threshold)).sum(dim=1)  # (B,)
    return torch.minimum(above.clamp(min=1), candidates.sum(dim=1))


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance as LLaDA does it: u + (w + 1)(c - u) (digest §5.1)."""
    return uncond + (scale + 1) * (cond - uncond)


def _first_stop(gen_ids: torch.Tensor, stop_ids: torch.Tensor) -> torch.Tensor:
    """(B, G) -> (B,) index of the first stop id in each row, G if none (or no stop ids)."""
    is_stop = torch.isin(gen_ids, stop_ids)  # (B, G); all False for an empty stop_ids
    positions = torch.arange(gen_ids.shape[1], device=gen_ids.device).expand_as(gen_ids)
    return torch.where(is_stop, positions, gen_ids.shape[1]).min(dim=1).values


def _predict(logits: torch.Tensor, temperature: float, remasking: str, banned: torch.Tensor,
             mask_id: int, generator: torch.Generator | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, W, V) -> predictions x0 (B, W) long and their confidence (B, W) float64."""
    if len(banned):  # unmasked positions are never rewritten, so banning everywhere is the
        logits = logits.index_fill(-1, banned, float("-inf"))  # reference's ban at masked ones
    scores = add_gumbel_noise(logits, temperature, generator)  # (B, W, V)
    # Never "reveal" [M] itself: a trained model gives it ~0 mass, a random one may not, and a
    # revealed [M] would stay masked forever (the threshold loop would never end).
    no_mask = torch.tensor([mask_id], device=logits.device)
    x0 = scores.index_fill(-1, no_mask, float("-inf")).argmax(dim=-1)  # (B, W)
    if remasking == "low_confidence":
        probs = torch.softmax(logits.to(torch.float64), dim=-1)  # float64, as the reference
        return x0, probs.gather(-1, x0[..., None]).squeeze(-1)
    return x0, torch.rand(x0.shape, generator=generator, dtype=torch.float64, device=x0.device)


def _check(gen_length: int, block_length: int, steps: int, remasking: str,
           threshold: float | None, cfg_scale: float, refresh_interval: int | None) -> None:
    if gen_length <= 0 or block_length <= 0 or gen_length % block_length:
        raise ValueError(f"gen_length ({gen_length}) must be a positive multiple of "
                         f"block_length ({block_length})")
    num_blocks = gen_length // block_length
    if threshold is None and (steps <= 0 or steps % num_blocks):
        raise ValueError(f"steps ({steps}) must be a positive multiple of the number of blocks "
                         f"({num_blocks} = gen_length {gen_length} / block_length {block_length})")
    if remasking not in REMASKING:
        raise ValueError(f"remasking={remasking!r}: choose one of {REMASKING}")
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale ({cfg_scale}) must be >= 0 (0 turns guidance off)")
    if refresh_interval is not None and refresh_interval < 1:
        raise ValueError(f"prefix_refresh_interval ({refresh_interval}) must be >= 1, or None "
                         "to refresh only at block starts")


@torch.no_grad()
def generate(denoiser: Denoiser, *, batch_size: int, gen_length: int, block_length: int,
             steps: int, mask_id: int, temperature: float = 0.0,
             remasking: str = "low_confidence", threshold: float | None = None,
             cfg_scale: float = 0.0, banned_ids: Sequence[int] = (),
             stop_ids: Sequence[int] = (), eos_id: int | None = None,
             use_prefix_cache: bool = False, prefix_refresh_interval: int | None = None,
             generator: torch.Generator | None = None,
             device: torch.device | str | None = None) -> SampleResult:
    """Fill a span of gen_length [M] tokens block by block; see the module docstring.

    steps: total over all blocks (steps / num_blocks per block); unused with `threshold`, where a
    block takes as many steps as it needs (at least one token each). stop_ids (and eos_id): a
    sample stops once its first stop is revealed and every mask before it is filled; positions
    after the stop are then never revealed and become eos_id (LLaDA-V, digest §5.2 item 5).
    use_prefix_cache: refresh the denoiser's prefix at the first step of each block, and every
    `prefix_refresh_interval` steps within it if given; other steps forward only the span from
    the block start on. generator drives Gumbel noise and random remasking (on `device`).
    device: where the ids live; by default the denoiser's `device` attribute, else CPU.
    """
    _check(gen_length, block_length, steps, remasking, threshold, cfg_scale,
           prefix_refresh_interval)
    device = device if device is not None else getattr(denoiser, "device", "cpu")
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks if threshold is None else None
    gen = torch.full((batch_size, gen_length), mask_id, dtype=torch.long, device=device)
    stops = torch.tensor(sorted(set(stop_ids) | ({eos_id} if eos_id is not None else set())),
                         dtype=torch.long, device=device)
    banned = torch.tensor(sorted(set(banned_ids)), dtype=torch.long, device=device)
    positions = torch.arange(gen_length, device=device)  # (G,)
    steps_taken = torch.zeros(batch_size, dtype=torch.long, device=device)
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)
    passes = 0

    def logits_at(start: int, refresh: bool, unconditional: bool) -> torch.Tensor:
        if refresh:
            return denoiser.refresh_prefix(gen, upto=start, unconditional=unconditional)
        return denoiser(gen, start=start, prefix_cache=use_prefix_cache,
                        unconditional=unconditional)

    for block in range(num_blocks):
        lo, hi = block * block_length, (block + 1) * block_length
        start = lo if use_prefix_cache else 0  # the denoiser returns gen positions start..G-1
        in_block = (positions >= lo) & (positions < hi)  # (G,)
        block_masks = ((gen == mask_id) & in_block).sum(dim=1) * ~done  # (B,)
        schedule = (num_transfer_tokens(block_masks, steps_per_block)
                    if steps_per_block is not None else None)  # (B, S)
        step = 0
        while schedule is None or step < schedule.shape[1]:
            before_stop = positions[None, :] < _first_stop(gen, stops)[:, None]  # (B, G)
            candidates = (gen == mask_id) & in_block & before_stop & ~done[:, None]  # (B, G)
            if not candidates.any():
                break
            refresh = use_prefix_cache and (step == 0 or bool(
                prefix_refresh_interval and step % prefix_refresh_interval == 0))
            logits = logits_at(start, refresh, unconditional=False)  # (B, G - start, V)
            passes += 1
            if cfg_scale > 0:
                uncond = logits_at(start, refresh, unconditional=True)
                passes += 1
                logits = guided_logits(logits, uncond, cfg_scale)
            x0, confidence = _predict(logits, temperature, remasking, banned, mask_id,
                                      generator)  # (B, G - start) each
            window = candidates[:, start:]  # (B, G - start)
            confidence = confidence.masked_fill(~window, float("-inf"))
            counts = (threshold_counts(confidence, window, threshold) if schedule is None
                      else torch.minimum(schedule[:, step], window.sum(dim=1)))  # (B,)
            for b in range(batch_size):  # per-sample top-k, like the reference (ties included)
                k = int(counts[b])
                if k:
                    chosen = torch.topk(confidence[b], k=k).indices + start
                    gen[b, chosen] = x0[b, chosen - start]
            steps_taken += window.any(dim=1).long()
            step += 1
            if len(stops):  # a sample is done once every mask before its first stop is filled
                stop_at = _first_stop(gen, stops)
                left = ((gen == mask_id) & (positions[None, :] < stop_at[:, None])).any(dim=1)
                done |= (stop_at < gen_length) & ~left
        if done.all():
            break
    stop_at = _first_stop(gen, stops)  # (B,)
    if eos_id is not None:
        gen = gen.masked_fill(positions[None, :] > stop_at[:, None], eos_id)
    answers = [gen[b, : int(stop_at[b])].tolist() for b in range(batch_size)]
    return SampleResult(tokens=gen, forward_passes=passes, steps=steps_taken, answers=answers)
