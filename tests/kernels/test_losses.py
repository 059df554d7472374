"""Losses vs independent float64 formulas, limits, masks, and gradients through the primitive."""

from __future__ import annotations

import math

import pytest
import torch

from stageflow.kernels import losses
from stageflow.kernels.logprob import per_token_logprobs

B, T = 4, 9


def _batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    ref = logp - 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask = torch.rand(B, T, generator=gen) > 0.3
    mask[:, 0] = True  # every answer has a token
    return logp.requires_grad_(), ref, mask


def _rows(logp, mask):
    """(list of answer log-prob lists) with plain python, the independent side of the checks."""
    return [[logp[b, t].item() for t in range(T) if mask[b, t]] for b in range(B)]


def _logsigmoid(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def test_sequence_logprobs_and_nll():
    logp, _, mask = _batch()
    rows = _rows(logp, mask)
    seq = losses.sequence_logprobs(logp, mask)
    assert seq.tolist() == pytest.approx([sum(r) for r in rows], abs=1e-12)
    token_mean = -sum(map(sum, rows)) / sum(map(len, rows))
    seq_mean = sum(-sum(r) / len(r) for r in rows) / B
    assert losses.nll_loss(logp, mask).item() == pytest.approx(token_mean, abs=1e-12)
    assert losses.nll_loss(logp, mask, "sequence_mean").item() == pytest.approx(seq_mean, abs=1e-12)
    assert losses.ga_loss(logp, mask).item() == pytest.approx(-token_mean, abs=1e-12)
    with pytest.raises(ValueError, match="reduction"):
        losses.nll_loss(logp, mask, "sum")


@pytest.mark.parametrize(
    "name, weight",
    [
        ("wga", lambda p: p**0.7),
        ("satimp", lambda p: p**5.0 * (1 - p) ** 1.5),
    ],
)
def test_token_weighted_ascent_matches_formula(name, weight):
    """WGA (w = p^beta) and SatImp (w = p^beta1 (1 - p)^beta2): sum m w log p / sum m, value
    and gradient (w is detached: d loss / d log p_t = w_t / sum m)."""
    logp, _, mask = _batch(12)
    tokens = [lp for row in _rows(logp, mask) for lp in row]
    want = sum(weight(math.exp(lp)) * lp for lp in tokens) / len(tokens)
    if name == "wga":
        got = losses.wga_loss(logp, mask, beta=0.7)
    else:
        got = losses.satimp_loss(logp, mask, beta1=5.0, beta2=1.5)
    assert got.item() == pytest.approx(want, abs=1e-12)
    (grad,) = torch.autograd.grad(got, logp)
    for b in range(B):
        for t in range(T):
            expected = weight(math.exp(logp[b, t].item())) / len(tokens) if mask[b, t] else 0.0
            assert grad[b, t].item() == pytest.approx(expected, abs=1e-12)
    # beta = 0 is plain gradient ascent
    assert losses.wga_loss(logp, mask, beta=0.0).item() == pytest.approx(
        losses.ga_loss(logp, mask).item(), abs=1e-12
    )


def test_npo_matches_formula():
    logp, ref, mask = _batch(1)
    beta = 0.5
    lp_rows, ref_rows = _rows(logp, mask), _rows(ref, mask)
    want = sum(
        -(2 / beta) * _logsigmoid(-beta * (sum(a) - sum(r))) for a, r in zip(lp_rows, ref_rows)
    )
    got = losses.npo_loss(logp, ref, mask, beta=beta)
    assert got.item() == pytest.approx(want / B, abs=1e-12)
    # equals (2/beta) log(1 + (pi_theta/pi_ref)^beta)
    alt = sum(
        (2 / beta) * math.log1p(math.exp(beta * (sum(a) - sum(r))))
        for a, r in zip(lp_rows, ref_rows)
    )
    assert got.item() == pytest.approx(alt / B, abs=1e-12)


def test_dpo_matches_formula_and_its_gradient():
    """-(2/beta) log sigma(beta [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))]),
    mean over pairs, in plain python; its gradient: d/d log pi_t(y_w) = (2 sigma(-beta m) / B)
    times -1 on chosen tokens and +1 on rejected ones; (2/beta) log 2 at pi = pi_ref."""
    win, win_ref, win_mask = _batch(2)
    lose, lose_ref, lose_mask = _batch(3)
    beta = 0.7
    margins = [
        (sum(a) - sum(r)) - (sum(c) - sum(d))
        for a, r, c, d in zip(
            _rows(win, win_mask), _rows(win_ref, win_mask),
            _rows(lose, lose_mask), _rows(lose_ref, lose_mask),
        )
    ]  # fmt: skip
    want = sum(-(2 / beta) * _logsigmoid(beta * m) for m in margins) / B
    got = losses.dpo_loss(win, win_ref, win_mask, lose, lose_ref, lose_mask, beta=beta)
    assert got.item() == pytest.approx(want, abs=1e-12)
    g_win, g_lose = torch.autograd.grad(got, (win, lose))
    for b, m in enumerate(margins):
        scale = 2 / (1 + math.exp(beta * m)) / B
        torch.testing.assert_close(g_win[b], -scale * win_mask[b].double(), atol=1e-12, rtol=0)
        torch.testing.assert_close(g_lose[b], scale * lose_mask[b].double(), atol=1e-12, rtol=0)
    at_ref = losses.dpo_loss(win, win, win_mask, lose, lose, lose_mask, beta=0.1)
    assert at_ref.item() == pytest.approx(20 * math.log(2), abs=1e-12)


def test_activation_loss_is_the_wmdp_distance():
    """RMU's distance: per row, the sum over answer tokens of the mean over features of the
    squared difference, over the row's answer length; then the mean over rows (plain python)."""
    gen = torch.Generator().manual_seed(4)
    states = torch.randn(B, T, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randn(5, generator=gen, dtype=torch.float64)
    _, _, mask = _batch(5)
    rows = []
    for b in range(B):
        tokens = [t for t in range(T) if mask[b, t]]
        per_token = [
            sum((states[b, t, h].item() - target[h].item()) ** 2 for h in range(5)) / 5
            for t in tokens
        ]
        rows.append(sum(per_token) / len(tokens))
    got = losses.activation_loss(states, target, mask)
    assert got.item() == pytest.approx(sum(rows) / B, abs=1e-12)
    (grad,) = torch.autograd.grad(got, states)
    lengths = mask.sum(-1, keepdim=True).unsqueeze(-1).double()
    want = 2 * (states.detach() - target) / 5 / lengths / B * mask.unsqueeze(-1)
    torch.testing.assert_close(grad, want, atol=1e-12, rtol=0)
    pair = torch.randn(B, T, 5, generator=gen, dtype=torch.float64)
    assert losses.activation_loss(pair, pair, mask).item() == 0.0  # states against states


def test_npo_tends_to_ga_as_beta_goes_to_zero():
    """Gradient -> grad of mean_b log pi_theta(y|x); value - 2 log2 / beta -> mean log-ratio."""
    logp, ref, mask = _batch(2)
    ga = losses.sequence_logprobs(logp, mask).mean()
    (ga_grad,) = torch.autograd.grad(ga, logp)
    beta = 1e-6
    npo = losses.npo_loss(logp, ref, mask, beta=beta)
    (npo_grad,) = torch.autograd.grad(npo, logp)
    torch.testing.assert_close(npo_grad, ga_grad, atol=1e-5, rtol=0)
    log_ratio = (losses.sequence_logprobs(logp, mask) - losses.sequence_logprobs(ref, mask)).mean()
    assert (npo - 2 * math.log(2) / beta).item() == pytest.approx(log_ratio.item(), abs=1e-4)
    # the reference side gets no gradient
    ref.requires_grad_(True)
    (ref_grad,) = torch.autograd.grad(losses.npo_loss(logp, ref, mask), ref, allow_unused=True)
    assert ref_grad is None


@pytest.mark.parametrize("length_normalize", [True, False])
def test_simnpo_matches_formula(length_normalize):
    logp, _, mask = _batch(3)
    beta, delta = 4.5, 0.2
    want = 0.0
    for row in _rows(logp, mask):
        nll = -sum(row) / (len(row) if length_normalize else 1)
        want += -(2 / beta) * _logsigmoid(beta * (nll - delta))
    got = losses.simnpo_loss(logp, mask, beta=beta, delta=delta, length_normalize=length_normalize)
    assert got.item() == pytest.approx(want / B, abs=1e-12)


def test_simnpo_rewards_forgetting():
    """Lower log-probs (higher NLL) give a lower loss: minimising it unlearns."""
    logp, _, mask = _batch(4)
    assert losses.simnpo_loss(logp - 1.0, mask) < losses.simnpo_loss(logp, mask)
    (grad,) = torch.autograd.grad(losses.simnpo_loss(logp, mask), logp)
    assert (grad[mask] > 0).all() and (grad[~mask] == 0).all()


def _grpo_formula(logp, old, ref, adv, ent, mask, eps_low, eps_high, beta, coef, reduction):
    per_seq, total, count = [], 0.0, 0
    for b in range(B):
        seq_total, n = 0.0, 0
        for t in range(T):
            if not mask[b, t]:
                continue
            rho = math.exp(logp[b, t].item() - old[b, t].item())
            a = adv[b].item()
            pg = -min(rho * a, min(max(rho, 1 - eps_low), 1 + eps_high) * a)
            q = ref[b, t].item() - logp[b, t].item()
            value = pg + beta * (math.exp(q) - q - 1) - coef * ent[b, t].item()
            seq_total, n = seq_total + value, n + 1
        per_seq.append(seq_total / n)
        total, count = total + seq_total, count + n
    return total / count if reduction == "token_mean" else sum(per_seq) / B


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean"])
def test_grpo_matches_formula(reduction):
    logp, ref, mask = _batch(5)
    gen = torch.Generator().manual_seed(6)
    old = logp.detach() + 0.4 * torch.randn(B, T, generator=gen, dtype=torch.float64)  # some clip
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5], dtype=torch.float64)
    ent = torch.rand(B, T, generator=gen, dtype=torch.float64)
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.04, entropy_coef=0.01)
    got = losses.grpo_loss(
        logp, old, adv, mask, ref_token_logprobs=ref, entropy=ent, reduction=reduction, **kw
    )
    want = _grpo_formula(logp, old, ref, adv, ent, mask, 0.2, 0.28, 0.04, 0.01, reduction)
    assert got.item() == pytest.approx(want, abs=1e-12)


