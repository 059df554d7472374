"""Evaluation of one model on the study's evaluation sets, by the trial's own actors.

Log-likelihood metrics come from the trial's learner on the weights it holds: the same
tokenisation as training (answer then EOS) and the fused log-prob kernels, so no N x V logits.
Only the answers the set's metrics read are scored (a row's answer, its paraphrases, its
perturbed answers; all of them for the set whose per-example truth ratios the analysis
compares). Generation metrics come from completions sampled by the trial's rollout engines
with those weights, checked by the row's checker (`check_answer`: the data set's `check`, else
the task's rule, else exact match). The result is
{"metrics": {"<set>/<metric>": value}, "examples": {"<set>/truth_ratio": [per example]}}.

Membership attacks score each row against the set's holdout rows. Min-K%++ reads standardised
token log-probs from the same head pass (asked for only when a set needs them); GradNorm runs a
backward per row on the learner (`grad_norms`); a Reference attack compares each row's mean
log-prob with the reference model's, whose own evaluation holds those values
(`<set>/mean_logprob`, `<set>/holdout_mean_logprob` are kept in "examples" for that), so it is
computed where both evaluations are read (`reference_auc`), not here.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stageflow.actors.metrics import (
    AnswerStats,
    ExampleStats,
    Sampled,
    probability_mass,
    truth_ratios,
)
from stageflow.actors.rendering import row_prompt
from stageflow.core.membership import membership_auc
from stageflow.core.registry import METRICS
from stageflow.core.tasks import check_answer
from stageflow.core.tasks.refusal import is_refusal


@dataclass(frozen=True)
class EvalJob:
    """One evaluation set to score: its rows, registered metric names and sampling options."""

    name: str
    rows: list[dict]
    metrics: list[str]
    task: str | None = None
    samples: int = 1
    max_new_tokens: int = 32
    temperature: float = 1.0
    seed: int = 0
    truth_ratios: bool = False  # keep the per-example truth ratios (the analysis compares them)
    holdout: list[dict] = field(default_factory=list)  # rows never trained on (`mia_*` metrics)
    min_k: float = 0.2  # the fraction of lowest token log-probs Min-K% averages

    def needs(self, kind: str) -> bool:
        return any(METRICS[m].needs == kind for m in self.metrics)

    @property
    def membership(self) -> bool:
        """Whether a metric is a membership-inference attack (scored against `holdout`)."""
        return any(METRICS[m].membership for m in self.metrics)

    def asks(self, flag: str) -> bool:
        """Whether a metric of the set has `flag` set (`standardized`, `grad_norm`, `reference`)."""
        return any(getattr(METRICS[m], flag) for m in self.metrics)

    @property
    def answers(self) -> tuple[str, ...]:
        """The kinds of answers to score: the row's answer, and what the metrics read."""
        if self.truth_ratios:
            return ALL_ANSWERS
        read = {
            kind for m in self.metrics if METRICS[m].needs == "loglik" for kind in METRICS[m].reads
        }
        return tuple(k for k in ALL_ANSWERS if k == "answer" or k in read)


ALL_ANSWERS = ("answer", "paraphrased", "perturbed")


def row_answers(row: dict, kinds: tuple[str, ...] = ALL_ANSWERS) -> dict[str, list[str]]:
    """A row's answers of each kind: its answer, its paraphrases, its perturbed answers."""
    paraphrased = row.get("paraphrased_answers") or (
        [row["paraphrased_answer"]] if "paraphrased_answer" in row else []
    )
    answers = {
        "answer": [row["answer"]],
        "paraphrased": list(paraphrased),
        "perturbed": list(row.get("perturbed_answers", [])),
    }
    return {kind: answers[kind] if kind in kinds else [] for kind in ALL_ANSWERS}


def answer_items(row: dict, kinds: tuple[str, ...] = ALL_ANSWERS) -> list[dict]:
    """The (prompt, answer) items of a row: its answer, paraphrases, then perturbed answers
    (those of `kinds`)."""
    answers = [a for group in row_answers(row, kinds).values() for a in group]
    turns = {"messages": row["messages"]} if row.get("messages") else {}
    return [{"prompt": row["prompt"], **turns, "answer": a} for a in answers]


def example_stats(
    rows: list[dict], flat: list[AnswerStats], kinds: tuple[str, ...] = ALL_ANSWERS
) -> list[ExampleStats]:
    """Regroup the flat per-item statistics of `answer_items` into one ExampleStats per row."""
    examples, at = [], 0
    for row in rows:
        grouped = {}
        for kind, answers in row_answers(row, kinds).items():
            grouped[kind], at = tuple(flat[at : at + len(answers)]), at + len(answers)
        examples.append(
            ExampleStats(
                grouped["answer"][0], grouped["paraphrased"], grouped["perturbed"], row["answer"]
            )
        )
    return examples


