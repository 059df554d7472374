"""Every CUDA path of stageflow, exercised in one run on a GPU machine (`make gpu-check`).

Command (repo root, a CUDA install: `make setup DEVICE=cuda`):

    python benchmarks/gpu_check.py            # each check in its own process, under 8 minutes

Checks, each a subprocess with its own time limit, its outcome and seconds recorded:
  1. the GPU tests of the suite (`pytest -m gpu`): Triton kernels compiled and at speed against
     the chunked path, NCCL weight broadcast between a learner and an engine on two GPUs;
  2. vLLM on CUDA: an engine's log-probs after a weight sync equal the learner's;
  3. the quickstart with `resources.device=cuda` (shortened), engines in the shared pool;
  4. the same with `rollout.placement=colocated`: the engine sleeps while the learner trains.
Writes benchmarks/results/gpu_check.{json,md}. Without a CUDA device it says so, writes
nothing and exits 0. A check that needs more GPUs than the machine has is reported skipped.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import results_io

ROOT = Path(__file__).resolve().parent.parent
SHORT = [
    "seeds=[0,1]",
    "stages.pretrain.steps=20",
    "stages.facts.steps=20",
    "stages.refusal.steps=10",
    "evaluation.sets.facts.max_examples=8",
]


def vllm_on_cuda() -> dict:
    """A learner and a vLLM engine on one GPU (half each): log-prob gap before and after a sync."""
    import tempfile

    import ray

    from stageflow.actors.group import Placement
    from stageflow.actors.learner import LearnerGroup
    from stageflow.actors.rollout import RolloutGroup
    from stageflow.actors.weight_sync import WeightSync
    from stageflow.core.config import LearnerSpec, RolloutSpec, StageSpec
    from stageflow.core.models import TinyModelSpec, build_tiny_model

    sys.path.insert(0, str(ROOT / "tests" / "actors"))
    from conftest import max_logprob_gap

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    gpu = Placement(device="cuda", gpus=0.5)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp) / "m", TinyModelSpec(hidden_size=128, num_heads=2))
        engine = RolloutGroup(
            model, RolloutSpec(max_model_len=256, gpu_memory_utilization=0.3), gpu
        )
        learner = LearnerGroup(model, LearnerSpec(ranks=1, zero_stage=0), gpu)
        before = max_logprob_gap(learner, engine)
        rows = [{"prompt": f"Q{i}: name? ", "answer": "stageflow ok"} for i in range(16)]
        learner.train_stage(StageSpec(kind="sft", lr=1e-2, batch_size=4, steps=6), rows)
        moved = max_logprob_gap(learner, engine)
        sync = WeightSync(learner, engine)
        sync.sync()
        after = max_logprob_gap(learner, engine)
        sync.close()
        learner.shutdown()
        engine.shutdown()
    assert before < 1e-2 and after < 1e-2 < moved, (before, moved, after)
    return {
        "gap_before": before,
        "gap_trained": moved,
        "gap_after_sync": after,
        "transport": sync.transport,
    }


def run(name: str, command: list[str], limit: int) -> dict:
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        outcome = "passed" if done.returncode == 0 else f"failed (exit {done.returncode})"
        tail = (done.stdout + done.stderr)[-2000:]
    except subprocess.TimeoutExpired:
        outcome, tail = f"timed out after {limit} s", ""
    if "skipped" in tail and "passed" not in tail and outcome == "passed":
        outcome = "skipped"
    print(f"{name}: {outcome} ({time.perf_counter() - start:.0f} s)", flush=True)
    return {
        "check": name,
        "outcome": outcome,
        "seconds": time.perf_counter() - start,
        "output": tail,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--vllm":
        print(json.dumps(vllm_on_cuda()))
        return
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (run it on a GPU machine)")
        return
    python, study = sys.executable, "studies/quickstart.yaml"
    cli = [python, "-m", "stageflow.platform.commands.cli", "run", study]
    checks = [
        run(
            "GPU tests (Triton at speed, NCCL sync)",
            [python, "-m", "pytest", "-q", "-m", "gpu", "-rs"],
            150,
        ),
        run("vLLM on CUDA, weight sync", [python, __file__, "--vllm"], 120),
        run(
            "quickstart on CUDA, shared engines",
            [*cli, *SHORT, "resources.device=cuda", "storage_dir=runs/gpu_check_shared"],
            150,
        ),
        run(
            "quickstart on CUDA, colocated (sleep mode)",
            [
                *cli,
                *SHORT,
                "resources.device=cuda",
                "rollout.placement=colocated",
                "storage_dir=runs/gpu_check_colocated",
            ],
            150,
        ),
    ]
    meta = {
        "gpu": torch.cuda.get_device_name(0),
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
    }
    lines = ["| check | outcome | seconds |", "| --- | --- | ---: |"]
    lines += [f"| {c['check']} | {c['outcome']} | {c['seconds']:.0f} |" for c in checks]
    intro = f"On {meta['gpus']} x {meta['gpu']} (torch {meta['torch']}); outputs' tails in the JSON file."
    page = results_io.markdown_page("CUDA paths", "python benchmarks/gpu_check.py", intro, lines)
    results_io.write_results("gpu_check", "python benchmarks/gpu_check.py", meta, checks, page)
    sys.exit(0 if all(c["outcome"] in ("passed", "skipped") for c in checks) else 1)


if __name__ == "__main__":
    main()