def test_grpo_on_policy_gradient_and_clipping():
    logp, _, mask = _batch(7)
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    (grad,) = torch.autograd.grad(losses.grpo_loss(logp, None, adv, mask), logp)
    want = torch.where(mask, -adv[:, None].expand(B, T) / mask.sum(), 0.0)
    torch.testing.assert_close(grad, want, atol=1e-12, rtol=0)
    # ratio far above 1 + eps_high with A > 0: clipped, no gradient
    old = logp.detach() - 1.0
    (grad,) = torch.autograd.grad(losses.grpo_loss(logp, old, adv.abs(), mask), logp)
    assert (grad == 0).all()


def test_k3_kl_is_zero_at_equality_and_positive_elsewhere():
    logp, ref, _ = _batch(8)
    assert losses.k3_kl(logp, logp.detach()).abs().max().item() == 0.0
    assert (losses.k3_kl(logp, ref) >= 0).all()
    with pytest.raises(ValueError, match="needs ref_token_logprobs"):
        losses.grpo_loss(logp, None, torch.ones(B), torch.ones(B, T), beta=0.1)


def test_junk_at_masked_positions_does_not_leak():
    logp, ref, mask = _batch(9)
    junk = torch.where(mask, logp, torch.tensor(float("nan"), dtype=logp.dtype))
    for value in (
        losses.nll_loss(junk, mask),
        losses.npo_loss(junk, ref, mask),
        losses.simnpo_loss(junk, mask),
        losses.grpo_loss(junk, None, torch.ones(B), mask),
        losses.wga_loss(junk, mask),
        losses.satimp_loss(junk, mask),
        losses.dpo_loss(junk, ref, mask, junk, ref, mask),
    ):
        assert torch.isfinite(value)


