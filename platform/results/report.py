"""The study report: report.md and report.html with the findings, the ordering test and figures,
and the tables the CLI prints."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from stageflow.core.config import StudySpec
from stageflow.core.expand import Trial
from stageflow.core.files import read_json
from stageflow.core.study_dir import StudyDir
from stageflow.platform.results.analysis import Analysis, mean_pm_std
from stageflow.platform.results.findings import findings
from stageflow.platform.results.methods_report import methods_section
from stageflow.platform.results.reward_report import reward_parts
from stageflow.platform.results.search_report import search_parts
from stageflow.platform.results.tables import clock, format_table, interval, p_cell

# lazy: matplotlib only where figures are drawn


def summary_table(summary: list[dict]) -> str:
    """Per score and method: effect sizes with their 95% bootstrap intervals and the test."""
    return format_table(
        [
            "score",
            "method",
            "family",
            "spread [95% CI]",
            "seed std",
            "eta2 [95% CI]",
            "p (Holm)",
            "smallest p",
            "significant",
        ],
        [
            [
                r["score"],
                r["method"],
                r["family"],
                interval(r["spread"], r["spread_ci"]),
                r["seed_std"],
                interval(r["eta2"], r["eta2_ci"]),
                p_cell(r["p_adjusted"], r["p"]),
                f"{r['p_min']:.3g}",
                "yes" if r["significant"] else "no",
            ]
            for r in summary
        ],
    )


def ordering_section(analysis) -> tuple[str, str]:
    """The study's answer first: the primary score's verdict, the test, then every score."""
    a = analysis.spec.analysis
    summary = analysis.summary()
    lines = []
    if a.primary_score:
        lines.append(
            f"**Primary score, {a.primary_score}:** {analysis.verdict(a.primary_score, a.primary_score)}"
        )
    tests = {r["test"].split(" (")[0] for r in summary if r["p"] is not None}
    lines.append(
        f"Test: {', '.join(sorted(tests)) or a.test} at alpha = {a.alpha:g}; the primary score's "
        f"methods form one Holm family, the other declared scores a second; derived scores "
        f"(gap:*, mass:*) are descriptive (unadjusted p, no verdict). Intervals: 95% percentile "
        f"bootstrap over seeds. docs/ordering_test.md says how to read this."
    )
    return "Does the ordering change the outcome?", "\n\n".join([*lines, summary_table(summary)])


def population_section(analysis) -> tuple[str, str] | None:
    """With `orderings.sample`: each score over all orderings, estimated from the sample."""
    rows = analysis.population()
    if not rows:
        return None
    first = rows[0][2]
    level = f"{first.level:.0%}"

    def interval(value: float, ci: tuple[float, float]) -> str:
        return f"{value:.4g} [{ci[0]:.4g}, {ci[1]:.4g}]"

    table = format_table(
        ["score", "method", "orderings", f"mean [{level}]", f"sd over orderings [{level}]",
         "seed sd"],
        [
            [score, method, f"{e.n} of {e.total}", interval(e.mean, e.mean_ci),
             interval(e.sd, e.sd_ci), f"{e.seed_sd:.2g}"]
            for score, method, e in rows
        ],
    )  # fmt: skip
    text = (
        f"{first.n} of the {first.total} orderings were drawn uniformly without replacement; "
        f"each ordering's value is its mean over seeds. The mean over all orderings has a t "
        f"interval and the standard deviation across them (how much the ordering matters) "
        f"Bonett's interval, both with the finite-population correction "
        f"(docs/formulas.md#sampled-orderings). A sample's range does not estimate the range "
        f"of all orderings. 'seed sd' is the spread of one ordering's value over seeds."
    )
    return f"All {first.total} orderings, estimated from {first.n}", f"{text}\n\n{table}"


UNLEARNING_SCORES = ("forget_quality", "privleak", "model_utility")


def unlearning_scores(analysis) -> list[str]:
    """The unlearning evaluation's scores the study has: forget quality, privacy leakage,
    model utility and the membership attacks' AUCs after unlearning."""
    wanted = [*UNLEARNING_SCORES, *analysis.membership_metrics]
    return [s for s in wanted if s in analysis.score_names]


