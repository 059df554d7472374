"""Does the ordering change a score? A declared test with a known error rate
(docs/ordering_test.md; its error rates on simulated studies: docs/ordering_test_error_rates.md).

Data: one value per trial, grouped by ordering; trials of one seed (and grid point) form a
**block**: they share the seed's base model, data order and every prefix trained before the
paths part, so they are not independent. Which test applies:

| design | `permutation` (default) | `anova` |
| --- | --- | --- |
| complete blocks (every ordering once in every block, >= 2 blocks) | ordering labels permuted within each block | two-way F test, ordering + block |
| anything else | labels permuted across all trials | one-way F test |

Statistic of the permutation tests: the between-ordering sum of squares of the ordering means
(the F statistic's numerator; with complete blocks the block sums are the same under every
permutation). Exact when the assignments are at most `EXACT_LIMIT`, else `DRAWS` random ones
(p = (1 + hits) / (1 + draws)). A discrete test has a smallest attainable p (`p_min`):
1 / (k!)^(n-1) blocked, k!·prod(n_o!) / N! across trials (2 orderings x n seeds: 2^(1-n) and
2 / C(2n, n)); a design whose p_min exceeds the level it is tested at can never reject.
Effect size: eta squared (partial, with blocks) and the spread of the ordering means, each with a
percentile bootstrap interval (blocks resampled; without blocks, trials within each ordering).
Several tests at once: Holm's step-down adjustment controls the family-wise error rate.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import numpy as np

# lazy: scipy only for the tests that need its distributions

TestName = Literal["permutation", "anova"]
EXACT_LIMIT = 100_000  # assignments enumerated exactly up to this many
DRAWS = 20_000  # random assignments otherwise
BOOTSTRAP = 2_000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Design:
    """Values grouped by ordering: `blocks[i]` names the block of `values[o][i]`."""

    orderings: tuple[str, ...]
    values: tuple[tuple[float, ...], ...]
    blocks: tuple[tuple[object, ...], ...]

    @classmethod
    def of(cls, data: dict[str, dict[object, float]]) -> Design:
        """{ordering: {block: value}}, NaN values dropped."""
        orderings, values, blocks = [], [], []
        for ordering, per_block in data.items():
            kept = [(b, float(v)) for b, v in per_block.items() if not math.isnan(float(v))]
            if kept:
                orderings.append(ordering)
                blocks.append(tuple(b for b, _ in kept))
                values.append(tuple(v for _, v in kept))
        return cls(tuple(orderings), tuple(values), tuple(blocks))

    @property
    def complete_blocks(self) -> list[object] | None:
        """The blocks every ordering has exactly one value in (None unless that is every value
        and there are at least two)."""
        if not self.values:
            return None
        sets = [set(b) for b in self.blocks]
        common = set.intersection(*sets)
        if len(common) < 2 or any(
            s != common or len(b) != len(s) for s, b in zip(sets, self.blocks)
        ):
            return None
        return sorted(common, key=repr)

    def matrix(self) -> np.ndarray:
        """(orderings x blocks) values of a complete-block design."""
        blocks = self.complete_blocks
        assert blocks is not None
        return np.array(
            [[dict(zip(b, v))[block] for block in blocks] for b, v in zip(self.blocks, self.values)]
        )


@dataclass
class OrderingTest:
    """One test's outcome: p (None when not measurable), the smallest p the design can reach,
    the effect sizes with their intervals, and Holm's adjusted p once the family is known."""

    test: str  # e.g. "permutation, blocked by seed (exact, 576 assignments)"
    orderings: int
    per_ordering: int  # the fewest values of one ordering
    p: float | None
    p_min: float
    eta2: float
    eta2_ci: tuple[float, float]
    spread: float
    spread_ci: tuple[float, float]
    reason: str = ""  # why p is None
    p_adjusted: float | None = None
    threshold: float | None = None  # the level Holm tests this p at (alpha / rank)
    extra: dict = field(default_factory=dict)

    def significant(self, alpha: float) -> bool:
        return self.p_adjusted is not None and self.p_adjusted <= alpha


