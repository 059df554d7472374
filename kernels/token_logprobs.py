"""What every log-prob implementation takes, returns and checks.

Every entry point and implementation is `fn(hidden, weight, targets, **options)`: the keywords
are `LogProbOptions` (typed for editors and type checkers), their defaults and checks live
once in `Options`, and each function names which of the non-head keywords it takes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, TypedDict

import torch

Tensor = torch.Tensor
HEAD = ("bias", "temperature", "softcap", "with_entropy", "with_argmax", "with_std")


class LogProbOptions(TypedDict, total=False):
    """bias [V] or None; temperature T > 0 (logits / T); softcap c > 0 or None (logits become
    c tanh(z / c) before the temperature: Gemma2's final-logit soft-capping); with_entropy,
    with_argmax, with_std: the extra outputs (no gradient flows through the argmax and std);
    impl (entry points); chunk_size (tokens per chunk), vocab_chunk_size (chunked) or
    block_v (Triton): the tiles of the fused paths; compute_dtype (naive: logits dtype)."""

    bias: Tensor | None
    temperature: float
    softcap: float | None
    with_entropy: bool
    with_argmax: bool
    with_std: bool
    impl: str
    chunk_size: int | None
    vocab_chunk_size: int | None
    block_v: int | None
    compute_dtype: torch.dtype | None


@dataclasses.dataclass(frozen=True)
class Options:
    """`LogProbOptions` with their defaults."""

    bias: Tensor | None = None
    temperature: float = 1.0
    softcap: float | None = None
    with_entropy: bool = False
    with_argmax: bool = False
    with_std: bool = False
    impl: str = "fused"
    chunk_size: int | None = None
    vocab_chunk_size: int | None = None
    block_v: int | None = None
    compute_dtype: torch.dtype | None = None

    @classmethod
    def of(cls, fn: str, given: dict[str, Any], takes: tuple[str, ...] = ()) -> Options:
        """`given` keywords of `fn`, which takes the head keywords and `takes`."""
        unknown = sorted(set(given) - set(HEAD) - set(takes))
        if unknown:
            raise TypeError(f"{fn}() got an unexpected keyword argument '{unknown[0]}'")
        return cls(**given)

    def head(self, **changes: Any) -> dict[str, Any]:
        """The head keywords (with `changes`), to pass on to an implementation."""
        return {**{k: getattr(self, k) for k in HEAD}, **changes}


class TokenLogProbs(NamedTuple):
    """Per-token selected log-probs and (when asked for) entropies and argmax flags, [N] or [B, T].

    Log-probs and entropies are fp32 for fp32/bf16/fp16 inputs (float64 for float64 inputs):
    ratios and sums of log-probs in the losses need more than bf16's three digits. `is_argmax`
    (bool) is True where the target's logit is the row's maximum (ties count), for metrics such
    as exact memorisation; `std` is the standard deviation of log p over the vocabulary under p
    (Min-K%++ standardises a token's log-prob by it and by the mean, minus the entropy). Both
    default to None so two-field constructions keep working.
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    is_argmax: torch.Tensor | None = None
    std: torch.Tensor | None = None


def result_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the softmax math and of the returned log-probs for inputs of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_inputs(hidden: Tensor, weight: Tensor, targets: Tensor, options: Options) -> None:
    """Raise one clear ValueError when shapes or arguments do not fit h [N, H], W [V, H], y [N]."""
    bias, temperature = options.bias, options.temperature
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
    if options.softcap is not None and not options.softcap > 0:
        raise ValueError(f"softcap must be > 0 or None; got {options.softcap}")
