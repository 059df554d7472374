"""The baseline of benchmarks/vs_script.py: the for-loop a researcher would write instead of
a stageflow study. Plain transformers + torch in one process. Its tokenisation, LR schedule and
losses are written here on purpose, not imported from stageflow: only the data sets' answer
checkers and refusal rule are stageflow's.

    python benchmarks/hand_written.py PLAN.json            # the careful loop
    python benchmarks/hand_written.py PLAN.json --naive    # every trial from the base model

PLAN.json (written by vs_script.py from a study): the base model directory, every stage's
settings and data file, the evaluation sets and the trials (path, unlearning branches, seed).

The careful loop does what a researcher who knows the study's shape writes: per seed it walks
the tree of the trials' paths depth first, trains each distinct prefix once (a model shared by
two paths is deep-copied where they part, as the unlearning branches are), evaluates each
distinct checkpoint once (the base model once in all), and runs every unlearning branch from
its path's end. The naive loop runs each trial alone: it loads the base model, evaluates it,
trains and evaluates the path's stages one after another, then the branches. Both give the
same metrics (every stage's data order is seeded by the trial's seed and the stage's position;
nothing else draws random numbers).

Training: AdamW with the stage's LR schedule and gradient clipping, the loss on the answer
tokens (prompt, answer, EOS). Evaluation: teacher-forced log-likelihoods, and greedy generation
with `generate` checked by the data set's rule (accuracy) or for a refusal (refusal_rate).
Prints one JSON line: wall time, optimizer-step time and count, evaluation time and count, the
final metrics of every trial.
"""

from __future__ import annotations

import copy
import json
import math
import random
import sys
import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

CLOCK = {
    "optimizer_steps": 0.0,
    "steps": 0,
    "eval_loglik": 0.0,
    "eval_generation": 0.0,
    "evaluations": 0,
}
STEP_SECONDS: dict[str, list[float]] = {}  # stage name -> seconds of each of its optimizer steps


def encode(tok, row: dict, max_len: int = 1 << 30) -> tuple[list[int], int]:
    prompt = tok(row["prompt"])["input_ids"]
    ids = prompt + tok(row["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return ids[:max_len], min(len(prompt), max_len)


def collate(tok, encoded: list[tuple[list[int], int]]):
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), tok.pad_token_id)
    attention = torch.zeros_like(ids)
    mask = torch.zeros(len(encoded), width - 1)
    for i, (seq, n_prompt) in enumerate(encoded):
        ids[i, : len(seq)] = torch.tensor(seq)
        attention[i, : len(seq)] = 1
        mask[i, n_prompt - 1 : len(seq) - 1] = 1.0
    return ids, attention, mask


def token_logprobs(model, ids, attention) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
    return torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def lr_multiplier(step: int, total: int, schedule: str, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress) if schedule == "linear" else 1.0


def loss_of(objective: str, logp, mask, ref_logp, beta: float) -> torch.Tensor:
    nll = -(logp * mask).sum() / mask.sum()
    if objective == "sft":
        return nll
    if objective == "ga":
        return -nll
    if objective == "npo":
        log_ratio = (logp * mask).sum(1) - (ref_logp * mask).sum(1)
        return (-2.0 / beta * F.logsigmoid(-beta * log_ratio)).mean()
    raise ValueError(f"the hand-written loop has no objective '{objective}'")


