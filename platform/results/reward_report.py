"""The report of an RL study's reward designs (`analysis.rewards`): per trial, the outcome and
shaping terms along its RL stage, the reward-hacking signature (their correlation over the last
half of the steps), and per design (the path's RL stage) their means over seeds, with the
declared test of whether the design changes the final outcome (docs/formulas.md#gated-rewards).

Read from the RL stage's per-step metrics in the prefix cache (`reward/<name>`, a gated
reward's ungated parts `reward/<gated>.<name>`), so a changed `analysis.rewards` needs no rerun.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence

from stageflow.platform.results.analysis import mean_pm_std
from stageflow.platform.results.ordering_test import ordering_test
from stageflow.platform.results.tables import format_table, p_cell


def term_value(step: dict[str, float], names: Sequence[str]) -> float:
    """The sum over `names` of a step's unweighted reward terms: "reward/<name>", or a gated
    reward's part "reward/<gated>.<name>" (ungated); 0 for a name the step does not log."""
    total = 0.0
    for name in names:
        keys = [k for k in step if k == f"reward/{name}" or k.endswith(f".{name}")]
        total += step[keys[0]] if keys else 0.0
    return total


def correlation(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson's r of two series (nan when either is constant or shorter than 3)."""
    if len(xs) < 3:
        return float("nan")
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def signature(steps: list[dict[str, float]], outcome: str, shaping: list[str]) -> dict:
    """One RL stage's curves and its hacking signature: outcome and shaping (sum of the shaping
    terms) per step; their last-quarter means; their correlation over the last half; the
    median RL samples per second of its steps."""
    out = [term_value(s, [outcome]) for s in steps]
    shape = [term_value(s, shaping) for s in steps]
    window, half = max(1, len(steps) // 4), len(steps) // 2
    speeds = [s["samples_per_s"] for s in steps if "samples_per_s" in s]
    return {
        "samples_per_s": statistics.median(speeds) if speeds else float("nan"),
        "outcome": out,
        "shaping": shape,
        "outcome_final": statistics.fmean(out[-window:]) if out else float("nan"),
        "shaping_final": statistics.fmean(shape[-window:]) if shape else float("nan"),
        "hacking_corr": correlation(out[half:], shape[half:]),
    }


class RewardDesigns:
    """Every trial's RL stage signature, by design (the name of the path's last RL stage)."""

    def __init__(self, analysis):
        spec = analysis.spec.analysis.rewards
        self.outcome, self.shaping = spec.outcome, list(spec.shaping)
        self.rows: list[dict] = []
        for trial, record in analysis.records:
            rl = [h for h in record["history"] if "rl/reward_final" in h.get("metrics", {})]
            if not rl or not analysis.cache.is_done(rl[-1]["key"]):
                continue
            steps = analysis.cache.meta(rl[-1]["key"]).get("step_metrics", [])
            row = signature(steps, self.outcome, self.shaping)
            row.update(design=rl[-1]["stage"], seed=trial.seed, metrics=record["metrics"])
            self.rows.append(row)

    def by_design(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = defaultdict(list)
        for row in self.rows:
            out[row["design"]].append(row)
        return out

    def curves(self, key: str) -> dict[str, list[tuple[int, float]]]:
        """{design: [(step, mean over seeds of `key`'s series)]}."""
        out = {}
        for design, rows in self.by_design().items():
            length = min(len(r[key]) for r in rows)
            out[design] = [(i, statistics.fmean(r[key][i] for r in rows)) for i in range(length)]
        return out


def reward_parts(
    analysis, png: Callable, lines: Callable
) -> tuple[tuple[str, str] | None, list[tuple[str, str, bytes]]]:
    """With `analysis.rewards`: the report's section and figures (the RL stages read once)."""
    if analysis.spec.analysis.rewards is None:
        return None, []
    designs = RewardDesigns(analysis)
    if not designs.rows:
        return None, []
    return reward_section(analysis, designs), reward_figures(designs, png, lines)


def reward_section(analysis, designs: RewardDesigns) -> tuple[str, str]:
    """Per design: the final outcome and shaping terms, the hacking correlation and each
    metric at the path's end, mean ± seed std; the declared test of the design's effect on
    each metric at the path's end (blocked by seed)."""
    groups = designs.by_design()
    metrics = sorted(
        {
            k
            for r in designs.rows
            for k in r["metrics"]
            if "/" in k and not k.startswith(("rl/", "time/"))
        }
    )
    header = ["design", "seeds", f"{designs.outcome} (last quarter)", "shaping (last quarter)",
              "hacking corr (last half)", *metrics, "RL samples/s (median)"]  # fmt: skip
    rows = []
    for design, members in groups.items():
        rows.append([
            design, len(members),
            mean_pm_std([r["outcome_final"] for r in members]),
            mean_pm_std([r["shaping_final"] for r in members]),
            mean_pm_std([r["hacking_corr"] for r in members]),
            *[mean_pm_std([r["metrics"].get(m, float("nan")) for r in members]) for m in metrics],
            f"{statistics.median(r['samples_per_s'] for r in members):.1f}",
        ])  # fmt: skip
    test_rows = []
    for metric in metrics:
        data = {d: {r["seed"]: r["metrics"][metric] for r in ms if metric in r["metrics"]}
                for d, ms in groups.items()}  # fmt: skip
        t = ordering_test(data, analysis.spec.analysis.test)
        test_rows.append([metric, t.test, p_cell(t.p, t.p), f"{t.p_min:.3g}", f"{t.eta2:.3g}"])
    text = (
        f"The factor is the reward design (the path's RL stage). Outcome: `{designs.outcome}`; "
        f"shaping: {', '.join(f'`{s}`' for s in designs.shaping)} (unweighted, ungated values "
        f"per step). Reward hacking shows as shaping rising while the outcome falls: a negative "
        f"correlation of the two over the last half of the steps. Test: "
        f"{analysis.spec.analysis.test}, blocked by seed, at alpha = "
        f"{analysis.spec.analysis.alpha:g} per metric (no correction across metrics)."
    )
    tests = format_table(["metric", "test", "p", "smallest p", "eta2"], test_rows)
    body = f"{text}\n\n{format_table(header, rows)}\n\n{tests}"
    return "Reward designs: outcome, shaping and hacking", body


def reward_figures(
    designs: RewardDesigns, png: Callable, lines: Callable
) -> list[tuple[str, str, bytes]]:
    """Per-step outcome and shaping terms by design (mean over seeds)."""
    return [
        (
            f"rewards_{key}",
            f"{label} per RL step, by reward design (mean over seeds)",
            png(lines(designs.curves(key), label, "RL step", label)),
        )
        for key, label in (
            ("outcome", f"outcome ({designs.outcome})"),
            ("shaping", f"shaping ({', '.join(designs.shaping)})"),
        )
    ]
