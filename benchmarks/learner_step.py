"""Learner step time at ZeRO 0/1/2/3 with 1 and 2 ranks (DeepSpeed on gloo, CPU), one run.

Command (repo root, the venv active):

    python benchmarks/learner_step.py           # full run, about 7 min on 2 CPU cores
    python benchmarks/learner_step.py --quick   # smoke run (tiny model, 3 timed steps)

Writes benchmarks/results/learner_step.json and benchmarks/results/learner_step.md.

Each configuration starts a fresh `LearnerGroup` (Ray actors, 1 CPU and so 1 torch thread per
rank) and runs one SFT stage of `--warmup` + `--steps` steps; the step time is rank 0's wall
time of forward + backward + optimizer step (`step_time_s` of `train_stage`'s metrics), median
over the timed steps (the minimum is reported too: on a shared machine it is the better
estimate of the unloaded time). Global batch `--batch` rows of `--seq` tokens (split across ranks),
fp32, AdamW (torch), fused log-prob kernel. tokens/s = global batch tokens / step time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {
    "tiny": dict(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=384),
    "25M": dict(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1408),
}


def rows(n: int, seq: int) -> list[dict]:
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz "
    return [
        {"prompt": "P: ", "answer": "".join(rng.choice(letters) for _ in range(seq - 5))}
        for _ in range(n)
    ]


def measure(model_dir: Path, ranks: int, zero: int, args) -> dict:
    from stageflow.actors.learner import LearnerGroup

    group = LearnerGroup(model_dir, {"ranks": ranks, "zero_stage": zero}, device="cpu")
    try:
        stage = {
            "kind": "sft",
            "lr": 1e-4,
            "batch_size": args.batch,
            "steps": args.warmup + args.steps,
            "max_len": args.seq,
        }
        metrics = group.train_stage(stage, rows(4 * args.batch, args.seq))[args.warmup :]
    finally:
        group.shutdown()
    step = statistics.median(m["step_time_s"] for m in metrics)
    return {
        "step_s": step,
        "min_step_s": min(m["step_time_s"] for m in metrics),
        "tokens_per_s": statistics.median(m["tokens_per_s"] for m in metrics),
        "final_loss": metrics[-1]["loss"],
    }


def markdown(results: list[dict], command: str, meta: dict) -> str:
    out = [
        "# Learner step time: DeepSpeed ZeRO stage x ranks (CPU, gloo)",
        "",
        f"Command: `{command}`",
        "",
        f"Global batch {meta['batch']} x {meta['seq']} tokens, fp32, AdamW; median over "
        f"{meta['steps']} steps after {meta['warmup']} warm-up steps; each rank is a Ray actor "
        f"with 1 CPU (1 torch thread) on a {meta['cpus']}-core machine shared with other work "
        f"(1-min load average {meta['load_average_1m_start_end'][0]:.1f} at the start, "
        f"{meta['load_average_1m_start_end'][1]:.1f} at the end).",
        "",
        "| model | params | ZeRO | ranks | step ms (median) | step ms (min) | tokens/s | vs 1 rank |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        out.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['zero_stage']} | {r['ranks']} "
            f"| {r['step_s'] * 1e3:.1f} | {r['min_step_s'] * 1e3:.1f} | {r['tokens_per_s']:.0f} "
            f"| {r['speedup_vs_1_rank']:.2f} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 3 timed steps")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    sizes = {"tiny": SIZES["tiny"]} if args.quick else SIZES
    if args.quick:
        args.steps = 3
    import ray

    from stageflow.platform.models import TinyModelSpec, build_tiny_model

    load_start = os.getloadavg()[0]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size, dims in sizes.items():
            model_dir = build_tiny_model(Path(tmp) / size, TinyModelSpec(**dims))
            from safetensors.torch import load_file

            params = sum(t.numel() for t in load_file(model_dir / "model.safetensors").values())
            for zero in (0, 1, 2, 3):
                for ranks in (1, 2):
                    r = {"model": size, "params": params, "zero_stage": zero, "ranks": ranks}
                    r.update(measure(model_dir, ranks, zero, args))
                    results.append(r)
                    print(
                        f"{size} ZeRO-{zero} ranks={ranks}: {r['step_s'] * 1e3:.1f} ms/step",
                        flush=True,
                    )
    ray.shutdown()
    for r in results:
        one = next(
            x
            for x in results
            if x["model"] == r["model"] and x["zero_stage"] == r["zero_stage"] and x["ranks"] == 1
        )
        r["speedup_vs_1_rank"] = r["tokens_per_s"] / one["tokens_per_s"]
    command = "python benchmarks/learner_step.py" + (" --quick" if args.quick else "")
    meta = {k: getattr(args, k) for k in ("batch", "seq", "warmup", "steps")}
    meta["cpus"] = os.cpu_count()
    meta["load_average_1m_start_end"] = [load_start, os.getloadavg()[0]]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "learner_step"
    out.with_suffix(".json").write_text(
        json.dumps({"command": command, "meta": meta, "results": results}, indent=1)
    )
    out.with_suffix(".md").write_text(markdown(results, command, meta))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