def unlearning_section(analysis) -> tuple[str, str] | None:
    """Per (ordering, method): each unlearning-evaluation score, mean ± seed std; then per
    method and score the ordering test's p (Holm-adjusted where the score is declared)."""
    scores = unlearning_scores(analysis)
    if not scores:
        return None
    tables = {score: analysis.by_ordering(score) for score in scores}
    rows = [
        [
            ordering,
            method,
            *[mean_pm_std(tables[s].get(method, {}).get(ordering, [])) for s in scores],
        ]
        for method in analysis.methods
        for ordering in analysis.orderings
    ]
    tests = [
        [method, *[_test_p(analysis.tests.get(s, {}).get(method)) for s in scores]]
        for method in analysis.methods
    ]
    text = format_table(["ordering", "method", *scores], rows)
    text += "\n\nDoes the path change them? The ordering test's p per method:\n\n"
    return "Unlearning evaluation", text + format_table(["method", *scores], tests)


def _test_p(test) -> str:
    return "n/a" if test is None else p_cell(test.p_adjusted, test.p)


def _tradeoff(analysis):
    """Forget quality against model utility after unlearning: a point per trial and method,
    a marker per method, a colour per ordering."""
    points = [
        (o.trial.ordering, o.method, o.scores["model_utility"], o.scores["forget_quality"])
        for o in analysis.outcomes
        if "model_utility" in o.scores and "forget_quality" in o.scores
    ]

    def draw(fig):
        ax = fig.add_subplot()
        colours = {o: f"C{i % 10}" for i, o in enumerate(analysis.orderings)}
        markers = dict(zip(analysis.methods, "os^Dv<>pPX*h"))
        for ordering, method, utility, quality in points:
            ax.scatter(
                utility, max(quality, 1e-300), c=colours[ordering], marker=markers.get(method, "o")
            )
        for ordering, colour in colours.items():
            ax.scatter([], [], c=colour, label=ordering)
        for method, marker in markers.items():
            ax.scatter([], [], c="gray", marker=marker, label=method)
        ax.set(xlabel="model utility", ylabel="forget quality (KS p-value)", yscale="log")
        ax.set_title("Forget quality against model utility after unlearning")
        ax.legend(fontsize=6, ncol=2)
        ax.grid(alpha=0.3)

    return draw if points else None


def trials_table(results: list[tuple[object, dict[str, float]]]) -> str:
    """One row per trial and model: the path's end, then each unlearning branch after it."""
    metrics = sorted({k for _, final in results for k in final if k.count("/") == 1})
    rows = []
    for trial, final in results:
        branches = [""] + list(getattr(trial, "unlearning", ()))
        for branch in branches:
            prefix = f"{branch}/" if branch else ""
            label = trial.display
            rows.append(
                [
                    label,
                    trial.seed,
                    f"+{branch}" if branch else "",
                    *(final.get(prefix + m, float("nan")) for m in metrics),
                ]
            )
    return format_table(["ordering", "seed", "unlearning", *metrics], rows)


