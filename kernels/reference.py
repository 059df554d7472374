"""Eager reference for per-token log-probs: full logits, log_softmax, gather.

Two uses: `reference_token_logprobs` computes in float64 (the ground truth of the tests), and
`naive_token_logprobs` computes in the input dtype with plain autograd (the baseline of the
benchmark and the learner's `kernels: naive` switch). Both materialise the N x V logits.
"""

from __future__ import annotations

import torch

from stageflow.kernels.token_logprobs import TokenLogProbs, check_inputs, result_dtype


def naive_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> TokenLogProbs:
    """log softmax((h @ W.T + b) / T)[target] per token (and entropy), by autograd on full logits.

    `compute_dtype` is the dtype of the logits and of the results (default: the input dtype,
    fp32 for half inputs); gradients flow back to the inputs in their own dtype.
    """
    check_inputs(hidden, weight, targets, bias, temperature)
    dtype = compute_dtype or result_dtype(hidden.dtype)
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return TokenLogProbs(logprobs, entropy)


def reference_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> TokenLogProbs:
    """Float64 ground truth of the fused kernels (same formula as `naive_token_logprobs`)."""
    return naive_token_logprobs(
        hidden,
        weight,
        targets,
        bias=bias,
        temperature=temperature,
        with_entropy=with_entropy,
        compute_dtype=torch.float64,
    )
