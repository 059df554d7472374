"""Error rates of the ordering test on simulated studies where the truth is known.

Command (repo root, the venv active):

    python benchmarks/ordering_test_error_rates.py            # 2,000 studies per cell
    python benchmarks/ordering_test_error_rates.py --quick    # 200 per cell (a smoke run)

Writes docs/ordering_test_error_rates.{md,json}. A simulated study has k orderings x n seeds;
trial (o, s) scores y = mu_o + sqrt(rho) b_s + sqrt(1 - rho) e_os with b, e standard normal
(rho: the share of the seed-to-seed variance that the trials of one seed share, through their
common prefix; within an ordering the seed standard deviation is 1). The ordering means are
evenly spaced over a range of `effect` seed standard deviations (0: no ordering effect). Each
study is judged by each test of platform/results/ordering_test.py at alpha = 0.05, and by the rule
stageflow used before (spread of the ordering means >= 2 mean seed standard deviations).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from stageflow.platform.results.ordering_test import Design, p_value

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "ordering_test_error_rates"
ALPHA = 0.05
DESIGNS = [(4, 3), (2, 5), (3, 4), (2, 7)]
EFFECTS = [0.0, 1.0, 2.0]
RHOS = [0.0, 0.5]
TESTS = {
    "permutation, blocked by seed": ("permutation", True),
    "permutation, across trials": ("permutation", False),
    "ANOVA, ordering + seed": ("anova", True),
    "ANOVA, one-way": ("anova", False),
}
OLD_RULE = "old rule: spread >= 2 seed std"


def design(y: np.ndarray, blocked: bool) -> Design:
    """The Design of an (orderings x seeds) matrix; without blocks every trial is its own."""
    k, n = y.shape
    blocks = tuple(
        tuple(range(n)) if blocked else tuple(o * n + s for s in range(n)) for o in range(k)
    )
    orderings = tuple(f"o{o}" for o in range(k))
    return Design(orderings, tuple(tuple(map(float, row)) for row in y), blocks)


def old_rule(y: np.ndarray) -> bool:
    means, stds = y.mean(axis=1), y.std(axis=1, ddof=1)
    return (means.max() - means.min()) / stds.mean() >= 2.0


def exact_size(k: int, n: int, blocked: bool) -> float | None:
    """P(p <= alpha) under no effect for an exact permutation test (continuous data): the
    distinct equally likely values of the statistic are 1 / p_min of them."""
    if blocked:
        distinct = math.factorial(k) ** (n - 1)
    else:
        distinct = math.factorial(k * n) // (math.factorial(n) ** k * math.factorial(k))
        if math.factorial(k * n) // math.factorial(n) ** k > 100_000:  # Monte Carlo p
            return None
    return math.floor(ALPHA * distinct) / distinct


def simulate(k: int, n: int, effect: float, rho: float, studies: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    means = effect * np.arange(k) / (k - 1)
    rejections = {name: 0 for name in [*TESTS, OLD_RULE]}
    p_min = {}
    for _ in range(studies):
        y = (
            means[:, None]
            + math.sqrt(rho) * rng.normal(size=(1, n))
            + math.sqrt(1 - rho) * rng.normal(size=(k, n))
        )
        for name, (test, blocked) in TESTS.items():
            p, p_min[name], _ = p_value(design(y, blocked), test, rng)
            rejections[name] += p <= ALPHA
        rejections[OLD_RULE] += old_rule(y)
    rates = {name: count / studies for name, count in rejections.items()}
    return {"rates": rates, "p_min": p_min}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="200 studies per cell")
    args = parser.parse_args()
    studies = 200 if args.quick else args.studies
    start = time.perf_counter()
    rows = []
    for index, (k, n) in enumerate(DESIGNS):
        for rho in RHOS:
            for effect in EFFECTS:
                seed = 1000 * index + 10 * int(effect) + int(10 * rho)
                found = simulate(k, n, effect, rho, studies, seed)
                rows.append({"orderings": k, "seeds": n, "rho": rho, "effect": effect, **found})
    se = math.sqrt(ALPHA * (1 - ALPHA) / studies)
    command = "python benchmarks/ordering_test_error_rates.py" + (" --quick" if args.quick else "")
    meta = {"studies_per_cell": studies, "alpha": ALPHA, "seconds": time.perf_counter() - start}
    OUT.with_suffix(".json").write_text(
        json.dumps({"command": command, "meta": meta, "results": rows}, indent=1)
    )
    OUT.with_suffix(".md").write_text(page(rows, command, studies, se))
    print(OUT.with_suffix(".md").read_text())


def page(rows: list[dict], command: str, studies: int, se: float) -> str:
    names = [*TESTS, OLD_RULE]
    lines = [
        "# The ordering test's error rates on simulated studies",
        "",
        f"Command: `{command}`",
        "",
        f"{studies} simulated studies per row; alpha = {ALPHA}; a test whose rejection rate "
        f"under no effect is at most alpha + 2 binomial standard errors "
        f"({ALPHA} + {2 * se:.4f} = {ALPHA + 2 * se:.4f}) keeps its level. rho: the share of "
        "the seed variance the trials of one seed share (their common prefix). effect: the range "
        "of the ordering means in seed standard deviations (0: no effect; the rows with an "
        "effect give the power). p_min: the smallest p the test can reach on the design; "
        "exact size: the rejection rate an exact permutation test has under no effect, "
        "floor(alpha / p_min) p_min.",
        "",
    ]
    header = ["orderings x seeds", "rho", "effect", *names]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * len(names)]
    for row in rows:
        cells = [f"{row['orderings']} x {row['seeds']}", f"{row['rho']:g}", f"{row['effect']:g}"]
        cells += [f"{row['rates'][name]:.3f}" for name in names]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| orderings x seeds | test | p_min | exact size |", "|---|---|---:|---:|"]
    for k, n in DESIGNS:
        row = next(r for r in rows if (r["orderings"], r["seeds"]) == (k, n))
        for name, (test, blocked) in TESTS.items():
            size = exact_size(k, n, blocked) if test == "permutation" else None
            shown = (
                "n/a (continuous)"
                if test == "anova"
                else ("~alpha (Monte Carlo p)" if size is None else f"{size:.4f}")
            )
            lines.append(f"| {k} x {n} | {name} | {row['p_min'][name]:.4g} | {shown} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
