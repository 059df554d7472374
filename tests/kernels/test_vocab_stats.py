"""The full-vocabulary statistics (CE-U's and UNDIAL's cross-entropy, PDU's logit margin,
ULD's KL from the uniform distribution)
against direct float64 implementations of the published formulas: values and gradients,
chunked, capped, with a teacher."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stageflow.kernels import vocab_stats
from stageflow.kernels.vocab_stats import (
    HeadStatistic,
    Teacher,
    logit_margin,
    per_token_statistic,
    soft_target_cross_entropy,
    uniform_kl,
)

N, H, V = 37, 32, 257


def direct(h, w, b, y, shift, teacher=None, cap=None):
    """open-unlearning's CE-U / UNDIAL loss per token, on full logits: the target logits (the
    model's own, detached, or the teacher's) with the true token set to -inf (CE-U) or lowered
    by shift (UNDIAL), softmaxed, as the probability target of F.cross_entropy."""

    def logits(hh, ww, bb):
        z = hh @ ww.T + (0 if bb is None else bb)
        return z if cap is None else cap * torch.tanh(z / cap)

    z = logits(h, w, b)
    source = (z if teacher is None else logits(*teacher)).detach().clone()
    if math.isinf(shift):
        source.scatter_(1, y[:, None], float("-inf"))
    else:
        source -= shift * F.one_hot(y, source.shape[1]).to(source.dtype)
    return F.cross_entropy(z, F.softmax(source, -1), reduction="none")


def leaves(seed, dtype=torch.float32, bias=True, n=N):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, H, generator=gen, dtype=torch.float64)
    w = torch.randn(V, H, generator=gen, dtype=torch.float64) * 3.0 / H**0.5
    b = torch.randn(V, generator=gen, dtype=torch.float64) if bias else None
    y = torch.randint(0, V, (n,), generator=gen)
    teacher = (
        torch.randn(n, H, generator=gen, dtype=torch.float64),
        torch.randn(V, H, generator=gen, dtype=torch.float64) * 3.0 / H**0.5,
        torch.randn(V, generator=gen, dtype=torch.float64),
    )
    made = [t.to(dtype).requires_grad_(True) if t is not None else None for t in (h, w, b)]
    return made, y, tuple(t.to(dtype) for t in teacher)


CASES = [
    ("ce_u", math.inf, False, None),
    ("ce_u-capped", math.inf, False, 2.0),
    ("undial", 10.0, True, None),
    ("undial-small-shift-capped", 0.5, True, 2.0),
]


@pytest.mark.parametrize("name, shift, with_teacher, cap", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("chunk_elements", [2**23, 5 * V], ids=["one-chunk", "five-row-chunks"])
def test_matches_the_direct_formula(monkeypatch, name, shift, with_teacher, cap, chunk_elements):
    """fp32, chunked or not, against float64 direct: the value and dh, dW, db under a random
    upstream gradient."""
    monkeypatch.setattr(vocab_stats, "CHUNK_ELEMENTS", chunk_elements)
    (h, w, b), y, teacher = leaves(seed=len(name))
    got = soft_target_cross_entropy(
        h, w, y, shift, Teacher(*teacher) if with_teacher else None, bias=b, softcap=cap
    )
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (h, w, b)]
    want = direct(
        *ref_leaves[:2], ref_leaves[2], y, shift,
        tuple(t.double() for t in teacher) if with_teacher else None, cap,
    )  # fmt: skip
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
    g = torch.randn(N, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = torch.autograd.grad((got * g.float()).sum(), (h, w, b))
    ref_grads = torch.autograd.grad((want * g).sum(), ref_leaves)
    for label, a, e in zip(("dh", "dW", "db"), grads, ref_grads):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), e, atol=1e-5, rtol=1e-4, msg=label)


@pytest.mark.parametrize("shift", [math.inf, 3.0])
def test_float64_gradcheck(shift):
    """With a teacher (q a constant) the hand-written backward is the derivative of the forward
    (finite differences); the model's own target is a stop-gradient, checked above."""
    (h, w, b), y, teacher = leaves(seed=7, dtype=torch.float64, n=6)
    t = Teacher(*teacher)

    def loss(hh, ww, bb):
        return soft_target_cross_entropy(hh, ww, y, shift, t, bias=bb, softcap=2.0)

    assert torch.autograd.gradcheck(loss, (h, w, b))


def test_the_target_is_what_the_methods_say():
    """CE-U's target gives the true token no mass and is the model's own distribution elsewhere,
    renormalised (so the loss is lse(z) - E_q[z] >= the entropy of q); UNDIAL with shift 0 would be
    distillation from the teacher (the loss at teacher = student is the entropy)."""
    (h, w, b), y, _ = leaves(seed=1, dtype=torch.float64, bias=False)
    z = (h @ w.T).detach()
    p = torch.softmax(z, -1)
    q = p.clone().scatter_(1, y[:, None], 0.0)
    q /= q.sum(-1, keepdim=True)
    want = -(q * torch.log_softmax(z, -1)).sum(-1)
    got = soft_target_cross_entropy(h, w, y, math.inf)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    same = soft_target_cross_entropy(h, w, y, 1e-30, Teacher(h.detach(), w.detach()))
    entropy = torch.distributions.Categorical(logits=z).entropy()
    torch.testing.assert_close(same, entropy, atol=1e-12, rtol=0)