def between_ss(groups: Sequence[np.ndarray]) -> float:
    """Sum over orderings of n_o (mean_o - grand mean)^2."""
    values = np.concatenate(groups)
    grand = values.mean()
    return float(sum(len(g) * (g.mean() - grand) ** 2 for g in groups))


def _eta2_blocked(m: np.ndarray) -> float:
    """Partial eta squared of the ordering in a two-way (ordering + block) layout."""
    grand = m.mean()
    ss_o = m.shape[1] * ((m.mean(axis=1) - grand) ** 2).sum()
    resid = m - m.mean(axis=1, keepdims=True) - m.mean(axis=0, keepdims=True) + grand
    ss_e = (resid**2).sum()
    return float(ss_o / (ss_o + ss_e)) if ss_o + ss_e > 0 else 0.0


def _eta2(groups: Sequence[np.ndarray]) -> float:
    values = np.concatenate(groups)
    total = ((values - values.mean()) ** 2).sum()
    return float(between_ss(groups) / total) if total > 0 else 0.0


def _spread(means: np.ndarray) -> float:
    return float(means.max() - means.min())


def _interval(samples: np.ndarray) -> tuple[float, float]:
    tail = (1 - CONFIDENCE) / 2
    return float(np.quantile(samples, tail)), float(np.quantile(samples, 1 - tail))


def blocked_permutation(m: np.ndarray, rng: np.random.Generator) -> tuple[float, float, str]:
    """(p, p_min, how) of the within-block permutation test of an (orderings x blocks) matrix."""
    k, n = m.shape
    # with complete blocks SS_between is a function of the ordering sums alone
    observed = ((m.sum(axis=1) - m.sum() / k) ** 2).sum()
    perms = list(itertools.permutations(range(k)))
    total = len(perms) ** (n - 1)  # the first block fixed: a global relabelling changes nothing
    tol = 1e-9 * max(1.0, abs(observed))
    if total <= EXACT_LIMIT:
        sums = m[:, 0].copy()[None, :]  # assignments so far x orderings
        for j in range(1, n):
            column = np.array([m[list(p), j] for p in perms])  # k! x k
            sums = (sums[:, None, :] + column[None, :, :]).reshape(-1, k)
        stats = ((sums - sums.sum(axis=1, keepdims=True) / k) ** 2).sum(axis=1)
        p = float(np.mean(stats >= observed - tol))
        return p, 1.0 / total, f"exact, {total} assignments"
    order = np.argsort(rng.random((DRAWS, n, k)), axis=2)  # a random permutation per block
    shuffled = np.take_along_axis(np.broadcast_to(m.T, (DRAWS, n, k)), order, axis=2)
    sums = shuffled.sum(axis=1)
    stats = ((sums - sums.sum(axis=1, keepdims=True) / k) ** 2).sum(axis=1)
    hits = int(np.sum(stats >= observed - tol))
    return (
        (1 + hits) / (1 + DRAWS),
        max(1.0 / total, 1 / (1 + DRAWS)),
        f"{DRAWS} random assignments",
    )


