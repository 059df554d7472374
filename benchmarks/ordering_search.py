"""Ordering search against uniform random sampling, on a five-stage study run exhaustively.

Command (repo root, the venv active):

    python benchmarks/ordering_search.py             # about 25 min on 2 CPU cores
    python benchmarks/ordering_search.py --quick     # 2 search seeds (about 8 min)

Steps, in one process and one embedded Ray:
1. the ground truth: studies/ordering_search.yaml (5 stages, every one of the 120 orderings,
   gradient ascent after each) run exhaustively; each ordering's forget score from the analysis;
2. the searches: for `goal: max` and `goal: min`, search seeds 0..N-1, `method: bayes` and the
   baseline `method: random`, each run as a study (`orderings.search`, Ray Tune's searcher) on
   the same study directory with a budget of 25% of the exhaustive study's stage trainings
   (prefixes and unlearning branches, counted whether cached or not): every training they ask
   for is a cache hit (checked: the prefix cache holds as many checkpoints after as before).
   Each search is also replayed offline on the ground truth (core/ordering_search.py `replay`),
   which must choose the same orderings;
3. `orderings.sample` with n = 24 for seeds 0..N-1: whether the standard deviation of all 120
   orderings lies inside the sample's 90% interval (Bonett's, finite-population corrected).

Writes benchmarks/results/ordering_search.{json,md} and ordering_search_progress.png (the rank of
the best ordering found against stage trainings spent, median over search seeds).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "studies" / "ordering_search.yaml"
RESULTS = ROOT / "benchmarks" / "results"
SCORE, BRANCH = "forget_score", "ga"
BUDGET_SHARE = 0.25
SAMPLE_N = 24


def load(overrides: list[str]):
    from stageflow.platform.commands.validate import load_and_validate

    return load_and_validate(STUDY, overrides)


def quietly(fn, *args, **kwargs):
    """Run `fn`, its progress lines kept from the terminal."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def ground_truth(storage: Path, tracking: str) -> tuple[dict[tuple, float], float]:
    from stageflow.core.expand import expand
    from stageflow.core.study_dir import StudyDir
    from stageflow.platform.engine.runner import run_study
    from stageflow.platform.results.analysis import Analysis

    spec = load([f"storage_dir={storage}", f"tracking.uri={tracking}"])
    start = time.perf_counter()
    quietly(run_study, spec, str(STUDY))
    wall = time.perf_counter() - start
    study = StudyDir(storage)
    analysis = Analysis(spec, study, study.records(expand(spec), None))
    values = analysis.ordering_values(SCORE, BRANCH)
    truth = {tuple(o.split(">")): statistics.fmean(v) for o, v in values.items()}
    assert len(truth) == 120, f"the exhaustive study scored {len(truth)} orderings, not 120"
    return truth, wall


def run_search(storage: Path, tracking: str, goal: str, method: str, seed: int, budget: int):
    from stageflow.platform.engine.runner import run_study

    stages = "[mixture, inst, facts, math, refusal]"
    search = f"{{stages: {stages}, score: {SCORE}, goal: {goal}, budget: {budget}, method: {method}, seed: {seed}}}"
    spec = load(
        [
            f"storage_dir={storage}",
            f"tracking.uri={tracking}",
            "orderings.permutations=null",
            f"orderings.search={search}",
        ]
    )
    start = time.perf_counter()
    quietly(run_study, spec, str(STUDY))
    wall = time.perf_counter() - start
    return json.loads((storage / "search.json").read_text()), wall, spec


def offline(spec, truth: dict) -> list[tuple]:
    from stageflow.core.ordering_search import replay
    from stageflow.platform.engine.search import new_search

    return replay(new_search(spec), truth.__getitem__).asked


def best_rank_curve(state: dict, truth: dict, goal: str, budget: int) -> list[int]:
    """The rank (1 = best of all 120) of the best ordering found after 0..budget trainings."""
    from stageflow.core.ordering_search import rank_of

    curve, best, asked = [], None, list(zip(state["asked"], state["spent_after"]))
    for spent in range(budget + 1):
        while asked and asked[0][1] <= spent:
            path, _ = asked.pop(0)
            rank = rank_of(tuple(path), truth, goal)
            best = rank if best is None else min(best, rank)
        curve.append(best if best is not None else len(truth))
    return curve


