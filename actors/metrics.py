"""Evaluation metrics, registered by name (docs/formulas.md#evaluation-metrics, open-unlearning
conventions).

A metric reduces per-example statistics to one number. `needs="loglik"` metrics read
teacher-forced answer statistics (`AnswerStats`); `needs="generation"` metrics read sampled
completions, checked by the row's rule and for a refusal (`Sampled`). Membership-inference
attacks (`mia_*`) score each example; the evaluation reports the ROC AUC of the set's scores
against its holdout set's (`membership_auc`, core/membership.py).
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass, field

from stageflow.core.membership import reference_score
from stageflow.core.registry import METRICS
from stageflow.core.tasks.math import FINAL_ANSWER


@dataclass(frozen=True)
class AnswerStats:
    """Teacher-forced statistics of one answer given its prompt."""

    logprob: float  # sum of the answer tokens' log-probs
    tokens: int  # |y|
    argmax_hits: int  # answer tokens whose teacher-forced argmax equals the label
    extraction_k: int  # shortest prefix length after which argmax reproduces the rest
    token_logprobs: tuple[float, ...] = ()  # each answer token's log-prob (EOS included)
    token_zscores: tuple[float, ...] = ()  # each token's (log p - mu) / sigma (Min-K%++)

    @property
    def mean_logprob(self) -> float:
        return self.logprob / max(self.tokens, 1)


@dataclass(frozen=True)
class ExampleStats:
    """An eval row's answer, plus its paraphrased and perturbed answers when the row has them."""

    answer: AnswerStats
    paraphrased: tuple[AnswerStats, ...] = ()
    perturbed: tuple[AnswerStats, ...] = ()
    text: str = ""  # the answer's text
    grad_norm: float = float("nan")  # ||grad of the answer's mean NLL|| (mia_gradnorm only)
    reference: float = float("nan")  # the answer's mean log-prob under the reference model


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def truth_ratios(examples: list[ExampleStats]) -> list[float]:
    """Per example TR = P_perturbed / P_paraphrased, each P = exp(mean length-normalised log-prob)."""
    ratios = []
    for ex in examples:
        if ex.perturbed and ex.paraphrased:
            p_perturbed = math.exp(_mean([s.mean_logprob for s in ex.perturbed]))
            p_paraphrased = math.exp(_mean([s.mean_logprob for s in ex.paraphrased]))
            ratios.append(p_perturbed / p_paraphrased)
    return ratios


@METRICS.register("avg_loglik", needs="loglik")
def avg_loglik(examples: list[ExampleStats]) -> float:
    """Mean over examples of the answer's length-normalised log-likelihood log π(y|x)/|y|."""
    return _mean([ex.answer.mean_logprob for ex in examples])


@METRICS.register("paraphrase_loglik", needs="loglik", reads=("answer", "paraphrased"))
def paraphrase_loglik(examples: list[ExampleStats]) -> float:
    """Mean length-normalised log-likelihood of the answer and each of its paraphrases
    (for `refusal`: the refusal and its 20 paraphrases; its drop is the forget score)."""
    return _mean([s.mean_logprob for ex in examples for s in (ex.answer, *ex.paraphrased)])


@METRICS.register("probability", needs="loglik", unit=True)
def probability(examples: list[ExampleStats]) -> float:
    """Mean over examples of exp(−NLL(y|x)/|y|)."""
    return _mean([math.exp(ex.answer.mean_logprob) for ex in examples])


@METRICS.register("truth_ratio", needs="loglik", reads=("paraphrased", "perturbed"), unit=True)
def truth_ratio(examples: list[ExampleStats]) -> float:
    """Mean of min(TR, 1/TR) over examples with paraphrased and perturbed answers (forget
    sets: 1 where the model no longer tells the true answer from the false ones)."""
    return _mean([min(tr, 1 / tr) for tr in truth_ratios(examples)])


@METRICS.register(
    "truth_ratio_true_better", needs="loglik", reads=("paraphrased", "perturbed"), unit=True
)
def truth_ratio_true_better(examples: list[ExampleStats]) -> float:
    """Mean of max(0, 1 - TR) (retain sets: 1 where the true answer is far likelier)."""
    return _mean([max(0.0, 1 - tr) for tr in truth_ratios(examples)])


@METRICS.register(
    "truth_ratio_false_better", needs="loglik", reads=("paraphrased", "perturbed"), unit=True
)
def truth_ratio_false_better(examples: list[ExampleStats]) -> float:
    """Mean of max(0, 1 - 1/TR) (1 where the false answers are far likelier)."""
    return _mean([max(0.0, 1 - 1 / tr) for tr in truth_ratios(examples)])


@METRICS.register("probability_w_options", needs="loglik", reads=("perturbed",), unit=True)
def probability_w_options(examples: list[ExampleStats]) -> float:
    """Mean of P(answer) / (P(answer) + sum of P(perturbed)), each P = exp(mean log-prob),
    over examples with perturbed answers."""
    values = []
    for ex in examples:
        if ex.perturbed:
            p = math.exp(ex.answer.mean_logprob)
            values.append(p / (p + sum(math.exp(s.mean_logprob) for s in ex.perturbed)))
    return _mean(values)


@METRICS.register("exact_memorization", needs="loglik", unit=True)
def exact_memorization(examples: list[ExampleStats]) -> float:
    """Mean fraction of answer tokens whose teacher-forced argmax equals the label."""
    return _mean([ex.answer.argmax_hits / max(ex.answer.tokens, 1) for ex in examples])


@METRICS.register("extraction_strength", needs="loglik", unit=True)
def extraction_strength(examples: list[ExampleStats]) -> float:
    """Mean of 1 − k/|y|, k the shortest prefix after which argmax reproduces the rest."""
    return _mean([1 - ex.answer.extraction_k / max(ex.answer.tokens, 1) for ex in examples])


