"""The standard unlearning evaluation's cost per checkpoint against the log-likelihoods alone.

Command (repo root, the venv active):

    python benchmarks/evaluation_suite.py           # 25M parameters, about 6 min on 2 cores
    python benchmarks/evaluation_suite.py --quick   # smoke run (tiny model, 2 repetitions)

Writes benchmarks/results/evaluation_suite.json and benchmarks/results/evaluation_suite.md.

One learner rank (DeepSpeed ZeRO-0, fp32, fused kernels) and one vLLM engine worker (Ray actors
with 1 CPU each) hold the same model. A forget set of `--rows` facts rows (each with its answer,
one paraphrase and three perturbed answers) and a holdout set of as many rows are evaluated per
checkpoint as TOFU evaluates its forget set. The sides, each `--reps` times, interleaved in a new
random order per repetition:

- `log-likelihoods alone`: the learner's per-token log-probs of every answer the suite scores
  (answers, paraphrases, perturbed answers, the holdout's answers), summed per answer: the
  baseline, the same tokens through the same forward;
- `teacher-forced suite`: `evaluate()` with every teacher-forced metric (avg_loglik,
  probability, truth_ratio and its two aggregations, probability_w_options,
  exact_memorization, extraction_strength, and the attacks mia_loss, mia_zlib, mia_min_k,
  mia_min_k_pp against the holdout), each distinct answer scored once;
- the same without Min-K%++ (no standardised log-probs asked of the head);
- `GradNorm`: mia_gradnorm's per-row gradient norms (a forward and backward per row);
- `generation`: ROUGE-L's greedy completions of the forget prompts (`--tokens` new tokens).

The Reference attack runs no model: it compares two evaluations' stored per-row log-probs
(timed here on the suite's values). Each side's median time and [min, max] over repetitions,
and its ratio to the baseline in the same repetition. Goal: the teacher-forced suite at most
1.5x the log-likelihoods alone.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import results_io

SIZES = results_io.MODEL_SIZES
TEACHER_FORCED = [
    "avg_loglik", "probability", "truth_ratio", "truth_ratio_true_better",
    "truth_ratio_false_better", "probability_w_options", "exact_memorization",
    "extraction_strength", "mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_pp",
]  # fmt: skip
GOAL = 1.5


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 repetitions")
    parser.add_argument("--size", choices=sorted(SIZES), default="25M")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)


def sides(learner, rollout, forget: list[dict], holdout: list[dict], tokens: int) -> dict:
    """{side: a callable that runs it once}."""
    from stageflow.core.membership import reference_auc
    from stageflow.platform.engine.evaluation import EvalJob, answer_items, evaluate

    def nothing(*args, **kwargs):
        raise AssertionError("no generation in the teacher-forced suite")

    def suite(metrics: list[str]):
        job = EvalJob("forget", forget, [*metrics, "mia_reference"], holdout=holdout)
        return evaluate([job], learner.answer_stats, nothing)

    items = [i for row in forget for i in answer_items(row)]
    items += [i for row in holdout for i in answer_items(row, ("answer",))]
    answers = [answer_items(row, ("answer",))[0] for row in forget + holdout]
    stored = suite(["avg_loglik"])["examples"]
    prompts = [row["prompt"] for row in forget]
    return {
        "log-likelihoods alone": lambda: [sum(lps) for lps in learner.logprobs(items)],
        "teacher-forced suite": lambda: suite(TEACHER_FORCED),
        "suite without Min-K%++": lambda: suite(TEACHER_FORCED[:-1]),
        "GradNorm": lambda: learner.grad_norms(answers),
        "generation (ROUGE-L)": lambda: rollout.generate(
            prompts, temperature=0.0, max_tokens=tokens, seed=0
        ),
        "Reference (no model)": lambda: reference_auc(stored, stored, "forget"),
    }


def measure_all(args: argparse.Namespace) -> tuple[list[dict], dict]:
    from stageflow.core.tasks import generate

    size = "tiny" if args.quick else args.size
    splits = generate("facts", seed=0, size=4 * args.rows, params={"forget_fraction": 0.25})
    forget, holdout = splits["forget"][: args.rows], splits["holdout"][: args.rows]
    times: dict[str, list[float]] = {}
    order_rng = random.Random(0)
    with results_io.local_ray(num_cpus=2):
        for _, model_dir in results_io.tiny_models({size: SIZES[size]}):
            params = results_io.param_count(model_dir)
            with results_io.learner_and_engine(model_dir) as (learner, rollout):
                runs = sides(learner, rollout, forget, holdout, args.tokens)
                for run in runs.values():  # warm-up: first calls compile and allocate
                    run()
                for rep in range(args.reps):
                    for name in order_rng.sample(list(runs), len(runs)):
                        start = time.perf_counter()
                        runs[name]()
                        times.setdefault(name, []).append(time.perf_counter() - start)
                        print(f"rep {rep} {name}: {times[name][-1]:.3f} s", flush=True)
    base = times["log-likelihoods alone"]
    results = []
    for name in runs:
        values = times[name]
        ratios = [t / b for t, b in zip(values, base)]
        results.append(
            {
                "side": name,
                "model": size,
                "params": params,
                "seconds": statistics.median(values),
                "range": [min(values), max(values)],
                "ratio": statistics.median(ratios),
                "ratio_range": [min(ratios), max(ratios)],
                "runs": values,
            }
        )
    suite = next(r for r in results if r["side"] == "teacher-forced suite")
    return results, {"goal": GOAL, "met": suite["ratio"] <= GOAL}


def intro(meta: dict) -> str:
    return (
        f"Per checkpoint: {meta['rows']} forget rows (answer, a paraphrase, three perturbed "
        f"answers) and {meta['rows']} holdout rows, one learner rank and one vLLM engine "
        f"worker (1 CPU each, fp32); {meta['reps']} repetitions with the sides interleaved in "
        f"a new random order each time; median [min, max] seconds and ratio to the "
        f"log-likelihoods alone in the same repetition. Goal: the teacher-forced suite at most "
        f"{meta['goal']}x ({'met' if meta['met'] else 'not met'}); GradNorm, generation "
        f"({meta['tokens']} greedy tokens) and Reference are reported beside it "
        f"({results_io.load_phrase(meta)})."
    )


def span(values: list[float], digits: int = 3) -> str:
    return f"[{values[0]:.{digits}f}, {values[1]:.{digits}f}]"


BENCHMARK = results_io.Benchmark(
    name="evaluation_suite",
    doc=__doc__,
    arguments=arguments,
    quick={"reps": 2, "rows": 16, "tokens": 8},
    measure=measure_all,
    title="The unlearning evaluation per checkpoint against the log-likelihoods alone",
    intro=intro,
    columns=[
        ("side", "left", lambda r: r["side"]),
        ("params", "right", lambda r: f"{r['params'] / 1e6:.1f}M"),
        ("seconds", "right", lambda r: f"{r['seconds']:.3f} {span(r['range'])}"),
        (
            "vs log-likelihoods alone",
            "right",
            lambda r: f"{r['ratio']:.2f} {span(r['ratio_range'], 2)}",
        ),
    ],
)

if __name__ == "__main__":
    BENCHMARK.main()
