"""Path-dependence analysis: how much the outcome of unlearning depends on the ordering.

For every unlearning method and scored metric (forget score, utilities, forget quality;
docs/formulas.md#study-analysis): the value by ordering, its spread across orderings, the seed standard
deviation, the distance to the oracle (the retrain-equivalence gap), and the test of whether the
ordering changes it (platform/results/ordering_test.py: declared test, level and Holm families).
Every number is computed from trial records written by runs, and the report names the
MLflow runs it comes from.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from stageflow.core.config import StudySpec
from stageflow.core.expand import Trial, oracle_path
from stageflow.core.membership import reference_auc
from stageflow.core.registry import METRICS
from stageflow.core.study_dir import StudyDir
from stageflow.platform.results.ordering_test import OrderingTest, holm, ordering_test, verdict
from stageflow.platform.results.population import PopulationEstimate, estimate, mean_seed_sd
from stageflow.platform.results.tables import format_table

# lazy: scipy only for the KS forget quality


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
    seed_std = mean_seed_sd(per_ordering)
    ratio = spread / seed_std if seed_std and not math.isnan(seed_std) else float("nan")
    return spread, seed_std, ratio


def point_label(hparams: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(hparams.items())) or "default"


def privleak(auc: float, oracle_auc: float) -> float:
    """MUSE's privacy leakage, in percent: ((1 - AUC) - (1 - AUC_oracle)) / (1 - AUC_oracle)
    x 100; 0 where the attack sees the model as the oracle, -100 where it tells every forget
    row from the holdout (AUC 1); NaN when the oracle's AUC is 1."""
    base = 1 - oracle_auc
    return ((1 - auc) - base) / base * 100 if base > 0 else float("nan")


