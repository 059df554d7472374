"""Training losses as cheap functions of per-token log-probs (notation of
docs/formulas.md#notation).

Every function takes per-token tensors [B, T] and a mask [B, T] (1 on answer tokens, 0 on the
prompt and padding), so it works with the fused or the naive log-probs of
`stageflow.kernels.logprob.per_token_logprobs`; gradients flow through the log-probs to the
hidden states and the LM head. log pi(y|x) is the sum of the answer's token log-probs and |y|
its token count. Reference / old-policy log-probs are detached here.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Reduction = Literal["token_mean", "sequence_mean"]


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x where mask, else 0 (a `where`, so that junk at masked-out positions cannot leak)."""
    if mask.shape != x.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must match log-probs {tuple(x.shape)}")
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def sequence_logprobs(token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi(y|x) = sum_t mask_t * log pi(y_t | x, y_<t), per sequence [B]."""
    return _masked(token_logprobs, mask).sum(-1)


def answer_lengths(mask: torch.Tensor) -> torch.Tensor:
    """|y| per sequence [B] (at least 1, so that empty answers do not divide by zero)."""
    return mask.sum(-1).clamp(min=1)


def _reduce(token_values: torch.Tensor, mask: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    masked = _masked(token_values, mask)
    if reduction == "token_mean":
        return masked.sum() / mask.sum().clamp(min=1).to(masked.dtype)
    if reduction == "sequence_mean":
        return (masked.sum(-1) / answer_lengths(mask).to(masked.dtype)).mean()
    raise ValueError(f"reduction must be 'token_mean' or 'sequence_mean'; got {reduction!r}")


def nll_loss(
    token_logprobs: torch.Tensor, mask: torch.Tensor, reduction: Reduction = "token_mean"
) -> torch.Tensor:
    """SFT loss. token_mean: -sum_{b,t} m log p / sum m; sequence_mean: mean_b(-log pi(y|x)/|y|)."""
    return -_reduce(token_logprobs, mask, reduction)


def ga_loss(
    token_logprobs: torch.Tensor, mask: torch.Tensor, reduction: Reduction = "token_mean"
) -> torch.Tensor:
    """Gradient ascent on the forget set: + log pi_theta(y|x), i.e. minus the NLL (`nll_loss`)."""
    return -nll_loss(token_logprobs, mask, reduction)


def weighted_ga_loss(
    token_logprobs: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Token-weighted gradient ascent: sum_{b,t} m w log p / sum m, the weights w detached (zero
    outside the mask, so that junk there cannot leak)."""
    w = _masked(weights.detach(), mask)
    return _reduce(w * token_logprobs, mask, "token_mean")


def wga_loss(token_logprobs: torch.Tensor, mask: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """WGA: gradient ascent with token weights p_t^beta (p_t = pi_theta(y_t|x, y_<t), detached):
    tokens the model still predicts well weigh most."""
    p = _masked(token_logprobs.detach(), mask).exp()
    return weighted_ga_loss(token_logprobs, mask, p**beta)


def satimp_loss(
    token_logprobs: torch.Tensor, mask: torch.Tensor, beta1: float = 5.0, beta2: float = 1.0
) -> torch.Tensor:
    """SatImp: gradient ascent with token weights p_t^beta1 (1 - p_t)^beta2 (detached): the
    saturated (p near 1) and the already forgotten (p near 0) tokens weigh least."""
    p = _masked(token_logprobs.detach(), mask).exp()
    return weighted_ga_loss(token_logprobs, mask, p**beta1 * (1.0 - p) ** beta2)


def npo_loss(
    token_logprobs: torch.Tensor,
    ref_token_logprobs: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """NPO: mean_b -(2/beta) * log sigmoid(-beta * (log pi_theta(y|x) - log pi_ref(y|x))).

    Equals (2/beta) * log(1 + (pi_theta/pi_ref)^beta); tends to GA (summed log-probs) as beta -> 0.
    """
    log_ratio = sequence_logprobs(token_logprobs, mask) - sequence_logprobs(
        ref_token_logprobs.detach(), mask
    )
    return (-(2.0 / beta) * F.logsigmoid(-beta * log_ratio)).mean()


def dpo_loss(
    chosen_logprobs: torch.Tensor,
    chosen_ref_logprobs: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_logprobs: torch.Tensor,
    rejected_ref_logprobs: torch.Tensor,
    rejected_mask: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """DPO: mean_b -(2/beta) log sigmoid(beta * (log-ratio(chosen) - log-ratio(rejected))), the
    log-ratio log pi_theta(y|x) - log pi_ref(y|x) of summed answer log-probs; row b of the chosen
    and the rejected tensors share a prompt. (2/beta) log 2 where pi_theta = pi_ref."""
    chosen = sequence_logprobs(chosen_logprobs, chosen_mask) - sequence_logprobs(
        chosen_ref_logprobs.detach(), chosen_mask
    )
    rejected = sequence_logprobs(rejected_logprobs, rejected_mask) - sequence_logprobs(
        rejected_ref_logprobs.detach(), rejected_mask
    )
    return (-(2.0 / beta) * F.logsigmoid(beta * (chosen - rejected))).mean()


def simnpo_loss(
    token_logprobs: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 4.5,
    delta: float = 0.0,
    length_normalize: bool = True,
) -> torch.Tensor:
    """SimNPO: mean_b -(2/beta) * log sigmoid(beta * (NLL_theta(y|x)/|y| - delta)).

    NLL_theta(y|x) = -log pi_theta(y|x); `delta` is the margin (open-unlearning names it delta
    too; its `gamma` is the forget weight, not used here). length_normalize=False drops the /|y|
    (the paper code's variant).
    """
    nll = -sequence_logprobs(token_logprobs, mask)
    if length_normalize:
        nll = nll / answer_lengths(mask).to(nll.dtype)
    return (-(2.0 / beta) * F.logsigmoid(beta * (nll - delta))).mean()


def activation_loss(states: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RMU's distance of hidden states [B, T, H] to a target (states or a vector [H]):
    mean_b (sum_t m_t mean_h (s - target)^2 / |y_b|), over the answer tokens of each row."""
    per_token = (states - target.detach()).square().mean(-1)
    return _reduce(per_token, mask, "sequence_mean")


def k3_kl(token_logprobs: torch.Tensor, ref_token_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref): exp(q) - q - 1, q = log pi_ref - log pi_theta."""
    q = ref_token_logprobs.detach() - token_logprobs
    return torch.exp(q) - q - 1.0


def grpo_loss(
    token_logprobs: torch.Tensor,
    old_token_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    ref_token_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    reduction: Reduction = "token_mean",
) -> torch.Tensor:
    """GRPO token-level clipped-ratio loss with the k3 KL term and an optional entropy bonus.

    loss_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A)
             + beta * (exp(q_t) - q_t - 1) - entropy_coef * H_t,
    rho_t = pi_theta / pi_old = exp(log p_t - log p_old_t), q_t = log p_ref_t - log p_t,
    averaged over answer tokens (`token_mean`) or per sequence then over sequences
    (`sequence_mean`). advantages: [B] (one per completion) or [B, T]. old_token_logprobs
    None means on-policy (pi_old = pi_theta detached, rho = 1).
    """
    old = token_logprobs.detach() if old_token_logprobs is None else old_token_logprobs.detach()
    adv = advantages.detach().to(token_logprobs.dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)
    ratio = torch.exp(token_logprobs - old)
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    if beta != 0.0:
        if ref_token_logprobs is None:
            raise ValueError("grpo_loss with beta != 0 needs ref_token_logprobs")
        per_token = per_token + beta * k3_kl(token_logprobs, ref_token_logprobs)
    if entropy_coef != 0.0:
        if entropy is None:
            raise ValueError("grpo_loss with entropy_coef != 0 needs entropy")
        per_token = per_token - entropy_coef * entropy
    return _reduce(per_token, mask, reduction)
