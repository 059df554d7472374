"""Eager reference for per-token log-probs: full logits, log_softmax, gather.

Two uses: `reference_token_logprobs` computes in float64 (the ground truth of the tests), and
`naive_token_logprobs` computes in the input dtype with plain autograd (the baseline of the
benchmark and the learner's `kernels: naive` switch). Both materialise the N x V logits.
"""

from __future__ import annotations

import torch
from typing_extensions import Unpack

from stageflow.kernels.token_logprobs import (
    LogProbOptions,
    Options,
    Tensor,
    TokenLogProbs,
    check_inputs,
    result_dtype,
)


def naive_token_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, **options: Unpack[LogProbOptions]
) -> TokenLogProbs:
    """log softmax(cap((h @ W.T + b)) / T)[target] per token (and entropy, argmax flag, std of
    log p under p), on full logits; cap(z) = c tanh(z / c) with `softcap` c, the identity without.

    `compute_dtype` is the dtype of the logits and of the results (default: the input dtype,
    fp32 for half inputs); gradients flow back to the inputs in their own dtype.
    """
    o = Options.of("naive_token_logprobs", options, ("compute_dtype",))
    check_inputs(hidden, weight, targets, o)
    bias, temperature = o.bias, o.temperature
    dtype = o.compute_dtype or result_dtype(hidden.dtype)
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    if o.softcap is not None:
        logits = o.softcap * torch.tanh(logits / o.softcap)
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    index = targets.long().unsqueeze(-1)
    logprobs = logp_all.gather(-1, index).squeeze(-1)
    entropy = is_argmax = std = None
    if o.with_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    if o.with_std:
        p = logp_all.detach().exp()
        mean = (p * logp_all.detach()).sum(-1, keepdim=True)
        std = (p * (logp_all.detach() - mean).square()).sum(-1).sqrt()
    if o.with_argmax:  # target logit >= row max: ties count as argmax
        z = logits.detach()
        is_argmax = z.gather(-1, index).squeeze(-1) >= z.amax(-1)
    return TokenLogProbs(logprobs, entropy, is_argmax, std)


def reference_token_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, **options: Unpack[LogProbOptions]
) -> TokenLogProbs:
    """Float64 ground truth of the fused kernels: `naive_token_logprobs` in float64."""
    o = Options.of("reference_token_logprobs", options)
    return naive_token_logprobs(hidden, weight, targets, compute_dtype=torch.float64, **o.head())