@pytest.mark.parametrize("loss_name", ["nll", "npo", "simnpo", "grpo", "wga", "satimp"])
def test_gradients_reach_hidden_and_lm_head_like_float64(loss_name):
    """Loss on fused (chunked) fp32 log-probs: dh and dW equal the float64 naive path's."""
    gen = torch.Generator().manual_seed(10)
    h64 = torch.randn(B, T, 16, generator=gen, dtype=torch.float64)
    w64 = torch.randn(60, 16, generator=gen, dtype=torch.float64) / 2
    y = torch.randint(0, 60, (B, T), generator=gen)
    _, _, mask = _batch(11)
    ref_tok = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5])

    def run(h, w, impl):
        out = per_token_logprobs(h, w, y, mask, with_entropy=True, impl=impl, chunk_size=5)
        lp = out.logprobs
        if loss_name == "nll":
            return losses.nll_loss(lp, mask)
        if loss_name == "npo":
            return losses.npo_loss(lp, ref_tok.to(lp.dtype), mask, beta=0.5)
        if loss_name == "simnpo":
            return losses.simnpo_loss(lp, mask)
        if loss_name == "wga":
            return losses.wga_loss(lp, mask, beta=0.5)
        if loss_name == "satimp":
            return losses.satimp_loss(lp, mask, beta1=2.0, beta2=1.0)
        return losses.grpo_loss(
            lp, lp.detach() - 0.1, adv, mask, beta=0.04, ref_token_logprobs=ref_tok.to(lp.dtype),
            entropy=out.entropy, entropy_coef=0.01,
        )  # fmt: skip

    h32, w32 = (t.float().requires_grad_() for t in (h64, w64))
    h64.requires_grad_(), w64.requires_grad_()
    got = torch.autograd.grad(run(h32, w32, "fused"), (h32, w32))
    want = torch.autograd.grad(run(h64, w64, "reference"), (h64, w64))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=5e-4)
