"""Shared fixtures of the kernel tests: random LM-head inputs and the float64 comparison."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from stageflow.kernels.reference import reference_token_logprobs

# Tolerances of the fp32 anchors in docs/formulas.md#fused-log-prob-kernel-sizing.
ATOL, RTOL = 1e-5, 5e-4


class LMInputs:
    """Leaf tensors h [N, H], W [V, H], b [V] (or None), y [N] with requires_grad set."""

    def __init__(self, n, hidden, vocab, *, bias, dtype, seed, logit_scale):
        gen = torch.Generator().manual_seed(seed)
        self.h = torch.randn(n, hidden, generator=gen, dtype=torch.float64)
        # W scaled so that logits have about `logit_scale` standard deviation.
        self.w = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64)
        self.w *= logit_scale / hidden**0.5
        self.b = torch.randn(vocab, generator=gen, dtype=torch.float64) if bias else None
        self.y = torch.randint(0, vocab, (n,), generator=gen)
        self.h, self.w = self.h.to(dtype), self.w.to(dtype)
        self.b = None if self.b is None else self.b.to(dtype)
        for t in (self.h, self.w, self.b):
            if t is not None:
                t.requires_grad_(True)

    def named_leaves(self) -> dict[str, torch.Tensor]:
        """{"dh": h, "dW": W, "db": b}, for the inputs that require grad."""
        pairs = (("dh", self.h), ("dW", self.w), ("db", self.b))
        return {name: t for name, t in pairs if t is not None and t.requires_grad}

    def leaves(self) -> list[torch.Tensor]:
        return list(self.named_leaves().values())

    def float64_copy(self) -> LMInputs:
        other = object.__new__(LMInputs)
        other.h, other.w, other.b = (
            None if t is None else t.detach().double().requires_grad_(t.requires_grad)
            for t in (self.h, self.w, self.b)
        )
        other.y = self.y
        return other


@pytest.fixture
def lm_inputs() -> Callable[..., LMInputs]:
    """Factory: lm_inputs(n, hidden, vocab, bias=False, dtype=fp32, seed=0, logit_scale=3.0)."""

    def make(n, hidden, vocab, *, bias=False, dtype=torch.float32, seed=0, logit_scale=3.0):
        return LMInputs(
            n, hidden, vocab, bias=bias, dtype=dtype, seed=seed, logit_scale=logit_scale
        )

    return make


def _weighted_sum(lp, ent, g, g_ent):
    total = (lp * g.to(lp.dtype)).sum()
    if ent is not None:
        total = total + (ent * g_ent.to(ent.dtype)).sum()
    return total


@pytest.fixture
def check_against_reference() -> Callable[..., None]:
    """check(fn, inputs, temperature=1.0, with_entropy=False, softcap=None, atol, rtol): values
    and grads.

    `fn(h, w, y, bias=, temperature=, with_entropy=)` must return TokenLogProbs. Upstream
    gradients are random, so every token's dlogp and dH enter dh, dW and db.
    """

    def check(
        fn, inputs, *, temperature=1.0, with_entropy=False, softcap=None, atol=ATOL, rtol=RTOL
    ):
        ref_in = inputs.float64_copy()
        kw = dict(temperature=temperature, with_entropy=with_entropy, softcap=softcap)
        out = fn(inputs.h, inputs.w, inputs.y, bias=inputs.b, **kw)
        ref = reference_token_logprobs(ref_in.h, ref_in.w, ref_in.y, bias=ref_in.b, **kw)
        torch.testing.assert_close(out.logprobs.double(), ref.logprobs, atol=atol, rtol=rtol)
        assert (out.entropy is None) == (not with_entropy)
        if with_entropy:
            torch.testing.assert_close(out.entropy.double(), ref.entropy, atol=atol, rtol=rtol)
        gen = torch.Generator().manual_seed(1)
        g = torch.randn(inputs.y.shape[0], generator=gen, dtype=torch.float64)
        g_ent = torch.randn(inputs.y.shape[0], generator=gen, dtype=torch.float64)
        grads = torch.autograd.grad(
            _weighted_sum(out.logprobs, out.entropy, g, g_ent), inputs.leaves()
        )
        ref_grads = torch.autograd.grad(
            _weighted_sum(ref.logprobs, ref.entropy, g, g_ent), ref_in.leaves()
        )
        for name, got, want in zip(inputs.named_leaves(), grads, ref_grads):
            assert got.dtype == inputs.h.dtype, name
            torch.testing.assert_close(
                got.double(), want, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}"
            )

    return check
