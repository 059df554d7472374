"""The ordering test: p-values against direct computations, the smallest attainable p of each
design, Holm's adjustment and every verdict sentence from constructed inputs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from stageflow.platform.results.ordering_test import holm, ordering_test, verdict


def blocked(matrix) -> dict:
    """{ordering: {seed: value}} of an (orderings x seeds) list of lists."""
    return {f"o{i}": {s: v for s, v in enumerate(row)} for i, row in enumerate(matrix)}


def test_blocked_permutation_p_equals_direct_enumeration():
    rng = np.random.default_rng(3)
    m = rng.normal(size=(3, 4)) + np.array([[0.0], [0.8], [1.5]])
    result = ordering_test(blocked(m.tolist()))
    assert "blocked by seed" in result.test and "exact" in result.test

    def stat(x):
        return ((x.mean(axis=1) - x.mean()) ** 2).sum()

    observed, hits, total = stat(m), 0, 0
    for perms in itertools.product(itertools.permutations(range(3)), repeat=4):
        shuffled = np.stack([m[list(p), j] for j, p in enumerate(perms)], axis=1)
        hits += stat(shuffled) >= observed - 1e-12
        total += 1
    assert result.p == pytest.approx(hits / total)
    assert result.p_min == pytest.approx(1 / 6**3)


@pytest.mark.parametrize("n", [3, 5, 6])
def test_smallest_attainable_p_of_two_orderings(n):
    separated = [[10.0 + i for i in range(n)], [float(i) for i in range(n)]]
    within = ordering_test(blocked(separated))
    assert within.p_min == pytest.approx(2.0 ** (1 - n)) and within.p == pytest.approx(within.p_min)
    # without complete blocks (one seed missing from one ordering, then the seeds differ)
    across = ordering_test({"a": {s: v for s, v in enumerate(separated[0])},
                            "b": {s + 100: v for s, v in enumerate(separated[1])}})  # fmt: skip
    assert "across trials" in across.test
    assert across.p_min == pytest.approx(2 / math.comb(2 * n, n))
    assert across.p == pytest.approx(across.p_min)


def test_unblocked_permutation_p_equals_direct_enumeration():
    groups = {"a": {0: 1.0, 1: 2.5, 2: 0.3}, "b": {3: 2.0, 4: 3.1}, "c": {5: 0.1, 6: 4.0, 7: 2.2}}
    result = ordering_test(groups)
    values = [v for g in groups.values() for v in g.values()]
    sizes = [len(g) for g in groups.values()]

    def stat(vals):
        parts, at = [], 0
        for size in sizes:
            parts.append(np.array(vals[at : at + size]))
            at += size
        grand = np.mean(vals)
        return sum(len(p) * (p.mean() - grand) ** 2 for p in parts)

    observed = stat(values)
    hits = sum(stat(list(p)) >= observed - 1e-12 for p in itertools.permutations(values))
    assert result.p == pytest.approx(hits / math.factorial(len(values)))


def test_anova_matches_scipy():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(2, 5)) + np.array([[0.0], [1.0]])
    two = ordering_test(blocked(m.tolist()), test="anova")
    assert two.p == pytest.approx(stats.ttest_rel(m[0], m[1]).pvalue)  # F(1, n-1) = paired t^2
    assert two.p_min == 0.0
    groups = {"a": {0: 1.0, 1: 2.0, 2: 0.5}, "b": {3: 2.5, 4: 3.0}}
    one = ordering_test(groups, test="anova")
    assert one.p == pytest.approx(stats.f_oneway([1.0, 2.0, 0.5], [2.5, 3.0]).pvalue)


def test_effect_sizes_and_intervals():
    m = [[0.0, 1.0, 2.0, 3.0], [2.0, 3.0, 4.0, 5.0]]  # ordering b is 2 higher in every seed
    result = ordering_test(blocked(m))
    assert result.spread == pytest.approx(2.0) and result.eta2 == pytest.approx(1.0)
    assert result.spread_ci == pytest.approx((2.0, 2.0))
    noisy = ordering_test(blocked([[0.0, 1.0, -1.0, 0.5], [0.2, 0.9, -0.8, 0.3]]))
    assert noisy.spread_ci[0] <= noisy.spread <= noisy.spread_ci[1]
    assert 0.0 <= noisy.eta2_ci[0] <= noisy.eta2_ci[1] <= 1.0


def test_holm_adjustment():
    tests = [
        ordering_test(blocked([[0, 1, 2, 3, 4, 5, 6], [9, 9, 9, 9, 9, 9, 9]])) for _ in range(3)
    ]
    for t, p in zip(tests, [0.01, 0.04, 0.03]):
        t.p = p
    holm(tests, alpha=0.05)
    assert [t.p_adjusted for t in tests] == pytest.approx([0.03, 0.06, 0.06])
    assert [t.threshold for t in tests] == pytest.approx([0.05 / 3, 0.05, 0.05 / 2])
    assert [t.significant(0.05) for t in tests] == [True, False, False]


def family(**matrices):
    tests = {method: ordering_test(blocked(m)) for method, m in matrices.items()}
    holm(list(tests.values()), 0.05)
    return tests


STRONG = [[0, 1, 2, 3, 4, 5, 6], [10, 11, 12, 13, 14, 15, 16]]  # 2 orderings x 7 seeds
NULL = [[0, 1, 2, 3, 4, 5, 6], [1, 0, 3, 2, 5, 4, 6]]


def test_verdict_reproduces():
    sentence = verdict(family(ga=STRONG, npo=STRONG), "the forget score", 0.05)
    assert sentence.startswith(
        "Reproduces here: the ordering changes the forget score for every method"
    )
    assert "Holm-adjusted over 2 methods" in sentence and "ga p=0.0312" in sentence


def test_verdict_partly_and_not():
    assert verdict(family(ga=STRONG, npo=NULL), "x", 0.05).startswith(
        "Reproduces for ga, not for npo"
    )
    assert verdict(family(ga=NULL, npo=NULL), "x", 0.05).startswith(
        "Does not reproduce here: no method's x differs significantly"
    )


def test_verdict_not_measurable():
    few = family(ga=[row[:5] for row in STRONG])  # 2 x 5 blocked: p >= 1/16 > 0.05
    assert verdict(few, "x", 0.05).startswith(
        "Not measurable here: the design is too small to ever reach significance (smallest attainable p 0.0625"
    )
    one_seed = family(ga=[[1.0], [2.0]])
    assert (
        verdict(one_seed, "x", 0.05)
        == "Not measurable here: x for ga has fewer than 2 seeds of an ordering."
    )
    assert verdict({}, "x", 0.05) == "Not measurable here: no trial scored x."