class Analysis:
    """Scores every (trial, method) pair of a finished study from its records."""

    def __init__(self, spec: StudySpec, study: StudyDir, records: list[tuple[Trial, dict]]):
        self.spec, self.study, self.cache = spec, study, study.cache()
        self.records = [(t, r) for t, r in records if not t.oracle]
        self.oracles = {(t.path, t.seed, point_label(t.hparams)): r for t, r in records if t.oracle}
        self.outcomes = [self._score(t, r, m) for t, r in self.records for m in t.unlearning]

    def _examples(self, entry: dict | None, eval_set: str) -> dict[str, list[float]]:
        """The per-example values of `eval_set`'s evaluation at a history entry of a trial."""
        key = (entry or {}).get("evals", {}).get(eval_set)
        found = self.cache.read_eval(key) if key else None
        return (found or {}).get("examples", {})

    def _truth_ratios(self, entry: dict | None, eval_set: str) -> list[float]:
        """The per-example truth ratios of `eval_set` at a history entry of a trial."""
        return self._examples(entry, eval_set).get(f"{eval_set}/truth_ratio", [])

    @cached_property
    def membership_metrics(self) -> list[str]:
        """'<set>/<metric>' of every membership-inference metric the study computes."""
        return [
            f"{name}/{metric}"
            for name, s in self.spec.evaluation.sets.items()
            for metric in s.metrics
            if METRICS[metric].membership
        ]

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
        if "model_utility" in after:
            out.scores["model_utility"] = after["model_utility"]
        for name in self.membership_metrics:  # each attack's AUC after unlearning
            if name in after:
                out.scores[name] = after[name]
        oracle = self.oracle_for(trial)
        for name, s in self.spec.evaluation.sets.items():  # the oracle as the reference
            if "mia_reference" in s.metrics and s.reference == "oracle" and oracle is not None:
                ours = self._examples(_branch(record, method), name)
                theirs = self._examples(oracle["history"][-1], name)
                if ours and theirs:
                    out.scores[f"{name}/mia_reference"] = reference_auc(ours, theirs, name)
        if a.probability_mass:
            out.scores.update(self._mass_moves(record, method))
        if oracle is not None:
            for metric in [a.forget_score, *a.utilities.values()]:
                if metric:
                    out.scores[f"gap:{metric}"] = abs(after[metric] - oracle["metrics"][metric])
            if a.forget_quality:
                from scipy.stats import ks_2samp

                ours = self._truth_ratios(_branch(record, method), a.forget_quality)
                theirs = self._truth_ratios(oracle["history"][-1], a.forget_quality)
                if ours and theirs:
                    out.scores["forget_quality"] = float(ks_2samp(ours, theirs).pvalue)
            if a.privleak and a.privleak in after and a.privleak in oracle["metrics"]:
                out.scores["privleak"] = privleak(after[a.privleak], oracle["metrics"][a.privleak])
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

    def by_block(self, score: str) -> dict[str, dict[str, dict[tuple, float]]]:
        """{method: {ordering: {(seed, grid point): value}}}: the trials of one seed and grid
        point are a block (they share that seed's prefixes)."""
        table: dict[str, dict[str, dict[tuple, float]]] = defaultdict(lambda: defaultdict(dict))
        for o in self.outcomes:
            if score in o.scores:
                block = (o.trial.seed, point_label(o.trial.hparams))
                table[o.method][o.trial.ordering][block] = o.scores[score]
        return table

    def family(self, score: str) -> str:
        """'primary', 'secondary' (the declared scores; each family Holm-corrected over its
        scores and methods) or 'descriptive' (derived scores: p unadjusted, no verdict)."""
        a = self.spec.analysis
        if score == a.primary_score:
            return "primary"
        return "secondary" if score in a.declared_scores else "descriptive"

    @cached_property
    def tests(self) -> dict[str, dict[str, OrderingTest]]:
        """{score: {method: its ordering test}}, Holm-adjusted within each family."""
        a = self.spec.analysis
        out = {
            score: {m: ordering_test(d, a.test) for m, d in self.by_block(score).items()}
            for score in self.score_names
        }
        for family in ("primary", "secondary"):
            members = [t for s, ts in out.items() if self.family(s) == family for t in ts.values()]
            holm(members, a.alpha)
        return out

    def verdict(self, score: str, what: str) -> str:
        """The sentence on whether the ordering changes `score` (over its family's tests)."""
        tests = self.tests.get(score, {})
        sentence = verdict(tests, what, self.spec.analysis.alpha)
        family = sum(
            len(ts) for s, ts in self.tests.items() if self.family(s) == self.family(score)
        )
        if family > len(tests):  # Holm ran over more scores than this one's methods
            sentence = sentence.replace(
                f"Holm-adjusted over {len(tests)} methods",
                f"Holm-adjusted over the {family} tests of the {self.family(score)} scores",
            )
        return sentence

    def summary(self) -> list[dict[str, Any]]:
        """Per score and method: the spread across orderings with its interval, the seed std,
        eta squared with its interval, the test's p (Holm-adjusted in its family), p_min."""
        rows = []
        for score in self.score_names:
            for method, per_ordering in self.by_ordering(score).items():
                spread, seed_std, ratio = spread_over_seeds(per_ordering)
                t = self.tests[score][method]
                rows.append(
                    {
                        "score": score,
                        "method": method,
                        "family": self.family(score),
                        "spread": spread,
                        "spread_ci": t.spread_ci,
                        "seed_std": seed_std,
                        "spread_over_seed_std": ratio,
                        "eta2": t.eta2,
                        "eta2_ci": t.eta2_ci,
                        "p": t.p,
                        "p_adjusted": t.p_adjusted,
                        "p_min": t.p_min,
                        "significant": t.significant(self.spec.analysis.alpha),
                        "test": t.test,
                        "orderings": len(per_ordering),
                    }
                )
        return rows

    def population(self) -> list[tuple[str, str, PopulationEstimate]]:
        """With `orderings.sample`: (score, method, its estimate over all k! orderings) for each
        analysis score, and for each metric at the path's end (method "path end")."""
        sample = self.spec.orderings.sample
        if sample is None:
            return []
        total = math.factorial(len(sample.stages))
        rows = [
            (score, method, estimate(per_ordering, total))
            for score in self.score_names
            for method, per_ordering in self.by_ordering(score).items()
        ]
        branch = tuple(f"{m}/" for m in self.methods)
        metrics = sorted({k for _, r in self.records for k in r["metrics"]})
        for metric in [m for m in metrics if not m.startswith(branch)]:
            rows.append((metric, "path end", estimate(self.path_values(metric), total)))
        return rows

    def ordering_values(self, score: str, branch: str) -> dict[str, list[float]]:
        """{ordering: [value per seed and grid point]} of `score`: an analysis score of the
        unlearning branch `branch` when it is one, else a metric at the path's end."""
        found = self.by_ordering(score).get(branch)
        return dict(found) if found else dict(self.path_values(score))

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


def search_scores(spec: StudySpec) -> list[str]:
    """The scores an ordering search may use: the analysis scores of an unlearning branch
    (with an oracle, the gaps to it) and every metric '<set>/<metric>' at the path's end."""
    a, sets = spec.analysis, spec.evaluation.sets
    names: list[str] = []
    if spec.unlearning:
        names += a.declared_scores
        if a.probability_mass:
            names += [f"mass:{k}" for k in ("answer", "paraphrases", "alternatives")]
        if spec.oracle:
            names += [f"gap:{m}" for m in [a.forget_score, *a.utilities.values()] if m]
    names += [f"{name}/{m}" for name, s in sets.items() for m in s.metrics]
    names += ["model_utility"] if spec.evaluation.model_utility else []
    return list(dict.fromkeys(names))