def unblocked_permutation(
    groups: list[np.ndarray], rng: np.random.Generator
) -> tuple[float, float, str]:
    """(p, p_min, how) of the permutation test across all trials (group sizes kept)."""
    sizes = [len(g) for g in groups]
    values = np.concatenate(groups)
    observed = between_ss(groups)
    tol = 1e-9 * max(1.0, abs(observed))
    total = math.factorial(len(values))
    for size in sizes:
        total //= math.factorial(size)
    equal = [sizes.count(s) for s in set(sizes)]
    symmetry = math.prod(math.factorial(c) for c in equal)  # relabelling equal-sized groups
    distinct = total // symmetry
    labels = np.repeat(np.arange(len(sizes)), sizes)
    if total <= EXACT_LIMIT:
        assignments = all_assignments(tuple(sizes))  # total x N, group index per value
    else:
        assignments = rng.permuted(np.broadcast_to(labels, (DRAWS, len(labels))), axis=1)
    counts = np.array(sizes, dtype=float)
    sums = np.stack([(assignments == g) @ values for g in range(len(sizes))], axis=1)
    grand = values.mean()
    stats = ((sums / counts - grand) ** 2 * counts).sum(axis=1)
    hits = int(np.sum(stats >= observed - tol))
    if total <= EXACT_LIMIT:
        return hits / total, 1.0 / distinct, f"exact, {total} assignments"
    return (
        (1 + hits) / (1 + DRAWS),
        max(1.0 / distinct, 1 / (1 + DRAWS)),
        f"{DRAWS} random assignments",
    )


@lru_cache(maxsize=16)
def all_assignments(sizes: tuple[int, ...]) -> np.ndarray:
    """(assignments x positions) group indices: every way to give the groups their sizes."""
    return np.array(list(_assignments(list(sizes))))


def _assignments(sizes: list[int]):
    """Every way to give len(sizes) groups their sizes among sum(sizes) positions."""
    n = sum(sizes)

    def fill(position_sets: list[list[int]], free: tuple[int, ...], group: int):
        if group == len(sizes):
            row = np.empty(n, dtype=int)
            for g, positions in enumerate(position_sets):
                row[positions] = g
            yield row
            return
        for chosen in itertools.combinations(free, sizes[group]):
            rest = tuple(i for i in free if i not in chosen)
            yield from fill([*position_sets, list(chosen)], rest, group + 1)

    yield from fill([], tuple(range(n)), 0)


def anova(design: Design) -> tuple[float, float, str]:
    """(p, 0, how) of the F test: two-way (ordering + block) with complete blocks, else one-way."""
    from scipy import stats

    if design.complete_blocks is not None:
        m = design.matrix()
        k, n = m.shape
        grand = m.mean()
        ss_o = n * ((m.mean(axis=1) - grand) ** 2).sum()
        resid = m - m.mean(axis=1, keepdims=True) - m.mean(axis=0, keepdims=True) + grand
        df_o, df_e = k - 1, (k - 1) * (n - 1)
        ms_e = (resid**2).sum() / df_e
        if ms_e <= 0:
            return (0.0 if ss_o > 0 else 1.0), 0.0, "F(ordering + block)"
        f = (ss_o / df_o) / ms_e
        return float(stats.f.sf(f, df_o, df_e)), 0.0, f"F({df_o}, {df_e}) with blocks"
    groups = [np.array(v) for v in design.values]
    result = stats.f_oneway(*groups)
    df = (len(groups) - 1, sum(len(g) for g in groups) - len(groups))
    p = float(result.pvalue) if not math.isnan(result.pvalue) else 1.0
    return p, 0.0, f"F({df[0]}, {df[1]}) one-way"