def test_per_token_keeps_the_masked_tokens_only():
    """[B, T] inputs: values at the mask's tokens equal the flat call's, 0 elsewhere, and junk
    in the teacher's hidden states outside the mask changes nothing."""
    (h, w, b), y, teacher = leaves(seed=2)
    hidden = h.detach().view(1, N, H).expand(2, N, H).contiguous().requires_grad_(True)
    targets = y.view(1, N).expand(2, N)
    mask = torch.rand(2, N, generator=torch.Generator().manual_seed(0)) < 0.5
    th = teacher[0].view(1, N, H).expand(2, N, H).clone()
    th[~mask] = float("nan")
    target = HeadStatistic(mask, "cross_entropy", 2.0, th, teacher[1], teacher[2])
    out = per_token_statistic(hidden, w, targets, target, bias=b)
    flat = soft_target_cross_entropy(h, w, y, 2.0, Teacher(*teacher), bias=b)
    assert out.shape == (2, N) and torch.isfinite(out).all()
    assert (out[~mask] == 0).all()
    torch.testing.assert_close(out[mask], flat.expand(2, N)[mask])
    (grad,) = torch.autograd.grad(out.sum(), hidden)
    assert (grad[~mask] == 0).all() and grad[mask].abs().sum() > 0


def test_a_bad_shift_is_one_sentence():
    (h, w, _), y, _ = leaves(seed=0)
    with pytest.raises(ValueError, match="shift must be > 0"):
        soft_target_cross_entropy(h, w, y, 0.0)


@pytest.mark.parametrize("cap", [None, 2.0], ids=["plain", "capped"])
@pytest.mark.parametrize("chunk_elements", [2**23, 5 * V], ids=["one-chunk", "five-row-chunks"])
def test_logit_margin_matches_the_direct_formula(monkeypatch, cap, chunk_elements):
    """PDU's max_v z - mean_v z (open-unlearning's maxLogits - averageLogits) on full float64
    logits: the value and dh, dW, db under a random upstream gradient."""
    monkeypatch.setattr(vocab_stats, "CHUNK_ELEMENTS", chunk_elements)
    (h, w, b), _, _ = leaves(seed=11)
    got = logit_margin(h, w, b, softcap=cap)
    ref = [t.detach().double().requires_grad_(True) for t in (h, w, b)]
    z = ref[0] @ ref[1].T + ref[2]
    z = z if cap is None else cap * torch.tanh(z / cap)
    want = z.max(-1).values - z.mean(-1)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
    g = torch.randn(N, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grads = torch.autograd.grad((got * g.float()).sum(), (h, w, b))
    for label, a, e in zip(("dh", "dW", "db"), grads, torch.autograd.grad((want * g).sum(), ref)):
        torch.testing.assert_close(a.double(), e, atol=1e-5, rtol=1e-4, msg=label)
    (h64, w64, b64), _, _ = leaves(seed=12, dtype=torch.float64, n=5)
    assert torch.autograd.gradcheck(lambda *t: logit_margin(*t, softcap=cap), (h64, w64, b64))


def test_per_token_margin_keeps_the_masked_tokens_only():
    (h, w, b), y, _ = leaves(seed=3)
    mask = torch.rand(1, N, generator=torch.Generator().manual_seed(1)) < 0.5
    out = per_token_statistic(h.view(1, N, H), w, y.view(1, N), HeadStatistic(mask, "margin"), b)
    assert (out[~mask] == 0).all()
    torch.testing.assert_close(out[mask], logit_margin(h, w, b)[mask[0]])


@pytest.mark.parametrize("cap", [None, 2.0], ids=["plain", "capped"])
@pytest.mark.parametrize("chunk_elements", [2**23, 5 * V], ids=["one-chunk", "five-row-chunks"])
def test_uniform_kl_matches_the_direct_formula(monkeypatch, cap, chunk_elements):
    """ULD's retain term, KL(u || softmax(z)) with u = 1/V (the ULD code's kl_div(log p, u)),
    on full float64 logits: the value and dh, dW, db under a random upstream gradient."""
    monkeypatch.setattr(vocab_stats, "CHUNK_ELEMENTS", chunk_elements)
    (h, w, b), _, _ = leaves(seed=21)
    got = uniform_kl(h, w, b, softcap=cap)
    ref = [t.detach().double().requires_grad_(True) for t in (h, w, b)]
    z = ref[0] @ ref[1].T + ref[2]
    z = z if cap is None else cap * torch.tanh(z / cap)
    u = torch.full_like(z, 1.0 / V)
    want = F.kl_div(F.log_softmax(z, -1), u, reduction="none").sum(-1)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
    assert (got >= 0).all()
    g = torch.randn(N, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grads = torch.autograd.grad((got * g.float()).sum(), (h, w, b))
    for label, a, e in zip(("dh", "dW", "db"), grads, torch.autograd.grad((want * g).sum(), ref)):
        torch.testing.assert_close(a.double(), e, atol=1e-5, rtol=1e-4, msg=label)
    (h64, w64, b64), _, _ = leaves(seed=22, dtype=torch.float64, n=5)
    assert torch.autograd.gradcheck(lambda *t: uniform_kl(*t, softcap=cap), (h64, w64, b64))
