"""What a sample of orderings says about all of them (`orderings: {sample: ...}`).

Each sampled ordering's value is its mean over seeds (and grid points); the n values are a
simple random sample, without replacement, of the values of all N = k! orderings. Estimated:
their mean (t interval with the finite-population correction) and their standard deviation S
(divisor N - 1), with Bonett's (2006) interval, which allows for non-normal values through
their kurtosis, its standard error scaled by the finite-population correction
sqrt((N - n) / (N - 1)). docs/formulas.md#sampled-orderings gives the formulas and what the
interval's coverage was in simulation. The range of a sample cannot estimate the range of all
orderings, so none is reported.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from statistics import NormalDist

# lazy: scipy for the t quantile

LEVEL = 0.90


@dataclass(frozen=True)
class PopulationEstimate:
    """A score over all orderings, from a sample: n of `total`, at confidence `level`."""

    n: int
    total: int
    mean: float
    mean_ci: tuple[float, float]
    sd: float
    sd_ci: tuple[float, float]
    seed_sd: float  # the mean within-ordering seed std (nan with one seed): the noise in a value
    level: float = LEVEL


def estimate(
    per_ordering: dict[str, list[float]], total: int, level: float = LEVEL
) -> PopulationEstimate:
    """The mean and standard deviation over all `total` orderings, from the sampled
    orderings' values ({ordering: [value per seed]})."""
    values = [statistics.fmean(v) for v in per_ordering.values() if v]
    seed_sd = mean_seed_sd(per_ordering)
    n = len(values)
    if n < 2:
        nan = float("nan")
        return PopulationEstimate(n, total, nan, (nan, nan), nan, (nan, nan), seed_sd, level)
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    return PopulationEstimate(
        n, total, mean, mean_interval(values, total, level), sd,
        sd_interval(values, total, level), seed_sd, level,
    )  # fmt: skip


def mean_seed_sd(per_ordering: dict[str, list[float]]) -> float:
    """The mean over orderings of each one's standard deviation over seeds (NaN values and
    orderings with fewer than two values left out; nan when no ordering has two)."""
    sds = []
    for values in per_ordering.values():
        values = [v for v in values if not math.isnan(v)]
        if len(values) > 1:
            sds.append(statistics.stdev(values))
    return statistics.fmean(sds) if sds else float("nan")


def finite_correction(n: int, total: int) -> float:
    """(N - n) / (N - 1): what is left unknown of a population of N after n draws."""
    return (total - n) / (total - 1) if total > 1 else 0.0


def mean_interval(values: list[float], total: int, level: float) -> tuple[float, float]:
    from scipy.stats import t  # lazy: see above

    n, mean = len(values), statistics.fmean(values)
    half = t.ppf(1 - (1 - level) / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    half *= math.sqrt(1 - n / total)
    return mean - half, mean + half


def sd_interval(values: list[float], total: int, level: float) -> tuple[float, float]:
    """Bonett's interval for the standard deviation, with the finite-population correction:
    exp(ln(c s^2) +- z se) under the square root, c = n / (n - z), se = c sqrt((kurtosis -
    (n - 3) / n) / (n - 1) * fpc), the kurtosis about a trimmed mean."""
    n = len(values)
    s2 = statistics.variance(values)
    if n >= total or s2 == 0:  # every ordering seen, or no spread: S is known
        return math.sqrt(s2), math.sqrt(s2)
    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    mean = statistics.fmean(values)
    cut = int(n / (2 * math.sqrt(n - 4))) if n > 4 else 0
    ordered = sorted(values)
    trimmed = statistics.fmean(ordered[cut : n - cut])
    kurtosis = (
        n * sum((v - trimmed) ** 4 for v in values) / sum((v - mean) ** 2 for v in values) ** 2
    )
    c = n / (n - z)
    spread = max(kurtosis - (n - 3) / n, 0.0) / (n - 1) * finite_correction(n, total)
    se = c * math.sqrt(spread)
    centre = math.log(c * s2)
    return math.sqrt(math.exp(centre - z * se)), math.sqrt(math.exp(centre + z * se))
