"""The std output (standard deviation of log p under p, for Min-K%++): chunked vs numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stageflow.kernels.chunked import chunked_token_logprobs
from stageflow.kernels.logprob import fused_token_logprobs
from stageflow.kernels.reference import reference_token_logprobs

N, H, V = 37, 32, 257


def numpy_std(h, w, b, temperature, softcap=None) -> np.ndarray:
    """sqrt(sum_v p_v (log p_v - sum_u p_u log p_u)^2) per row, in float64 numpy."""
    z = h.detach().double().numpy() @ w.detach().double().numpy().T
    if b is not None:
        z = z + b.detach().double().numpy()
    if softcap is not None:
        z = softcap * np.tanh(z / softcap)
    z = z / temperature
    logp = z - z.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    p = np.exp(logp)
    mean = (p * logp).sum(1, keepdims=True)
    return np.sqrt((p * (logp - mean) ** 2).sum(1))


@pytest.mark.parametrize(
    "chunk, vocab_block", [(16, 100), (37, 64), (1, 300)], ids=["split-both", "vocab", "single"]
)
@pytest.mark.parametrize("temperature, softcap", [(1.0, None), (0.7, None), (1.0, 5.0)])
def test_chunked_std_matches_numpy(lm_inputs, chunk, vocab_block, temperature, softcap):
    inputs = lm_inputs(N, H, V, bias=True, seed=7 + chunk, logit_scale=4.0)
    kw = dict(bias=inputs.b, temperature=temperature, softcap=softcap)
    out = chunked_token_logprobs(
        inputs.h, inputs.w, inputs.y, with_std=True, chunk_size=chunk, vocab_chunk_size=vocab_block,
        **kw,
    )  # fmt: skip
    expected = numpy_std(inputs.h, inputs.w, inputs.b, temperature, softcap)
    assert out.std.shape == (N,) and out.entropy is None
    np.testing.assert_allclose(out.std.detach().numpy(), expected, rtol=1e-4, atol=1e-5)
    ref = reference_token_logprobs(inputs.h, inputs.w, inputs.y, with_std=True, **kw)
    np.testing.assert_allclose(ref.std.detach().numpy(), expected, rtol=1e-10)


def test_std_changes_nothing_else(lm_inputs):
    """with_std=True leaves the log-probs, entropy and their gradients as they are, to the bit."""
    results = []
    for with_std in (False, True):
        inputs = lm_inputs(N, H, V, bias=True, seed=3)
        out = chunked_token_logprobs(
            inputs.h, inputs.w, inputs.y, bias=inputs.b, with_entropy=True, with_std=with_std,
            chunk_size=5, vocab_chunk_size=64,
        )  # fmt: skip
        (out.logprobs.sum() + out.entropy.sum()).backward()
        results.append([out.logprobs, out.entropy, *(t.grad for t in inputs.leaves())])
    for before, after in zip(*results):
        assert torch.equal(before, after)


def test_std_routes_to_a_torch_path(lm_inputs):
    """`auto` / `fused` never send with_std to Triton; the std agrees with the reference."""
    inputs = lm_inputs(N, H, V, seed=4)
    for impl in ("auto", "fused", "chunked", "naive"):
        out = fused_token_logprobs(inputs.h, inputs.w, inputs.y, with_std=True, impl=impl)
        ref = reference_token_logprobs(inputs.h, inputs.w, inputs.y, with_std=True)
        torch.testing.assert_close(out.std.double(), ref.std, rtol=1e-4, atol=1e-5)
