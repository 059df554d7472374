"""The is_argmax output (target logit >= row max): chunked vs reference, masks, ties, routing."""

from __future__ import annotations

import pytest
import torch

from stageflow.kernels.chunked import chunked_token_logprobs
from stageflow.kernels.logprob import fused_token_logprobs, per_token_logprobs, resolve_impl
from stageflow.kernels.reference import naive_token_logprobs, reference_token_logprobs
from stageflow.kernels.token_logprobs import TokenLogProbs

N, H, V = 37, 32, 257  # primes: no chunk size below divides them


def _argmax_every_other_target(inputs):
    """Targets of the even tokens set to their row's argmax (random targets almost never are)."""
    with torch.no_grad():
        logits = inputs.h.double() @ inputs.w.double().T
        if inputs.b is not None:
            logits += inputs.b.double()
    inputs.y = inputs.y.clone()
    inputs.y[::2] = logits.argmax(-1)[::2]
    return inputs


@pytest.mark.parametrize(
    "chunk, vocab_block",
    [(16, 100), (5, 257), (37, 64), (1, 300)],
    ids=["split-both", "split-tokens", "split-vocab", "single-token-chunks"],
)
@pytest.mark.parametrize("temperature", [1.0, 0.7], ids=["T=1", "T=0.7"])
def test_chunked_matches_reference(lm_inputs, chunk, vocab_block, temperature):
    inputs = _argmax_every_other_target(lm_inputs(N, H, V, bias=True, seed=20 + chunk))
    kw = dict(bias=inputs.b, temperature=temperature, with_argmax=True)
    out = chunked_token_logprobs(
        inputs.h, inputs.w, inputs.y, chunk_size=chunk, vocab_chunk_size=vocab_block, **kw
    )
    ref = reference_token_logprobs(inputs.h, inputs.w, inputs.y, **kw)
    assert out.is_argmax.dtype == torch.bool and out.is_argmax.shape == (N,)
    assert ref.is_argmax[::2].all() and not ref.is_argmax[1::2].all()
    assert torch.equal(out.is_argmax, ref.is_argmax)
    naive = naive_token_logprobs(inputs.h, inputs.w, inputs.y, **kw)
    assert torch.equal(naive.is_argmax, ref.is_argmax)


def _flags(impl, hidden, weight, targets, **kwargs) -> list[bool]:
    """is_argmax of `impl`; "chunked-blocks" is the chunked path with vocabulary blocks of 4."""
    if impl == "chunked-blocks":
        out = chunked_token_logprobs(
            hidden, weight, targets, with_argmax=True, chunk_size=2, vocab_chunk_size=4, **kwargs
        )
    else:
        out = fused_token_logprobs(
            hidden, weight, targets, with_argmax=True, impl=impl, chunk_size=3, **kwargs
        )
    return out.is_argmax.tolist()


FLAG_IMPLS = ["chunked", "chunked-blocks", "naive", "reference"]

# logits = LOGITS exactly (hidden = LOGITS, weight = identity), so the flags are known.
LOGITS = [
    [0.0, 1.0, 5.0, 2.0, 0.0, 3.0],
    [4.0, 1.0, 0.0, 2.0, 0.0, 3.99],
    [0.0, 0.0, 0.0, 0.0, 0.0, 7.0],
    [9.0, 1.0, 0.0, 2.0, 0.0, 3.0],
    [1.0, 1.0, 2.0, 2.0, 0.0, 2.0],
    [1.0, 1.0, 2.0, 2.0, 0.0, 2.0],
    [-3.0, -3.0, -3.0, -3.0, -3.0, -3.0],
]
TARGETS = [2, 5, 5, 3, 3, 0, 4]
# max in the target's block / just below a max in another block / max in the partial last
# block / far below / tied with the max at 2 and 5 / below a tie / all tied
EXPECTED = [True, False, True, False, True, False, True]


@pytest.mark.parametrize("impl", FLAG_IMPLS)
@pytest.mark.parametrize("temperature", [1.0, 0.5], ids=["T=1", "T=0.5"])
def test_constructed_rows(impl, temperature):
    flags = _flags(
        impl, torch.tensor(LOGITS), torch.eye(6), torch.tensor(TARGETS), temperature=temperature
    )
    assert flags == EXPECTED


