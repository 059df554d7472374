"""The unlearning evaluation's metrics against direct numpy / float64 implementations of their
published formulas, on constructed per-example statistics; and evaluate() scoring a set's
membership against its holdout set, each distinct item once."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from stageflow.actors.metrics import (
    AnswerStats,
    ExampleStats,
    Sampled,
    harmonic_mean,
    rouge_l_recall,
)
from stageflow.core.membership import membership_auc, reference_auc
from stageflow.core.registry import METRICS, load_plugins
from stageflow.platform.engine.evaluation import EvalJob, evaluate

load_plugins()
RNG = np.random.default_rng(0)


def answer(token_logprobs) -> AnswerStats:
    lps = tuple(float(v) for v in token_logprobs)
    return AnswerStats(sum(lps), len(lps), 0, 0, lps)


def example(n_tokens: int, shift: float = 0.0, perturbed: int = 3) -> ExampleStats:
    """An example with random token log-probs (the answer's shifted by `shift`)."""

    def stats(n):
        return answer(-RNG.exponential(1.0, n) + shift)

    return ExampleStats(
        stats(n_tokens),
        (stats(n_tokens),),
        tuple(stats(n_tokens + 1) for _ in range(perturbed)),
        text=" ".join(["word"] * n_tokens) + f" {n_tokens}",
    )


def pairwise_auc(members, holdout) -> float:
    """P(member > holdout) + 0.5 P(tie), over every pair (the definition, not the rank formula)."""
    m, h = np.asarray(members, np.float64)[:, None], np.asarray(holdout, np.float64)[None, :]
    return float(((m > h) + 0.5 * (m == h)).mean())


def test_membership_auc_is_the_pairwise_probability():
    members, holdout = RNG.normal(0.5, 1, 40).tolist(), RNG.normal(0, 1, 30).tolist()
    assert membership_auc(members, holdout) == pytest.approx(pairwise_auc(members, holdout))
    tied = [1.0, 1.0, 2.0, 3.0]
    assert membership_auc(tied, [1.0, 2.0, 0.0]) == pytest.approx(pairwise_auc(tied, [1, 2, 0]))
    assert membership_auc([2.0, 3.0], [0.0, 1.0]) == 1.0 and membership_auc([0.0], [1.0]) == 0.0
    assert math.isnan(membership_auc([1.0], []))


def test_attack_scores_follow_their_formulas():
    examples = [example(int(n)) for n in RNG.integers(3, 12, 20)]
    for ex in examples:
        lps = np.asarray(ex.answer.token_logprobs, np.float64)
        nll = -lps.mean()
        assert METRICS["mia_loss"].fn(ex, 0.2) == pytest.approx(-nll)
        zlib_bytes = len(zlib.compress(ex.text.encode("utf-8")))
        assert METRICS["mia_zlib"].fn(ex, 0.2) == pytest.approx(-nll / zlib_bytes)
        for k in (0.1, 0.2, 0.5, 1.0):
            lowest = np.sort(lps)[: max(1, int(np.floor(k * len(lps))))]
            assert METRICS["mia_min_k"].fn(ex, k) == pytest.approx(lowest.mean())


def test_min_k_pp_gradnorm_and_reference_scores():
    """Min-K%++ averages the lowest standardised token log-probs (log p - mu) / sigma, mu and
    sigma over the vocabulary under p, computed here from full random logits in float64."""
    for n in RNG.integers(3, 12, 10):
        logits = RNG.normal(0, 3, (int(n), 50))
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        target = RNG.integers(0, 50, int(n))
        p = np.exp(logp)
        mu = (p * logp).sum(1)
        sigma = np.sqrt((p * (logp - mu[:, None]) ** 2).sum(1))
        z = (logp[np.arange(int(n)), target] - mu) / sigma
        lps = tuple(logp[np.arange(int(n)), target].tolist())
        ex = ExampleStats(AnswerStats(sum(lps), len(lps), 0, 0, lps, tuple(z.tolist())))
        for k in (0.2, 0.5, 1.0):
            lowest = np.sort(z)[: max(1, int(np.floor(k * len(z))))]
            assert METRICS["mia_min_k_pp"].fn(ex, k) == pytest.approx(lowest.mean())
    ex = ExampleStats(answer([-1.0, -2.0]), grad_norm=3.5, reference=-2.5)
    assert METRICS["mia_gradnorm"].fn(ex, 0.2) == -3.5
    assert METRICS["mia_reference"].fn(ex, 0.2) == pytest.approx(-1.5 - (-2.5))


def test_reference_auc_compares_two_evaluations_row_by_row():
    ours = {"f/mean_logprob": RNG.normal(-1, 1, 20).tolist()}
    ours["f/holdout_mean_logprob"] = RNG.normal(-2, 1, 15).tolist()
    theirs = {k: RNG.normal(-2, 1, len(v)).tolist() for k, v in ours.items()}
    diff = {k: np.subtract(ours[k], theirs[k]) for k in ours}
    expected = pairwise_auc(diff["f/mean_logprob"], diff["f/holdout_mean_logprob"])
    assert reference_auc(ours, theirs, "f") == pytest.approx(expected)
    assert reference_auc(ours, ours, "f") == 0.5  # a model against itself: every score ties


def test_probability_with_options_and_truth_ratio_aggregations():
    examples = [example(int(n)) for n in RNG.integers(2, 9, 15)]

    def p(stats: AnswerStats) -> float:  # exp(mean log-prob), float64
        return float(np.exp(np.mean(np.asarray(stats.token_logprobs, np.float64))))

    options = [p(e.answer) / (p(e.answer) + sum(p(s) for s in e.perturbed)) for e in examples]
    # the truth ratio's P of a kind is exp of the mean over its answers of their mean log-prob
    ratios = np.array(
        [
            np.exp(np.mean([np.log(p(s)) for s in e.perturbed])) / p(e.paraphrased[0])
            for e in examples
        ]
    )
    fn = {name: METRICS[name].fn for name in METRICS.names()}
    assert fn["probability_w_options"](examples) == pytest.approx(np.mean(options))
    assert fn["truth_ratio"](examples) == pytest.approx(np.mean(np.minimum(ratios, 1 / ratios)))
    assert fn["truth_ratio_true_better"](examples) == pytest.approx(
        np.mean(np.maximum(0, 1 - ratios))
    )
    assert fn["truth_ratio_false_better"](examples) == pytest.approx(
        np.mean(np.maximum(0, 1 - 1 / ratios))
    )


def lcs(a: list[str], b: list[str]) -> int:
    """The longest common subsequence by the textbook table, in numpy."""
    table = np.zeros((len(a) + 1, len(b) + 1), dtype=np.int64)
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            if a[i - 1] == b[j - 1]:
                table[i, j] = table[i - 1, j - 1] + 1
            else:
                table[i, j] = max(table[i - 1, j], table[i, j - 1])
    return int(table[-1, -1])


def test_rouge_l_is_lcs_recall_over_the_answer_words():
    words = ["ann", "was", "born", "in", "bellin", "1962", "the", "city"]
    for _ in range(30):
        ref = list(RNG.choice(words, RNG.integers(1, 8)))
        out = list(RNG.choice(words, RNG.integers(0, 9)))
        expected = lcs(out, ref) / len(ref)
        # case and punctuation are not words
        got = rouge_l_recall(" ".join(w.upper() for w in out) + ".", ", ".join(ref) + "!")
        assert got == pytest.approx(expected)
    sampled = Sampled(
        correct=[[True], [False, False]],
        refused=[[False], [False, False]],
        texts=[["Ann was born in Bellin."], ["born in", "Bellin"]],
        answers=["Ann was born in Bellin.", "She was born in Bellin."],
    )
    assert METRICS["rouge_l"].fn(sampled) == pytest.approx(np.mean([1.0, np.mean([2 / 5, 1 / 5])]))


def test_completion_rate_counts_well_formed_final_answers_right_or_wrong():
    sampled = Sampled(
        correct=[[True, False], [False]],
        refused=[[False, False], [False]],
        texts=[[" 2+2=4. The answer is 4.", " 2+2=5. The answer is 5."], [" 2+2=4. 4+4=8. 8+"]],
    )
    assert METRICS["completion_rate"].fn(sampled) == pytest.approx(np.mean([1.0, 0.0]))


def test_membership_is_scored_against_the_holdout_and_each_item_once():
    members = [{"prompt": f"q{i}", "answer": f" a{i}"} for i in range(4)]
    holdout = [{"prompt": f"h{i}", "answer": f" b{i}"} for i in range(3)]
    # a member's tokens are likelier (memorised) than a holdout row's, except member 3
    logprob = {
        **{f" a{i}": -0.5 for i in range(3)},
        " a3": -3.0,
        **{f" b{i}": -2.0 for i in range(3)},
    }
    seen: list[str] = []

    def answer_stats(items, standardized):
        assert not standardized  # no Min-K%++ asked for
        seen.extend(i["answer"] for i in items)
        return [answer([logprob[i["answer"]]] * 2) for i in items]

    jobs = [
        EvalJob("forget", members, ["mia_loss", "mia_min_k", "avg_loglik"], holdout=holdout),
        EvalJob("holdout", holdout, ["avg_loglik"]),
    ]
    out = evaluate(jobs, answer_stats, lambda prompts, **sampling: {})
    assert sorted(seen) == sorted(r["answer"] for r in members + holdout)  # each once
    assert out["metrics"]["forget/mia_loss"] == pytest.approx(9 / 12)
    assert out["metrics"]["forget/mia_min_k"] == pytest.approx(9 / 12)
    assert out["metrics"]["holdout/avg_loglik"] == pytest.approx(-2.0)


def test_model_utility_is_the_harmonic_mean():
    values = RNG.uniform(0.05, 1, 9)
    assert harmonic_mean(values.tolist()) == pytest.approx(len(values) / np.sum(1 / values))
    assert harmonic_mean([0.5, 0.0, 1.0]) == 0.0 and math.isnan(harmonic_mean([]))


def test_privleak_is_the_relative_auc_gap_to_the_oracle():
    from stageflow.platform.results.analysis import privleak

    assert privleak(0.5, 0.5) == 0.0 and privleak(1.0, 0.5) == pytest.approx(-100.0)
    assert privleak(0.3, 0.5) == pytest.approx(40.0)  # unlearned past the oracle
    assert privleak(0.8, 0.6) == pytest.approx(((1 - 0.8) - (1 - 0.6)) / (1 - 0.6) * 100)
    assert math.isnan(privleak(0.7, 1.0))


def test_gradnorm_zscores_and_reference_values_are_asked_for_only_where_needed():
    members = [{"prompt": f"q{i}", "answer": f" a{i}"} for i in range(3)]
    holdout = [{"prompt": f"h{i}", "answer": f" b{i}"} for i in range(2)]
    other = [{"prompt": "x", "answer": " y"}]
    norms: list[str] = []
    flags: list[bool] = []

    def answer_stats(items, standardized):
        flags.append(standardized)
        return [AnswerStats(-1.0, 1, 0, 0, (-1.0,), (0.5,) if standardized else ()) for _ in items]

    def grad_norms(items):
        norms.extend(i["answer"] for i in items)
        return [0.1 if i["answer"].startswith(" a") else 2.0 for i in items]

    jobs = [
        EvalJob(
            "forget",
            members,
            ["mia_gradnorm", "mia_min_k_pp", "mia_reference"],
            holdout=holdout,
        ),
        EvalJob("other", other, ["avg_loglik"]),
    ]
    out = evaluate(jobs, answer_stats, lambda prompts, **sampling: {}, grad_norms)
    assert flags == [True]  # one teacher-forced call, standardised for every item
    assert sorted(norms) == sorted(r["answer"] for r in members + holdout)  # not "other"'s
    assert out["metrics"]["forget/mia_gradnorm"] == 1.0  # members' gradients are smaller
    assert out["metrics"]["forget/mia_min_k_pp"] == 0.5  # all tied
    assert "forget/mia_reference" not in out["metrics"]  # needs the reference's evaluation
    assert out["examples"]["forget/mean_logprob"] == [-1.0] * 3
    assert out["examples"]["forget/holdout_mean_logprob"] == [-1.0] * 2
