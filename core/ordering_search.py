"""Searching the orderings of a study's stages (`orderings: {search: ...}`).

The search space is the tree of prefixes: a path's stage trainings are its prefixes (each
trained once, shared by every path through it) and its unlearning branches, per seed and grid
point. A search spends a budget of stage trainings: a path costs the trainings it asks for
that no earlier path of the search asked for, cached or not (its oracle's prefixes counted
apart, even where they coincide with a path's: the count never flatters a search).

`bayes` (the default) models the score of an ordering as linear in two kinds of features:
which position each stage holds and, for each pair of stages, which comes first (the
Kendall kernel's features), with a Gaussian prior on the weights and Gaussian noise whose
scales maximise the marginal likelihood of the scores seen (Bayesian linear regression, a
Gaussian process with a position + Kendall kernel). After one random path, it runs the
ordering with the highest expected improvement over the best score seen per training it
costs (to the power COST_POWER): a sibling of a path already run costs one training and its
branch, a new first stage the whole path, so the search deepens where the model expects
gains and pays for a new region only when the model's uncertainty there makes it worth it.
`random` runs orderings drawn uniformly without replacement until the next does not fit the
budget: the baseline a search must beat. docs/formulas.md#ordering-search has the formulas.

A running path is stopped after a stage (Tune's stopper, `can_win`) when, under the model fitted
to the scores that finished meanwhile, no completion of its prefix can beat the best score
seen (upper bound: mean + PRUNE_Z standard deviations).

The search's decisions depend only on its seed and the scores it saw in order: its state is
kept in `<study dir>/search.json` after every step, and a resumed study goes on from it.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from statistics import NormalDist

from stageflow.core.lazy import lazy_module

np = lazy_module("numpy")  # loaded where a search proposes; validate reads the costs alone

Path_ = tuple[str, ...]
ENUMERATE_UP_TO = 40320  # 8 stages: every ordering is a candidate; more: a random sample
CANDIDATES = 20000
INITIAL = 1  # random paths before the model chooses
COST_POWER = 1.0  # expected improvement per (new trainings) ** COST_POWER
PRUNE_Z = 2.0
PRIOR_SCALES = (0.1, 0.3, 1.0, 3.0)  # weight prior std, in units of the scores' std
NOISE_SCALES = (0.03, 0.1, 0.3, 1.0)  # noise std, same units


def path_nodes(
    path: Path_, branches: int, oracle: Path_ | None, evals: frozenset[str] = frozenset()
) -> set[tuple]:
    """The trainings a path asks for, per seed and grid point: its prefixes (but those ending
    in an evaluation-only stage of `evals`), its unlearning branches, its oracle's prefixes."""

    def prefixes(kind: str, p: Path_) -> set[tuple]:
        return {(kind, p[:i]) for i in range(1, len(p) + 1) if p[i - 1] not in evals}

    nodes = prefixes("prefix", path) | {("branch", path, b) for b in range(branches)}
    return nodes | (prefixes("oracle", oracle) if oracle is not None else set())


def exhaustive_trainings(
    stages: list[str],
    branches: int,
    runs: int,
    oracle_of: Callable[[Path_], Path_] | None = None,
    evals: frozenset[str] = frozenset(),
) -> int:
    """The trainings of every ordering (the budget of an exhaustive study)."""
    nodes: set[tuple] = set()
    for path in itertools.permutations(stages):
        nodes |= path_nodes(path, branches, oracle_of(path) if oracle_of else None, evals)
    return len(nodes) * runs


def features(paths: list[Path_], stages: list[str]) -> np.ndarray:
    """Per path: one-hot position of every stage (k x k), then +1 / -1 for each pair of
    stages (i < j in `stages`) as i comes before or after j."""
    k = len(stages)
    index = {s: i for i, s in enumerate(stages)}
    pos = np.array([[0] * k for _ in paths])
    for row, path in enumerate(paths):
        for p, s in enumerate(path):
            pos[row, index[s]] = p
    onehot = np.zeros((len(paths), k * k))
    for s in range(k):
        onehot[np.arange(len(paths)), s * k + pos[:, s]] = 1.0
    i, j = np.triu_indices(k, 1)
    before = np.where(pos[:, i] < pos[:, j], 1.0, -1.0)
    return np.hstack([onehot, before])


