"""Training objectives, registered by name in `OBJECTIVES` (what a stage's `objective:` names).

Each objective is one function of `LossInputs` (per-token log-probs [B, T] of the stage's batch
under pi_theta, its answer mask, and when needed pi_ref's log-probs and a retain batch's
log-probs) and its hyper-parameters, returning a scalar loss. The formulas live in
`stageflow.kernels.losses`; the notation is docs/formulas.md's (log pi(y|x) summed over answer
tokens, |y| the answer length). Each entry is a `registry.Objective`: the stage kinds that
accept it, its hyper-parameters with defaults, whether it needs pi_ref or a retain set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stageflow.core.lazy import lazy_module
from stageflow.core.registry import OBJECTIVES

if TYPE_CHECKING:
    import torch

# torch loads with the first loss, not when validation reads the registry
losses = lazy_module("stageflow.kernels.losses")


@dataclass
class LossInputs:
    """Per-token tensors an objective may use (all [B, T] except `advantages`, [B] or [B, T])."""

    logprobs: torch.Tensor
    mask: torch.Tensor
    ref_logprobs: torch.Tensor | None = None
    retain_logprobs: torch.Tensor | None = None
    retain_mask: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    advantages: torch.Tensor | None = None


def retain_nll(x: LossInputs) -> torch.Tensor:
    """NLL_r: token-mean negative log-likelihood of the retain batch's answers."""
    if x.retain_logprobs is None or x.retain_mask is None:
        raise ValueError("this objective's retain weight is > 0 but the stage has no retain data")
    return losses.nll_loss(x.retain_logprobs, x.retain_mask)


def with_retain(loss: torch.Tensor, x: LossInputs, alpha: float) -> torch.Tensor:
    """loss + alpha * NLL_r (the retain term is skipped when alpha is 0)."""
    return loss + alpha * retain_nll(x) if alpha else loss


@OBJECTIVES.register("sft", kinds=("sft",))
def sft(x: LossInputs) -> torch.Tensor:
    """Supervised fine-tuning: NLL = -sum_t m_t log pi(y_t|x, y_<t) / sum_t m_t (token mean)."""
    return losses.nll_loss(x.logprobs, x.mask)


@OBJECTIVES.register("ga", kinds=("unlearn",))
def ga(x: LossInputs) -> torch.Tensor:
    """Gradient ascent on the forget set: loss = + log pi_theta(y|x) per token (= -NLL)."""
    return losses.ga_loss(x.logprobs, x.mask)


@OBJECTIVES.register("graddiff", kinds=("unlearn",), retain_weight="alpha")
def graddiff(x: LossInputs, gamma: float = 1.0, alpha: float = 1.0) -> torch.Tensor:
    """GradDiff: gamma * (-NLL_f) + alpha * NLL_r."""
    return with_retain(gamma * losses.ga_loss(x.logprobs, x.mask), x, alpha)


@OBJECTIVES.register("wga", kinds=("unlearn",), retain_weight="alpha", nonnegative=("beta",))
def wga(x: LossInputs, beta: float = 1.0, gamma: float = 1.0, alpha: float = 1.0) -> torch.Tensor:
    """WGA: gamma * (-sum_t w_t NLL_t / |tokens|), w_t = p_t^beta detached, + alpha * NLL_r."""
    return with_retain(gamma * losses.wga_loss(x.logprobs, x.mask, beta=beta), x, alpha)


@OBJECTIVES.register(
    "satimp", kinds=("unlearn",), retain_weight="alpha", nonnegative=("beta1", "beta2")
)
def satimp(
    x: LossInputs, beta1: float = 5.0, beta2: float = 1.0, gamma: float = 1.0, alpha: float = 0.1
) -> torch.Tensor:
    """SatImp: WGA with weights p_t^beta1 (1 - p_t)^beta2 detached, + alpha * NLL_r."""
    loss = losses.satimp_loss(x.logprobs, x.mask, beta1=beta1, beta2=beta2)
    return with_retain(gamma * loss, x, alpha)


