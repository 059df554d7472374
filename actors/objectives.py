"""Training objectives, registered by name in `OBJECTIVES` (what a stage's `objective:` names).

Each objective is one function of `LossInputs` (per-token log-probs [B, T] of the stage's batch
under pi_theta, its answer mask, and when needed pi_ref's log-probs, a retain batch's
log-probs, and what the objective declares beyond them: a full-vocabulary statistic, chosen
answers, a layer's states, state across steps) and its hyper-parameters, returning a scalar
loss. The formulas live in `stageflow.kernels.losses`; the notation is docs/formulas.md's (log pi(y|x) summed over answer
tokens, |y| the answer length). Each entry is a `registry.Objective`: the stage kinds that
accept it, its hyper-parameters with defaults, whether it needs pi_ref or a retain set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stageflow.core.alternatives import GENERATED, IDK
from stageflow.core.lazy import lazy_module
from stageflow.core.registry import OBJECTIVES, LayerStates, VocabStat

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
    vocab_stat: torch.Tensor | None = None  # the objective's `VocabStat` per token
    vocab_stat_mask: torch.Tensor | None = None  # the tokens `vocab_stat` covers
    # preference objectives: the chosen answers of the same prompts, row for row
    chosen_logprobs: torch.Tensor | None = None
    chosen_mask: torch.Tensor | None = None
    chosen_ref_logprobs: torch.Tensor | None = None
    # representation objectives (`LayerStates`): a decoder layer's output [B, T, H] at the
    # target positions, pi_ref's on the retain rows, and the stage's fixed random unit vector [H]
    states: torch.Tensor | None = None
    retain_states: torch.Tensor | None = None
    ref_retain_states: torch.Tensor | None = None
    direction: torch.Tensor | None = None
    # stateful objectives: a dict kept across the stage's steps, and the mean of a value over
    # the learner's ranks (every rank computes the loss, so each keeps the same state)
    state: dict[str, float] | None = None
    mean_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None


def mean_vocab_stat(x: LossInputs, power: int = 1) -> torch.Tensor:
    """Token mean of the objective's full-vocabulary statistic (to the `power`)."""
    if x.vocab_stat is None or x.vocab_stat_mask is None:
        raise ValueError("this objective needs its full-vocabulary statistic (vocab_stat)")
    return losses.nll_loss(-(x.vocab_stat**power), x.vocab_stat_mask)


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


@OBJECTIVES.register("abl", kinds=("unlearn",), extra_params={"isolate": 0.1}, isolate="isolate")
def abl(x: LossInputs) -> torch.Tensor:
    """Isolate then ascend (Anti-Backdoor Learning): gradient ascent on the `isolate` fraction of
    the stage's rows with the lowest loss under the model at the stage's start (the suspected
    poisoned rows, learnt fastest), selected by the learner before the first step."""
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


@OBJECTIVES.register(
    "ceu",
    kinds=("unlearn",),
    retain_weight="alpha",
    nonnegative=("skip_first",),
    vocab_stat=lambda p: VocabStat("cross_entropy", "self", math.inf, p.skip_first),
)
def ceu(x: LossInputs, skip_first: int = 1, gamma: float = 1.0, alpha: float = 0.0) -> torch.Tensor:
    """CE-U: gamma * token mean of CE(p_theta, q), q = softmax(z_theta detached, true token
    removed), over answer tokens after the first `skip_first` of each answer, + alpha * NLL_r."""
    return with_retain(gamma * mean_vocab_stat(x), x, alpha)


@OBJECTIVES.register(
    "undial",
    kinds=("unlearn",),
    retain_weight="alpha",
    positive=("beta",),
    vocab_stat=lambda p: VocabStat("cross_entropy", "reference", p.beta),
)
def undial(
    x: LossInputs, beta: float = 10.0, gamma: float = 1.0, alpha: float = 0.0
) -> torch.Tensor:
    """UNDIAL: gamma * token mean of CE(p_theta, q), q = softmax(z_ref - beta * onehot(y)) from
    the frozen pi_ref (the stage's start), over answer tokens, + alpha * NLL_r."""
    return with_retain(gamma * mean_vocab_stat(x), x, alpha)


def preference(x: LossInputs, beta: float) -> torch.Tensor:
    """DPO's loss with the stage's answers rejected and the chosen answers preferred."""
    if x.chosen_logprobs is None or x.ref_logprobs is None or x.chosen_ref_logprobs is None:
        raise ValueError("a preference objective needs chosen answers and pi_ref's log-probs")
    return losses.dpo_loss(
        x.chosen_logprobs, x.chosen_ref_logprobs, x.chosen_mask,
        x.logprobs, x.ref_logprobs, x.mask, beta=beta,
    )  # fmt: skip


@OBJECTIVES.register(
    "dpo",
    kinds=("unlearn",),
    needs_ref=True,
    retain_weight="alpha",
    positive=("beta",),
    alternative=lambda p: p.alternative,
)
def dpo(
    x: LossInputs,
    alternative: str | None = None,
    beta: float = 0.1,
    gamma: float = 1.0,
    alpha: float = 1.0,
) -> torch.Tensor:
    """DPO for unlearning: gamma * mean_b -(2/beta) log sigmoid(beta * (log pi_theta/pi_ref of
    the chosen answer - of the forget answer)) + alpha * NLL_r; the chosen answers from
    `alternative` (`idk`, or a column of the stage's data); pi_ref the stage's start."""
    return with_retain(gamma * preference(x, beta), x, alpha)


