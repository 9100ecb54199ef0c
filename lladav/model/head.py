"""The LM head, and its training form: cross-entropy on selected rows in chunks, no (B, L, V).

    hidden (N, D) rows, labels (N,) --LMHead(rows, labels)--> ce (N,) float32, correct (N,) bool

The training step needs the head only at the masked positions, and there only the cross-entropy.
Full logits are (B, L, V) with V = 126,464: 3.9 GiB per sample at L = 8,192 in fp32, and
autograd keeps them (and an fp32 copy) for backward. Here the head runs on `chunk` rows at a
time: forward keeps only each row's log-sum-exp; backward recomputes one chunk's logits at a
time, turns them into the softmax gradient and accumulates the weight's gradient in fp32. Peak
memory is a few (chunk, V) blocks whatever L is (bench/loss_memory.py), at the price of one
extra head matmul in backward.

Why a module call rather than a function over `lm_head.weight`: under ZeRO-3 a partitioned
weight is gathered only around its own module's forward (and again for its backward), so the
whole chunked computation runs inside `LMHead.forward`: the weight is gathered once per step.

Why hand-written rather than a library kernel: the fused-linear-cross-entropy kernels (Liger,
Apple's cut-cross-entropy) are Triton/CUDA only and the training step must run on the CPU too;
this is plain torch and matches `F.cross_entropy(F.linear(h, W).float(), y)` (tests/unit/
test_head.py, to 1e-6 in fp32).

Owns: the head's logits and the chunked row cross-entropy with its gradients. Does not own:
which rows are masked, or how the per-row values are weighted into the loss (diffusion.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CHUNK = 1024
"""Rows per chunk: (1024, 126,464) fp32 logits are 0.5 GB; larger chunks save little time."""


class _RowCrossEntropy(torch.autograd.Function):
    """ce_i = logsumexp(h_i W^T) - (h_i W^T)[y_i], in fp32, chunk by chunk (see module doc)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        ce = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        correct = torch.empty(n, dtype=torch.bool, device=hidden.device)
        for s in range(0, n, chunk):
            logits = F.linear(hidden[s:s + chunk], weight).float()          # (c, V)
            lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, labels[s:s + chunk, None])[:, 0]
            ce[s:s + chunk] = lse[s:s + chunk] - picked
            correct[s:s + chunk] = logits.argmax(dim=-1) == labels[s:s + chunk]
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(correct)
        return ce, correct

    @staticmethod
    def backward(ctx, grad_ce: torch.Tensor, _grad_correct: torch.Tensor | None):
        hidden, weight, labels, lse = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[s:s + ctx.chunk]
            logits = F.linear(h, weight).float()                             # (c, V)
            g = logits.sub_(lse[s:s + ctx.chunk, None]).exp_()               # softmax, in place
            g[torch.arange(len(h), device=g.device), labels[s:s + ctx.chunk]] -= 1.0
            g.mul_(grad_ce[s:s + ctx.chunk, None].float())                   # dCE/dlogits (c, V)
            if want_h:
                grad_h[s:s + ctx.chunk] = g.to(hidden.dtype) @ weight
            if want_w:
                grad_w.addmm_(g.t(), h.float())
        return grad_h, (grad_w.to(weight.dtype) if want_w else None), None, None


def row_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                      chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row CE (N,) float32 (differentiable in hidden and weight) and argmax hits (N,) bool
    of the head `weight` (V, D) over `hidden` (N, D) against `labels` (N,) long."""
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"row_cross_entropy: hidden {tuple(hidden.shape)} must be (N, D) and "
                         f"labels {tuple(labels.shape)} (N,)")
    return _RowCrossEntropy.apply(hidden, weight, labels.to(hidden.device), max(1, int(chunk)))


class LMHead(nn.Linear):
    """`lm_head`: an nn.Linear without bias (its state-dict name and shape are unchanged).

    head(hidden) -> logits (..., V), as nn.Linear. head(rows, labels) -> (ce, correct): the
    training form, see `row_cross_entropy`; one call per step, so ZeRO-3 gathers W once.
    """

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__(hidden_size, vocab_size, bias=False)

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None,
                chunk: int = CHUNK) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if labels is None:
            return F.linear(hidden, self.weight)
        return row_cross_entropy(hidden, self.weight, labels, chunk)
