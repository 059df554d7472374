"""Sampled orderings: the estimates over all orderings and their intervals' coverage, checked by
simulating populations of 120 ordering values and samples of 24 (the benchmark's setting)."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from stageflow.platform.results.population import estimate, mean_interval, sd_interval

TOTAL, N, SIMULATIONS = 120, 24, 1500


def normal(rng: random.Random) -> list[float]:
    return [rng.gauss(0, 1) for _ in range(TOTAL)]


def by_first_stage(rng: random.Random) -> list[float]:
    """Orderings grouped by their first of five stages (24 each), which moves the score most."""
    shifts = [rng.gauss(0, 2) for _ in range(5)]
    return [shifts[i // 24] + rng.gauss(0, 0.5) for i in range(TOTAL)]


def two_clusters(rng: random.Random) -> list[float]:
    """A fifth of the orderings (one stage placed late, say) far from the rest."""
    return [(3.0 if rng.random() < 0.2 else 0.0) + rng.gauss(0, 0.3) for _ in range(TOTAL)]


@pytest.mark.parametrize("population", [normal, by_first_stage, two_clusters])
def test_intervals_cover_at_their_level(population):
    """90% intervals cover the population's standard deviation (divisor N - 1) and mean in
    0.87-0.93 of the simulated studies (1500 each: the binomial sd is 0.008)."""
    rng = random.Random(population.__name__)
    sd_hits = mean_hits = 0
    for _ in range(SIMULATIONS):
        values = population(rng)
        drawn = rng.sample(values, N)
        lo, hi = sd_interval(drawn, TOTAL, 0.9)
        sd_hits += lo <= statistics.stdev(values) <= hi
        lo, hi = mean_interval(drawn, TOTAL, 0.9)
        mean_hits += lo <= statistics.fmean(values) <= hi
    assert 0.87 <= sd_hits / SIMULATIONS <= 0.93, sd_hits / SIMULATIONS
    assert 0.87 <= mean_hits / SIMULATIONS <= 0.93, mean_hits / SIMULATIONS


def test_heavy_tailed_values_undercover_as_documented():
    """docs/formulas.md#sampled-orderings: lognormal values (a few orderings far out) are the
    known weak spot of any standard-deviation interval from 24 values: below 0.80 here."""
    rng = random.Random(0)
    hits = 0
    for _ in range(SIMULATIONS):
        values = [rng.lognormvariate(0, 0.8) for _ in range(TOTAL)]
        lo, hi = sd_interval(rng.sample(values, N), TOTAL, 0.9)
        hits += lo <= statistics.stdev(values) <= hi
    assert 0.65 <= hits / SIMULATIONS <= 0.82, hits / SIMULATIONS


def test_every_ordering_seen_is_exact_and_seed_means_are_the_values():
    per_ordering = {f"o{i}": [float(i), float(i) + 2.0] for i in range(6)}
    e = estimate(per_ordering, total=6)
    values = [i + 1.0 for i in range(6)]
    assert (e.n, e.total) == (6, 6)
    assert e.mean == pytest.approx(statistics.fmean(values)) and e.mean_ci == (e.mean, e.mean)
    assert e.sd == pytest.approx(statistics.stdev(values)) and e.sd_ci == pytest.approx((e.sd,) * 2)
    assert e.seed_sd == pytest.approx(math.sqrt(2.0))
    assert math.isnan(estimate({"o": [1.0]}, total=6).sd)  # one ordering: nothing to estimate
