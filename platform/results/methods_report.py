"""The report's comparison of unlearning methods: one row per method with its forget score and
utilities over all orderings, and whether the ordering changes each (the study's ordering test,
Holm-adjusted in its family), so that many methods can be read side by side."""

from __future__ import annotations

import math

from stageflow.platform.results.tables import format_table, p_cell


def score_unit(metric: str) -> float:
    """What a score's values are multiplied by in a table: accuracy differences in points."""
    return 100.0 if metric.endswith("accuracy") else 1.0


def over_orderings(per_ordering: dict[str, list[float]], unit: float) -> str:
    """'mean [lowest, highest]' of the orderings' means (each over seeds), times `unit`."""
    kept = [[v for v in values if not math.isnan(v)] for values in per_ordering.values()]
    means = [sum(values) / len(values) * unit for values in kept if values]
    if not means:
        return "n/a"
    return f"{sum(means) / len(means):.3g} [{min(means):.3g}, {max(means):.3g}]"


def methods_section(analysis) -> tuple[str, str] | None:
    """Per method: the forget score and each utility, the mean over orderings with the lowest
    and highest ordering, and the ordering test's p; None with fewer than two methods."""
    a = analysis.spec.analysis
    scores = {"forget_score": a.forget_score} if a.forget_score else {}
    scores.update(a.utilities)
    scores = {name: metric for name, metric in scores.items() if name in analysis.score_names}
    if len(analysis.methods) < 2 or not scores:
        return None
    tables = {name: analysis.by_ordering(name) for name in scores}
    rows = []
    for method in analysis.methods:
        row = [method]
        for name, metric in scores.items():
            test = analysis.tests[name].get(method)
            row += [
                over_orderings(tables[name].get(method, {}), score_unit(metric)),
                "n/a" if test is None else p_cell(test.p_adjusted, test.p),
            ]
        rows.append(row)
    headers = ["method"]
    for name in scores:
        headers += [name, "p (Holm)"]
    points = [name for name, metric in scores.items() if score_unit(metric) != 1.0]
    text = (
        f"Each score's mean over the {len(analysis.orderings)} orderings (each ordering's value "
        "its mean over seeds), with the lowest and highest ordering in brackets, and the "
        "ordering test's p (does the path change it?), Holm-adjusted in the score's family. "
        "The forget score is the drop of "
        f"{a.forget_score} over the unlearning stage (higher: more forgotten)"
        + (f"; {', '.join(points)} in accuracy points" if points else "")
        + "."
    )
    return "Methods compared", f"{text}\n\n{format_table(headers, rows)}"