def sample_coverage(truth: dict, seeds: int) -> list[dict]:
    from stageflow.core.config import SampleSpec
    from stageflow.core.expand import sampled_orderings
    from stageflow.platform.results.population import estimate

    stages = ["mixture", "inst", "facts", "math", "refusal"]
    true_sd = statistics.stdev(truth.values())
    rows = []
    for seed in range(seeds):
        drawn = sampled_orderings(SampleSpec(stages, SAMPLE_N, seed))
        e = estimate({">".join(p): [truth[p]] for p in drawn}, len(truth))
        rows.append(
            {
                "seed": seed,
                "sd": e.sd,
                "sd_ci": list(e.sd_ci),
                "true_sd": true_sd,
                "covered": e.sd_ci[0] <= true_sd <= e.sd_ci[1],
            }
        )
    return rows


def progress_figure(curves: dict, budget: int, exhaustive: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110, sharey=True)
    for ax, goal in zip(axes, ("max", "min")):
        for method, style in (("bayes", "C3"), ("random", "C0")):
            runs = curves[goal][method]
            median = [statistics.median(c[x] for c in runs) for x in range(budget + 1)]
            low = [min(c[x] for c in runs) for x in range(budget + 1)]
            high = [max(c[x] for c in runs) for x in range(budget + 1)]
            ax.step(
                range(budget + 1), median, where="post", color=style, label=f"{method} (median)"
            )
            ax.fill_between(range(budget + 1), low, high, step="post", color=style, alpha=0.15)
        ax.axhline(6, color="grey", linestyle=":", label="top 5% (rank 6)")
        ax.set(
            title=f"goal: {goal} of the forget score",
            xlabel=f"stage trainings spent (exhaustive: {exhaustive})",
            yscale="log",
        )
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("rank of the best ordering found (1 = best of 120)")
    axes[0].legend(fontsize=7)
    fig.suptitle("Ordering search vs random sampling (band: min to max over search seeds)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="search seeds per goal and method")
    parser.add_argument("--quick", action="store_true", help="2 search seeds")
    args = parser.parse_args()
    if args.quick:
        args.seeds = 2
    from stageflow.core.ordering_search import exhaustive_trainings, rank_of
    from stageflow.core.prefix_cache import PrefixCache
    from stageflow.platform.engine.runner import init_ray

    work = Path(tempfile.mkdtemp(prefix="ordering-search-"))
    storage, tracking = work / "study", f"sqlite:///{work / 'mlflow.db'}"
    init_ray(load([f"storage_dir={storage}"]))
    truth, exhaustive_wall = ground_truth(storage, tracking)
    trainings = exhaustive_trainings(["mixture", "inst", "facts", "math", "refusal"], 1, 1)
    checkpoints = len(PrefixCache(storage / "prefixes").trained())
    budget = int(trainings * BUDGET_SHARE)
    print(f"ground truth: {len(truth)} orderings, {checkpoints} trainings, {exhaustive_wall:.0f} s")

    rows, curves = [], {"max": {"bayes": [], "random": []}, "min": {"bayes": [], "random": []}}
    for goal in ("max", "min"):
        for seed in range(args.seeds):
            for method in ("bayes", "random"):
                state, wall, spec = run_search(storage, tracking, goal, method, seed, budget)
                asked = [tuple(p) for p in state["asked"]]
                ranks = [rank_of(p, truth, goal) for p in asked]
                row = {
                    "goal": goal,
                    "method": method,
                    "seed": seed,
                    "orderings": len(asked),
                    "spent": state["spent_after"][-1],
                    "best_rank": min(ranks),
                    "best": ">".join(asked[ranks.index(min(ranks))]),
                    "same_as_offline": asked == offline(spec, truth),
                    "wall_s": round(wall, 1),
                }
                rows.append(row)
                curves[goal][method].append(best_rank_curve(state, truth, goal, budget))
                print(json.dumps(row), flush=True)
    cache_hits = len(PrefixCache(storage / "prefixes").trained()) == checkpoints
    coverage = sample_coverage(truth, args.seeds)

    summary = {}
    for goal in ("max", "min"):
        found = {
            m: [r for r in rows if r["goal"] == goal and r["method"] == m] for m in curves[goal]
        }
        pairs = list(zip(found["bayes"], found["random"]))
        summary[goal] = {
            "search_better_than_random": sum(b["best_rank"] < r["best_rank"] for b, r in pairs),
            "search_as_good_as_random": sum(b["best_rank"] <= r["best_rank"] for b, r in pairs),
            "search_in_top_5pct": sum(b["best_rank"] <= 6 for b in found["bayes"]),
            "random_in_top_5pct": sum(r["best_rank"] <= 6 for r in found["random"]),
            "search_median_rank": statistics.median(b["best_rank"] for b in found["bayes"]),
            "random_median_rank": statistics.median(r["best_rank"] for r in found["random"]),
            "search_mean_orderings": statistics.fmean(b["orderings"] for b in found["bayes"]),
            "random_mean_orderings": statistics.fmean(r["orderings"] for r in found["random"]),
        }
    ranked = sorted(truth, key=truth.get)
    meta = {
        "command": "python benchmarks/ordering_search.py"
        + (f" --seeds {args.seeds}" if args.seeds != 10 else ""),
        "seeds": args.seeds,
        "exhaustive_trainings": trainings,
        "exhaustive_checkpoints": checkpoints,
        "exhaustive_wall_s": round(exhaustive_wall, 1),
        "budget": budget,
        "every_search_training_a_cache_hit": cache_hits,
        "all_same_as_offline": all(r["same_as_offline"] for r in rows),
        "truth_sd": statistics.stdev(truth.values()),
        "truth_mean": statistics.fmean(truth.values()),
        "truth_max": [">".join(ranked[-1]), truth[ranked[-1]]],
        "truth_min": [">".join(ranked[0]), truth[ranked[0]]],
        "sample_n": SAMPLE_N,
        "sample_covered": sum(c["covered"] for c in coverage),
    }
    RESULTS.mkdir(exist_ok=True)
    out = {"meta": meta, "summary": summary, "searches": rows, "sample": coverage}
    (RESULTS / "ordering_search.json").write_text(json.dumps(out, indent=1) + "\n")
    progress_figure(curves, budget, trainings, RESULTS / "ordering_search_progress.png")
    (RESULTS / "ordering_search.md").write_text(markdown(meta, summary, rows, coverage))
    print(markdown(meta, summary, rows, coverage))
    sys.exit(0)


def markdown(meta: dict, summary: dict, rows: list[dict], coverage: list[dict]) -> str:
    n = meta["seeds"]
    lines = [
        "# Ordering search vs random sampling",
        "",
        f"`{meta['command']}`",
        "",
        f"Ground truth: studies/ordering_search.yaml run exhaustively, 120 orderings of 5 stages "
        f"and a gradient-ascent branch after each: {meta['exhaustive_trainings']} stage trainings "
        f"({meta['exhaustive_checkpoints']} checkpoints), {meta['exhaustive_wall_s']:.0f} s. "
        f"Forget score over the 120: mean {meta['truth_mean']:.3f}, sd {meta['truth_sd']:.3f}; "
        f"max {meta['truth_max'][1]:.3f} ({meta['truth_max'][0]}), min "
        f"{meta['truth_min'][1]:.3f} ({meta['truth_min'][0]}). Budget of each search: "
        f"{meta['budget']} trainings (25%). Every search ran as a study through Ray Tune on the "
        f"same study directory; every training it asked for was a cache hit: "
        f"{'yes' if meta['every_search_training_a_cache_hit'] else 'NO'}; each chose the same "
        f"orderings as its offline replay: {'yes' if meta['all_same_as_offline'] else 'NO'}.",
        "",
        "| goal | search better than random (paired seeds) | as good or better | search in top 5% | random in top 5% | median rank search / random | orderings run search / random |",
        "|---|---|---|---|---|---|---|",
    ]
    for goal, s in summary.items():
        lines.append(
            f"| {goal} | {s['search_better_than_random']} of {n} | {s['search_as_good_as_random']} of {n} "
            f"| {s['search_in_top_5pct']} of {n} | {s['random_in_top_5pct']} of {n} "
            f"| {s['search_median_rank']:g} / {s['random_median_rank']:g} "
            f"| {s['search_mean_orderings']:.1f} / {s['random_mean_orderings']:.1f} |"
        )
    lines += [
        "",
        f"`orderings.sample` with n = {meta['sample_n']}: the sd of all 120 orderings inside "
        f"the sample's 90% interval in {meta['sample_covered']} of {n} seeds.",
        "",
        "| goal | method | seed | orderings | trainings | best rank | best found |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['goal']} | {r['method']} | {r['seed']} | {r['orderings']} | {r['spent']} "
            f"| {r['best_rank']} | {r['best']} |"
        )
    lines += ["", "| sample seed | sd [90% CI] | true sd | covered |", "|---|---|---|---|"]
    for c in coverage:
        lines.append(
            f"| {c['seed']} | {c['sd']:.3f} [{c['sd_ci'][0]:.3f}, {c['sd_ci'][1]:.3f}] "
            f"| {c['true_sd']:.3f} | {'yes' if c['covered'] else 'no'} |"
        )
    lines += ["", "![progress](ordering_search_progress.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