@dataclass
class Posterior:
    """Bayesian linear regression's posterior over standardised scores."""

    mean_w: np.ndarray
    cov_w: np.ndarray
    offset: float
    scale: float

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation of the score (latent, in the scores' units)."""
        mean = x @ self.mean_w
        var = np.einsum("ij,jk,ik->i", x, self.cov_w, x)
        return self.offset + self.scale * mean, self.scale * np.sqrt(np.maximum(var, 0.0))


def fit(x: np.ndarray, y: np.ndarray) -> Posterior:
    """The posterior with the prior and noise scales of highest marginal likelihood."""
    offset = float(y.mean())
    scale = float(y.std()) or 1.0
    z = (y - offset) / scale
    best = None
    gram = x @ x.T
    for a in PRIOR_SCALES:
        for b in NOISE_SCALES:
            cov = a * a * gram + b * b * np.eye(len(z))
            sign, logdet = np.linalg.slogdet(cov)
            ll = -0.5 * (z @ np.linalg.solve(cov, z) + logdet)
            if best is None or ll > best[0]:
                best = (ll, a, b)
    _, a, b = best
    precision = x.T @ x / (b * b) + np.eye(x.shape[1]) / (a * a)
    cov_w = np.linalg.inv(precision)
    mean_w = cov_w @ x.T @ z / (b * b)
    return Posterior(mean_w, cov_w, offset, scale)


def expected_improvement(mean: np.ndarray, sd: np.ndarray, best: float) -> np.ndarray:
    """E[max(f - best, 0)] for f ~ N(mean, sd) (goal max)."""
    normal = NormalDist()
    sd = np.maximum(sd, 1e-12)
    z = (mean - best) / sd
    cdf = np.vectorize(normal.cdf)(z)
    pdf = np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return (mean - best) * cdf + sd * pdf


@dataclass
class OrderingSearch:
    """A search over the orderings of `stages`: `propose` the next path (None: the budget is
    spent or every ordering ran), `observe` its score (None: it failed)."""

    stages: list[str]
    goal: str  # max | min
    budget: int
    seed: int = 0
    method: str = "bayes"
    runs: int = 1  # seeds x grid points: trials per path
    branches: int = 0  # unlearning branches per trial
    oracle_of: Callable[[Path_], Path_] | None = None
    evals: frozenset[str] = frozenset()  # evaluation-only stages: no training
    asked: list[Path_] = field(default_factory=list)
    scores: dict[Path_, float | None] = field(default_factory=dict)
    spent_after: list[int] = field(default_factory=list)  # budget spent after each ask

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.nodes: set[tuple] = set()
        self.order: list[Path_] | None = None  # `random`: the shuffled orderings
        self._candidates: list[Path_] | None = None

    # ----- cost -----------------------------------------------------------------------------
    def nodes_of(self, path: Path_) -> set[tuple]:
        oracle = self.oracle_of(path) if self.oracle_of else None
        return path_nodes(path, self.branches, oracle, self.evals)

    def cost(self, path: Path_) -> int:
        return len(self.nodes_of(path) - self.nodes) * self.runs

    @property
    def spent(self) -> int:
        return len(self.nodes) * self.runs

    def _ask(self, path: Path_) -> Path_:
        self.asked.append(path)
        self.nodes |= self.nodes_of(path)
        self.spent_after.append(self.spent)
        return path

    # ----- proposing ------------------------------------------------------------------------
    def candidates(self) -> list[Path_]:
        if self._candidates is None:
            k = len(self.stages)
            if math.factorial(k) <= ENUMERATE_UP_TO:
                self._candidates = list(itertools.permutations(self.stages))
            else:
                draw = random.Random(self.seed + 1)
                found = {tuple(draw.sample(self.stages, k)) for _ in range(CANDIDATES)}
                self._candidates = sorted(found)
        return self._candidates

    def propose(self) -> Path_ | None:
        left = self.budget - self.spent
        asked = set(self.asked)
        if self.method == "random":
            if self.order is None:
                self.order = list(self.candidates())
                self.rng.shuffle(self.order)
            for path in self.order:
                if path not in asked:
                    return self._ask(path) if self.cost(path) <= left else None
            return None
        priced = [(p, self.cost(p)) for p in self.candidates() if p not in asked]
        fits = [p for p, c in priced if c <= left]
        if not fits:
            return None
        seen = self.observed()
        if len(seen) < INITIAL or len({v for v in seen.values()}) < 2:
            return self._ask(fits[self.rng.randrange(len(fits))])
        posterior = self.posterior(seen)
        mean, sd = posterior.predict(features(fits, self.stages))
        sign = 1.0 if self.goal == "max" else -1.0
        best = max(sign * v for v in seen.values())
        gain = expected_improvement(sign * mean, sd, best)
        costs = np.array([c for _, c in priced if c <= left], dtype=float)
        value = gain / costs**COST_POWER
        top = np.flatnonzero(value >= value.max() - 1e-15 * abs(value.max()))
        return self._ask(fits[int(top[self.rng.randrange(len(top))])])

    def observed(self) -> dict[Path_, float]:
        return {p: v for p, v in self.scores.items() if v is not None and not math.isnan(v)}

    def posterior(self, seen: dict[Path_, float]) -> Posterior:
        paths = list(seen)
        return fit(features(paths, self.stages), np.array([seen[p] for p in paths]))

    def observe(self, path: Path_, score: float | None) -> None:
        self.scores[path] = score

    # ----- pruning --------------------------------------------------------------------------
    def can_win(self, prefix: Path_) -> bool:
        """Whether some unobserved completion of `prefix` may beat the best score seen."""
        seen = self.observed()
        if self.method == "random" or len(seen) < max(INITIAL, 2):
            return True
        rest = [p for p in self.candidates() if p[: len(prefix)] == prefix and p not in seen]
        if not rest:
            return False
        mean, sd = self.posterior(seen).predict(features(rest, self.stages))
        sign = 1.0 if self.goal == "max" else -1.0
        best = max(sign * v for v in seen.values())
        return bool((sign * mean + PRUNE_Z * sd).max() >= best)

    # ----- the log ---------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "asked": [list(p) for p in self.asked],
            "scores": [[list(p), v] for p, v in self.scores.items()],
            "spent_after": self.spent_after,
            "rng": _jsonable(self.rng.getstate()),
        }

    def restore(self, state: dict) -> None:
        """Go on from a saved state (the same spec: the same stages, budget and seed)."""
        for path in state["asked"]:
            self.asked.append(tuple(path))
            self.nodes |= self.nodes_of(tuple(path))
        self.spent_after = list(state["spent_after"])
        self.scores = {tuple(p): v for p, v in state["scores"]}
        self.rng.setstate(_tupled(state["rng"]))
        if self.method == "random":
            self.order = list(self.candidates())
            random.Random(self.seed).shuffle(self.order)

    def pending(self) -> list[Path_]:
        """Asked paths without a score yet (a resumed search runs them first)."""
        return [p for p in self.asked if p not in self.scores]


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tupled(value):
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def replay(search: OrderingSearch, score_of: Callable[[Path_], float]) -> OrderingSearch:
    """Run a search to its end on known scores (a simulation, or the benchmark's ground
    truth): propose, observe, until the budget is spent."""
    while (path := search.propose()) is not None:
        search.observe(path, score_of(path))
    return search


def rank_of(path: Path_, truth: dict[Path_, float], goal: str) -> int:
    """1 for the best of all orderings under `goal` (ties share the better rank)."""
    value = truth[path]
    better = [v for v in truth.values() if (v > value if goal == "max" else v < value)]
    return len(better) + 1


def best_rank(paths: Iterable[Path_], truth: dict[Path_, float], goal: str) -> int:
    return min(rank_of(p, truth, goal) for p in paths)