def _figure_png(draw, height: float = 4.2) -> bytes:
    """Render a matplotlib figure drawn by `draw(fig)` to PNG bytes (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(7, height), dpi=110)
    draw(fig)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _heatmap(analysis, score: str):
    """A method per row, an ordering per column, each cell the mean over seeds; the colour runs
    over each method's own range (lowest ordering to highest), so that the pattern across
    orderings shows for every method whatever the others' scale."""
    data = analysis.by_ordering(score)
    grid = np.array(
        [
            [
                sum(v) / len(v) if (v := data.get(m, {}).get(o)) else np.nan
                for o in analysis.orderings
            ]
            for m in analysis.methods
        ]
    )
    low = np.fmin.reduce(grid, axis=1, keepdims=True)  # fmin/fmax skip NaN cells
    span = np.fmax.reduce(grid, axis=1, keepdims=True) - low
    shade = np.divide(grid - low, span, out=np.full_like(grid, 0.5), where=span > 0)

    def draw(fig):
        ax = fig.add_subplot()
        ax.imshow(shade, cmap="viridis", aspect="auto", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(len(analysis.orderings)), analysis.orderings, fontsize=7)
        ax.tick_params(axis="x", labelrotation=15)
        ax.set_yticks(range(len(analysis.methods)), analysis.methods)
        for (i, j), value in np.ndenumerate(grid):
            colour = "black" if shade[i, j] > 0.6 else "white"
            ax.text(j, i, f"{value:.3g}", ha="center", va="center", color=colour, fontsize=8)
        ax.set_title(
            f"{score} by method × ordering (mean over seeds)\n"
            "colour: each method's lowest (dark) to highest (light) ordering",
            fontsize=9,
        )

    return draw


def _lines(curves: dict[str, list], title: str, xlabel: str, ylabel: str):
    def draw(fig):
        ax = fig.add_subplot()
        for label, points in curves.items():
            xs, ys = (
                zip(*points)
                if points and isinstance(points[0], tuple)
                else (range(len(points)), points)
            )
            ax.plot(list(xs), list(ys), marker="o", markersize=3, label=label)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)

    return draw


def study_report(analysis, out_dir: Path) -> dict[str, Path]:
    """Write report.md, report.html and figures/*.png for a study; returns the written files."""
    figures_dir = out_dir / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    a = analysis.spec.analysis
    figures: list[tuple[str, str, bytes]] = []
    for score in [s for s in analysis.score_names if not s.startswith("gap:")]:
        figures.append(
            (
                f"heatmap_{score.replace(':', '_').replace('/', '_')}",
                f"{score}: method × ordering",
                _figure_png(
                    _heatmap(analysis, score), height=max(2.6, 1.4 + 0.34 * len(analysis.methods))
                ),
            )
        )
    for metric in [m for m in [a.forget_score, *a.utilities.values()] if m]:
        curves = analysis.stage_curves(metric)
        figures.append(
            (
                f"stages_{metric.replace('/', '_')}",
                f"{metric} after each stage, by ordering",
                _figure_png(_lines(curves, metric, "stage index", metric)),
            )
        )
    for method in analysis.methods:
        curves = analysis.unlearning_curves(method)
        if curves:
            figures.append(
                (
                    f"unlearning_{method}",
                    f"{method}: loss per unlearning step, by ordering",
                    _figure_png(_lines(curves, f"{method} unlearning", "step", "loss")),
                )
            )
        if a.probability_mass:
            para = analysis.unlearning_curves(method, "mass/paraphrases")
            alt = analysis.unlearning_curves(method, "mass/alternatives")
            ratio = {o: [p - q for p, q in zip(para[o], alt.get(o, []))] for o in para}
            label = "log P(paraphrases) - log P(alternatives)"
            figures.append(
                (
                    f"mass_{method}",
                    f"{method}: where the forget set's probability mass goes, per unlearning step",
                    _figure_png(_lines(ratio, f"{method}: {label}", "step", "nats")),
                )
            )

    search, search_pngs = search_parts(analysis, _figure_png)
    rewards, reward_pngs = reward_parts(analysis, _figure_png, _lines)
    figures += search_pngs + reward_pngs
    tradeoff = _tradeoff(analysis)
    if tradeoff is not None:
        caption = "forget quality against model utility, by method and ordering"
        figures.append(("tradeoff_forget_quality_utility", caption, _figure_png(tradeoff)))

    sections = [ordering_section(analysis), *findings(analysis)]
    for extra in (search, rewards, population_section(analysis)):
        if extra:
            sections.insert(1, extra)
    for part in (methods_section(analysis), unlearning_section(analysis)):
        if part:
            sections.append(part)
    sections += [
        (f"{score} by ordering (mean ± seed std)", analysis.value_table(score))
        for score in analysis.score_names
    ]
    sections.append(("Runs these numbers come from", analysis.runs_table()))
    sections.append(("How this study ran", how_it_ran(analysis.study)))

    md = [f"# Study report: {analysis.spec.name}", ""]
    for title, table in sections:
        md += [f"## {title}", "", table, ""]
    md += ["## Figures", ""] + [
        f"![{caption}](figures/{name}.png)\n\n*{caption}*\n" for name, caption, _ in figures
    ]
    written = {"report.md": out_dir / "report.md", "report.html": out_dir / "report.html"}
    written["report.md"].write_text("\n".join(md))

    body = [f"<h1>Study report: {html.escape(analysis.spec.name)}</h1>"]
    for title, table in sections:
        body.append(f"<h2>{html.escape(title)}</h2><pre>{html.escape(table)}</pre>")
    for name, caption, png in figures:
        (figures_dir / f"{name}.png").write_bytes(png)
        written[f"figures/{name}.png"] = figures_dir / f"{name}.png"
        data = base64.b64encode(png).decode()
        body.append(
            f"<figure><img src='data:image/png;base64,{data}'><figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    written["report.html"].write_text(
        "<!doctype html><meta charset='utf-8'><title>stageflow report</title>" + "".join(body)
    )
    return written


