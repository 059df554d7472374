"""Gemma2's final-logit soft-capping, cap(z) = c tanh(z / c) before the temperature, in every
torch log-prob path against float64 (the Triton path: tests/kernels/test_triton_logprob.py)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from stageflow.kernels.chunked import chunked_token_logprobs
from stageflow.kernels.logprob import per_token_logprobs
from stageflow.kernels.reference import naive_token_logprobs, reference_token_logprobs

N, H, V = 37, 32, 257
CAP = 2.0  # logits of about 3 standard deviations (the inputs' default): the cap bites


def test_reference_is_the_published_formula(lm_inputs):
    """log softmax(c tanh((h W^T + b) / c) / T)[y], and its gradient by finite differences."""
    inputs = lm_inputs(11, 8, 29, bias=True, dtype=torch.float64, seed=0)
    out = reference_token_logprobs(
        inputs.h, inputs.w, inputs.y, bias=inputs.b, temperature=0.7, softcap=CAP,
        with_entropy=True,
    )  # fmt: skip
    capped = CAP * torch.tanh((inputs.h @ inputs.w.T + inputs.b) / CAP) / 0.7
    torch.testing.assert_close(
        out.logprobs, -F.cross_entropy(capped, inputs.y, reduction="none"), atol=1e-12, rtol=0
    )
    want_ent = torch.distributions.Categorical(logits=capped).entropy()
    torch.testing.assert_close(out.entropy, want_ent, atol=1e-12, rtol=0)
    uncapped = reference_token_logprobs(inputs.h, inputs.w, inputs.y, bias=inputs.b)
    assert (out.logprobs - uncapped.logprobs).abs().max() > 0.1  # the cap changes the result

    def logprobs(h, w, b):
        return reference_token_logprobs(h, w, inputs.y, bias=b, softcap=CAP).logprobs

    assert torch.autograd.gradcheck(logprobs, (inputs.h, inputs.w, inputs.b))


@pytest.mark.parametrize(
    "chunk, vocab_block, temperature, with_entropy",
    [(16, 100, 1.0, False), (5, 257, 0.7, True), (37, 64, 1.6, False), (1, 300, 1.0, True)],
    ids=["split-both", "split-tokens-tempered", "split-vocab-tempered", "single-token-chunks"],
)
def test_chunked(lm_inputs, check_against_reference, chunk, vocab_block, temperature, with_entropy):
    fn = functools.partial(chunked_token_logprobs, chunk_size=chunk, vocab_chunk_size=vocab_block)
    inputs = lm_inputs(N, H, V, bias=True, seed=chunk)
    check_against_reference(
        fn, inputs, temperature=temperature, with_entropy=with_entropy, softcap=CAP
    )


def test_chunked_float64_is_exact_up_to_rounding(lm_inputs, check_against_reference):
    fn = functools.partial(chunked_token_logprobs, chunk_size=10, vocab_chunk_size=60)
    inputs = lm_inputs(N, H, V, bias=True, dtype=torch.float64, seed=4)
    check_against_reference(
        fn, inputs, temperature=0.8, with_entropy=True, softcap=CAP, atol=1e-12, rtol=1e-10
    )


@pytest.mark.parametrize("with_entropy", [False, True], ids=["lp", "lp+entropy"])
def test_chunked_frozen_weight(lm_inputs, check_against_reference, with_entropy):
    """W without grad (LoRA): the E_p[W] shortcut does not apply through the cap; dh is exact."""
    inputs = lm_inputs(N, H, V, seed=7)
    inputs.w.requires_grad_(False)
    fn = functools.partial(chunked_token_logprobs, chunk_size=8, vocab_chunk_size=100)
    check_against_reference(fn, inputs, temperature=0.7, with_entropy=with_entropy, softcap=CAP)


@pytest.mark.parametrize("impl", ["naive", "fused"])
def test_entry_points(lm_inputs, check_against_reference, impl):
    inputs = lm_inputs(25, 16, 99, bias=True, seed=1)
    if impl == "naive":
        check_against_reference(naive_token_logprobs, inputs, with_entropy=True, softcap=CAP)
        return
    h, w, y = inputs.h.detach(), inputs.w.detach(), inputs.y
    out = per_token_logprobs(h.view(5, 5, 16), w, y.view(5, 5), softcap=CAP, impl=impl)
    want = reference_token_logprobs(h.double(), w.double(), y, softcap=CAP).logprobs
    torch.testing.assert_close(out.logprobs.reshape(-1).double(), want, atol=1e-5, rtol=5e-4)


def test_argmax_under_the_cap(lm_inputs):
    """tanh is increasing: the capped argmax is the raw one (ties where fp32 saturates count)."""
    inputs = lm_inputs(N, H, V, seed=9)
    h, w = inputs.h.detach(), inputs.w.detach()
    y = (h @ w.T).argmax(-1)
    out = chunked_token_logprobs(h, w, y, softcap=CAP, with_argmax=True, chunk_size=8)
    assert out.is_argmax.all()


def test_bad_softcap_is_one_sentence(lm_inputs):
    inputs = lm_inputs(4, 8, 16, seed=0)
    with pytest.raises(ValueError, match="softcap must be > 0 or None; got 0.0"):
        chunked_token_logprobs(inputs.h, inputs.w, inputs.y, softcap=0.0)
