"""The ordering search's cost accounting, budget, resume and choices, on known scores."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest

from stageflow.core.ordering_search import (
    OrderingSearch,
    best_rank,
    exhaustive_trainings,
    path_nodes,
    replay,
)

STAGES = ["a", "b", "c", "d", "e"]


def synthetic_scores(seed: int) -> dict[tuple[str, ...], float]:
    """Scores with the structure of a path-dependent study: each stage's effect depends on how
    late it comes, one pair interacts through their order, plus noise."""
    rng = random.Random(seed)
    late = {s: rng.gauss(0, 1) for s in STAGES}
    pair = rng.gauss(0, 1)
    return {
        p: sum(late[s] * i for i, s in enumerate(p)) / 4
        + (pair if p.index("a") < p.index("b") else 0.0)
        + rng.gauss(0, 0.2)
        for p in itertools.permutations(STAGES)
    }


def test_costs_count_every_prefix_branch_and_oracle_prefix_once():
    assert exhaustive_trainings(STAGES, branches=1, runs=1) == 325 + 120
    assert exhaustive_trainings(STAGES, branches=2, runs=3) == (325 + 240) * 3
    # an evaluation-only stage c trains nothing: a, b; ab, ba, ca, cb; acb, bca, cab, cba
    assert exhaustive_trainings(["a", "b", "c"], 0, 1, evals=frozenset({"c"})) == 10
    search = OrderingSearch(STAGES, "max", 100, branches=1)
    assert search.cost(("a", "b", "c", "d", "e")) == 6
    search._ask(("a", "b", "c", "d", "e"))
    assert search.cost(("a", "b", "c", "e", "d")) == 3  # two new prefixes and a branch
    assert search.cost(("b", "a", "c", "d", "e")) == 6
    oracle = path_nodes(("a", "b", "c"), 0, ("a", "c"))
    assert ("oracle", ("a", "c")) in oracle and len(oracle) == 5


@pytest.mark.parametrize("method", ["bayes", "random"])
def test_a_search_never_spends_more_than_its_budget(method):
    truth = synthetic_scores(0)
    for budget in (6, 40, 111):
        search = replay(OrderingSearch(STAGES, "min", budget, 3, method, branches=1), truth.get)
        assert search.spent <= budget and search.spent == search.spent_after[-1]
        assert len(set(search.asked)) == len(search.asked)
        assert search.spent_after == sorted(search.spent_after)


def test_a_budget_of_every_training_runs_every_ordering():
    truth = synthetic_scores(1)
    search = replay(OrderingSearch(STAGES, "max", 445, 0, "bayes", branches=1), truth.get)
    assert sorted(search.asked) == sorted(truth) and search.spent == 445


def test_the_search_beats_random_sampling_at_a_quarter_of_the_budget():
    """On scores with structure, at 111 of 445 trainings: the median rank of the best ordering
    found over 20 search seeds and 8 score sets, against random sampling's."""
    search_ranks, random_ranks = [], []
    for world in range(8):
        truth = synthetic_scores(world)
        for seed in range(20):
            for method, ranks in (("bayes", search_ranks), ("random", random_ranks)):
                found = replay(
                    OrderingSearch(STAGES, "max", 111, seed, method, branches=1), truth.get
                )
                ranks.append(best_rank(found.asked, truth, "max"))
    assert statistics.median(search_ranks) <= 2 < statistics.median(random_ranks)
    assert statistics.mean(r <= 6 for r in search_ranks) >= 0.9


def test_a_restored_search_proposes_what_the_uninterrupted_one_would():
    truth = synthetic_scores(2)
    whole = replay(OrderingSearch(STAGES, "max", 111, 5, "bayes", branches=1), truth.get)
    part = OrderingSearch(STAGES, "max", 111, 5, "bayes", branches=1)
    for _ in range(4):
        path = part.propose()
        part.observe(path, truth[path])
    part.propose()  # asked, not scored: the driver died while it ran
    resumed = OrderingSearch(STAGES, "max", 111, 5, "bayes", branches=1)
    resumed.restore(part.state())
    assert resumed.pending() == [part.asked[-1]]
    for path in resumed.pending():
        resumed.observe(path, truth[path])
    assert replay(resumed, truth.get).asked == whole.asked


def test_a_prefix_whose_completions_all_ran_cannot_win_and_failures_are_skipped():
    truth = synthetic_scores(3)
    search = OrderingSearch(STAGES, "max", 445, 0, "bayes", branches=1)
    for path in itertools.permutations(STAGES):
        if path[:2] == ("a", "b"):
            search._ask(path)
            search.observe(path, truth[path])
    search._ask(("c", "a", "b", "d", "e"))
    search.observe(("c", "a", "b", "d", "e"), None)  # a failed path has no score
    assert not search.can_win(("a", "b"))
    assert search.can_win(("c",))
    assert ("c", "a", "b", "d", "e") not in search.observed()
