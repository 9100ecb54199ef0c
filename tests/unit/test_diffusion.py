"""The masked-diffusion objective (lladav/diffusion.py): draw order, closed-form loss values,
normalisation by B, unbiasedness, and that prompts and images never get a mask or a gradient."""

from __future__ import annotations

import math

import pytest
import torch

from lladav.diffusion import (EPS, apply_mask, apply_mask_ids, diffusion_loss, forward_process,
                              mask_targets, sample_t)


def logits_with_ce(ces: list[float]) -> torch.Tensor:
    """(N, 2) logits whose CE against label 0 is exactly ces[i]: CE = log(1 + e^x) for [0, x]."""
    x = torch.tensor([math.log(math.expm1(c)) for c in ces], dtype=torch.float64)
    return torch.stack([torch.zeros_like(x), x], dim=1)


def reference_loss(logits, labels, masked, targets, p) -> float:
    """The formula of digest §3.1, one token at a time in float64."""
    total = 0.0
    b, length, _ = logits.shape
    for i in range(b):
        n_tgt = int(targets[i].sum())
        for j in range(length):
            if masked[i, j]:
                row = logits[i, j].double()
                ce = float(torch.logsumexp(row, 0) - row[labels[i, j]])
                total += ce / float(p[i]) / n_tgt
    return total / b


