"""The Retrain Equivalence paper's four findings, each a short report section: a table, the
spread across orderings against the seed standard deviation, and one plain sentence saying
whether it reproduces in this study (docs/formulas.md#study-analysis).

1. The forget score depends on the path (`analysis.forget_score`).
2. Utility degradation depends on the path; the paper saw math accuracy vary by more than 20
   points across paths (`analysis.utilities`; accuracy utilities are reported in points).
3. Where unlearning moves the probability mass, to paraphrases of the forgotten answer or to
   alternative answers, depends on the path (`mass_shift`, `analysis.probability_mass`).
4. The forget set is targeted: the model does not refuse the prompts it should answer, on any
   path, before unlearning (`analysis.over_refusal`).

Whether a score depends on the path is decided by the study's ordering test (platform/
ordering_test.py: the declared test at `analysis.alpha`, Holm-corrected within its family).
"""

from __future__ import annotations

from stageflow.platform.results.analysis import mean_pm_std, spread_over_seeds
from stageflow.platform.results.methods_report import score_unit
from stageflow.platform.results.tables import format_table, p_cell

OVER_REFUSAL = 0.1  # refusal rate on prompts to answer above which a path over-refuses


def path_dependence(analysis, score: str, unit: float = 1.0) -> str:
    """The table of a score by ordering and method, with each method's spread (times `unit`),
    seed std, effect size and test."""
    per_method = analysis.by_ordering(score)
    rows = []
    for method in analysis.methods:
        data = per_method.get(method, {})
        if not data:
            continue
        spread, seed_std, _ = spread_over_seeds(data)
        t = analysis.tests[score][method]
        rows.append(
            [method]
            + [mean_pm_std([v * unit for v in data.get(o, [])]) for o in analysis.orderings]
            + [spread * unit, seed_std * unit, t.eta2, p_cell(t.p_adjusted, t.p)]
        )
    headers = ["method", *analysis.orderings, "spread", "seed std", "eta2", "p (Holm)"]
    return format_table(headers, rows)


def pooled(analysis, score: str) -> list[float]:
    """Every value of a score, over methods, orderings and seeds."""
    return [v for per in analysis.by_ordering(score).values() for vs in per.values() for v in vs]


def findings(analysis) -> list[tuple[str, str]]:
    """(title, body) of each finding the study's analysis settings can speak to."""
    a = analysis.spec.analysis
    out = []
    if a.forget_score:
        table = path_dependence(analysis, "forget_score")
        what = f"the forget score (drop of {a.forget_score})"
        out.append(
            (
                "Finding 1: the forget score depends on the path",
                f"{table}\n\n{analysis.verdict('forget_score', what)}",
            )
        )
    for name, metric in a.utilities.items():
        points = score_unit(metric) != 1.0
        table = path_dependence(analysis, name, score_unit(metric))
        body = f"{table}\n\n{analysis.verdict(name, f'{name} ({metric})')}"
        if points:
            spreads = [
                spread_over_seeds(d)[0] * 100 for d in analysis.by_ordering(name).values() if d
            ]
            largest = max(spreads, default=float("nan"))
            body += (
                f" The largest spread is {largest:.1f} accuracy points (the paper saw more "
                f"than 20): {'as large' if largest > 20 else 'smaller'} here."
            )
        out.append((f"Finding 2: {name} after unlearning depends on the path", body))
    if a.probability_mass:
        table = path_dependence(analysis, "mass_shift")
        moves = [
            f"{kind} {mean_pm_std(pooled(analysis, f'mass:{kind}'))}"
            for kind in ("answer", "paraphrases", "alternatives")
        ]
        out.append(
            (
                "Finding 3: where the probability mass goes depends on the path",
                f"mass_shift = Δ log P(paraphrases) - Δ log P(alternatives) over the unlearning "
                f"stage (nats; > 0: the mass stays with paraphrases of the refusal, < 0: it "
                f"moves to the alternative answers). Change over all paths: {'; '.join(moves)}."
                f"\n\n{table}\n\n{analysis.verdict('mass_shift', 'mass_shift')}",
            )
        )
    if a.over_refusal:
        rows, worst = [], 0.0
        for ordering in analysis.orderings:
            cells = []
            for metric in a.over_refusal:
                values = analysis.path_values(metric).get(ordering, [])
                worst = max([worst, *values])
                cells.append(mean_pm_std(values))
            rows.append([ordering, *cells])
        table = format_table(["ordering", *a.over_refusal], rows)
        holds = worst <= OVER_REFUSAL
        sentence = (
            f"{'Reproduces' if holds else 'Does not reproduce'} here: the highest refusal rate "
            f"on prompts to answer, in any trial before unlearning, is {worst:.2f} "
            f"({'at most' if holds else 'above'} {OVER_REFUSAL:g})."
        )
        out.append(("Finding 4: no over-refusal before unlearning", f"{table}\n\n{sentence}"))
    return out