# ----- membership inference: a score per example, higher for rows more likely trained on ------
@METRICS.register("mia_loss", needs="loglik", membership=True, unit=True)
def mia_loss(example: ExampleStats, k: float) -> float:
    """LOSS attack: the answer's mean log-prob (minus its mean NLL)."""
    return example.answer.mean_logprob


@METRICS.register("mia_zlib", needs="loglik", membership=True, unit=True)
def mia_zlib(example: ExampleStats, k: float) -> float:
    """ZLib attack: minus the answer's mean NLL over its zlib-compressed length in bytes."""
    return example.answer.mean_logprob / len(zlib.compress(example.text.encode()))


@METRICS.register("mia_min_k", needs="loglik", membership=True, unit=True)
def mia_min_k(example: ExampleStats, k: float) -> float:
    """Min-K% attack: the mean of the lowest fraction `k` of the answer's token log-probs
    (at least one token)."""
    lowest = sorted(example.answer.token_logprobs)
    return _mean(lowest[: max(1, math.floor(k * len(lowest)))])


@METRICS.register("mia_min_k_pp", needs="loglik", membership=True, unit=True, standardized=True)
def mia_min_k_pp(example: ExampleStats, k: float) -> float:
    """Min-K%++ attack: the mean of the lowest fraction `k` of the answer's standardised token
    log-probs (log p(y_t) - mu_t) / sigma_t, mu_t and sigma_t the mean and standard deviation of
    log p over the vocabulary under p at that position."""
    lowest = sorted(example.answer.token_zscores)
    return _mean(lowest[: max(1, math.floor(k * len(lowest)))])


@METRICS.register("mia_gradnorm", needs="loglik", membership=True, unit=True, grad_norm=True)
def mia_gradnorm(example: ExampleStats, k: float) -> float:
    """Gradient-norm attack: minus the L2 norm of the gradient of the answer's mean NLL with
    respect to the model's weights (rows trained on sit where the loss is flat)."""
    return -example.grad_norm


@METRICS.register("mia_reference", needs="loglik", membership=True, unit=True, reference=True)
def mia_reference(example: ExampleStats, k: float) -> float:
    """Reference attack: the answer's mean log-prob minus its mean log-prob under a reference
    model (the base, or the oracle: the evaluation set's `reference`)."""
    return reference_score(example.answer.mean_logprob, example.reference)


@dataclass(frozen=True)
class Sampled:
    """Sampled completions per question, checked: by the row's rule, and for a refusal; with
    their texts and the rows' answers (for ROUGE)."""

    correct: list[list[bool]]
    refused: list[list[bool]]
    texts: list[list[str]] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)


def _rate(flags: list[list[bool]]) -> float:
    return _mean([sum(samples) / len(samples) for samples in flags if samples])


@METRICS.register("accuracy", needs="generation", unit=True)
def accuracy(sampled: Sampled) -> float:
    """Mean over questions of the fraction of sampled completions the task's rule accepts."""
    return _rate(sampled.correct)


@METRICS.register("completion_rate", needs="generation", unit=True)
def completion_rate(sampled: Sampled) -> float:
    """Mean over questions of the fraction of sampled completions that state a well-formed
    final answer ("The answer is N.", right or wrong): G-RA's completion rate, the share of
    attempts the policy finishes rather than spends on shaping terms."""
    return _rate(
        [[re.search(FINAL_ANSWER, t) is not None for t in texts] for texts in sampled.texts]
    )


@METRICS.register("refusal_rate", needs="generation", unit=True)
def refusal_rate(sampled: Sampled) -> float:
    """Mean over questions of the fraction of sampled completions that refuse (over-refusal,
    on prompts that should be answered)."""
    return _rate(sampled.refused)


def rouge_words(text: str) -> list[str]:
    """ROUGE's tokens: lower-cased runs of letters and digits."""
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge_l_recall(completion: str, reference: str) -> float:
    """ROUGE-L recall: the longest common subsequence of the words over the reference's words."""
    ours, ref = rouge_words(completion), rouge_words(reference)
    if not ref:
        return 0.0
    previous = [0] * (len(ours) + 1)
    for word in ref:
        current = [0]
        for j, other in enumerate(ours):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1] / len(ref)


@METRICS.register("rouge_l", needs="generation", unit=True)
def rouge_l(sampled: Sampled) -> float:
    """Mean over questions of the mean ROUGE-L recall of the completions against the answer
    (greedy generations, as TOFU reports it, with `temperature: 0`)."""
    return _mean(
        [
            _mean([rouge_l_recall(text, answer) for text in texts])
            for texts, answer in zip(sampled.texts, sampled.answers)
            if texts
        ]
    )


def harmonic_mean(values: list[float]) -> float:
    """n / sum(1/v) of values in [0, 1]; 0 when one of them is 0 (model utility)."""
    if not values:
        return float("nan")
    return 0.0 if min(values) <= 0 else len(values) / sum(1 / v for v in values)


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def probability_mass(examples: list[ExampleStats]) -> dict[str, float]:
    """Where a forget set's probability mass sits (nats, mean over prompts): log π(y|x) of the
    original answer (`answer`), log Σ_j π(y'_j|x) over its paraphrases (`paraphrases`) and over
    its alternative, perturbed answers (`alternatives`). Tracked per unlearning step."""
    return {
        "answer": _mean([ex.answer.logprob for ex in examples]),
        "paraphrases": _mean(
            [_logsumexp([s.logprob for s in ex.paraphrased]) for ex in examples if ex.paraphrased]
        ),
        "alternatives": _mean(
            [_logsumexp([s.logprob for s in ex.perturbed]) for ex in examples if ex.perturbed]
        ),
    }
