"""The sampler (lladav/sampler.py) on a tiny random bidirectional stand-in model: reveal schedule,
blocks, threshold decoding, remasking, banned and stop ids, CFG and the prefix cache."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lladav.sampler import (EmbeddingDenoiser, add_gumbel_noise, generate, guided_logits,
                            num_transfer_tokens, threshold_counts)

VOCAB, MASK, EOS, EOT, BOS = 32, 31, 30, 29, 28
PROMPT_LEN = 7


class TinyBidirectionalLM(nn.Module):
    """Stand-in with our LLaDA LM's call: model(input_ids | inputs_embeds, *, prefix_kv,
    return_kv) -> .logits (B, L, V), .kv per layer (k, v) of shape (B, H, L, head_dim). No mask;
    absolute positions start after the prefix, so a cache that is read wrongly shows. float64,
    so batched and single runs cannot differ by rounding."""

    def __init__(self, n_layers: int = 2, dim: int = 32, n_heads: int = 2, seed: int = 2):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.embed = nn.Embedding(VOCAB, dim)
            self.pos = nn.Embedding(64, dim)
            self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim, bias=False) for _ in range(n_layers))
            self.out = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(n_layers))
            self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(dim, 2 * dim, bias=False), nn.GELU(),
                                                   nn.Linear(2 * dim, dim, bias=False))
                                     for _ in range(n_layers))
            self.head = nn.Linear(dim, VOCAB, bias=False)
            # Large random weights and no biases: the answer depends on the prompt and on what
            # is already revealed, not on one favourite token.
            for name, param in self.named_parameters():
                if not name.startswith(("embed", "pos")):
                    nn.init.normal_(param, std=0.4)
        self.n_heads = n_heads
        self.double().eval()

    def forward(self, input_ids=None, inputs_embeds=None, *, prefix_kv=None, return_kv=False):
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, L, D)
        b, length, dim = x.shape
        start = 0 if prefix_kv is None else prefix_kv[0][0].shape[2]
        x = x + self.pos(torch.arange(start, start + length))
        kv = []
        for i in range(len(self.qkv)):
            q, k, v = (self.qkv[i](F.layer_norm(x, (dim,)))
                       .view(b, length, 3, self.n_heads, dim // self.n_heads)
                       .permute(2, 0, 3, 1, 4))  # each (B, H, L, hd)
            kv.append((k, v))
            if prefix_kv is not None:
                k = torch.cat([prefix_kv[i][0], k], dim=2)
                v = torch.cat([prefix_kv[i][1], v], dim=2)
            att = F.scaled_dot_product_attention(q, k, v)  # bidirectional
            x = x + self.out[i](att.transpose(1, 2).reshape(b, length, dim))
            x = x + self.mlp[i](F.layer_norm(x, (dim,)))
        return SimpleNamespace(logits=self.head(x), kv=kv if return_kv else None)


class Recording:
    """Wraps a denoiser: records (gen_ids, kwargs) of every call; can add a logit bias."""

    def __init__(self, inner, bias=None):
        self.inner, self.bias, self.calls = inner, bias, []

    def _biased(self, logits, start):
        return logits if self.bias is None else logits + self.bias[start:]

    def __call__(self, gen_ids, **kw):
        self.calls.append((gen_ids.clone(), kw))
        return self._biased(self.inner(gen_ids, **kw), kw.get("start", 0))

    def refresh_prefix(self, gen_ids, **kw):
        self.calls.append((gen_ids.clone(), {"refresh": True, **kw}))
        return self._biased(self.inner.refresh_prefix(gen_ids, **kw), kw["upto"])


MODEL = TinyBidirectionalLM()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Thousands of tiny ops: a second intra-op thread only spins, and under a loaded CPU that
    # made this file 25x slower (48 s instead of 2 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def prompts(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, BOS, (n, PROMPT_LEN), generator=torch.Generator().manual_seed(seed))


def denoiser(prompt_ids: torch.Tensor, model=MODEL) -> EmbeddingDenoiser:
    return EmbeddingDenoiser(model, model.embed, model.embed(prompt_ids).detach(), MASK)


def run(den, batch_size=1, **kw):
    settings = dict(gen_length=16, block_length=4, steps=16, mask_id=MASK)
    return generate(den, batch_size=batch_size, **{**settings, **kw})


# ---- pure pieces --------------------------------------------------------------------------

@pytest.mark.parametrize("count,steps,expected", [
    (10, 4, [3, 3, 2, 2]), (7, 4, [2, 2, 2, 1]), (3, 4, [1, 1, 1, 0]), (16, 16, [1] * 16),
    (32, 16, [2] * 16), (96, 48, [2] * 48), (0, 3, [0, 0, 0])])
def test_reveal_schedule(count, steps, expected):
    assert num_transfer_tokens(torch.tensor([count]), steps).tolist() == [expected]


def test_reveal_schedule_batched():
    schedule = num_transfer_tokens(torch.tensor([5, 9]), 4)
    assert schedule.tolist() == [[2, 1, 1, 1], [3, 2, 2, 2]]
    assert schedule.dtype == torch.long


def test_gumbel_noise_samples_the_tempered_softmax():
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    assert add_gumbel_noise(logits, 0.0) is logits  # greedy: untouched
    n = 20_000
    for temperature in (1.0, 0.5):
        noisy = add_gumbel_noise(logits.expand(n, -1), temperature,
                                 torch.Generator().manual_seed(0))
        assert noisy.dtype == torch.float64
        freq = torch.bincount(noisy.argmax(-1), minlength=4).double() / n
        expected = torch.softmax(logits[0].double() / temperature, -1)
        tolerance = 4 * torch.sqrt(expected * (1 - expected) / n)  # 4 binomial std errors
        assert bool(((freq - expected).abs() < tolerance).all()), (temperature, freq, expected)


def test_threshold_counts():
    conf = torch.tensor([[0.95, 0.9, 0.6, 0.2], [0.4, 0.3, 0.2, 0.1], [0.99, 0.99, 0.2, 0.1]],
                        dtype=torch.float64)
    cand = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert threshold_counts(conf, cand, 0.7).tolist() == [2, 1, 0]  # at least one, none if empty
    assert threshold_counts(conf, cand, 0.0).tolist() == [4, 3, 0]  # only candidates count
    assert threshold_counts(conf, cand, 1.5).tolist() == [1, 1, 0]


def test_guided_logits():
    cond, uncond = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    assert torch.equal(guided_logits(cond, uncond, 0.0), cond)
    assert torch.equal(guided_logits(cond, uncond, 1.0), torch.tensor([3.0, -1.0]))


@pytest.mark.parametrize("kw,match", [
    (dict(gen_length=10, block_length=4), "block_length"),
    (dict(steps=6), "number of blocks"),
    (dict(remasking="top_p"), "low_confidence"),
    (dict(cfg_scale=-1.0), "cfg_scale")])
def test_invalid_arguments_name_the_problem(kw, match):
    with pytest.raises(ValueError, match=match):
        run(denoiser(prompts(1)), **kw)


# ---- the decoding loop ----------------------------------------------------------------------

def test_one_token_per_step_when_steps_equal_gen_length():
    rec = Recording(denoiser(prompts(1)))
    result = run(rec, gen_length=16, block_length=16, steps=16)
    masks = [int((gen == MASK).sum()) for gen, _ in rec.calls] + [
        int((result.tokens == MASK).sum())]
    assert masks == list(range(16, -1, -1))
    assert result.forward_passes == 16 and result.steps.tolist() == [16]


def test_later_blocks_stay_masked_while_a_block_is_decoded():
    rec = Recording(denoiser(prompts(2)))
    result = run(rec, batch_size=2, gen_length=16, block_length=4, steps=8)  # 2 steps per block
    assert result.forward_passes == len(rec.calls) == 8
    for j, (gen, _) in enumerate(rec.calls):
        block = j // 2
        assert bool((gen[:, (block + 1) * 4:] == MASK).all()), j
        assert not bool((gen[:, : block * 4] == MASK).any()), j
        assert int((gen[:, block * 4: (block + 1) * 4] == MASK).sum(1)[0]) == 4 - 2 * (j % 2)
    assert not bool((result.tokens == MASK).any())


def test_deterministic_for_a_fixed_seed():
    def sample(seed):
        return run(denoiser(prompts(2)), batch_size=2, temperature=1.0,
                   generator=torch.Generator().manual_seed(seed)).tokens
    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))


def test_batch_equals_single_runs_including_early_stop():
    batch = prompts(3, seed=1)
    free = [run(denoiser(batch[i:i + 1])).tokens[0].tolist() for i in range(3)]
    # A stop id that sample 0 generates and sample 1 never does: 0 stops early, 1 does not.
    stop = next(tok for tok in free[0][2:12] if tok not in free[1])
    kw = dict(stop_ids=(stop,), eos_id=EOS)
    together = run(denoiser(batch), batch_size=3, **kw)
    for i in range(3):
        alone = run(denoiser(batch[i:i + 1]), **kw)
        assert torch.equal(together.tokens[i], alone.tokens[0]), i
        assert together.answers[i] == alone.answers[0]
        assert int(together.steps[i]) == int(alone.steps[0])
    assert len(together.answers[0]) < 12 and stop not in together.answers[0]
    assert together.answers[1] == free[1]


def test_threshold_above_one_reproduces_the_baseline():
    for temperature in (0.0, 1.0):
        kw = dict(batch_size=2, gen_length=16, block_length=4, steps=16, temperature=temperature)
        base = run(denoiser(prompts(2)), generator=torch.Generator().manual_seed(3), **kw)
        fast = run(denoiser(prompts(2)), generator=torch.Generator().manual_seed(3),
                   threshold=1.5, **kw)
        assert torch.equal(base.tokens, fast.tokens)
        assert base.forward_passes == fast.forward_passes == 16


def test_low_threshold_uses_fewer_passes():
    base = run(denoiser(prompts(2)), batch_size=2)
    everything = run(denoiser(prompts(2)), batch_size=2, threshold=0.0)
    assert everything.forward_passes == 4  # every masked position is above 0: one pass per block
    some = run(denoiser(prompts(2)), batch_size=2, threshold=0.9)
    assert everything.forward_passes < some.forward_passes < base.forward_passes == 16
    for result in (everything, some):
        assert not bool((result.tokens == MASK).any())


def test_random_remasking_reveals_in_a_seeded_random_order():
    def order(seed):
        rec = Recording(denoiser(prompts(1)))
        result = run(rec, gen_length=8, block_length=8, steps=8, remasking="random",
                     generator=torch.Generator().manual_seed(seed))
        assert not bool((result.tokens == MASK).any())
        gens = [gen for gen, _ in rec.calls] + [result.tokens]
        return [int(((a == MASK) & (b != MASK)).nonzero()[0, 1]) for a, b in zip(gens, gens[1:])]
    assert order(0) == order(0)
    assert order(0) != order(1) and sorted(order(0)) == list(range(8))


def test_banned_ids_never_appear():
    favour = torch.zeros(16, VOCAB, dtype=torch.float64)
    favour[:, [EOS, BOS]] = 500.0  # the model wants to say EOS/BOS everywhere
    unbanned = run(Recording(denoiser(prompts(2)), bias=favour), batch_size=2)
    assert bool(torch.isin(unbanned.tokens, torch.tensor([EOS, BOS])).all())
    banned = run(Recording(denoiser(prompts(2)), bias=favour), batch_size=2,
                 banned_ids=(EOS, BOS))
    assert not bool(torch.isin(banned.tokens, torch.tensor([EOS, BOS, MASK])).any())


def test_early_stop_fills_with_eos_and_saves_passes():
    plant = torch.zeros(16, VOCAB, dtype=torch.float64)
    plant[5, EOT] = 500.0  # the answer ends at position 5
    stopped = run(Recording(denoiser(prompts(1)), bias=plant), stop_ids=(EOT,), eos_id=EOS)
    tokens = stopped.tokens[0].tolist()
    assert tokens[5] == EOT and tokens[6:] == [EOS] * 10
    assert stopped.answers == [tokens[:5]] and MASK not in tokens[:5]
    assert stopped.forward_passes <= 8  # blocks 0 and 1 at most, not all 16 steps
    assert int(stopped.steps[0]) == stopped.forward_passes
    assert run(Recording(denoiser(prompts(1)), bias=plant)).forward_passes == 16
    # without eos_id the later blocks are simply never decoded
    left = run(Recording(denoiser(prompts(1)), bias=plant), stop_ids=(EOT,))
    assert left.tokens[0, 5] == EOT and bool((left.tokens[0, 8:] == MASK).all())


def test_cfg_scale_zero_is_no_guidance():
    rec = Recording(denoiser(prompts(2)))
    plain = run(denoiser(prompts(2)), batch_size=2)
    zero = run(rec, batch_size=2, cfg_scale=0.0)
    assert torch.equal(plain.tokens, zero.tokens) and zero.forward_passes == 16
    assert not any(kw.get("unconditional") for _, kw in rec.calls)
    rec = Recording(denoiser(prompts(2)))
    guided = run(rec, batch_size=2, cfg_scale=2.0)
    assert guided.forward_passes == 32
    assert sum(bool(kw.get("unconditional")) for _, kw in rec.calls) == 16
    assert not torch.equal(guided.tokens, plain.tokens)


def test_unconditional_pass_ignores_the_prompt():
    gen = torch.full((1, 8), MASK)
    a, b = denoiser(prompts(1, seed=0)), denoiser(prompts(1, seed=1))
    assert not torch.allclose(a(gen), b(gen))
    assert torch.equal(a(gen, unconditional=True), b(gen, unconditional=True))


# ---- the prefix cache -----------------------------------------------------------------------

def partly_filled(seed: int = 0) -> torch.Tensor:
    gen = torch.randint(0, BOS, (2, 12), generator=torch.Generator().manual_seed(seed))
    gen[:, 6:] = MASK
    return gen


@pytest.mark.parametrize("unconditional", [False, True])
def test_cached_logits_equal_uncached_right_after_a_refresh(unconditional):
    den, gen = denoiser(prompts(2)), partly_filled()
    full = den(gen, unconditional=unconditional)  # (B, 12, V)
    refreshed = den.refresh_prefix(gen, upto=4, unconditional=unconditional)
    cached = den(gen, start=4, prefix_cache=True, unconditional=unconditional)
    assert refreshed.shape == cached.shape == (2, 8, VOCAB)
    assert torch.allclose(refreshed, full[:, 4:], atol=1e-12)
    assert torch.allclose(cached, full[:, 4:], atol=1e-10)
    # After a reveal past the prefix the cache is stale (2 layers): approximate, as documented.
    gen[:, 7] = 3
    stale = den(gen, start=4, prefix_cache=True, unconditional=unconditional)
    assert not torch.allclose(stale, den(gen, unconditional=unconditional)[:, 4:], atol=1e-6)
    with pytest.raises(ValueError, match="refresh_prefix"):
        den(gen, start=8, prefix_cache=True, unconditional=unconditional)


def test_one_layer_cache_is_exact_so_generation_matches():
    # With one layer the prefix keys/values depend on the prefix tokens alone, never stale.
    model = TinyBidirectionalLM(n_layers=1, seed=1)
    den, gen = denoiser(prompts(2), model), partly_filled()
    den.refresh_prefix(gen, upto=4)
    gen[:, 7] = 3
    assert torch.allclose(den(gen, start=4, prefix_cache=True), den(gen)[:, 4:], atol=1e-10)
    plain = run(denoiser(prompts(2), model), batch_size=2, steps=8)
    cached = run(denoiser(prompts(2), model), batch_size=2, steps=8, use_prefix_cache=True)
    assert torch.equal(plain.tokens, cached.tokens)


def test_generation_with_prefix_cache():
    rec = Recording(denoiser(prompts(2)))
    result = run(rec, batch_size=2, steps=8, use_prefix_cache=True, cfg_scale=0.5)
    assert not bool((result.tokens == MASK).any())
    assert bool(((result.tokens >= 0) & (result.tokens < VOCAB)).all())
    assert result.forward_passes == len(rec.calls) == 16  # 8 steps, CFG doubles
    refreshes = [(j, kw["upto"]) for j, (_, kw) in enumerate(rec.calls) if kw.get("refresh")]
    assert refreshes == [(0, 0), (1, 0), (4, 4), (5, 4), (8, 8), (9, 8), (12, 12), (13, 12)]
    reused = [kw for _, kw in rec.calls if not kw.get("refresh")]
    assert all(kw["prefix_cache"] for kw in reused)
    assert [kw["start"] for kw in reused] == [0, 0, 4, 4, 8, 8, 12, 12]


def test_refreshing_every_step_equals_no_cache():
    # digest §8 check 8: prefix_refresh_interval=1 is the uncached sampler, token for token
    kw = dict(batch_size=2, gen_length=16, block_length=8, steps=16)
    plain = run(denoiser(prompts(2)), **kw)
    every = run(denoiser(prompts(2)), use_prefix_cache=True, prefix_refresh_interval=1, **kw)
    once = run(denoiser(prompts(2)), use_prefix_cache=True, **kw)
    assert torch.equal(plain.tokens, every.tokens)
    assert not bool((once.tokens == MASK).any())
