"""Weight masks of an unlearning stage: only the chosen weights change (SalUn, WAGLE).

At the stage's start the learner takes the gradient of the forget rows' token-mean NLL, g_f
(and for `attribution` the retain rows', g_r), summed over micro-batches and ranks, and scores
every trained weight:

    saliency     s = |g_f|                              (SalUn)
    attribution  s = |(theta - g_r / mu) * g_f|         (WAGLE; mu stands for the Hessian)

The mask keeps the top `fraction` of all trained weights by score (one threshold over the whole
model). During the stage a hook multiplies each weight's gradient by its mask before the
optimizer sees it; with no gradient and no weight decay (validation asks for weight_decay 0)
Adam leaves a weight exactly as it was, so the others stay bit-identical. Under LoRA the trained
weights are the adapters' matrices: the mask selects entries of A and B, so the merged change
B A is not sparse in the model's weights.

Under ZeRO-3 a rank holds a partition of each weight and of its gradient: the gradients come
from the engine's own backward (reduce-scattered), each rank scores its partitions, the ranks
gather the scores for the one threshold, and each keeps its partitions' mask, applied to its
partitions of the gradient after every backward (`apply`), before the optimizer steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from stageflow.core.config import MaskSpec

# lazy: DeepSpeed's partition API loads only for a mask under ZeRO-3


def weight_scores(
    spec: MaskSpec,
    params: list[torch.nn.Parameter],
    grad_forget: list[torch.Tensor],
    grad_retain: list[torch.Tensor] | None,
) -> list[torch.Tensor]:
    """Each trained weight's score, as the module docstring says."""
    if spec.kind == "saliency":
        return [g.abs() for g in grad_forget]
    if grad_retain is None:  # internal: validation asks an attribution mask for retain data
        raise RuntimeError("an attribution mask needs the retain rows' gradient")
    return [
        ((p.detach() - r / spec.mu) * f).abs() for p, f, r in zip(params, grad_forget, grad_retain)
    ]


def top_fraction(scores: list[torch.Tensor], fraction: float) -> list[torch.Tensor]:
    """Boolean masks of the `ceil(fraction * n)` highest scores of all n weights together
    (a score of -inf, a partition's padding, is never kept and not counted)."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    n = int(torch.isfinite(flat).sum()) if flat.numel() else 0
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[torch.topk(flat, max(1, math.ceil(fraction * n))).indices] = True
    return split_like(keep, scores)


def top_fraction_of_partitions(
    scores: list[torch.Tensor], fraction: float, rank: int, world: int
) -> list[torch.Tensor]:
    """`top_fraction` over every rank's partitions (equal sizes on every rank, padding -inf):
    the masks of this rank's partitions."""
    mine = torch.cat([s.reshape(-1).float() for s in scores])
    every = [torch.empty_like(mine) for _ in range(world)]
    torch.distributed.all_gather(every, mine)
    return split_like(top_fraction(every, fraction)[rank], scores)


def split_like(flat: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """`flat` cut into views shaped like `tensors`, in order."""
    out, at = [], 0
    for t in tensors:
        out.append(flat[at : at + t.numel()].view(t.shape))
        at += t.numel()
    return out


def partition_padding(param: torch.nn.Parameter, rank: int) -> torch.Tensor:
    """True at the entries of this rank's ZeRO-3 partition of `param` past its last element."""
    size = param.ds_tensor.numel()
    return torch.arange(rank * size, (rank + 1) * size) >= param.ds_numel


@dataclass
class GradientMask:
    """Zeroes the gradient of every weight outside its mask, until `remove()`: through
    gradient hooks on full weights (`attach`), or on a rank's ZeRO-3 partitions of the
    gradients after each backward (`on_partitions`, then `apply()` before every step)."""

    masks: list[torch.Tensor]
    fraction: float  # the share of the trained weights the stage may change
    handles: list = field(default_factory=list)
    partitioned: list[torch.nn.Parameter] = field(default_factory=list)

    @classmethod
    def attach(cls, params: list[torch.nn.Parameter], masks: list[torch.Tensor]) -> GradientMask:
        kept = sum(int(m.sum()) for m in masks)
        out = cls(masks, kept / max(1, sum(m.numel() for m in masks)))
        for p, m in zip(params, masks):
            keep = m.to(p.dtype)
            out.handles.append(p.register_hook(lambda g, keep=keep: g * keep))
        return out

    @classmethod
    def on_partitions(
        cls, params: list[torch.nn.Parameter], masks: list[torch.Tensor]
    ) -> GradientMask:
        kept = torch.tensor([float(sum(int(m.sum()) for m in masks))])
        torch.distributed.all_reduce(kept)
        total = sum(p.ds_numel for p in params)
        return cls([m.float() for m in masks], float(kept) / max(1, total), [], params)

    def apply(self) -> None:
        """ZeRO-3: multiply this rank's partitions of the gradients by the mask (after the
        backward, before the step); nothing for hooks, which did it during the backward."""
        if not self.partitioned:
            return
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

        for p, keep in zip(self.partitioned, self.masks):
            safe_set_local_grad(p, safe_get_local_grad(p) * keep.view(-1))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.partitioned = []