def train(model, tok, name: str, stage: dict, rows: list[dict], seed: int) -> None:
    """One stage: its steps of AdamW on batches drawn epoch by epoch from `rows`."""
    encoded = [encode(tok, r, stage["max_len"]) for r in rows]
    ref = None
    if stage["objective"] == "npo":
        ref = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=stage["lr"], weight_decay=stage["weight_decay"])
    steps = stage["steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_multiplier(s, steps, stage["schedule"], stage["warmup_steps"])
    )
    rng, order = random.Random(seed), []
    model.train()
    for _ in range(steps):
        while len(order) < stage["batch_size"]:
            perm = list(range(len(rows)))
            rng.shuffle(perm)
            order += perm
        batch, order = order[: stage["batch_size"]], order[stage["batch_size"] :]
        ids, attention, mask = collate(tok, [encoded[i] for i in batch])
        start = time.perf_counter()
        logp = token_logprobs(model, ids, attention)
        ref_logp = None
        if ref is not None:
            with torch.no_grad():
                ref_logp = token_logprobs(ref, ids, attention)
        loss = loss_of(stage["objective"], logp, mask, ref_logp, stage.get("beta", 0.1))
        opt.zero_grad()
        loss.backward()
        if stage["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), stage["grad_clip"])
        opt.step()
        sched.step()
        seconds = time.perf_counter() - start
        CLOCK["optimizer_steps"] += seconds
        CLOCK["steps"] += 1
        STEP_SECONDS.setdefault(name, []).append(seconds)


@torch.no_grad()
def mean_logprobs(model, tok, items: list[dict]) -> list[float]:
    """Each item's answer log-likelihood per token (EOS included), 32 sequences per forward."""
    out = []
    for at in range(0, len(items), 32):
        encoded = [encode(tok, it) for it in items[at : at + 32]]
        ids, attention, mask = collate(tok, encoded)
        logp = token_logprobs(model, ids, attention)
        out += ((logp * mask).sum(1) / mask.sum(1)).tolist()
    return out


@torch.no_grad()
def greedy(model, tok, prompts: list[str], max_new_tokens: int) -> list[str]:
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(
        **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
    )
    return tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def evaluate(model, tok, sets: dict, checks: dict, refused) -> dict[str, float]:
    model.eval()
    CLOCK["evaluations"] += 1
    metrics = {}
    for name, s in sets.items():
        rows = s["rows"]
        start = time.perf_counter()
        if "avg_loglik" in s["metrics"]:
            lps = mean_logprobs(model, tok, rows)
            metrics[f"{name}/avg_loglik"] = sum(lps) / len(lps)
        if "paraphrase_loglik" in s["metrics"]:
            items = [
                {"prompt": r["prompt"], "answer": a}
                for r in rows
                for a in [r["answer"], *r["paraphrased_answers"]]
            ]
            lps = mean_logprobs(model, tok, items)
            metrics[f"{name}/paraphrase_loglik"] = sum(lps) / len(lps)
        CLOCK["eval_loglik"] += time.perf_counter() - start
        generated = [m for m in s["metrics"] if m in ("accuracy", "refusal_rate")]
        if generated:
            start = time.perf_counter()
            texts = greedy(model, tok, [r["prompt"] for r in rows], s["max_new_tokens"])
            if "accuracy" in generated:
                hits = [checks[name](r, t) for r, t in zip(rows, texts)]
                metrics[f"{name}/accuracy"] = sum(hits) / len(hits)
            if "refusal_rate" in generated:
                refusals = [refused(t) for t in texts]
                metrics[f"{name}/refusal_rate"] = sum(refusals) / len(refusals)
            CLOCK["eval_generation"] += time.perf_counter() - start
    return metrics


class Loop:
    """The plan's model, tokenizer, data and evaluation sets, and the two ways to run it."""

    def __init__(self, plan: dict, checks: dict, refused):
        self.plan, self.checks, self.refused = plan, checks, refused
        self.tok = AutoTokenizer.from_pretrained(plan["model_dir"])
        self.rows = {path: [json.loads(line) for line in open(path)] for path in plan["data_files"]}
        self.sets = {
            name: {**s, "rows": self.rows[s["data"]][: s["max_examples"]]}
            for name, s in plan["eval_sets"].items()
        }

    def base(self):
        return AutoModelForCausalLM.from_pretrained(self.plan["model_dir"], dtype=torch.float32)

    def evaluate(self, model) -> dict[str, float]:
        return evaluate(model, self.tok, self.sets, self.checks, self.refused)

    def train(self, model, name: str, seed: int) -> None:
        stage = self.plan["stages"][name]
        train(model, self.tok, name, stage, self.rows[stage["data"]], seed)

    def branches(self, model, trial: dict, final: dict) -> dict:
        """Every unlearning branch of `trial` from `model` (its path's end), evaluated."""
        for name in trial["unlearning"]:
            branch = copy.deepcopy(model)
            self.train(branch, name, trial["seed"] * 100 + 99)
            final = {**final, **{f"{name}/{k}": v for k, v in self.evaluate(branch).items()}}
        return {"trial": trial, "metrics": final}

    def naive(self) -> list[dict]:
        finals = []
        for trial in self.plan["trials"]:
            torch.manual_seed(trial["seed"])
            model = self.base()
            final = self.evaluate(model)
            for index, name in enumerate(trial["path"], start=1):
                self.train(model, name, trial["seed"] * 100 + index)
                final.update(self.evaluate(model))
            finals.append(self.branches(model, trial, final))
        return finals

    def careful(self) -> list[dict]:
        base = self.base()
        at_base = self.evaluate(base)
        finals = []
        for seed in sorted({t["seed"] for t in self.plan["trials"]}):
            torch.manual_seed(seed)
            trials = [t for t in self.plan["trials"] if t["seed"] == seed]
            finals += self.walk(copy.deepcopy(base), [], trials, at_base)
        order = {id(t): i for i, t in enumerate(self.plan["trials"])}
        return sorted(finals, key=lambda f: order[id(f["trial"])])

    def walk(self, model, prefix: list[str], trials: list[dict], final: dict) -> list[dict]:
        """The trials below `prefix` (whose model is `model`, its metrics so far `final`):
        those ending here branch, the others continue with each next stage once."""
        finals = [self.branches(model, t, final) for t in trials if len(t["path"]) == len(prefix)]
        following: dict[str, list[dict]] = {}
        for t in trials:
            if len(t["path"]) > len(prefix):
                following.setdefault(t["path"][len(prefix)], []).append(t)
        for number, (name, below) in enumerate(following.items(), start=1):
            child = model if number == len(following) else copy.deepcopy(model)
            self.train(child, name, below[0]["seed"] * 100 + len(prefix) + 1)
            finals += self.walk(child, [*prefix, name], below, {**final, **self.evaluate(child)})
        return finals


def main(plan: dict, checks: dict, refused, naive: bool = False) -> dict:
    wall = time.perf_counter()
    loop = Loop(plan, checks, refused)
    finals = loop.naive() if naive else loop.careful()
    wall = time.perf_counter() - wall
    stage_steps = {name: [sum(times), len(times)] for name, times in STEP_SECONDS.items()}
    return {"wall_s": wall, **CLOCK, "stage_steps": stage_steps, "trials": finals}


if __name__ == "__main__":
    from stageflow.core.registry import TASKS  # the data sets' answer-checking rules
    from stageflow.core.tasks.refusal import is_refusal

    plan = json.loads(open(sys.argv[1]).read())
    checks = {name: TASKS[s["task"]].check for name, s in plan["eval_sets"].items()}
    print(json.dumps(main(plan, checks, is_refusal, naive="--naive" in sys.argv)))