def evaluate(
    jobs: list[EvalJob],
    answer_stats: Callable[[list[dict], bool], list[AnswerStats]],
    generate: Callable[..., dict[str, Any]],
    grad_norms: Callable[[list[dict]], list[float]] | None = None,
) -> dict[str, dict]:
    """Score every job. `answer_stats(items, standardized)`: teacher-forced statistics (the
    learner), one call for every distinct item of every set, with standardised token log-probs
    when a set's metric reads them; `generate(prompts, **sampling)`: sampled completions (the
    rollout engines); `grad_norms(items)`: per-row gradient norms (the learner), called for the
    rows of sets with `mia_gradnorm` only."""
    loglik = [job for job in jobs if job.needs("loglik") or job.truth_ratios]
    holdouts = [job for job in loglik if job.holdout and job.membership]
    per_job = [[i for row in job.rows for i in answer_items(row, job.answers)] for job in loglik]
    per_job += [
        [i for row in job.holdout for i in answer_items(row, ("answer",))] for job in holdouts
    ]
    standardized = any(job.asks("standardized") for job in loglik)
    scored = distinct_stats(
        [item for items in per_job for item in items],
        lambda items: answer_stats(items, standardized),
    )
    stats: dict[str, list[ExampleStats]] = {}
    held: dict[str, list[ExampleStats]] = {}
    for job, items in zip(loglik, per_job):
        stats[job.name] = example_stats(job.rows, scored(items), job.answers)
    for job, items in zip(holdouts, per_job[len(loglik) :]):
        held[job.name] = example_stats(job.holdout, scored(items), ("answer",))
    with_norms(loglik, stats, held, grad_norms)
    metrics: dict[str, float] = {}
    examples: dict[str, list[float]] = {}
    for job in jobs:
        sampled = sampled_checks(job, generate) if job.needs("generation") else None
        for name in job.metrics:
            entry = METRICS[name]
            if entry.reference:  # needs the reference's evaluation: `reference_auc`
                continue
            if entry.membership:
                members, holdout = stats[job.name], held.get(job.name, [])
                value = membership_auc(
                    [entry.fn(ex, job.min_k) for ex in members],
                    [entry.fn(ex, job.min_k) for ex in holdout],
                )
            else:
                value = entry.fn(stats[job.name] if entry.needs == "loglik" else sampled)
            metrics[f"{job.name}/{name}"] = float(value)
        if job.name in stats and (ratios := truth_ratios(stats[job.name])):
            examples[f"{job.name}/truth_ratio"] = ratios
        if job.asks("reference"):
            for key, rows in (("mean_logprob", stats), ("holdout_mean_logprob", held)):
                examples[f"{job.name}/{key}"] = [ex.answer.mean_logprob for ex in rows[job.name]]
    return {"metrics": metrics, "examples": examples}


def with_norms(
    jobs: list[EvalJob],
    stats: dict[str, list[ExampleStats]],
    held: dict[str, list[ExampleStats]],
    grad_norms: Callable[[list[dict]], list[float]] | None,
) -> None:
    """Fill in `grad_norm` of the rows and holdout rows of the sets with `mia_gradnorm`, each
    distinct answer's norm computed once."""
    asked = [job for job in jobs if job.asks("grad_norm")]
    if not asked:
        return
    if grad_norms is None:
        raise RuntimeError("a set asks for mia_gradnorm but no grad_norms was given")
    groups = [(stats, job.name, job.rows) for job in asked]
    groups += [(held, job.name, job.holdout) for job in asked if job.name in held]
    items = [[answer_items(row, ("answer",))[0] for row in rows] for _, _, rows in groups]
    norms = distinct_stats([i for some in items for i in some], grad_norms)
    for (where, name, _), some in zip(groups, items):
        where[name] = [
            dataclasses.replace(ex, grad_norm=norm) for ex, norm in zip(where[name], norms(some))
        ]


def distinct_stats(
    items: list[dict], answer_stats: Callable[[list[dict]], list]
) -> Callable[[list[dict]], list]:
    """Score each distinct item once (a row two sets share, a holdout row); returns the lookup
    from a list of items to their statistics."""
    first: dict[str, dict] = {}
    for item in items:
        first.setdefault(json.dumps(item, sort_keys=True), item)
    found = dict(zip(first, answer_stats(list(first.values())))) if first else {}
    return lambda some: [found[json.dumps(item, sort_keys=True)] for item in some]


def sampled_checks(job: EvalJob, generate: Callable[..., dict]) -> Sampled:
    """`job.samples` completions per prompt, each checked by the row's checker and for a
    refusal."""
    out = generate(
        [row_prompt(row) for row in job.rows],
        n=job.samples,
        temperature=job.temperature,
        max_tokens=job.max_new_tokens,
        seed=job.seed,
    )
    return Sampled(
        correct=[
            [check_answer(job.task, row, text) for text in out["texts"][i]]
            for i, row in enumerate(job.rows)
        ],
        refused=[[is_refusal(text) for text in texts] for texts in out["texts"]],
        texts=out["texts"],
        answers=[row["answer"] for row in job.rows],
    )


def probe_items(rows: list[dict]) -> list[dict]:
    """Every answer of every row (answer, paraphrases, perturbed), for the learner's probe."""
    return [item for row in rows for item in answer_items(row)]


def mass_per_step(rows: list[dict], steps: list[dict]) -> None:
    """Turn the learner's probe log-probs in `steps` (see `LearnerWorker.train_stage`) into the
    probability mass of `rows`' answers, paraphrases and alternatives, in place: `mass/<kind>`
    after each step, `mass_start/<kind>` (before the first) on step 0."""

    def mass(logprobs: list[float]) -> dict[str, float]:
        flat = [AnswerStats(lp, 0, 0, 0) for lp in logprobs]
        return probability_mass(example_stats(rows, flat))

    for step in steps:
        for key, prefix in (("probe_start", "mass_start"), ("probe", "mass")):
            if key in step:
                step.update({f"{prefix}/{k}": v for k, v in mass(step.pop(key)).items()})
