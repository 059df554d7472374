"""What every log-prob implementation returns, and the input checks they share."""

from __future__ import annotations

from typing import NamedTuple

import torch


class TokenLogProbs(NamedTuple):
    """Per-token selected log-probs and (when asked for) per-token entropies, both [N] or [B, T].

    Both are fp32 for fp32/bf16/fp16 inputs (float64 for float64 inputs): ratios and sums of
    log-probs in the losses need more than bf16's three digits.
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor | None


def result_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the softmax math and of the returned log-probs for inputs of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
) -> None:
    """Raise one clear ValueError when shapes or arguments do not fit h [N, H], W [V, H], y [N]."""
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"hidden must be [N, H] and weight [V, H]; got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden size differs: hidden {tuple(hidden.shape)} vs weight {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N]={hidden.shape[0]}; got {tuple(targets.shape)}")
    if targets.is_floating_point():
        raise ValueError(f"targets must be integer token ids; got dtype {targets.dtype}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V]={weight.shape[0]}; got {tuple(bias.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