@pytest.mark.parametrize("impl", FLAG_IMPLS)
def test_ties_count_as_argmax(impl):
    """Zero weight: the logits are the bias, whose maximum 2 stands in both vocabulary blocks."""
    bias = torch.tensor([0.0, 2.0, 1.0, 2.0, 2.0, -1.0, 2.0])
    flags = _flags(
        impl, torch.ones(7, 4), torch.zeros(7, 4), torch.arange(7), bias=bias, temperature=0.7
    )
    assert flags == (bias == 2.0).tolist()


@pytest.mark.parametrize("impl", ["fused", "triton", "naive"])
def test_per_token_with_mask(impl):
    """Masked-out positions are False; "triton" is routed to the chunked path (no Triton here)."""
    gen = torch.Generator().manual_seed(0)
    b, t, hidden, vocab = 3, 7, 16, 50
    h = torch.randn(b, t, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) / 2
    bias = torch.randn(vocab, generator=gen)
    y = torch.randint(0, vocab, (b, t), generator=gen)
    y[:, ::2] = (h @ w.T + bias).argmax(-1)[:, ::2]
    mask = torch.zeros(b, t, dtype=torch.bool)
    mask[0, 2:] = True
    mask[1, 4:6] = True  # row 2 has no answer token at all
    y_junk = torch.where(mask, y, torch.full_like(y, -100))
    out = per_token_logprobs(
        h, w, y_junk, mask, bias=bias, temperature=1.3, with_argmax=True, impl=impl, chunk_size=3
    )
    ref = reference_token_logprobs(
        h.reshape(-1, hidden), w, y.reshape(-1), bias=bias, temperature=1.3, with_argmax=True
    )
    want = ref.is_argmax.view(b, t) & mask
    assert out.is_argmax.shape == mask.shape and out.entropy is None
    assert want.any() and (mask & ~want).any()
    assert torch.equal(out.is_argmax, want)


def test_per_token_without_mask_keeps_shape_and_defaults_to_none():
    gen = torch.Generator().manual_seed(1)
    h, w = torch.randn(2, 5, 8, generator=gen), torch.randn(20, 8, generator=gen)
    y = torch.randint(0, 20, (2, 5), generator=gen)
    assert per_token_logprobs(h, w, y).is_argmax is None
    out = per_token_logprobs(h, w, y, with_argmax=True)
    ref = reference_token_logprobs(h.reshape(-1, 8), w, y.reshape(-1), with_argmax=True)
    assert torch.equal(out.is_argmax, ref.is_argmax.view(2, 5))
    assert TokenLogProbs(out.logprobs, None).is_argmax is None  # two-field construction


@pytest.mark.parametrize("case", ["lp", "lp+entropy", "frozen-weight"])
def test_logprobs_entropy_and_grads_bit_identical(lm_inputs, case):
    """with_argmax=True changes nothing else: same values and gradients to the bit."""
    gen = torch.Generator().manual_seed(2)
    g, g_ent = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    with_entropy = case == "lp+entropy"
    results = []
    for with_argmax in (False, True):
        inputs = lm_inputs(N, H, V, bias=True, seed=22)
        if case == "frozen-weight":  # the precomputed-dh path
            inputs.w.requires_grad_(False)
            inputs.b.requires_grad_(False)
        out = chunked_token_logprobs(
            inputs.h,
            inputs.w,
            inputs.y,
            bias=inputs.b,
            temperature=0.7,
            with_entropy=with_entropy,
            with_argmax=with_argmax,
            chunk_size=16,
            vocab_chunk_size=100,
        )
        assert (out.is_argmax is not None) == with_argmax
        loss = (out.logprobs * g).sum() + ((out.entropy * g_ent).sum() if with_entropy else 0)
        grads = torch.autograd.grad(loss, inputs.leaves())
        values = [out.logprobs] + ([out.entropy] if with_entropy else [])
        results.append([v.detach() for v in values] + list(grads))
    assert len(results[0]) == len(results[1])
    for without, with_ in zip(*results):
        assert torch.equal(without, with_)


def test_resolve_impl_routes_argmax_away_from_triton():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for impl in ("auto", "fused", "triton"):
        assert resolve_impl(impl, cuda, with_argmax=True) == "chunked"
    assert resolve_impl("naive", cuda, with_argmax=True) == "naive"
    assert resolve_impl("triton", cpu) == "triton"


def test_empty_input():
    out = chunked_token_logprobs(
        torch.zeros(0, 4), torch.randn(9, 4), torch.zeros(0, dtype=torch.long), with_argmax=True
    )
    assert out.is_argmax.shape == (0,) and out.is_argmax.dtype == torch.bool
