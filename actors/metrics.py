"""Evaluation metrics, registered by name (docs/formulas.md#evaluation-metrics, open-unlearning
conventions).

A metric reduces per-example statistics to one number. `needs="loglik"` metrics read
teacher-forced answer statistics (`AnswerStats`); `needs="generation"` metrics read sampled
completions, checked by the row's rule and for a refusal (`Sampled`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stageflow.core.registry import METRICS


@dataclass(frozen=True)
class AnswerStats:
    """Teacher-forced statistics of one answer given its prompt."""

    logprob: float  # sum of the answer tokens' log-probs
    tokens: int  # |y|
    argmax_hits: int  # answer tokens whose teacher-forced argmax equals the label
    extraction_k: int  # shortest prefix length after which argmax reproduces the rest

    @property
    def mean_logprob(self) -> float:
        return self.logprob / max(self.tokens, 1)


@dataclass(frozen=True)
class ExampleStats:
    """An eval row's answer, plus its paraphrased and perturbed answers when the row has them."""

    answer: AnswerStats
    paraphrased: tuple[AnswerStats, ...] = ()
    perturbed: tuple[AnswerStats, ...] = ()


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


@METRICS.register("probability", needs="loglik")
def probability(examples: list[ExampleStats]) -> float:
    """Mean over examples of exp(−NLL(y|x)/|y|)."""
    return _mean([math.exp(ex.answer.mean_logprob) for ex in examples])


@METRICS.register("truth_ratio", needs="loglik", reads=("paraphrased", "perturbed"))
def truth_ratio(examples: list[ExampleStats]) -> float:
    """Mean of min(TR, 1/TR) over examples with paraphrased and perturbed answers."""
    return _mean([min(tr, 1 / tr) for tr in truth_ratios(examples)])


@METRICS.register("exact_memorization", needs="loglik")
def exact_memorization(examples: list[ExampleStats]) -> float:
    """Mean fraction of answer tokens whose teacher-forced argmax equals the label."""
    return _mean([ex.answer.argmax_hits / max(ex.answer.tokens, 1) for ex in examples])


@METRICS.register("extraction_strength", needs="loglik")
def extraction_strength(examples: list[ExampleStats]) -> float:
    """Mean of 1 − k/|y|, k the shortest prefix after which argmax reproduces the rest."""
    return _mean([1 - ex.answer.extraction_k / max(ex.answer.tokens, 1) for ex in examples])


@dataclass(frozen=True)
class Sampled:
    """Sampled completions per question, checked: by the row's rule, and for a refusal."""

    correct: list[list[bool]]
    refused: list[list[bool]]


def _rate(flags: list[list[bool]]) -> float:
    return _mean([sum(samples) / len(samples) for samples in flags if samples])


@METRICS.register("accuracy", needs="generation")
def accuracy(sampled: Sampled) -> float:
    """Mean over questions of the fraction of sampled completions the task's rule accepts."""
    return _rate(sampled.correct)


@METRICS.register("refusal_rate", needs="generation")
def refusal_rate(sampled: Sampled) -> float:
    """Mean over questions of the fraction of sampled completions that refuse (over-refusal,
    on prompts that should be answered)."""
    return _rate(sampled.refused)


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