@OBJECTIVES.register(
    "idkdpo",
    kinds=("unlearn",),
    needs_ref=True,
    retain_weight="alpha",
    positive=("beta",),
    alternative=lambda p: IDK,
)
def idkdpo(
    x: LossInputs, beta: float = 0.1, gamma: float = 1.0, alpha: float = 1.0
) -> torch.Tensor:
    """IdkDPO: DPO with an "I don't know" answer chosen for every forget prompt."""
    return with_retain(gamma * preference(x, beta), x, alpha)


@OBJECTIVES.register(
    "altpo",
    kinds=("unlearn",),
    extra_params={"samples": 4, "max_new_tokens": 32},
    needs_ref=True,
    retain_weight="alpha",
    positive=("beta",),
    alternative=lambda p: GENERATED,
)
def altpo(x: LossInputs, beta: float = 0.1, gamma: float = 1.0, alpha: float = 1.0) -> torch.Tensor:
    """AltPO: DPO with the chosen answer of each forget prompt sampled from the model itself at
    the stage's start (the rollout engines, on the stage's starting weights), the forget answer
    rejected."""
    return with_retain(gamma * preference(x, beta), x, alpha)


def rmu_layers(p: Any) -> LayerStates:
    """RMU's layer, and the layers that train: `trainable_layers`, or the layer and the two
    before it (the WMDP code's 5, 6, 7 for layer 7)."""
    trainable = p.trainable_layers
    if trainable is None:
        trainable = range(max(0, p.layer - 2), p.layer + 1)
    elif isinstance(trainable, str) or not isinstance(trainable, Sequence):
        trainable = [trainable]  # validate names it: expected a list of layer indexes
    return LayerStates(p.layer, tuple(trainable))


@OBJECTIVES.register(
    "rmu",
    kinds=("unlearn",),
    retain_weight="alpha",
    nonnegative=("layer", "gamma"),
    positive=("steering",),
    layer_states=rmu_layers,
)
def rmu(
    x: LossInputs,
    layer: int = 1,
    trainable_layers: list[int] | None = None,
    steering: float = 20.0,
    gamma: float = 1.0,
    alpha: float = 100.0,
) -> torch.Tensor:
    """RMU: gamma * d(h_l(forget), c u) + alpha * d(h_l(retain), h_l^ref(retain)), d the mean
    over rows of sum_t m_t mean_h (a - b)^2 / |y|, h_l decoder layer `layer`'s output, u the
    stage's fixed random unit vector, c = `steering`; only `trainable_layers` train."""
    if x.states is None or x.direction is None:
        raise ValueError("rmu needs the layer's states and the stage's direction")
    loss = gamma * losses.activation_loss(x.states, steering * x.direction, x.mask)
    if alpha:
        if x.retain_states is None or x.ref_retain_states is None:
            raise ValueError("rmu's retain weight is > 0 but the stage has no retain states")
        retain = losses.activation_loss(x.retain_states, x.ref_retain_states, x.retain_mask)
        loss = loss + alpha * retain
    return loss


@OBJECTIVES.register(
    "pdu",
    kinds=("unlearn",),
    needs_retain=True,
    stateful=True,
    nonnegative=("eps", "dual_step", "alpha", "gamma"),
    vocab_stat=lambda p: VocabStat("margin"),
)
def pdu(
    x: LossInputs,
    eps: float | None = None,
    dual_step: float = 1.0,
    alpha: float = 1.0,
    gamma: float = 1.0,
) -> torch.Tensor:
    """PDU: gamma * token mean of (max_v z - mean_v z)^2 over the forget answers + lambda *
    (NLL_r - eps), the retain loss a constraint NLL_r <= eps with dual variable lambda (from
    `alpha`; after each step lambda <- max(0, lambda + dual_step (NLL_r - eps)), NLL_r the
    ranks' mean); eps null: NLL_r at the stage's first step (no worse than at the start)."""
    if x.state is None or x.mean_over_ranks is None:
        raise ValueError("pdu keeps its dual variable in the stage's state")
    retain = retain_nll(x)
    observed = float(x.mean_over_ranks(retain.detach()))
    if "dual" not in x.state:
        x.state.update(dual=alpha, eps=observed if eps is None else eps)
    dual, bound = x.state["dual"], x.state["eps"]
    x.state["dual"] = max(0.0, dual + dual_step * (observed - bound))
    return gamma * mean_vocab_stat(x, power=2) + dual * (retain - bound)


@OBJECTIVES.register(
    "uld",
    kinds=("unlearn",),
    retain_weight="retain_weight",
    nonnegative=("retain_weight",),
    vocab_stat=lambda p: VocabStat("uniform_kl", rows="retain") if p.retain_weight else None,
    extra_params={
        "layers": 0,
        "weight": 1.0,
        "relative_top": 0.1,
        "rank": 16,
        "alpha": 32.0,
        "generation": "",
    },
    assistant="layers",
)
def uld(x: LossInputs, retain_weight: float = 5.0) -> torch.Tensor:
    """ULD's assistant (actors/uld.py), trained with the objectives reversed: NLL_f (it learns
    the forget answers) + retain_weight * token mean of KL(uniform || p) over the retain
    answers (it learns to know nothing else). The unlearned model, base - weight * assistant,
    is what the stage leaves; `layers` (0: a quarter of the model's, at least one), `rank` and
    `alpha` size the assistant, `relative_top` filters the tokens the subtraction touches;
    `generation: hf` states that its completions are sampled by transformers on the learner."""
    loss = losses.nll_loss(x.logprobs, x.mask)
    return loss + retain_weight * mean_vocab_stat(x) if retain_weight else loss


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
        {"name": "no_forbidden_terms", "weight": 1.0, "params": {"terms": p.extra.forget_terms}}
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
        {
            "name": "refusal_boundary",
            "weight": 1.0,
            "params": {"answer_weight": p.extra.answer_weight},
        }
    ],
)
