"""Evaluation of one model on the study's evaluation sets, by the trial's own actors.

Log-likelihood metrics come from the trial's learner on the weights it holds: the same
tokenisation as training (answer then EOS) and the fused log-prob kernels, so no N x V logits.
Generation metrics come from completions sampled by the trial's rollout engines with those
weights, checked by the task's rule (exact match for a user's JSONL). The result is
{"metrics": {"<set>/<metric>": value}, "examples": {"<set>/truth_ratio": [per example]}}.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stageflow.actors.metrics import AnswerStats, ExampleStats, truth_ratios
from stageflow.platform.registry import METRICS, TASKS


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

    def needs(self, kind: str) -> bool:
        return any(METRICS[m].needs == kind for m in self.metrics)


def exact_match(row: dict, completion: str) -> bool:
    """The checker for user JSONL sets: the completion's first line equals the answer."""
    return completion.strip().split("\n")[0].strip() == row["answer"].strip()


def answer_items(row: dict) -> list[dict]:
    """The (prompt, answer) items of a row: its answer, paraphrases, then perturbed answers."""
    paraphrased = row.get("paraphrased_answers") or (
        [row["paraphrased_answer"]] if "paraphrased_answer" in row else []
    )
    answers = [row["answer"], *paraphrased, *row.get("perturbed_answers", [])]
    return [{"prompt": row["prompt"], "answer": a} for a in answers]


def example_stats(rows: list[dict], flat: list[AnswerStats]) -> list[ExampleStats]:
    """Regroup the flat per-item statistics of `answer_items` into one ExampleStats per row."""
    examples, at = [], 0
    for row in rows:
        n_para = len(answer_items(row)) - 1 - len(row.get("perturbed_answers", []))
        n = len(answer_items(row))
        answer, rest = flat[at], flat[at + 1 : at + n]
        examples.append(ExampleStats(answer, tuple(rest[:n_para]), tuple(rest[n_para:])))
        at += n
    return examples


def evaluate(
    jobs: list[EvalJob],
    answer_stats: Callable[[list[dict]], list[AnswerStats]],
    generate: Callable[..., dict[str, Any]],
) -> dict[str, dict]:
    """Score every job. `answer_stats(items)`: teacher-forced statistics (the learner);
    `generate(prompts, **sampling)`: sampled completions (the rollout engines)."""
    loglik = [job for job in jobs if job.needs("loglik")]
    items = [item for job in loglik for row in job.rows for item in answer_items(row)]
    flat = answer_stats(items) if items else []
    stats: dict[str, list[ExampleStats]] = {}
    for job in loglik:
        n = sum(len(answer_items(row)) for row in job.rows)
        stats[job.name], flat = example_stats(job.rows, flat[:n]), flat[n:]
    metrics: dict[str, float] = {}
    examples: dict[str, list[float]] = {}
    for job in jobs:
        correct = sampled_correctness(job, generate) if job.needs("generation") else None
        for name in job.metrics:
            entry = METRICS[name]
            value = entry.fn(stats[job.name] if entry.needs == "loglik" else correct)
            metrics[f"{job.name}/{name}"] = float(value)
        if job.name in stats and (ratios := truth_ratios(stats[job.name])):
            examples[f"{job.name}/truth_ratio"] = ratios
    return {"metrics": metrics, "examples": examples}


def sampled_correctness(job: EvalJob, generate: Callable[..., dict]) -> list[list[bool]]:
    """`job.samples` completions per prompt, each checked by the task's rule."""
    check = TASKS[job.task].check if job.task else exact_match
    out = generate(
        [row["prompt"] for row in job.rows],
        n=job.samples,
        temperature=job.temperature,
        max_tokens=job.max_new_tokens,
        seed=job.seed,
    )
    return [[check(row, text) for text in out["texts"][i]] for i, row in enumerate(job.rows)]
