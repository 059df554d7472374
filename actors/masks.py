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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from stageflow.core.config import MaskSpec


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
    """Boolean masks of the `ceil(fraction * n)` highest scores of all n weights together."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[torch.topk(flat, max(1, math.ceil(fraction * flat.numel()))).indices] = True
    masks, at = [], 0
    for s in scores:
        masks.append(keep[at : at + s.numel()].view(s.shape))
        at += s.numel()
    return masks


@dataclass
class GradientMask:
    """Hooks that zero the gradient of every weight outside its mask, until `remove()`."""

    masks: list[torch.Tensor]
    handles: list = field(default_factory=list)

    @classmethod
    def attach(cls, params: list[torch.nn.Parameter], masks: list[torch.Tensor]) -> GradientMask:
        out = cls(masks)
        for p, m in zip(params, masks):
            keep = m.to(p.dtype)
            out.handles.append(p.register_hook(lambda g, keep=keep: g * keep))
        return out

    @property
    def fraction(self) -> float:
        """The share of the trained weights the stage may change."""
        return sum(int(m.sum()) for m in self.masks) / max(1, sum(m.numel() for m in self.masks))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