def test_draw_order_matches_the_reference():
    targets = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    masked, p, t = forward_process(targets, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    t_ref = torch.rand(2, generator=g)  # drawn FIRST
    u_ref = torch.rand(2, 8, generator=g)  # SECOND, over the full length
    p_ref = (1 - EPS) * t_ref + EPS
    assert torch.equal(t, t_ref) and torch.equal(p, p_ref)
    assert torch.equal(masked, (u_ref < p_ref[:, None]) & targets)
    # the same through the two halves
    g = torch.Generator().manual_seed(7)
    t2 = sample_t(2, g)
    assert torch.equal(mask_targets(targets, t2, g)[0], masked)


def test_loss_on_a_fixed_batch_equals_the_formula():
    g = torch.Generator().manual_seed(0)
    b, length, vocab = 3, 10, 11
    logits = torch.randn(b, length, vocab, generator=g) * 3
    labels = torch.randint(0, vocab, (b, length), generator=g)
    targets = torch.rand(b, length, generator=g) < 0.6
    masked, p, _ = forward_process(targets, torch.Generator().manual_seed(1))
    assert masked.any() and (targets & ~masked).any()  # the draw exercises both cases
    loss = diffusion_loss(logits, labels, masked, targets, p)
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(reference_loss(logits, labels, masked, targets, p),
                                        rel=1e-6)


def test_closed_form_value():
    # digest §8 check 6: B=1, 4 targets, t=0.5 -> p=0.5005, masked CEs 1.0 and 2.0
    p = (1 - EPS) * torch.tensor([0.5]) + EPS
    assert float(p) == pytest.approx(0.5005)
    logits = torch.zeros(1, 6, 2, dtype=torch.float64)
    logits[0, [2, 4]] = logits_with_ce([1.0, 2.0])
    labels = torch.zeros(1, 6, dtype=torch.long)
    targets = torch.tensor([[0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    masked = torch.tensor([[0, 0, 1, 0, 1, 0]], dtype=torch.bool)
    loss = diffusion_loss(logits, labels, masked, targets, p)
    assert float(loss) == pytest.approx((1 / 0.5005 + 2 / 0.5005) / 4, rel=1e-6)
    assert float(loss) == pytest.approx(1.498501498, rel=1e-6)


def test_batch_of_two_divides_by_b_not_by_total_targets():
    p = torch.tensor([0.5005, 0.25])
    logits = torch.zeros(2, 5, 2, dtype=torch.float64)
    logits[0, [1, 3]] = logits_with_ce([1.0, 2.0])
    logits[1, [0]] = logits_with_ce([3.0])
    labels = torch.zeros(2, 5, dtype=torch.long)
    targets = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)  # 4 and 2
    masked = torch.tensor([[0, 1, 0, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    loss = float(diffusion_loss(logits, labels, masked, targets, p))
    per_sample = ((1 + 2) / 0.5005 / 4 + 3 / 0.25 / 2) / 2
    pooled = ((1 + 2) / 0.5005 + 3 / 0.25) / 6  # the normalisation the reference does NOT use
    assert loss == pytest.approx(per_sample, rel=1e-6)
    assert abs(loss - pooled) > 0.1


def test_no_masked_token_gives_zero_loss_that_backprops():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    targets = torch.ones(2, 4, dtype=torch.bool)
    masked = torch.zeros(2, 4, dtype=torch.bool)
    loss = diffusion_loss(logits, torch.zeros(2, 4, dtype=torch.long), masked, targets,
                          torch.tensor([0.3, 0.7]))
    loss.backward()
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_masked_outside_targets_is_refused():
    targets = torch.tensor([[1, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match="not targets"):
        diffusion_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long),
                       torch.tensor([[1, 1]], dtype=torch.bool), targets, torch.tensor([0.5]))


def test_estimator_is_unbiased_for_the_mean_target_ce():
    # E_t E_mask[Σ_masked CE / p / n] = mean CE over targets, since P(masked) = p.
    g = torch.Generator().manual_seed(3)
    length, vocab, draws = 8, 16, 20_000
    logits = torch.randn(1, length, vocab, generator=g) * 2
    labels = torch.randint(0, vocab, (1, length), generator=g)
    targets = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 0]], dtype=torch.bool)
    ce = torch.nn.functional.cross_entropy(logits[0], labels[0], reduction="none")  # (L,)
    expected = float(ce[targets[0]].mean())
    # One batch of `draws` copies = `draws` independent draws of (t, masks); the loss is their mean.
    masked, p, _ = forward_process(targets.expand(draws, -1), torch.Generator().manual_seed(4))
    loss = float(diffusion_loss(logits.expand(draws, -1, -1), labels.expand(draws, -1), masked,
                                targets.expand(draws, -1), p))
    per_draw = (masked * ce).sum(dim=1) / p / targets.sum()  # (draws,) the same estimator
    assert loss == pytest.approx(float(per_draw.mean()), rel=1e-4)
    stderr = float(per_draw.std()) / math.sqrt(draws)
    assert abs(loss - expected) < 4 * stderr
    assert stderr < 0.1 * expected  # the tolerance is tight enough to mean something


def test_no_gradient_reaches_non_target_or_unmasked_positions():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 12, 7, generator=g, requires_grad=True)
    labels = torch.randint(0, 7, (4, 12), generator=g)
    targets = torch.zeros(4, 12, dtype=torch.bool)
    targets[:, 6:] = True  # prompt / image positions first, response after
    masked, p, _ = forward_process(targets, torch.Generator().manual_seed(6))
    assert masked.any()
    diffusion_loss(logits, labels, masked, targets, p).backward()
    grad_norm = logits.grad.abs().sum(dim=-1)  # (B, L)
    assert torch.equal(grad_norm[~masked], torch.zeros_like(grad_norm[~masked]))
    assert bool((grad_norm[masked] > 0).all())


def test_masks_never_touch_non_target_embeddings():
    g = torch.Generator().manual_seed(8)
    n, length, dim = 2000, 10, 4
    embeds = torch.randn(1, length, dim, generator=g).expand(n, -1, -1)
    targets = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 0, 1, 1]], dtype=torch.bool).expand(n, -1)
    mask_embedding = torch.randn(dim, generator=g, requires_grad=True)
    masked, _, _ = forward_process(targets, torch.Generator().manual_seed(9))
    noisy = apply_mask(embeds, masked, mask_embedding)
    assert torch.equal(noisy[~targets], embeds[~targets])
    assert torch.equal(noisy[masked], mask_embedding.detach().expand(int(masked.sum()), -1))
    assert bool(masked[:, targets[0]].any(dim=0).all())  # every target got masked in some draw
    noisy.sum().backward()  # the [M] row is trainable through the where
    assert torch.allclose(mask_embedding.grad, torch.full((dim,), float(masked.sum())))


def test_apply_mask_ids():
    ids = torch.tensor([[5, 6, 7, 8]])
    masked = torch.tensor([[0, 1, 0, 1]], dtype=torch.bool)
    assert apply_mask_ids(ids, masked, mask_id=99).tolist() == [[5, 99, 7, 99]]
    assert ids.tolist() == [[5, 6, 7, 8]]  # not in place
