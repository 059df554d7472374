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
import os
import statistics
from pathlib import Path

import results_io

SIZES = {
    **results_io.MODEL_SIZES,
    "100M": dict(hidden_size=1024, num_layers=8, num_heads=16, intermediate_size=2816),
}
PARTS = ("gather_write_s", "transfer_reload_s", "engine_read_s", "engine_reload_s", "total_s")
TRANSPORTS = ("object_store", "shm")


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny model only, 2 reps")
    parser.add_argument("--reps", type=int, default=5)


def measure(model_dir: Path, reps: int) -> list[dict]:
    from stageflow.actors.weight_sync import WeightSync

    runs: dict[str, list[dict]] = {t: [] for t in TRANSPORTS}
    with results_io.learner_and_engine(model_dir) as (learner, rollout):
        syncs = {t: WeightSync(learner, rollout, t) for t in TRANSPORTS}
        try:
            for sync in syncs.values():
                sync.sync()  # warm-up
            for _ in range(reps):
                for transport, sync in syncs.items():
                    runs[transport].append(sync.sync())
        finally:
            for sync in syncs.values():
                sync.close()
    rows = []
    for transport, results in runs.items():
        row = {
            "transport": transport,
            **{k: statistics.median(r[k] for r in results) for k in PARTS},
        }
        row.update(bytes=results[0]["bytes"], tensors=results[0]["tensors"])
        rows.append(row)
    return rows


def measure_all(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Both transports on every model size, against the memcpy bandwidth measured first."""
    sizes = {"tiny": SIZES["tiny"]} if args.quick else SIZES
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    bandwidth = results_io.memcpy_bandwidth()
    rows = []
    with results_io.local_ray(num_cpus=4):
        for size, model_dir in results_io.tiny_models(sizes):
            for row in measure(model_dir, args.reps):
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
    return rows, {"memcpy_GBps": bandwidth / 1e9}


def intro(meta: dict) -> str:
    return (
        f"Median of {meta['reps']} syncs per transport after a warm-up; one learner rank "
        f"(ZeRO-0, fp32) and one vLLM-CPU worker, Ray actors on one node ({meta['cpus']} CPU "
        f"cores, shared with other work: {results_io.load_phrase(meta)}). memcpy: "
        f"{meta['memcpy_GBps']:.1f} GB/s (fastest torch copy_ of 256 MiB); x memcpy = time / "
        "(bytes / memcpy bandwidth); overhead = total - engine reload (vLLM's own reload_weights)."
    )


BENCHMARK = results_io.Benchmark(
    name="weight_sync",
    doc=__doc__,
    arguments=arguments,
    quick={"reps": 2},
    measure=measure_all,
    title="Weight sync learner -> vLLM rollout worker (CPU)",
    intro=intro,
    columns=[
        ("model", "left", lambda r: r["model"]),
        ("MB", "right", lambda r: f"{r['bytes'] / 1e6:.1f}"),
        ("transport", "left", lambda r: r["transport"]),
        ("total ms", "right", lambda r: f"{r['total_s'] * 1e3:.1f}"),
        ("x memcpy", "right", lambda r: f"{r['x_memcpy']:.1f}"),
        ("overhead x memcpy", "right", lambda r: f"{r['overhead_x_memcpy']:.1f}"),
        ("gather+write ms", "right", lambda r: f"{r['gather_write_s'] * 1e3:.1f}"),
        ("transfer+reload ms", "right", lambda r: f"{r['transfer_reload_s'] * 1e3:.1f}"),
        ("engine read ms", "right", lambda r: f"{r['engine_read_s'] * 1e3:.1f}"),
        (
            "engine reload ms (x memcpy)",
            "right",
            lambda r: (
                f"{r['engine_reload_s'] * 1e3:.1f} ({r['engine_reload_s'] / r['memcpy_s']:.1f})"
            ),
        ),
    ],
)

if __name__ == "__main__":
    BENCHMARK.main()
