"""Learner with and without LoRA (`learner.lora`): step time, memory, trainable parameters and
optimizer state, side by side, on the tiny model and the 25M one, in one run.

Command (repo root, the venv active):

    python benchmarks/lora.py           # full run, about 6 min on 2 CPU cores
    python benchmarks/lora.py --quick   # smoke run (tiny model, 3 timed steps)

Writes benchmarks/results/lora.json and benchmarks/results/lora.md.

Each configuration (model size x full fine-tuning or LoRA of rank r on every linear layer but
the LM head) runs in a fresh process of this script: one learner rank (`LearnerWorker`,
DeepSpeed ZeRO-1 as a study's default learner, gloo, 1 torch thread, no Ray) trains one SFT
stage of `--warmup` + `--steps` steps. Step time: forward + backward + optimizer step
(`step_time_s`), median and minimum over the timed steps. Memory: the process's peak RSS
(VmHWM: imports, the model, DeepSpeed's buffers, the optimizer, activations), its RSS once the
model is loaded, and the largest step's peak above the RSS at its start (the first step
allocates Adam's moments). Trainable parameters and the optimizer state (Adam's two moments,
fp32) are counted in the learner. Global batch `--batch` rows of `--seq` tokens, fp32, AdamW.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys

import results_io
from learner_step import SIZES, rows


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny model, 3 timed steps")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64], help="LoRA ranks r")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))


def worker(cfg: dict) -> dict:
    """One configuration in this fresh process: train a stage, then read the learner's sizes."""
    import torch

    torch.set_num_threads(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    from stageflow.actors.learner_worker import LearnerWorker
    from stageflow.core.config import LearnerSpec, LoraSpec, StageSpec

    lora = LoraSpec(r=cfg["r"], alpha=2.0 * cfg["r"]) if cfg["r"] else None
    learner = LearnerWorker(cfg["model_dir"], LearnerSpec(zero_stage=1, lora=lora))
    learner.setup()
    loaded_mib = _status_mib("VmRSS")
    steps = cfg["warmup"] + cfg["steps"]
    stage = StageSpec(kind="sft", lr=1e-4, batch_size=cfg["batch"], steps=steps, max_len=cfg["seq"])
    metrics = learner.train_stage(stage, rows(4 * cfg["batch"], cfg["seq"]))
    timed = metrics[cfg["warmup"] :]
    moments = [
        t
        for state in learner.engine.basic_optimizer.state.values()
        for t in state.values()
        if torch.is_tensor(t) and t.dim() > 0
    ]
    return {
        "step_s": statistics.median(m["step_time_s"] for m in timed),
        "min_step_s": min(m["step_time_s"] for m in timed),
        "tokens_per_s": statistics.median(m["tokens_per_s"] for m in timed),
        "trainable": sum(p.numel() for p in learner.policy.parameters() if p.requires_grad),
        "optimizer_mib": sum(t.numel() * t.element_size() for t in moments) / 2**20,
        "loaded_rss_mib": loaded_mib,
        "peak_rss_mib": _status_mib("VmHWM"),
        "step_peak_mib": max(m["peak_mem_mib"] for m in metrics),
        "final_loss": metrics[-1]["loss"],
    }


def run_worker(cfg: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(cfg)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {cfg} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_all(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Every model size x (full, LoRA r for each of --ranks), each in a fresh process."""
    sizes = {"tiny": SIZES["tiny"]} if args.quick else SIZES
    options = {k: getattr(args, k) for k in ("batch", "seq", "warmup", "steps")}
    results = []
    for size, model_dir in results_io.tiny_models(sizes):
        params = results_io.param_count(model_dir)
        for r in [0, *args.ranks]:
            row = {"model": size, "params": params, "lora_r": r}
            row.update(run_worker({"model_dir": str(model_dir), "r": r, **options}))
            results.append(row)
            print(
                f"{size} {'LoRA r=' + str(r) if r else 'full'}: {row['step_s'] * 1e3:.0f} ms/step, "
                f"peak RSS {row['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
    for row in results:
        full = next(x for x in results if x["model"] == row["model"] and not x["lora_r"])
        row["step_vs_full"] = row["step_s"] / full["step_s"]
        row["peak_rss_vs_full_mib"] = row["peak_rss_mib"] - full["peak_rss_mib"]
    return results, {"zero_stage": 1, "threads": 1}


def intro(meta: dict) -> str:
    return (
        f"One learner rank (DeepSpeed ZeRO-{meta['zero_stage']}, fp32, AdamW, "
        f"{meta['threads']} torch thread) per configuration, each in a fresh process; global "
        f"batch {meta['batch']} x {meta['seq']} tokens; median and minimum over {meta['steps']} "
        f"steps after {meta['warmup']} warm-up steps. LoRA: alpha = 2r on every linear layer "
        f"but the LM head; optimizer state: Adam's two fp32 moments. A {meta['cpus']}-core "
        f"machine shared with other work ({results_io.load_phrase(meta)})."
    )


BENCHMARK = results_io.Benchmark(
    name="lora",
    doc=__doc__,
    arguments=arguments,
    quick={"steps": 3, "ranks": [8]},
    measure=measure_all,
    title="Learner with and without LoRA: step time, memory, trainable parameters (CPU)",
    intro=intro,
    columns=[
        ("model", "left", lambda r: r["model"]),
        ("params", "right", lambda r: f"{r['params'] / 1e6:.1f}M"),
        ("training", "left", lambda r: f"LoRA r={r['lora_r']}" if r["lora_r"] else "full"),
        ("trainable", "right", lambda r: f"{r['trainable'] / 1e6:.3f}M"),
        ("optimizer state MiB", "right", lambda r: f"{r['optimizer_mib']:.2f}"),
        ("step ms (median)", "right", lambda r: f"{r['step_s'] * 1e3:.1f}"),
        ("step ms (min)", "right", lambda r: f"{r['min_step_s'] * 1e3:.1f}"),
        ("vs full", "right", lambda r: f"{r['step_vs_full']:.2f}"),
        ("RSS loaded MiB", "right", lambda r: f"{r['loaded_rss_mib']:.0f}"),
        ("peak RSS MiB", "right", lambda r: f"{r['peak_rss_mib']:.0f}"),
        ("peak vs full MiB", "right", lambda r: f"{r['peak_rss_vs_full_mib']:+.0f}"),
        ("step peak MiB", "right", lambda r: f"{r['step_peak_mib']:.0f}"),
    ],
    worker=worker,
)

if __name__ == "__main__":
    BENCHMARK.main()