@OBJECTIVES.register("npo", kinds=("unlearn",), needs_ref=True, retain_weight="alpha")
def npo(x: LossInputs, beta: float = 0.1, alpha: float = 0.0) -> torch.Tensor:
    """NPO: mean -(2/beta) log sigmoid(-beta (log pi_theta(y|x) - log pi_ref(y|x))) + alpha NLL_r."""
    if x.ref_logprobs is None:
        raise ValueError("npo needs reference log-probs (pi_ref)")
    return with_retain(losses.npo_loss(x.logprobs, x.ref_logprobs, x.mask, beta=beta), x, alpha)


@OBJECTIVES.register("simnpo", kinds=("unlearn",), retain_weight="alpha")
def simnpo(
    x: LossInputs, beta: float = 4.5, delta: float = 0.0, alpha: float = 0.0
) -> torch.Tensor:
    """SimNPO: mean -(2/beta) log sigmoid(beta (NLL_theta(y|x)/|y| - delta)) + alpha NLL_r."""
    return with_retain(losses.simnpo_loss(x.logprobs, x.mask, beta=beta, delta=delta), x, alpha)


# the clip range and the KL coefficient of every RL objective
CLIP_AND_KL = ("eps_low", "eps_high", "beta")


@OBJECTIVES.register("grpo", kinds=("grpo",), rl_loop=True, nonnegative=CLIP_AND_KL)
def grpo(
    x: LossInputs, eps_low: float = 0.2, eps_high: float = 0.2, beta: float = 0.0
) -> torch.Tensor:
    """GRPO: -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A) + beta k3(pi_theta || pi_ref), token mean.

    rho = pi_theta / pi_old per token; the k3 term needs `ref_logprobs` when beta > 0. The RL
    loop's own parameters (`RLLoopParams`: group size, sampling...) are not the loss's.
    """
    if x.advantages is None:
        raise ValueError("grpo needs per-sequence or per-token advantages")
    return losses.grpo_loss(
        x.logprobs,
        x.old_logprobs,
        x.advantages,
        x.mask,
        eps_low=eps_low,
        eps_high=eps_high,
        beta=beta,
        ref_token_logprobs=x.ref_logprobs,
    )


# ----- RL-based unlearning: the GRPO loop with an unlearning reward (stageflow.platform.engine.rl) ------
def register_rl_unlearning(name: str, doc: str, beta: float, **entry: Any) -> None:
    """An `unlearn` objective trained by the RL loop with the GRPO loss and its own rewards."""

    def loss(
        x: LossInputs, eps_low: float = 0.2, eps_high: float = 0.2, beta: float = beta
    ) -> torch.Tensor:
        return grpo(x, eps_low=eps_low, eps_high=eps_high, beta=beta)

    loss.__name__, loss.__doc__ = name, doc
    extra = entry.pop("params")
    OBJECTIVES.register(
        name, kinds=("unlearn",), extra_params=extra, rl_loop=True, nonnegative=CLIP_AND_KL, **entry
    )(loss)


register_rl_unlearning(
    "purge",
    """PURGE: the GRPO loss on the forget prompts with r = 1[no forget term in the completion].

    `forget_terms` null: the vocabulary is derived from the forget rows' answers.
    """,
    beta=0.04,
    params={"forget_terms": None},
    default_rewards=lambda p: [
        {"name": "no_forbidden_terms", "weight": 1.0, "params": {"terms": p["forget_terms"]}}
    ],
)
register_rl_unlearning(
    "rule",
    """RULE: the GRPO loss on forget prompts (r = 1[refusal]) and the stage's retain prompts
    (r = (1 - answer_weight) 1[not refusal] + answer_weight 1[correct]).""",
    beta=0.01,
    params={"answer_weight": 0.5},
    retain_prompts=True,
    default_rewards=lambda p: [
        {"name": "refusal_boundary", "weight": 1.0, "params": {"answer_weight": p["answer_weight"]}}
    ],
)
