"""`Evaluator`: a Ray actor that scores a model directory on evaluation sets.

Log-likelihood metrics come from teacher-forced forward passes in transformers;
generation accuracy comes from sampled completions (a rollout worker's `generate`),
checked by the task's rule. Returns a flat {"<set>/<metric>": value} dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stageflow.actors.metrics import AnswerStats, ExampleStats, truth_ratios
from stageflow.platform.registry import METRICS, TASKS, load_plugins


@dataclass(frozen=True)
class EvalJob:
    """One evaluation set to score: its rows, registered metric names and sampling options."""

    name: str
    rows: list[dict]
    metrics: list[str]
    task: str | None = None
    samples: int = 1
    max_new_tokens: int = 32
    temperature: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)


def exact_match(row: dict, completion: str) -> bool:
    """The checker for user JSONL sets: the completion's first line equals the answer."""
    return completion.strip().split("\n")[0].strip() == row["answer"].strip()


class Evaluator:
    """Holds one transformers model at a time; reloads only when asked for another directory."""

    def __init__(self, batch_size: int = 32, max_len: int = 512):
        import torch

        load_plugins()
        torch.set_num_threads(1)
        self.batch_size, self.max_len = batch_size, max_len
        self._model_dir: str | None = None
        self.model = self.tokenizer = None

    def _load(self, model_dir: str) -> None:
        if model_dir == self._model_dir:
            return
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self._model_dir = model_dir

    def evaluate(self, model_dir: str | Path, jobs: list[EvalJob], rollout: Any = None) -> dict:
        """Score `model_dir` on every job; generation metrics sample through `rollout`."""
        return self.evaluate_detailed(model_dir, jobs, rollout)["metrics"]

    def evaluate_detailed(
        self, model_dir: str | Path, jobs: list[EvalJob], rollout: Any = None
    ) -> dict:
        """{"metrics": {"<set>/<metric>": value}, "examples": {"<set>/truth_ratio": [per example]}}."""
        self._load(str(model_dir))
        results: dict[str, float] = {}
        examples: dict[str, list[float]] = {}
        for job in jobs:
            kinds = {METRICS[m].meta["needs"] for m in job.metrics}
            stats = self.answer_stats(job.rows) if "loglik" in kinds else None
            correct = self.generation_correct(job, rollout) if "generation" in kinds else None
            for metric in job.metrics:
                entry = METRICS[metric]
                value = entry.fn(stats if entry.meta["needs"] == "loglik" else correct)
                results[f"{job.name}/{metric}"] = float(value)
            if stats is not None and (ratios := truth_ratios(stats)):
                examples[f"{job.name}/truth_ratio"] = ratios
        return {"metrics": results, "examples": examples}

    def answer_stats(self, rows: list[dict]) -> list[ExampleStats]:
        """Teacher-forced statistics of each row's answer, paraphrases and perturbed answers."""
        pairs, layout = [], []
        for row in rows:
            paraphrased = row.get("paraphrased_answers") or (
                [row["paraphrased_answer"]] if "paraphrased_answer" in row else []
            )
            perturbed = row.get("perturbed_answers", [])
            layout.append((len(paraphrased), len(perturbed)))
            pairs += [(row["prompt"], a) for a in [row["answer"], *paraphrased, *perturbed]]
        flat = self.pair_stats(pairs)
        examples, at = [], 0
        for n_para, n_pert in layout:
            answer, para = flat[at], tuple(flat[at + 1 : at + 1 + n_para])
            pert = tuple(flat[at + 1 + n_para : at + 1 + n_para + n_pert])
            examples.append(ExampleStats(answer, para, pert))
            at += 1 + n_para + n_pert
        return examples

    def pair_stats(self, pairs: list[tuple[str, str]]) -> list[AnswerStats]:
        import torch

        out: list[AnswerStats] = []
        pad = self.tokenizer.pad_token_id or 0
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            encoded = [self._encode(p, a) for p, a in chunk]
            width = max(len(ids) for ids, _ in encoded)
            ids = torch.full((len(encoded), width), pad, dtype=torch.long)
            attention = torch.zeros_like(ids)
            for i, (row_ids, _) in enumerate(encoded):
                ids[i, : len(row_ids)] = torch.tensor(row_ids)
                attention[i, : len(row_ids)] = 1
            with torch.no_grad():
                logits = self.model(input_ids=ids, attention_mask=attention).logits.float()
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
            for i, (row_ids, answer_start) in enumerate(encoded):
                labels = torch.tensor(row_ids[answer_start:])
                positions = torch.arange(answer_start - 1, len(row_ids) - 1)
                token_lp = logprobs[i, positions].gather(-1, labels[:, None]).squeeze(-1)
                hits = logprobs[i, positions].argmax(-1) == labels
                misses = (~hits).nonzero()
                k = int(misses[-1]) + 1 if len(misses) else 0
                out.append(AnswerStats(float(token_lp.sum()), len(labels), int(hits.sum()), k))
        return out

    def _encode(self, prompt: str, answer: str) -> tuple[list[int], int]:
        """Prompt ids (with the tokenizer's specials) then answer ids; returns (ids, answer start)."""
        prompt_ids = self.tokenizer(prompt)["input_ids"]
        answer_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        ids = (prompt_ids + answer_ids)[: self.max_len]
        return ids, min(len(prompt_ids), len(ids) - 1)

    def generation_correct(self, job: EvalJob, rollout: Any) -> list[list[bool]]:
        """Sample `job.samples` completions per prompt through the rollout service and check each."""
        import ray

        if rollout is None:
            raise ValueError(
                f"evaluation set '{job.name}' needs a rollout worker for generation metrics"
            )
        check = TASKS[job.task].meta["check"] if job.task else exact_match
        prompts = [row["prompt"] for row in job.rows]
        result = ray.get(
            rollout.generate.remote(
                self._model_dir,
                prompts,
                n=job.samples,
                temperature=job.temperature,
                max_tokens=job.max_new_tokens,
                seed=job.options.get("seed", 0),
            )
        )
        texts = result["texts"]
        return [[check(row, text) for text in texts[i]] for i, row in enumerate(job.rows)]
