"""Chunked torch path vs the float64 reference: values, dh/dW/db, invariants, torch.compile."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from stageflow.kernels.chunked import chunked_token_logprobs, default_chunk_sizes
from stageflow.kernels.reference import reference_token_logprobs

N, H, V = 37, 32, 257  # primes: no chunk size below divides them


@pytest.mark.parametrize(
    "chunk, vocab_block",
    [(16, 100), (5, 257), (37, 64), (64, 1000), (1, 300)],
    ids=["split-both", "split-tokens", "split-vocab", "one-block", "single-token-chunks"],
)
@pytest.mark.parametrize("with_entropy", [False, True], ids=["lp", "lp+entropy"])
def test_matches_reference(lm_inputs, check_against_reference, chunk, vocab_block, with_entropy):
    fn = functools.partial(chunked_token_logprobs, chunk_size=chunk, vocab_chunk_size=vocab_block)
    check_against_reference(fn, lm_inputs(N, H, V, seed=chunk), with_entropy=with_entropy)


@pytest.mark.parametrize("temperature", [0.7, 1.6])
def test_bias_and_temperature(lm_inputs, check_against_reference, temperature):
    fn = functools.partial(chunked_token_logprobs, chunk_size=16, vocab_chunk_size=100)
    inputs = lm_inputs(N, H, V, bias=True, seed=3)
    check_against_reference(fn, inputs, temperature=temperature, with_entropy=True)


def test_float64_is_exact_up_to_rounding(lm_inputs, check_against_reference):
    fn = functools.partial(chunked_token_logprobs, chunk_size=10, vocab_chunk_size=60)
    inputs = lm_inputs(N, H, V, bias=True, dtype=torch.float64, seed=4)
    check_against_reference(fn, inputs, temperature=0.8, with_entropy=True, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("logit_scale", [0.01, 3.0, 60.0], ids=["flat", "normal", "peaked"])
def test_invariants(lm_inputs, logit_scale):
    inputs = lm_inputs(N, H, V, seed=5, logit_scale=logit_scale)
    with torch.no_grad():
        out = chunked_token_logprobs(
            inputs.h, inputs.w, inputs.y, with_entropy=True, chunk_size=16, vocab_chunk_size=100
        )
    assert torch.isfinite(out.logprobs).all() and torch.isfinite(out.entropy).all()
    assert (out.logprobs <= 0).all()
    assert (out.entropy >= -1e-6).all()
    assert (out.entropy <= math.log(V) + 1e-5).all()
    if logit_scale == 0.01:  # nearly uniform: entropy close to log V
        assert torch.allclose(out.entropy, torch.full_like(out.entropy, math.log(V)), atol=1e-3)


def test_entropy_grad_alone_and_logprob_grad_alone(lm_inputs):
    inputs = lm_inputs(N, H, V, seed=6)
    ref_in = inputs.float64_copy()
    out = chunked_token_logprobs(inputs.h, inputs.w, inputs.y, with_entropy=True, chunk_size=16)
    ref = reference_token_logprobs(ref_in.h, ref_in.w, ref_in.y, with_entropy=True)
    for got, want in ((out.entropy, ref.entropy), (out.logprobs, ref.logprobs)):
        (dh,) = torch.autograd.grad(got.sum(), [inputs.h], retain_graph=True)
        (dh_ref,) = torch.autograd.grad(want.sum(), [ref_in.h], retain_graph=True)
        torch.testing.assert_close(dh.double(), dh_ref, atol=1e-5, rtol=5e-4)


@pytest.mark.parametrize(
    "with_entropy, temperature, vocab_block",
    [(False, 1.0, None), (False, 0.7, 100), (True, 0.7, 100)],
    ids=["precomputed-dh", "precomputed-dh-vocab-blocks", "entropy-recompute"],
)
def test_frozen_weight(lm_inputs, check_against_reference, with_entropy, temperature, vocab_block):
    """W without grad (LoRA): dh still exact (the shortcut through E_p[W] when no entropy)."""
    inputs = lm_inputs(N, H, V, seed=7)
    inputs.w.requires_grad_(False)
    fn = functools.partial(chunked_token_logprobs, chunk_size=8, vocab_chunk_size=vocab_block)
    check_against_reference(fn, inputs, temperature=temperature, with_entropy=with_entropy)
    out = fn(inputs.h, inputs.w, inputs.y)
    out.logprobs.sum().backward()
    assert inputs.w.grad is None and inputs.h.grad is not None


@pytest.mark.parametrize("with_entropy", [False, True], ids=["lp", "lp+entropy"])
def test_backward_twice_with_retain_graph(lm_inputs, with_entropy):
    """The first backward reuses the forward's last logits buffer; a second one recomputes."""
    inputs = lm_inputs(N, H, V, seed=12)
    out = chunked_token_logprobs(
        inputs.h, inputs.w, inputs.y, with_entropy=with_entropy, chunk_size=16, vocab_chunk_size=100
    )
    loss = out.logprobs.sum() + (out.entropy.sum() if with_entropy else 0)
    first = torch.autograd.grad(loss, inputs.leaves(), retain_graph=True)
    second = torch.autograd.grad(loss, inputs.leaves())
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_bf16_inputs_give_fp32_logprobs_and_bf16_grads(lm_inputs):
    inputs = lm_inputs(N, H, V, bias=True, dtype=torch.bfloat16, seed=8)
    out = chunked_token_logprobs(inputs.h, inputs.w, inputs.y, bias=inputs.b, chunk_size=16)
    assert out.logprobs.dtype == torch.float32
    out.logprobs.sum().backward()
    assert inputs.h.grad.dtype == inputs.w.grad.dtype == inputs.b.grad.dtype == torch.bfloat16
    ref_in = inputs.float64_copy()
    ref = reference_token_logprobs(ref_in.h, ref_in.w, ref_in.y, bias=ref_in.b)
    torch.testing.assert_close(out.logprobs.double(), ref.logprobs, atol=0.1, rtol=0.05)


def test_default_chunk_sizes_bound_the_buffer():
    chunk, block = default_chunk_sizes(4096, 32768)
    assert (chunk, block) == (1024, 32768) and chunk * block * 4 == 128 * 2**20
    assert default_chunk_sizes(3, 50) == (3, 50)
    assert default_chunk_sizes(10**6, 256_000)[1] == 32768


def test_under_torch_compile(lm_inputs):
    """Full-graph inductor compile of forward and backward (two token chunks, two vocab blocks)."""
    torch._dynamo.reset()
    inputs = lm_inputs(12, 8, 40, bias=True, seed=9)
    weights = torch.linspace(-1, 1, 12, dtype=torch.float32)

    def loss(h, w, b, y):
        out = chunked_token_logprobs(
            h, w, y, bias=b, temperature=0.9, with_entropy=True, chunk_size=8, vocab_chunk_size=32
        )
        return (out.logprobs * weights).sum() + 0.1 * out.entropy.sum()

    compiled = torch.compile(loss, fullgraph=True)
    value = compiled(inputs.h, inputs.w, inputs.b, inputs.y)
    grads = torch.autograd.grad(value, inputs.leaves())
    eager_value = loss(inputs.h, inputs.w, inputs.b, inputs.y)
    eager_grads = torch.autograd.grad(eager_value, inputs.leaves())
    torch.testing.assert_close(value, eager_value, atol=1e-5, rtol=5e-4)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=5e-4)
