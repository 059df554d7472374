"""What a learner rank computes besides its training steps, on the weights it holds: the
tokenised batches both share (`_encode`, `_batch`, `_forward`), per-token log-probs and
evaluation statistics in no-grad forwards (`logprobs`, `answer_stats`), per-row gradient norms
(`grad_norms`, GradNorm's attack), answer values gathered over ranks (the probability-mass
probe, ABL's isolation pass) and the gradients that score a stage's weight mask.
`LearnerWorker` (actors/learner_worker.py) inherits it; the methods read the rank's state
(`policy`, `engine`, `ref`, `tokenizer`, `rank`, `world`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from stageflow.actors.batching import TokenBatch, collate, completion_values
from stageflow.actors.dispatch import SPLIT, dispatch
from stageflow.actors.masks import (
    GradientMask,
    partition_padding,
    top_fraction,
    top_fraction_of_partitions,
    weight_scores,
)
from stageflow.actors.metrics import AnswerStats
from stageflow.actors.rendering import Completion, encode_item
from stageflow.core.config import StageSpec

# lazy: DeepSpeed's partition API loads only for a mask under ZeRO-3

FORWARD_MICRO_BATCH = 32  # sequences per no-grad forward (log-probs, evaluation)


class LearnerScoring:
    """A learner rank's forwards that score rather than train (see the module docstring)."""

    def _encode(self, items: list[Any], max_len: int = 1 << 30) -> list[tuple[list[int], int]]:
        return [encode_item(self.tokenizer, it, max_len) for it in items]

    def _batch(self, encoded: list[tuple[list[int], int]]) -> TokenBatch:
        if not encoded:  # a rank with no rows still runs one forward (ZeRO-3 collectives); weight 0
            encoded = [([self.tokenizer.bos_token_id or 0, self.tokenizer.eos_token_id or 0], 1)]
        return collate([e[0] for e in encoded], [e[1] for e in encoded], self.pad_id)

    def _forward(self, module: Any, batch: TokenBatch, **kwargs: Any) -> Any:
        return module(
            batch.input_ids.to(self.device),
            batch.attention_mask.to(self.device),
            batch.mask.to(self.device),
            **kwargs,
        )

    def _weight_mask(
        self, stage: StageSpec, encoded: list, retain_rows: list[dict] | None
    ) -> GradientMask:
        """The stage's weight mask (actors/masks.py), scored on the forget rows (and as many
        retain rows for `attribution`) before its first step, the same on every rank (under
        ZeRO-3 each rank's on its partitions)."""
        params = [p for p in self.policy.parameters() if p.requires_grad]
        retain = None
        if stage.mask.kind == "attribution":
            retain = self._encode((retain_rows or [])[: len(encoded)], stage.max_len)
        if self.zero3:
            return self._partition_mask(stage, params, encoded, retain)
        grad_forget = self._loss_grads(encoded, params)
        grad_retain = None if retain is None else self._loss_grads(retain, params)
        scores = weight_scores(stage.mask, params, grad_forget, grad_retain)
        return GradientMask.attach(params, top_fraction(scores, stage.mask.fraction))

    def _partition_mask(
        self, stage: StageSpec, params: list, encoded: list, retain: list | None
    ) -> GradientMask:
        """`_weight_mask` under ZeRO-3: scores of this rank's partitions (padding -inf)."""
        from deepspeed.utils import safe_get_local_fp32_param

        grad_forget = self._partition_grads(encoded, params)
        grad_retain = None if retain is None else self._partition_grads(retain, params)
        theta = [safe_get_local_fp32_param(p) for p in params]
        scores = weight_scores(stage.mask, theta, grad_forget, grad_retain)
        for score, p in zip(scores, params):
            score[partition_padding(p, self.rank)] = -math.inf
        masks = top_fraction_of_partitions(scores, stage.mask.fraction, self.rank, self.world)
        return GradientMask.on_partitions(params, masks)

    def _loss_grads(self, encoded: list, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
        """The gradient of the rows' token-mean NLL (over all rows and ranks) with respect to
        `params`: each rank its share, in micro-batches, then summed over ranks."""
        total = [torch.zeros_like(p) for p in params]
        tokens = max(1, sum(len(ids) - prompt for ids, prompt in encoded))
        mine = encoded[self.rank :: self.world]
        self.policy.eval()
        for at in range(0, len(mine), FORWARD_MICRO_BATCH):
            batch = self._batch(mine[at : at + FORWARD_MICRO_BATCH])
            nll = -self._forward(self.policy, batch).sum() / tokens
            for acc, grad in zip(total, torch.autograd.grad(nll, params)):
                acc += grad
        for acc in total:
            torch.distributed.all_reduce(acc)
        return total

    def _partition_grads(self, encoded: list, params: list) -> list[torch.Tensor]:
        """`_loss_grads` under ZeRO-3: this rank's partition of each gradient, from the
        engine's backward (which averages over ranks, hence the factor), one micro-batch at a
        time and zeroed after each, as many backwards on every rank (they are collective)."""
        from deepspeed.utils import safe_get_local_grad

        total = [torch.zeros(p.ds_tensor.numel()) for p in params]
        tokens = max(1, sum(len(ids) - prompt for ids, prompt in encoded))
        mine = encoded[self.rank :: self.world]
        chunks = [
            mine[i : i + FORWARD_MICRO_BATCH] for i in range(0, len(mine), FORWARD_MICRO_BATCH)
        ]
        count = torch.tensor([len(chunks)])
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        self.policy.eval()
        for i in range(int(count)):
            chunk = chunks[i] if i < len(chunks) else []
            nll = -self._forward(self.engine, self._batch(chunk)).sum() / tokens
            self.engine.backward(nll * (1.0 if chunk else 0.0))
            for acc, p in zip(total, params):
                acc += safe_get_local_grad(p).view(-1) * self.world
            self.engine.optimizer.zero_grad()
        return total

    def _answer_values(self, items: list[dict], value: Callable[[AnswerStats], float]) -> list:
        """`value` of every item's answer statistics, each rank scoring its share (every rank
        gets the whole list, in order): the probability-mass probe, ABL's isolation pass."""
        mine = [value(s) for s in self.answer_stats(items[self.rank :: self.world])]
        shares: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(shares, mine)
        out: list = [None] * len(items)
        for rank, share in enumerate(shares):
            out[rank :: self.world] = share
        return out

    # ----- no-grad forwards: log-probs and evaluation statistics -------------------------------
    def _no_grad_forwards(self, items: list[dict], module: Any, read: Any) -> list:
        """`read(module, batch)` over micro-batches of `items`: one result per item, in order.

        Under ZeRO-3 every rank runs as many forwards as the busiest one (gathers are collective).
        """
        encoded = self._encode(items)
        chunks = [
            encoded[i : i + FORWARD_MICRO_BATCH]
            for i in range(0, len(encoded), FORWARD_MICRO_BATCH)
        ]
        n_calls = len(chunks)
        if self.zero3 and self.engine is not None:
            count = torch.tensor([n_calls])
            torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
            n_calls = int(count)
        out: list = []
        module.eval()
        with torch.no_grad():
            for i in range(n_calls):
                chunk = chunks[i] if i < len(chunks) else []
                out += read(module, self._batch(chunk))[: len(chunk)]
        return out

    def _module(self, reference: bool = False) -> Any:
        if reference:
            if self.ref is None:
                raise RuntimeError("no pi_ref: the stage's objective does not need one")
            return self.ref
        if self.uld is not None or self.combined is not None:  # a ULD stage's unlearned model
            return self._combined_module()
        return self.engine if self.engine is not None else self.policy

    @dispatch(SPLIT)
    def logprobs(
        self,
        items: list[dict] | list[Completion],
        temperature: float = 1.0,
        reference: bool = False,
    ) -> list[list[float]]:
        """Per-token log-probs of each item's answer (a `prompt`/`answer` row) or completion (a
        `Completion`); under pi_ref (taken by `begin_stage`) when `reference`."""

        def read(module: Any, batch: TokenBatch) -> list[list[float]]:
            values = self._forward(module, batch, temperature=temperature)
            return completion_values(values.cpu(), batch)

        return self._no_grad_forwards(items, self._module(reference), read)

    @dispatch(SPLIT)
    def grad_norms(self, items: list[dict]) -> list[float]:
        """The L2 norm of the gradient of each item's mean answer NLL with respect to the model's
        weights (`mia_gradnorm`; LoRA adapters aside, frozen weights included, so the value does
        not depend on what the last stage trained): one forward and backward per item, on the
        weights this rank holds (ZeRO 0-2; validation refuses ZeRO-3); weights, optimizer and
        `requires_grad` are left as they were."""
        module = self.policy
        named = [(n, p) for n, p in module.named_parameters() if "lora_" not in n]
        trained = [p.requires_grad for _, p in named]
        params = [p.requires_grad_(True) for _, p in named]
        module.eval()
        norms = []
        try:
            for encoded in self._encode(items):
                batch = self._batch([encoded])
                logprobs = self._forward(module, batch)
                nll = -logprobs.sum() / batch.mask.sum().clamp(min=1)
                grads = torch.autograd.grad(nll, params)
                norms.append(float(torch.sqrt(sum(g.double().square().sum() for g in grads))))
        finally:
            for p, flag in zip(params, trained):
                p.requires_grad_(flag)
        return norms

    @dispatch(SPLIT)
    def answer_stats(self, items: list[dict], standardized: bool = False) -> list[AnswerStats]:
        """Teacher-forced statistics of each `prompt`/`answer` item's answer tokens (EOS
        included, as trained): summed log-prob, length, argmax hits, extraction prefix k and
        each token's log-prob; with `standardized`, each token's (log p - mu) / sigma too, mu
        and sigma the mean and std of log p under p (Min-K%++), from the same head pass."""

        def read(module: Any, batch: TokenBatch) -> list[AnswerStats]:
            out = self._forward(module, batch, with_argmax=True, with_std=standardized)
            columns = [out.logprobs, out.is_argmax.float()]
            if standardized:  # mu = -entropy
                columns.append((out.logprobs + out.entropy) / out.std.clamp(min=1e-12))
            stats = []
            for lps, hits, *z in zip(*(completion_values(c.cpu(), batch) for c in columns)):
                misses = [i for i, hit in enumerate(hits) if not hit]
                k = misses[-1] + 1 if misses else 0
                stats.append(
                    AnswerStats(float(sum(lps)), len(lps), int(sum(hits)), k, tuple(lps), tuple(*z))
                )
            return stats

        return self._no_grad_forwards(items, self._module(), read)
