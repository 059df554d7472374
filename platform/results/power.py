"""How many seeds a study needs for its declared ordering test to detect a pilot's ordering
effect (`stageflow plan --pilot RUN_DIR`).

From a finished pilot, per unlearning method, the primary score by ordering and seed. With k
orderings, n seeds a ordering and residual variance s^2 (the two-way ordering + seed layout
with complete blocks, else the variance within orderings), the ordering means' sum of squares
has expectation sum_o (mu_o - mu)^2 + (k - 1) s^2 / n: the effect is estimated by the observed
one minus that noise term (zero when negative: no effect beyond the pilot's noise). Power at
n seeds is the F test's: noncentral F with lambda = n sum_o (mu_o - mu)^2 / s^2, at the
strictest level Holm tests a member of the family at (alpha / family). The permutation test's
power is close to it for normal errors (checked by simulation in the tests), and it cannot
reject at all until its smallest attainable p, 1 / (k!)^(n-1) blocked, is at most that level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stageflow.core.config import StudyError
from stageflow.core.expand import expand
from stageflow.core.study_dir import StudyDir
from stageflow.core.study_file import load_study
from stageflow.platform.results.analysis import Analysis
from stageflow.platform.results.ordering_test import Design

# lazy: scipy's distributions only where a power is computed

TARGET_POWER = 0.8
MAX_SEEDS = 1000


def smallest_p(k: int, n: int, test: str, blocked: bool) -> float:
    """The smallest p the declared test can reach with k orderings of n seeds each."""
    if test == "anova":
        return 0.0
    if blocked:
        return 1.0 / math.factorial(k) ** (n - 1)
    return math.factorial(k) * math.factorial(n) ** k / math.factorial(k * n)


def power(effect_ss: float, variance: float, k: int, n: int, level: float, blocked: bool) -> float:
    """The F test's power with k orderings of n seeds: `effect_ss` = sum_o (mu_o - mu)^2."""
    from scipy import stats

    df1, df2 = k - 1, (k - 1) * (n - 1) if blocked else k * (n - 1)
    if df2 < 1:
        return 0.0
    critical = stats.f.ppf(1 - level, df1, df2)
    return float(stats.ncf.sf(critical, df1, df2, n * effect_ss / variance))


def seeds_needed(
    effect_ss: float, variance: float, k: int, level: float, test: str, blocked: bool
) -> int | None:
    """The fewest seeds (>= 2) whose power reaches TARGET_POWER and whose test can reject at
    `level`; None when no effect or more than MAX_SEEDS."""
    if effect_ss <= 0:
        return None
    for n in range(2, MAX_SEEDS + 1):
        reachable = smallest_p(k, n, test, blocked) <= level
        if reachable and power(effect_ss, variance, k, n, level, blocked) >= TARGET_POWER:
            return n
    return None


@dataclass(frozen=True)
class PilotEffect:
    method: str
    orderings: int
    seeds: int  # the pilot's, per ordering
    blocked: bool
    effect_ss: float  # sum over orderings of (mean - grand mean)^2, bias-corrected
    variance: float  # residual
    level: float  # alpha / family

    @property
    def cohens_f(self) -> float:
        return math.sqrt(self.effect_ss / self.orderings / self.variance)

    def needed(self, test: str) -> int | None:
        return seeds_needed(
            self.effect_ss, self.variance, self.orderings, self.level, test, self.blocked
        )

    def power_at(self, seeds: int, test: str) -> float:
        if smallest_p(self.orderings, seeds, test, self.blocked) > self.level:
            return 0.0
        return power(self.effect_ss, self.variance, self.orderings, seeds, self.level, self.blocked)


def design_effect(design: Design) -> tuple[float, float, int, bool] | None:
    """(effect_ss, residual variance, seeds, blocked) of a design; None without two seeds of
    every ordering (no variance to estimate)."""
    k = len(design.values)
    if design.complete_blocks is not None:
        m = design.matrix()
        n = m.shape[1]
        grand = m.mean()
        resid = m - m.mean(axis=1, keepdims=True) - m.mean(axis=0, keepdims=True) + grand
        variance = float((resid**2).sum() / ((k - 1) * (n - 1)))
        observed = float(((m.mean(axis=1) - grand) ** 2).sum())
        blocked = True
    else:
        if k < 2 or min(len(v) for v in design.values) < 2:
            return None
        groups = [np.array(v) for v in design.values]
        n = round(float(np.mean([len(g) for g in groups])))
        total = sum(len(g) for g in groups)
        variance = float(sum(((g - g.mean()) ** 2).sum() for g in groups) / (total - k))
        grand = np.concatenate(groups).mean()
        observed = float(sum((g.mean() - grand) ** 2 for g in groups))
        blocked = False
    if variance <= 0:
        return None
    return max(0.0, observed - (k - 1) * variance / n), variance, n, blocked


def pilot_effects(run_dir: str | Path) -> tuple[str, str, list[PilotEffect]]:
    """(primary score, declared test, the effect per method) of a finished pilot study."""
    study = StudyDir.existing(run_dir, "--pilot")
    spec = load_study(study.spec_file)
    analysis = Analysis(spec, study, study.records(expand(spec, study.searched_paths()), None))
    score = spec.analysis.primary_score
    if score is None or score not in analysis.score_names:
        raise StudyError(
            str(run_dir),
            "--pilot",
            "the pilot has no finished trial with a primary score; expected a study with "
            "unlearning methods and analysis.forget_score (or analysis.primary) that ran",
        )
    data = analysis.by_block(score)
    level = spec.analysis.alpha / len(data)
    effects = []
    for method, per_ordering in data.items():
        found = design_effect(Design.of(per_ordering))
        if found is None:
            raise StudyError(
                str(run_dir),
                "--pilot",
                f"{score} of {method} has fewer than 2 seeds of some ordering (or no spread "
                "between seeds); expected a pilot with at least 2 seeds, to estimate a standard deviation",
            )
        effect_ss, variance, seeds, blocked = found
        k = len(per_ordering)
        effects.append(PilotEffect(method, k, seeds, blocked, effect_ss, variance, level))
    return score, spec.analysis.test, effects
