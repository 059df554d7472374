"""Path-dependence analysis: how much the outcome of unlearning depends on the ordering.

For every unlearning method and scored metric (forget score, utilities, forget quality;
docs/formulas.md#study-analysis): the value by ordering, its spread across orderings, the seed standard
deviation, their ratio, and the distance to the oracle (the retrain-equivalence gap).
Every number is computed from trial records written by runs, and the report names the
MLflow runs it comes from.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from stageflow.platform.config import StudySpec
from stageflow.platform.expand import Trial, oracle_path
from stageflow.platform.report import format_table
from stageflow.platform.study_dir import StudyDir


@dataclass
class Outcome:
    """One (trial, unlearning method) pair's scores."""

    trial: Trial
    method: str
    run_id: str
    scores: dict[str, float] = field(default_factory=dict)


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def _std(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def mean_pm_std(values: list[float]) -> str:
    """ "mean ± seed std" of the values (the mean alone for one value)."""
    std = _std(values)
    return f"{_mean(values):.4g}" + ("" if math.isnan(std) else f" ± {std:.2g}")


def spread_over_seeds(per_ordering: dict[str, list[float]]) -> tuple[float, float, float]:
    """(spread of the per-ordering means, mean within-ordering seed std, their ratio)."""
    means = [_mean(v) for v in per_ordering.values()]
    spread = max(means) - min(means) if means else float("nan")
    seed_std = _mean([_std(v) for v in per_ordering.values()])
    ratio = spread / seed_std if seed_std and not math.isnan(seed_std) else float("nan")
    return spread, seed_std, ratio


def point_label(hparams: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(hparams.items())) or "default"


class Analysis:
    """Scores every (trial, method) pair of a finished study from its records."""

    def __init__(self, spec: StudySpec, study: StudyDir, records: list[tuple[Trial, dict]]):
        self.spec, self.cache = spec, study.cache()
        self.records = [(t, r) for t, r in records if not t.oracle]
        self.oracles = {(t.path, t.seed, point_label(t.hparams)): r for t, r in records if t.oracle}
        self.outcomes = [self._score(t, r, m) for t, r in self.records for m in t.unlearning]

    def _examples(self, key: str, name: str) -> list[float]:
        return (self.cache.read_eval(key) or {}).get("examples", {}).get(name, [])

    def oracle_for(self, trial: Trial) -> dict | None:
        path = oracle_path(self.spec, trial.path)
        return self.oracles.get((path, trial.seed, point_label(trial.hparams)))

    def _score(self, trial: Trial, record: dict, method: str) -> Outcome:
        a = self.spec.analysis
        before, final = record["metrics"], record["metrics"]
        after = {k[len(method) + 1 :]: v for k, v in final.items() if k.startswith(f"{method}/")}
        out = Outcome(trial, method, record.get("run_id", ""))
        if a.forget_score:
            out.scores["forget_score"] = before[a.forget_score] - after[a.forget_score]
        for name, metric in a.utilities.items():
            delta = after[metric] - before[metric]
            out.scores[name] = delta if metric.endswith("accuracy") else 1 - abs(delta)
        if a.probability_mass:
            out.scores.update(self._mass_moves(record, method))
        oracle = self.oracle_for(trial)
        if oracle is not None:
            for metric in [a.forget_score, *a.utilities.values()]:
                if metric:
                    out.scores[f"gap:{metric}"] = abs(after[metric] - oracle["metrics"][metric])
            if a.forget_quality:
                from scipy.stats import ks_2samp

                name = f"{a.forget_quality}/truth_ratio"
                branch = _branch(record, method)
                ours, theirs = (
                    self._examples(branch["key"], name),
                    self._examples(oracle["history"][-1]["key"], name),
                )
                if ours and theirs:
                    out.scores["forget_quality"] = float(ks_2samp(ours, theirs).pvalue)
        return out

    def _mass_moves(self, record: dict, method: str) -> dict[str, float]:
        """How the unlearning stage moved the forget set's probability mass (nats, end - start):
        `mass:<kind>` for the answer, its paraphrases and the alternatives, and `mass_shift` =
        Δ paraphrases - Δ alternatives (> 0: the mass left stays with paraphrases of the answer,
        < 0: it goes to the alternatives)."""
        branch = _branch(record, method)
        steps = self.cache.meta(branch["key"]).get("step_metrics", []) if branch else []
        if not steps or "mass_start/answer" not in steps[0]:
            return {}
        moves = {
            kind: steps[-1][f"mass/{kind}"] - steps[0][f"mass_start/{kind}"]
            for kind in ("answer", "paraphrases", "alternatives")
        }
        return {
            **{f"mass:{kind}": v for kind, v in moves.items()},
            "mass_shift": moves["paraphrases"] - moves["alternatives"],
        }

    @property
    def score_names(self) -> list[str]:
        names = {n for o in self.outcomes for n in o.scores}
        return sorted(names, key=lambda n: (n.startswith("gap:"), n))

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(o.method for o in self.outcomes))

    @property
    def orderings(self) -> list[str]:
        return list(dict.fromkeys(t.ordering for t, _ in self.records))

    def by_ordering(self, score: str) -> dict[str, dict[str, list[float]]]:
        """{method: {ordering: [value per seed and grid point]}}."""
        table: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for o in self.outcomes:
            if score in o.scores:
                table[o.method][o.trial.ordering].append(o.scores[score])
        return table

    def summary(self) -> list[dict[str, Any]]:
        """Per score and method: spread across orderings, seed std and their ratio."""
        rows = []
        for score in self.score_names:
            for method, per_ordering in self.by_ordering(score).items():
                spread, seed_std, ratio = spread_over_seeds(per_ordering)
                rows.append(
                    {
                        "score": score,
                        "method": method,
                        "spread": spread,
                        "seed_std": seed_std,
                        "spread_over_seed_std": ratio,
                        "orderings": len(per_ordering),
                    }
                )
        return rows

    def value_table(self, score: str) -> str:
        data = self.by_ordering(score)
        rows = []
        for ordering in self.orderings:
            cells = [mean_pm_std(data.get(method, {}).get(ordering, [])) for method in self.methods]
            rows.append([ordering, *cells])
        return format_table(["ordering", *self.methods], rows)

    def path_values(self, metric: str) -> dict[str, list[float]]:
        """{ordering: [value per seed and grid point]} of a metric at the path's end, before
        unlearning."""
        table: dict[str, list[float]] = defaultdict(list)
        for trial, record in self.records:
            if metric in record["metrics"]:
                table[trial.ordering].append(record["metrics"][metric])
        return table

    def runs_table(self) -> str:
        rows = [
            [t.ordering, t.seed, point_label(t.hparams), r.get("run_id", "")]
            for t, r in self.records
        ]
        rows += [
            [Trial(p, s, oracle=True).display, s, h, r.get("run_id", "")]
            for (p, s, h), r in self.oracles.items()
        ]
        return format_table(["trial", "seed", "hyper-parameters", "MLflow run id"], rows)

    def stage_curves(self, metric: str) -> dict[str, list[tuple[int, float]]]:
        """{ordering: [(stage index, mean over seeds)]} along each path (unlearning excluded)."""
        per: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for trial, record in self.records:
            for h in record["history"]:
                if not h.get("branch") and metric in h["metrics"]:
                    per[trial.ordering][h["index"]].append(h["metrics"][metric])
        return {o: sorted((i, _mean(v)) for i, v in steps.items()) for o, steps in per.items()}

    def unlearning_curves(self, method: str, metric: str = "loss") -> dict[str, list[float]]:
        """{ordering: per-step `metric` of the unlearning stage (first seed)}, from the prefix
        cache."""
        curves = {}
        for trial, record in self.records:
            branch = _branch(record, method)
            if branch and self.cache.is_done(branch["key"]) and trial.ordering not in curves:
                steps = self.cache.meta(branch["key"]).get("step_metrics", [])
                curves[trial.ordering] = [s.get(metric, float("nan")) for s in steps]
        return curves


def _branch(record: dict, method: str) -> dict | None:
    """The history entry of a trial's unlearning branch `method`."""
    return next((h for h in record["history"] if h.get("branch") and h["stage"] == method), None)
