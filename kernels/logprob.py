"""Entry points of the fused log-prob primitive; they pick the implementation.

impl: "fused" / "auto" (Triton on CUDA when triton is installed, else the chunked torch path),
"chunked", "triton", "naive" (full logits in the input dtype, plain autograd) or "reference"
(float64, for tests). The learner calls `per_token_logprobs(hidden, lm_head.weight, targets,
mask, impl=...)` with its model's last hidden states and feeds the result to kernels/losses.py.
"""

from __future__ import annotations

from typing import Literal

import torch

from stageflow.kernels.chunked import chunked_token_logprobs
from stageflow.kernels.reference import naive_token_logprobs, reference_token_logprobs
from stageflow.kernels.token_logprobs import TokenLogProbs

Impl = Literal["auto", "fused", "chunked", "triton", "naive", "reference"]
IMPLS = ("auto", "fused", "chunked", "triton", "naive", "reference")


def resolve_impl(impl: str, device: torch.device) -> str:
    """The concrete implementation ("chunked", "triton", "naive", "reference") for `impl`."""
    if impl not in IMPLS:
        raise ValueError(f"kernels impl must be one of {', '.join(IMPLS)}; got {impl!r}")
    if impl in ("auto", "fused"):
        from stageflow.kernels.triton_logprob import HAS_TRITON

        return "triton" if device.type == "cuda" and HAS_TRITON else "chunked"
    return impl


def fused_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    impl: Impl = "auto",
    chunk_size: int | None = None,
) -> TokenLogProbs:
    """log softmax((h @ W.T + b) / T)[y] per token, and the entropy when `with_entropy`.

    hidden [N, H], weight [V, H], bias [V] or None, targets [N] token ids. Returns
    `TokenLogProbs(logprobs [N], entropy [N] or None)`, fp32 (float64 for float64 inputs).
    The fused paths never hold the N x V logits; `chunk_size` is tokens per chunk.
    """
    kind = resolve_impl(impl, hidden.device)
    kwargs = dict(bias=bias, temperature=temperature, with_entropy=with_entropy)
    if kind == "chunked":
        return chunked_token_logprobs(hidden, weight, targets, chunk_size=chunk_size, **kwargs)
    if kind == "triton":
        from stageflow.kernels.triton_logprob import triton_token_logprobs

        return triton_token_logprobs(hidden, weight, targets, chunk_size=chunk_size, **kwargs)
    if kind == "naive":
        return naive_token_logprobs(hidden, weight, targets, **kwargs)
    return reference_token_logprobs(hidden, weight, targets, **kwargs)


def per_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    impl: Impl = "fused",
    chunk_size: int | None = None,
) -> TokenLogProbs:
    """Per-token log-probs [B, T] (and entropies) from hidden states [B, T, H].

    hidden[:, t] must already be aligned with targets[:, t] (the caller shifts by one).
    With a mask [B, T] only the masked-in tokens are computed (targets elsewhere may be
    anything, e.g. -100); the outputs are 0 at masked-out positions and get no gradient there.
    """
    if hidden.dim() != 3 or targets.shape != hidden.shape[:2]:
        raise ValueError(
            f"hidden must be [B, T, H] and targets [B, T]; got {tuple(hidden.shape)} "
            f"and {tuple(targets.shape)}"
        )
    if mask is not None and mask.shape != targets.shape:
        raise ValueError(f"mask must be [B, T]={tuple(targets.shape)}; got {tuple(mask.shape)}")
    batch_shape = targets.shape
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_y = targets.reshape(-1)
    kwargs = dict(
        bias=bias,
        temperature=temperature,
        with_entropy=with_entropy,
        impl=impl,
        chunk_size=chunk_size,
    )
    if mask is None:
        out = fused_token_logprobs(flat_h, weight, flat_y, **kwargs)
        entropy = None if out.entropy is None else out.entropy.view(batch_shape)
        return TokenLogProbs(out.logprobs.view(batch_shape), entropy)
    keep = mask.reshape(-1).bool()
    out = fused_token_logprobs(flat_h[keep], weight, flat_y[keep], **kwargs)

    def scatter(values: torch.Tensor) -> torch.Tensor:
        full = values.new_zeros(flat_y.shape[0])
        return full.masked_scatter(keep, values).view(batch_shape)

    entropy = None if out.entropy is None else scatter(out.entropy)
    return TokenLogProbs(scatter(out.logprobs), entropy)