def how_it_ran(study) -> str:
    """The driver's time breakdown of the last run and the provenance of its numbers."""
    timing, made = read_json(study.timing) or {}, read_json(study.provenance) or {}
    lines = []
    if timing:
        phases = ", ".join(
            f"{name[5:-2].replace('_', ' ')} {clock(v)}"
            for name, v in timing.items()
            if name not in ("time/wall_s", "time/other_s")
        )
        until = "" if "time/shutdown_s" in timing else ", until this report"
        wall = clock(timing["time/wall_s"])
        lines.append(f"Wall time of the last run{until}: {wall} ({phases}).")
    if made:
        git = made.get("git") or {}
        commit = git.get("commit", "unknown")[:10] + (
            " with local changes" if git.get("modified") else ""
        )
        libraries = ", ".join(f"{k} {v}" for k, v in sorted(made.get("libraries", {}).items()))
        lines.append(
            f"stageflow {made.get('stageflow')} (commit {commit}, code version {made.get('code_version')}); "
            f"Python {made.get('python')}; {libraries}; CPU: {made.get('cpu')}, {made.get('cpu_threads')} "
            f"threads, {made.get('threads_per_actor') or 'default'} per actor."
        )
    return "\n\n".join(lines) or "No timing or provenance recorded (a study run before they were)."


def study_description(analysis, results: list, files: dict[str, Path]) -> str:
    """The study run's description in MLflow: the ordering test's answer and table (the
    per-ordering table when the study unlearns nothing) and where the report and figures are
    among its artifacts."""
    if analysis.summary():
        title, body = ordering_section(analysis)
    else:
        title, body = "Final metrics by trial", trials_table(results)
    figures = [f"- report/{name}" for name in files if name.startswith("figures/")]
    lines = [f"**{title}** ({len(results)} trials)", "", body, ""]
    lines += ["Report: report/report.md and report/report.html (artifacts of this run)."]
    return "\n".join(lines + (["", "Figures:", *figures] if figures else []))


def read_results(
    study: StudyDir, trials: list[Trial], current: dict[str, str] | None
) -> list[tuple[Trial, dict[str, float]]]:
    """(trial, final metrics) of the trials whose record their current plan made (every
    record when `current` is None)."""
    return [(trial, record["metrics"]) for trial, record in study.records(trials, current)]


def write_analysis(
    spec: StudySpec, study: StudyDir, trials: list[Trial], current: dict[str, str] | None
) -> tuple[Analysis, dict[str, Path]]:
    """The path-dependence analysis and its report files under `<study dir>/report`."""
    analysis = Analysis(spec, study, study.records(trials, current))
    return analysis, study_report(analysis, study.report)
