"""The eager reference against independent torch formulas; the naive path against float64."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stageflow.kernels.reference import naive_token_logprobs, reference_token_logprobs


def test_reference_matches_cross_entropy_and_categorical_entropy(lm_inputs):
    inputs = lm_inputs(23, 16, 101, bias=True, dtype=torch.float64, seed=0)
    out = reference_token_logprobs(
        inputs.h, inputs.w, inputs.y, bias=inputs.b, temperature=0.5, with_entropy=True
    )
    logits = (inputs.h @ inputs.w.T + inputs.b) / 0.5
    want_lp = -F.cross_entropy(logits, inputs.y, reduction="none")
    want_ent = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(out.logprobs, want_lp, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out.entropy, want_ent, atol=1e-12, rtol=1e-12)
    assert out.logprobs.dtype == torch.float64


def test_naive_fp32_matches_float64(lm_inputs, check_against_reference):
    inputs = lm_inputs(37, 32, 257, bias=True, seed=1)
    check_against_reference(naive_token_logprobs, inputs, temperature=1.3, with_entropy=True)


def test_naive_bf16_computes_logits_in_fp32(lm_inputs):
    inputs = lm_inputs(8, 16, 64, dtype=torch.bfloat16, seed=2)
    out = naive_token_logprobs(inputs.h, inputs.w, inputs.y)
    assert out.logprobs.dtype == torch.float32
    out.logprobs.sum().backward()
    assert inputs.h.grad.dtype == inputs.w.grad.dtype == torch.bfloat16
