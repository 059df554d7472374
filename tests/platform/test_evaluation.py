"""Evaluation's bookkeeping: a row's answer items and their statistics regrouped per row."""

from __future__ import annotations

import pytest

from stageflow.actors.metrics import AnswerStats
from stageflow.core.registry import load_plugins
from stageflow.platform.engine.evaluation import EvalJob, answer_items, evaluate, example_stats

load_plugins()


def stats(value: float, tokens: int = 2) -> AnswerStats:
    return AnswerStats(value, tokens, tokens, 0)


def test_rows_regroup_their_answers():
    rows = [
        {
            "prompt": "p1",
            "answer": "a",
            "paraphrased_answers": ["b", "c"],
            "perturbed_answers": ["d"],
        },
        {"prompt": "p2", "answer": "e", "paraphrased_answer": "f"},
        {"prompt": "p3", "answer": "g"},
    ]
    items = [item for row in rows for item in answer_items(row)]
    assert [i["answer"] for i in items] == list("abcdefg")
    flat = [stats(-float(i)) for i in range(len(items))]
    out = example_stats(rows, flat)
    assert [e.answer.logprob for e in out] == [0.0, -4.0, -6.0]
    assert [len(e.paraphrased) for e in out] == [2, 1, 0]
    assert [e.perturbed[0].logprob for e in out[:1]] == [-3.0]


def test_evaluate_scores_each_set_from_its_own_items():
    jobs = [
        EvalJob("one", [{"prompt": "p", "answer": "a"}], ["avg_loglik"]),
        EvalJob("two", [{"prompt": "q", "answer": "b"}] * 2, ["avg_loglik", "accuracy"]),
    ]
    seen: list[str] = []

    def answer_stats(items, standardized=False):
        seen.extend(i["answer"] for i in items)
        return [stats(-2.0 if i["answer"] == "a" else -4.0) for i in items]

    def generate(prompts, **sampling):
        assert sampling["n"] == 1 and sampling["max_tokens"] == 32
        return {"texts": [["b"], ["nope"]]}

    out = evaluate(jobs, answer_stats, generate)
    assert seen == ["a", "b"]  # one call for every log-likelihood set, each distinct item once
    assert out["metrics"] == pytest.approx(
        {"one/avg_loglik": -1.0, "two/avg_loglik": -2.0, "two/accuracy": 0.5}
    )


def test_only_the_answers_the_metrics_read_are_scored():
    row = {
        "prompt": "p",
        "answer": "a",
        "paraphrased_answers": ["b", "c"],
        "perturbed_answers": ["d", "e"],
    }
    seen: list[list[str]] = []

    def answer_stats(items, standardized=False):
        seen.append([i["answer"] for i in items])
        return [stats(-2.0) for _ in items]

    def scored(job: EvalJob) -> list[str]:
        seen.clear()
        out = evaluate([job], answer_stats, lambda prompts, **sampling: {})
        return seen[0] if seen else [], out

    assert scored(EvalJob("s", [row], ["avg_loglik"]))[0] == ["a"]
    assert scored(EvalJob("s", [row], ["paraphrase_loglik"]))[0] == ["a", "b", "c"]
    answers, out = scored(EvalJob("s", [row], ["truth_ratio", "avg_loglik"]))
    assert answers == list("abcde") and out["examples"]["s/truth_ratio"] == [1.0]
    # the set the analysis compares per example keeps its truth ratios whatever its metrics
    answers, out = scored(EvalJob("s", [row], ["avg_loglik"], truth_ratios=True))
    assert answers == list("abcde") and out["examples"]["s/truth_ratio"] == [1.0]
    assert scored(EvalJob("s", [row], ["avg_loglik"]))[1]["examples"] == {}


def test_refusal_rate_counts_refusing_completions():
    job = EvalJob(
        "math", [{"prompt": "p", "answer": "3"}] * 2, ["accuracy", "refusal_rate"], samples=2
    )

    def generate(prompts, **sampling):
        return {"texts": [["3", "Sorry, I cannot assist you with that."], ["I'm sorry, no.", "4"]]}

    out = evaluate([job], lambda items: [], generate)
    assert out["metrics"] == {"math/accuracy": 0.25, "math/refusal_rate": 0.5}


def test_probability_mass_and_its_steps():
    """log P of the answer, log-sum-exp over paraphrases and over alternatives, per row; the
    learner's probe lists become `mass/<kind>` per step and `mass_start/<kind>` on step 0."""
    import math

    from stageflow.actors.metrics import ExampleStats, probability_mass
    from stageflow.platform.engine.evaluation import mass_per_step, probe_items

    example = ExampleStats(stats(-1.0), (stats(-2.0), stats(-2.0)), (stats(-5.0),))
    mass = probability_mass([example, example])
    assert mass == pytest.approx(
        {"answer": -1.0, "paraphrases": -2.0 + math.log(2), "alternatives": -5.0}
    )
    rows = [
        {
            "prompt": "p",
            "answer": "a",
            "paraphrased_answers": ["b", "c"],
            "perturbed_answers": ["d"],
        }
    ]
    assert [i["answer"] for i in probe_items(rows)] == list("abcd")
    steps = [
        {"loss": 1.0, "probe_start": [-1.0, -2.0, -2.0, -5.0], "probe": [-3.0, -1.0, -1.0, -5.0]}
    ]
    mass_per_step(rows, steps)
    assert "probe" not in steps[0] and "probe_start" not in steps[0]
    assert steps[0]["mass_start/paraphrases"] == pytest.approx(-2.0 + math.log(2))
    assert steps[0]["mass/paraphrases"] == pytest.approx(-1.0 + math.log(2))
    assert steps[0]["mass/answer"] == -3.0 and steps[0]["mass/alternatives"] == -5.0
