"""The report of an ordering search (`orderings: {search: ...}`): the best and worst orderings
it found, its progress against the stage trainings it spent, and the prefix tree it explored."""

from __future__ import annotations

import math
from collections.abc import Callable

from stageflow.core.files import read_json
from stageflow.platform.results.analysis import mean_pm_std
from stageflow.platform.results.tables import format_table

SHOWN = 5  # orderings in the best and the worst tables


class SearchOutcome:
    """What a search asked for and what it found, from its log and the trial records."""

    def __init__(self, analysis):
        spec, study = analysis.spec, analysis.study
        self.search = spec.orderings.search
        state = read_json(study.search_log) or {"asked": [], "spent_after": [], "pruned": []}
        self.asked = [">".join(p) for p in state["asked"]]
        self.spent_after = dict(zip(self.asked, state["spent_after"]))
        self.pruned = {">".join(p) for p in state.get("pruned", [])}
        branch = self.search.branch or (spec.unlearning or [""])[0]
        self.values = analysis.ordering_values(self.search.score, branch)
        self.total = math.factorial(len(self.search.stages))

    def mean(self, ordering: str) -> float:
        found = [v for v in self.values.get(ordering, []) if not math.isnan(v)]
        return sum(found) / len(found) if found else float("nan")

    def ranked(self) -> list[str]:
        """The scored orderings, best first."""
        scored = [o for o in self.asked if not math.isnan(self.mean(o))]
        return sorted(scored, key=self.mean, reverse=self.search.goal == "max")

    def progress(self) -> list[tuple[int, float]]:
        """(trainings spent, best score so far) after each scored ordering, in asked order."""
        better: Callable[[float, float], bool] = (
            (lambda a, b: a > b) if self.search.goal == "max" else (lambda a, b: a < b)
        )
        best, out = float("nan"), []
        for ordering in self.asked:
            value = self.mean(ordering)
            if not math.isnan(value) and (math.isnan(best) or better(value, best)):
                best = value
            if not math.isnan(best):
                out.append((self.spent_after[ordering], best))
        return out


def search_parts(analysis, png: Callable) -> tuple[tuple[str, str] | None, list]:
    """With `orderings.search`: the report's section and figures (the outcome read once)."""
    if analysis.spec.orderings.search is None:
        return None, []
    out = SearchOutcome(analysis)
    return search_section(out), search_figures(out, png)


def search_section(out: SearchOutcome) -> tuple[str, str]:
    s = out.search
    ranked = out.ranked()
    spent = max(out.spent_after.values(), default=0)

    def rows(orderings: list[str]) -> list[list]:
        return [
            [o, mean_pm_std(out.values.get(o, [])), len(out.values.get(o, [])), out.spent_after[o]]
            for o in orderings
        ]

    header = ["ordering", f"{s.score} (mean ± seed std)", "values", "trainings spent when run"]
    text = (
        f"A {s.method} search (seed {s.seed}) for the {s.goal} of {s.score}: {len(out.asked)} of "
        f"the {out.total} orderings run for {spent} of a budget of {s.budget} stage trainings "
        f"(each prefix, unlearning branch and oracle prefix counted once per seed and grid "
        f"point, cached or not), {len(out.pruned)} stopped early because their prefix could "
        f"not win. core/ordering_search.py and docs/formulas.md#ordering-search say how it "
        f"chooses. The best found is the best of the orderings run, not of all {out.total}."
    )
    best = format_table(header, rows(ranked[:SHOWN]))
    worst = format_table(header, rows(ranked[::-1][:SHOWN]))
    body = f"{text}\n\nBest found:\n\n{best}\n\nWorst found:\n\n{worst}"
    return f"Ordering search: the {s.goal} of {s.score}", body


def search_figures(out: SearchOutcome, png: Callable) -> list[tuple[str, str, bytes]]:
    """The search's progress and its explored tree, as (name, caption, PNG bytes)."""
    return [
        (
            "search_progress",
            f"ordering search: best {out.search.score} found against stage trainings spent",
            png(lambda fig: _progress(fig, out)),
        ),
        (
            "search_tree",
            "ordering search: the prefix tree it explored (leaves coloured by score)",
            png(lambda fig: _tree(fig, out)),
        ),
    ]


def _progress(fig, out: SearchOutcome) -> None:
    ax = fig.add_subplot()
    points = [(out.spent_after[o], out.mean(o)) for o in out.asked if not math.isnan(out.mean(o))]
    if points:
        ax.scatter(*zip(*points), s=12, alpha=0.5, label="each ordering run")
    best = out.progress()
    if best:
        ax.step(*zip(*best), where="post", color="C3", label=f"best so far ({out.search.goal})")
    ax.axvline(out.search.budget, color="grey", linestyle="--", label="budget")
    ax.set(xlabel="stage trainings spent", ylabel=out.search.score)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def _tree(fig, out: SearchOutcome) -> None:
    """Leaves in lexicographic order along x, depth down y; a node sits over its leaves."""
    ax = fig.add_subplot()
    leaves = sorted(out.asked)
    xs: dict[tuple[str, ...], list[float]] = {}
    for i, ordering in enumerate(leaves):
        path = tuple(ordering.split(">"))
        for depth in range(1, len(path) + 1):
            xs.setdefault(path[:depth], []).append(i)
    position = {node: sum(v) / len(v) for node, v in xs.items()}
    for node, x in position.items():
        if len(node) > 1:
            parent = position[node[:-1]]
            ax.plot([parent, x], [-(len(node) - 1), -len(node)], color="grey", linewidth=0.6)
    roots = [x for node, x in position.items() if len(node) == 1]
    for node in [n for n in position if len(n) == 1]:
        ax.plot([sum(roots) / len(roots), position[node]], [0, -1], color="grey", linewidth=0.6)
        ax.annotate(node[0], (position[node], -1), fontsize=7, ha="left", va="bottom", rotation=35)
    values = [out.mean(o) for o in leaves]
    depth = len(out.search.stages)
    dots = ax.scatter(range(len(leaves)), [-depth] * len(leaves), c=values, cmap="viridis", s=30)
    for i, ordering in enumerate(leaves):
        if ordering in out.pruned:
            ax.annotate("stopped", (i, -depth), fontsize=6, rotation=90, va="top", ha="center")
    ax.set(xlabel="orderings run (lexicographic)", ylabel="depth (stages)")
    ax.set_yticks([-d for d in range(depth + 1)], [str(d) for d in range(depth + 1)])
    fig.colorbar(dots, ax=ax, label=out.search.score)
