"""The quickstart's verdict on disjoint seed sets, and what a different thread count changes.

Command (repo root, the venv active; each run is `stageflow run studies/quickstart.yaml` in a
fresh study directory, one after another):

    python benchmarks/quickstart_robustness.py          # 3 seed sets + 1 thread variant

Writes docs/quickstart_robustness.{md,json}: per run its seeds, threads per actor, the primary
score's verdict, each method's Holm-adjusted p, and the wall time; then, for the same seeds
run with the default threads and with one thread per actor, the largest difference of any
metric of the trials table and whether the verdict changed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "quickstart_robustness"


def seeds_of(study: Path) -> list[int]:
    import yaml

    return list(yaml.safe_load(study.read_text())["seeds"])


def run(storage: Path, seeds: list[int], threads: int | None) -> dict:
    overrides = [f"storage_dir={storage}", f"seeds=[{','.join(map(str, seeds))}]"]
    if threads is not None:
        overrides.append(f"resources.threads_per_actor={threads}")
    command = [
        sys.executable,
        "-m",
        "stageflow.platform.commands.cli",
        "run",
        "studies/quickstart.yaml",
        *overrides,
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(
            f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    verdict = re.search(r"\*\*Primary score, forget_score:\*\* (.+)", done.stdout).group(1)
    timing = json.loads((storage / "timing.json").read_text())
    made = json.loads((storage / "provenance.json").read_text())
    metrics = {
        f"{r['trial']['path']}|{r['trial']['seed']}|{k}": v
        for r in (json.loads(p.read_text()) for p in (storage / "trials").glob("*.json"))
        for k, v in r["metrics"].items()
        if k.count("/") <= 2 and not k.startswith("time/")
    }
    p_values = dict(re.findall(r"(\w+) p=([0-9.e-]+)", verdict))
    return {
        "seeds": seeds,
        "threads_per_actor": made["threads_per_actor"],
        "verdict": verdict,
        "p_holm": p_values,
        "wall_s": timing["time/wall_s"],
        "metrics": metrics,
    }


def main() -> None:
    seeds = seeds_of(ROOT / "studies" / "quickstart.yaml")
    n = len(seeds)
    sets = [seeds, [s + n for s in seeds], [s + 2 * n for s in seeds]]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, chosen in enumerate(sets):
            runs.append(run(Path(tmp) / f"set{i}", chosen, None))
            print(f"seeds {chosen}: {runs[-1]['verdict']}", flush=True)
        one = run(Path(tmp) / "threads1", seeds, 1)
        print(f"seeds {seeds}, 1 thread: {one['verdict']}", flush=True)
    base = runs[0]
    diffs = {
        k: abs(v - one["metrics"][k]) for k, v in base["metrics"].items() if k in one["metrics"]
    }
    worst = max(diffs, key=diffs.get)
    compared = {
        "threads": [base["threads_per_actor"], 1],
        "metrics_compared": len(diffs),
        "metrics_identical": sum(1 for d in diffs.values() if d == 0),
        "largest_difference": diffs[worst],
        "largest_difference_metric": worst,
        "verdict_same": base["verdict"].split(":")[0] == one["verdict"].split(":")[0],
    }
    command = "python benchmarks/quickstart_robustness.py"
    payload = {"command": command, "runs": [*runs, one], "threads": compared}
    OUT.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    lines = [
        "# The quickstart on disjoint seed sets, and with other threads",
        "",
        f"Command: `{command}`",
        "",
        "Each row is one `stageflow run studies/quickstart.yaml` in a fresh study directory "
        "(only `seeds` and `resources.threads_per_actor` overridden).",
        "",
        "| seeds | threads per actor | verdict on forget_score | p (Holm) | wall time |",
        "| --- | ---: | --- | --- | ---: |",
    ]
    for r in [*runs, one]:
        verdict = r["verdict"].split(":")[0]
        ps = ", ".join(f"{m} {p}" for m, p in r["p_holm"].items())
        lines.append(
            f"| {r['seeds'][0]}-{r['seeds'][-1]} | {r['threads_per_actor']} | {verdict} | {ps} | {r['wall_s']:.0f} s |"
        )
    lines += [
        "",
        f"Threads: seeds {seeds[0]}-{seeds[-1]} with {compared['threads'][0]} and with 1 thread per actor: "
        f"{compared['metrics_identical']} of {compared['metrics_compared']} metrics identical; the largest "
        f"difference is {compared['largest_difference']:.3g} ({compared['largest_difference_metric']}); "
        f"the verdict is {'the same' if compared['verdict_same'] else 'different'}.",
    ]
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(OUT.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
