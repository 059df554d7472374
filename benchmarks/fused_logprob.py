"""Naive vs fused per-token log-probs, forward + backward: peak memory and time in one run.

Command (repo root, the venv active):

    python benchmarks/fused_logprob.py           # full run, about 15 min on 2 CPU cores
    python benchmarks/fused_logprob.py --quick   # smoke run of the same code paths, ~1 min

Writes benchmarks/results/fused_logprob.json and benchmarks/results/fused_logprob.md.

naive = full logits h @ W.T, log_softmax, gather, autograd (stageflow.kernels.reference);
fused = stageflow.kernels.chunked (its default chunk sizes unless a chunk column says otherwise).
Loss = sum of the log-probs (+ entropies); gradients for h and W (W frozen in the "frozen W" rows).

Method. Every measurement runs in a fresh subprocess: inputs are allocated, then the kernel's
high-water mark of resident memory is reset (/proc/self/clear_refs 5, falling back to
getrusage's ru_maxrss) and one forward + backward runs; peak = VmHWM - VmRSS before the call,
so it counts every byte the call touches (logits, buffers, the new h.grad and W.grad; not the
inputs). The same process then times `--reps` more forward + backward calls. Naive and fused
processes alternate, `--rounds` times, and the table reports medians over all of them. Torch
runs on `--threads` threads (2). On CUDA the same script also times the Triton path (peak from
torch.cuda.max_memory_allocated) and reports TFLOP/s against the nominal 6 N H V.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> str:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM after clear_refs"
    except OSError:
        return "ru_maxrss"


def _peak_rss_kib(method: str) -> int:
    if method == "ru_maxrss":
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return _status_kib("VmHWM")


def worker(cfg: dict) -> dict:
    """One fresh-process measurement: peak memory of the first call, then timed calls."""
    import torch

    from stageflow.kernels.logprob import fused_token_logprobs

    torch.set_num_threads(cfg["threads"])
    device = cfg["device"]
    n, hidden, vocab = cfg["n"], cfg["hidden"], cfg["vocab"]
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(n, hidden, device=device, generator=gen).requires_grad_()
    w = torch.randn(vocab, hidden, device=device, generator=gen) * (3.0 / hidden**0.5)
    w.requires_grad_(not cfg["frozen_w"])
    y = torch.randint(0, vocab, (n,), device=device, generator=gen)
    impl, chunk, ent = cfg["impl"], cfg["chunk"], cfg["entropy"]

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def step() -> tuple[float, float, float]:
        """(forward s, backward s, CPU s of all threads) of one forward + backward."""
        h.grad = w.grad = None
        sync()
        c0, t0 = time.process_time(), time.perf_counter()
        out = fused_token_logprobs(h, w, y, with_entropy=ent, impl=impl, chunk_size=chunk)
        loss = out.logprobs.sum() + (out.entropy.sum() if ent else 0.0)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        return t1 - t0, time.perf_counter() - t1, time.process_time() - c0

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        first = step()
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
        method = "torch.cuda.max_memory_allocated"
    else:
        method = _reset_peak_rss()
        base_kib = _status_kib("VmRSS") if method != "ru_maxrss" else _peak_rss_kib(method)
        first = step()
        peak_mib = (_peak_rss_kib(method) - base_kib) / 1024
    times = [step() for _ in range(cfg["reps"])] if cfg["reps"] else [first]
    return {
        **cfg,
        "peak_mib": peak_mib,
        "memory_method": method,
        "fwd_s": [t[0] for t in times],
        "bwd_s": [t[1] for t in times],
        "total_s": [t[0] + t[1] for t in times],
        "cpu_s": [t[2] for t in times],
        "loadavg": os.getloadavg()[0],
    }


def run_worker(cfg: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(cfg)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {cfg} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(pairs: list[dict], rounds: int) -> list[dict]:
    """Runs each config `rounds` times, alternating configs (and their order) every round."""
    runs: dict[int, list[dict]] = {i: [] for i in range(len(pairs))}
    for r in range(rounds):
        order = range(len(pairs)) if r % 2 == 0 else reversed(range(len(pairs)))
        for i in order:
            runs[i].append(run_worker(pairs[i]))
            print(f"  {summary_line(runs[i][-1])}", flush=True)
    rows = [aggregate(pairs[i], runs[i]) for i in range(len(pairs))]
    naive = [i for i, cfg in enumerate(pairs) if cfg["impl"] == "naive"]
    for i, row in enumerate(rows):
        if naive and i != naive[0]:  # same-round ratios: robust to load that drifts over rounds
            row["paired_time_ratios"] = [
                statistics.median(a["total_s"]) / statistics.median(b["total_s"])
                for a, b in zip(runs[i], runs[naive[0]])
            ]
    return rows


def summary_line(res: dict) -> str:
    return (
        f"n={res['n']} {res['impl']:<8} chunk={res['chunk']} ent={res['entropy']} "
        f"frozenW={res['frozen_w']} peak={res['peak_mib']:.0f}MiB "
        f"t={statistics.median(res['total_s']):.3f}s load={res['loadavg']:.1f}"
    )


def aggregate(cfg: dict, runs: list[dict]) -> dict:
    totals = [t for r in runs for t in r["total_s"]]
    return {
        **cfg,
        "peak_mib": statistics.median(r["peak_mib"] for r in runs),
        "peak_mib_all": [round(r["peak_mib"], 1) for r in runs],
        "time_s": statistics.median(totals),
        "time_s_min": min(totals),
        "time_s_max": max(totals),
        "fwd_s": statistics.median(t for r in runs for t in r["fwd_s"]),
        "bwd_s": statistics.median(t for r in runs for t in r["bwd_s"]),
        "cpu_s": statistics.median(t for r in runs for t in r["cpu_s"]),
        "samples": len(totals),
        "memory_method": runs[0]["memory_method"],
        "loadavg_max": max(r["loadavg"] for r in runs),
    }


def base_cfg(args, **over) -> dict:
    cfg = dict(
        device="cpu", impl="naive", n=args.n, hidden=args.hidden, vocab=args.vocab,
        chunk=None, entropy=False, frozen_w=False, reps=args.reps, threads=args.threads,
    )  # fmt: skip
    cfg.update(over)
    return cfg


def plan(args) -> dict[str, list[tuple[list[dict], int]]]:
    """Groups of configs measured side by side: {group: [(configs, rounds), ...]}."""
    groups: dict[str, list[tuple[list[dict], int]]] = {"headline": [], "variants": [], "sweep": []}
    groups["headline"].append(([base_cfg(args), base_cfg(args, impl="chunked")], args.rounds))
    groups["tuning"] = [
        ([base_cfg(args, impl="chunked", chunk=c) for c in args.chunks], max(2, args.rounds // 2))
    ]
    for over in (dict(entropy=True), dict(frozen_w=True)):
        groups["variants"].append(
            ([base_cfg(args, **over), base_cfg(args, impl="chunked", **over)], args.sweep_rounds)
        )
    for n in args.sweep:
        if n == args.n:
            continue
        reps = args.reps if n <= args.n else max(1, args.reps - 1)
        pair = [base_cfg(args, n=n, reps=reps), base_cfg(args, impl="chunked", n=n, reps=reps)]
        groups["sweep"].append((pair, args.sweep_rounds))
    if args.cuda:
        cuda = dict(device="cuda", threads=args.threads)
        groups["cuda"] = [
            (
                [base_cfg(args, n=n, impl=impl, **cuda) for impl in ("naive", "chunked", "triton")],
                args.rounds,
            )
            for n in sorted({args.n, *args.sweep})
        ]
    return groups


def pair_rows(results: list[dict]) -> list[dict]:
    """Adds fused/naive ratios to the fused rows of side-by-side results."""
    naive = {
        (r["device"], r["n"], r["entropy"], r["frozen_w"]): r
        for r in results
        if r["impl"] == "naive"
    }
    for r in results:
        ref = naive.get((r["device"], r["n"], r["entropy"], r["frozen_w"]))
        if ref is not None and r["impl"] != "naive":
            r["peak_ratio"] = r["peak_mib"] / ref["peak_mib"]
            r["time_ratio"] = r["time_s"] / ref["time_s"]
            r["cpu_ratio"] = r["cpu_s"] / ref["cpu_s"]
    return results


def markdown(args, results: dict[str, list[dict]], command: str, meta: dict) -> str:
    def fmt_row(r):
        chunk = r.get("chunk_used") or r["chunk"] or "default"
        ratio_m = f"{r['peak_ratio']:.1%}" if "peak_ratio" in r else ""
        ratio_t = f"{r['time_ratio']:.2f}x" if "time_ratio" in r else ""
        if "paired_time_ratios" in r:
            ratio_t += f" ({statistics.median(r['paired_time_ratios']):.2f}x)"
        ratio_c = f"{r['cpu_ratio']:.2f}x" if "cpu_ratio" in r else ""
        extra = f" {r['tflops']:.1f} TFLOP/s" if "tflops" in r else ""
        return (
            f"| {r['n']} | {r['impl']}{' +entropy' if r['entropy'] else ''}"
            f"{' (W frozen)' if r['frozen_w'] else ''} | {chunk} | {r['peak_mib']:.0f} | "
            f"{ratio_m} | {r['time_s']:.3f} ({r['time_s_min']:.3f}-{r['time_s_max']:.3f}) | "
            f"{r['fwd_s']:.3f} / {r['bwd_s']:.3f} | {r['cpu_s']:.2f} | {ratio_t}{extra} | "
            f"{ratio_c} | {r['samples']} |"
        )

    head = (
        "| N | impl | chunk (tokens) | peak MiB | peak vs naive | time s, median (min-max) | "
        "fwd / bwd s | CPU s | time vs naive (paired) | CPU vs naive | samples |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    out = [
        "# Fused per-token log-probs: naive vs fused (chunked), forward + backward",
        "",
        f"Command: `{command}`",
        "",
        f"Shape: H={args.hidden}, V={args.vocab}, fp32, {args.threads} torch threads; "
        f"{meta['cpu']}; torch {meta['torch']}; {meta['date']}.",
        f"Peak memory: {meta['memory_method']} in a fresh process per measurement, minus the "
        "resident size before the call (counts logits, buffers and the new h.grad/W.grad; "
        "the inputs are not counted). Time: median over all timed calls of all rounds; "
        "naive and fused processes alternate; (paired) is the median of the per-round ratios "
        "of the two. CPU s = process CPU time of all threads (less sensitive to other "
        "processes than wall time). Load average (1 min) ranged "
        f"{meta['load_min']:.1f}-{meta['load_max']:.1f} during the run.",
        "",
    ]
    titles = {
        "headline": f"## Headline (N={args.n})",
        "variants": f"## Variants at N={args.n}",
        "sweep": "## Sweep over N",
        "tuning": f"## Chunk size at N={args.n} (fused only)",
        "cuda": "## CUDA (Triton path)",
    }
    tables = dict(results)
    tables["sweep"] = sorted(results["headline"] + results["sweep"], key=lambda r: r["n"])
    for group in ("headline", "variants", "sweep", "tuning", "cuda"):
        if tables.get(group):
            out += [titles[group], "", head, *map(fmt_row, tables[group]), ""]
            if group == "headline":
                out += [goal_check(results["headline"]), ""]
    return "\n".join(out)


def goal_check(headline: list[dict]) -> str:
    """The goal line under the headline table: peak <= 20% of naive, time <= 1.0x naive."""
    fused = next(r for r in headline if "peak_ratio" in r)
    mem_ok, time_ok = fused["peak_ratio"] <= 0.20, fused["time_ratio"] <= 1.0
    lines = [
        f"Goal: peak <= 20% of naive: {fused['peak_ratio']:.1%}, "
        f"{'met' if mem_ok else 'MISSED'}; time <= 1.0x naive: {fused['time_ratio']:.2f}x, "
        + ("met." if time_ok else f"MISSED by {fused['time_ratio'] - 1:.0%}.")
    ]
    if not time_ok:
        lines.append(
            "Why: the fused path keeps no logits, so its backward recomputes them: four "
            "N x H x V matmuls (8 N H V FLOPs) where naive runs three (6 N H V). Naive's extra "
            "work is memory-bound N x V passes (log_softmax, its backward, the gather's "
            "scatter), and on this CPU they cost less than one matmul, so the recompute is not "
            "paid back; the fused path wins back part of it by reusing one logits buffer "
            "(no page faults) and by skipping the N x V multiply of the backward. With W frozen "
            "(LoRA) there is no recompute (E_p[W] is accumulated in the forward): see Variants."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--sweep", default="1024,2048,4096,8192,16384")
    parser.add_argument("--chunks", default="256,512,1024,2048")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sweep-rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="small shapes, one round")
    parser.add_argument("--out", default=str(RESULTS / "fused_logprob"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    command = "python benchmarks/fused_logprob.py" + " ".join([""] + sys.argv[1:])
    if args.quick:
        args.n, args.vocab, args.sweep, args.chunks = 512, 8192, "256,512", "128,512"
        args.rounds = args.sweep_rounds = 1
        args.reps = 1
    args.sweep = [int(x) for x in args.sweep.split(",")]
    args.chunks = [int(x) for x in args.chunks.split(",")]
    import torch

    args.cuda = torch.cuda.is_available()
    from stageflow.kernels.chunked import default_chunk_sizes

    results: dict[str, list[dict]] = {}
    loads = [os.getloadavg()[0]]
    for group, items in plan(args).items():
        print(f"[{group}]", flush=True)
        rows: list[dict] = []
        for cfgs, rounds in items:
            rows += pair_rows(measure(cfgs, rounds))
        for r in rows:
            if r["impl"] == "chunked" and r["chunk"] is None:
                r["chunk_used"] = default_chunk_sizes(r["n"], r["vocab"])[0]
            if r["device"] == "cuda":
                r["tflops"] = 6 * r["n"] * r["hidden"] * r["vocab"] / r["time_s"] / 1e12
            loads.append(r["loadavg_max"])
        results[group] = rows
    meta = {
        "cpu": f"{os.cpu_count()} CPU cores",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "memory_method": results["headline"][0]["memory_method"],
        "load_min": min(loads),
        "load_max": max(loads),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "meta": meta, "args": {**vars(args), "worker": None}}
    out.with_suffix(".json").write_text(json.dumps({**payload, "results": results}, indent=1))
    out.with_suffix(".md").write_text(markdown(args, results, command, meta))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