def ordering_test(
    data: dict[str, dict[object, float]], test: TestName = "permutation", seed: int = 0
) -> OrderingTest:
    """Test whether the ordering changes the values {ordering: {block: value}}."""
    design = Design.of(data)
    rng = np.random.default_rng(seed)
    k = len(design.values)
    fewest = min((len(v) for v in design.values), default=0)
    groups = [np.array(v) for v in design.values]
    means = np.array([g.mean() for g in groups]) if groups else np.array([0.0])
    if k < 2 or fewest < 2:
        why = "fewer than 2 orderings" if k < 2 else "fewer than 2 seeds of an ordering"
        return OrderingTest(test, k, fewest, None, 1.0, float("nan"), (float("nan"),) * 2,
                            _spread(means), (float("nan"),) * 2, reason=why)  # fmt: skip
    blocks = design.complete_blocks
    if blocks is not None:
        m = design.matrix()
        eta2 = _eta2_blocked(m)
        picks = rng.integers(0, m.shape[1], size=(BOOTSTRAP, m.shape[1]))
        boot_eta = np.array([_eta2_blocked(m[:, p]) for p in picks])
        boot_spread = np.array([_spread(m[:, p].mean(axis=1)) for p in picks])
    else:
        eta2 = _eta2(groups)
        picks = [rng.integers(0, len(g), size=(BOOTSTRAP, len(g))) for g in groups]
        resampled = [[g[p[b]] for g, p in zip(groups, picks)] for b in range(BOOTSTRAP)]
        boot_eta = np.array([_eta2(r) for r in resampled])
        boot_spread = np.array([_spread(np.array([x.mean() for x in r])) for r in resampled])
    p, p_min, name = p_value(design, test, rng)
    return OrderingTest(
        name, k, fewest, p, p_min, eta2, _interval(boot_eta), _spread(means), _interval(boot_spread)
    )


def p_value(design: Design, test: TestName, rng: np.random.Generator) -> tuple[float, float, str]:
    """(p, smallest attainable p, the test's name) of a design with >= 2 values per ordering."""
    blocks = design.complete_blocks
    label = "blocked by seed" if blocks is not None else "across trials"
    if test == "anova":
        p, p_min, how = anova(design)
        return p, p_min, f"ANOVA {how}"
    if blocks is not None:
        p, p_min, how = blocked_permutation(design.matrix(), rng)
    else:
        p, p_min, how = unblocked_permutation([np.array(v) for v in design.values], rng)
    return p, p_min, f"permutation, {label} ({how})"


def holm(tests: Sequence[OrderingTest], alpha: float) -> None:
    """Holm's step-down adjustment over a family, in place: `p_adjusted` and `threshold`."""
    measured = sorted((t for t in tests if t.p is not None), key=lambda t: t.p)
    m, running = len(measured), 0.0
    for rank, t in enumerate(measured):
        running = max(running, min(1.0, (m - rank) * t.p))
        t.p_adjusted, t.threshold = running, alpha / (m - rank)


def reachable(t: OrderingTest, alpha: float, family: int) -> bool:
    """Whether the design can reach significance at all: p_min at most alpha / family (the
    strictest level Holm may test it at)."""
    return t.p_min <= alpha / max(family, 1)


def verdict(tests: dict[str, OrderingTest], what: str, alpha: float) -> str:
    """One sentence on whether the ordering changes `what`, over the tests of each method."""
    if not tests:
        return f"Not measurable here: no trial scored {what}."
    family = len(tests)
    unmeasured = {m: t for m, t in tests.items() if t.p is None}
    if unmeasured:
        method, t = next(iter(unmeasured.items()))
        return f"Not measurable here: {what} for {method} has {t.reason}."
    small = {m: t for m, t in tests.items() if not reachable(t, alpha, family)}
    if len(small) == len(tests):
        t = next(iter(small.values()))
        return (
            f"Not measurable here: the design is too small to ever reach significance "
            f"(smallest attainable p {t.p_min:.3g} > {alpha:g}/{family}); add seeds or orderings."
        )
    name = next(iter(tests.values())).test.split(" (")[0]
    detail = ", ".join(f"{m} p={t.p_adjusted:.3g}" for m, t in tests.items())
    yes = [m for m, t in tests.items() if t.significant(alpha)]
    tail = f"({name}, Holm-adjusted over {family} methods at alpha={alpha:g}: {detail})."
    if len(yes) == len(tests):
        return f"Reproduces here: the ordering changes {what} for every method {tail}"
    if not yes:
        return f"Does not reproduce here: no method's {what} differs significantly across orderings {tail}"
    no = [m for m in tests if m not in yes]
    return (
        f"Reproduces for {', '.join(yes)}, not for {', '.join(no)}: the ordering changes {what} "
        f"significantly for some methods only {tail}"
    )
