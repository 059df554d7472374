"""Entry points of the fused log-prob primitive; they pick the implementation.

impl: "fused" / "auto" (Triton on CUDA when triton is installed, else the chunked torch path),
"chunked", "triton", "naive" (full logits in the input dtype, plain autograd) or "reference"
(float64, for tests); with `with_argmax`, "auto" / "fused" / "triton" mean "chunked". The
learner calls `per_token_logprobs(hidden, lm_head.weight, targets, mask, impl=...)` with its
model's last hidden states and feeds the result to kernels/losses.py.
"""

from __future__ import annotations

from typing import Literal

import torch
from typing_extensions import Unpack

from stageflow.kernels.chunked import chunked_token_logprobs
from stageflow.kernels.reference import naive_token_logprobs, reference_token_logprobs
from stageflow.kernels.token_logprobs import LogProbOptions, Options, Tensor, TokenLogProbs

Impl = Literal["auto", "fused", "chunked", "triton", "naive", "reference"]
IMPLS = ("auto", "fused", "chunked", "triton", "naive", "reference")


def resolve_impl(impl: str, device: torch.device, with_argmax: bool = False) -> str:
    """The concrete implementation ("chunked", "triton", "naive", "reference") for `impl`.

    `with_argmax` (also said of `with_std`) never gets "triton": those outputs exist only on the
    torch paths.
    """
    if impl not in IMPLS:
        raise ValueError(f"kernels impl must be one of {', '.join(IMPLS)}; got {impl!r}")
    if with_argmax and impl in ("auto", "fused", "triton"):
        return "chunked"  # the Triton kernels have no is_argmax; chunked torch runs on CUDA too
    if impl in ("auto", "fused"):
        # lazy: imports Triton where it is installed
        from stageflow.kernels.triton_logprob import HAS_TRITON

        return "triton" if device.type == "cuda" and HAS_TRITON else "chunked"
    return impl


def fused_token_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, **options: Unpack[LogProbOptions]
) -> TokenLogProbs:
    """log softmax((h @ W.T + b) / T)[y] per token; the entropy and argmax flag when asked for.

    hidden [N, H], weight [V, H], bias [V] or None, targets [N] token ids. Returns
    `TokenLogProbs(logprobs [N], entropy [N], is_argmax [N] bool, std [N])`, each extra None
    unless asked for, fp32
    (float64 for float64 inputs). The fused paths never hold the N x V logits; `chunk_size` is
    tokens per chunk. `impl` (default "auto") picks the implementation (`resolve_impl`);
    `with_argmax` and `with_std` run the chunked path where Triton would.
    """
    o = Options.of("fused_token_logprobs", {"impl": "auto", **options}, ("impl", "chunk_size"))
    kind = resolve_impl(o.impl, hidden.device, o.with_argmax or o.with_std)
    if kind == "triton":  # never with with_argmax (resolve_impl)
        # lazy: imports Triton where it is installed
        from stageflow.kernels.triton_logprob import triton_token_logprobs

        return triton_token_logprobs(hidden, weight, targets, **o.head(chunk_size=o.chunk_size))
    if kind == "chunked":
        return chunked_token_logprobs(hidden, weight, targets, **o.head(chunk_size=o.chunk_size))
    fn = naive_token_logprobs if kind == "naive" else reference_token_logprobs
    return fn(hidden, weight, targets, **o.head())


def per_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    mask: Tensor | None = None,
    **options: Unpack[LogProbOptions],
) -> TokenLogProbs:
    """Per-token log-probs [B, T] (and entropies, argmax flags) from hidden states [B, T, H].

    hidden[:, t] must already be aligned with targets[:, t] (the caller shifts by one).
    With a mask [B, T] only the masked-in tokens are computed (targets elsewhere may be
    anything, e.g. -100); the outputs are 0 (False) at masked-out positions and get no
    gradient there. Keywords as `fused_token_logprobs` (`impl` default "fused").
    """
    o = Options.of("per_token_logprobs", options, ("impl", "chunk_size"))
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
    kwargs = o.head(impl=o.impl, chunk_size=o.chunk_size)
    if mask is None:
        out = fused_token_logprobs(flat_h, weight, flat_y, **kwargs)
        return TokenLogProbs(*(None if t is None else t.view(batch_shape) for t in out))
    keep = mask.reshape(-1).bool()
    out = fused_token_logprobs(flat_h[keep], weight, flat_y[keep], **kwargs)

    def scatter(values: Tensor | None) -> Tensor | None:
        """[B, T] with `values` at the kept positions, 0 (False for bool) elsewhere."""
        if values is None:
            return None
        full = values.new_zeros(flat_y.shape[0])
        return full.masked_scatter(keep, values).view(batch_shape)

    return TokenLogProbs(*map(scatter, out))
