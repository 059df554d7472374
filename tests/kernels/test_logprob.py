"""Dispatcher and the [B, T] convenience: implementation choice, masks, input errors."""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap

import pytest
import torch

from stageflow.kernels.logprob import fused_token_logprobs, per_token_logprobs, resolve_impl
from stageflow.kernels.reference import reference_token_logprobs


def test_resolve_impl_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_impl("auto", cpu) == resolve_impl("fused", cpu) == "chunked"
    for impl in ("chunked", "naive", "reference", "triton"):
        assert resolve_impl(impl, cpu) == impl
    with pytest.raises(ValueError, match="kernels impl must be one of"):
        resolve_impl("flash", cpu)


@pytest.mark.parametrize("impl", ["auto", "chunked", "naive", "reference"])
def test_every_cpu_impl_matches_reference(lm_inputs, check_against_reference, impl):
    fn = functools.partial(fused_token_logprobs, impl=impl, chunk_size=10)
    check_against_reference(fn, lm_inputs(25, 16, 99, bias=True, seed=0), with_entropy=True)


def _batch(seed=0, b=3, t=7, hidden=16, vocab=50):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(b, t, hidden, generator=gen, requires_grad=True)
    w = (torch.randn(vocab, hidden, generator=gen) / 2).requires_grad_()
    y = torch.randint(0, vocab, (b, t), generator=gen)
    mask = torch.zeros(b, t, dtype=torch.bool)
    mask[0, 2:] = True
    mask[1, 4:6] = True  # row 2 has no answer token at all
    return h, w, y, mask


@pytest.mark.parametrize("impl", ["fused", "naive"])
def test_per_token_logprobs_with_mask(impl):
    h, w, y, mask = _batch()
    y_junk = torch.where(mask, y, torch.full_like(y, -100))  # ignore-index outside the answer
    out = per_token_logprobs(h, w, y_junk, mask, with_entropy=True, impl=impl, chunk_size=3)
    full = reference_token_logprobs(
        h.detach().double().reshape(-1, 16), w.detach().double(), y.reshape(-1), with_entropy=True
    )
    assert out.logprobs.shape == out.entropy.shape == mask.shape
    for got, want in ((out.logprobs, full.logprobs), (out.entropy, full.entropy)):
        want = torch.where(mask, want.view(mask.shape), 0.0)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=5e-4)
    (out.logprobs.sum() + out.entropy.sum()).backward()
    assert (h.grad[~mask] == 0).all() and (h.grad[mask].abs().sum(-1) > 0).all()


def test_per_token_logprobs_without_mask_keeps_shape():
    h, w, y, _ = _batch(seed=1)
    out = per_token_logprobs(h, w, y)
    assert out.logprobs.shape == y.shape and out.entropy is None
    ref = reference_token_logprobs(
        h.detach().double().reshape(-1, 16), w.detach().double(), y.view(-1)
    )
    torch.testing.assert_close(out.logprobs.double().view(-1), ref.logprobs, atol=1e-5, rtol=5e-4)


@pytest.mark.parametrize(
    "args, message",
    [
        (dict(hidden=torch.zeros(4, 8), weight=torch.zeros(10, 7)), "hidden size differs"),
        (dict(targets=torch.zeros(5, dtype=torch.long)), "targets must be"),
        (dict(targets=torch.zeros(4)), "integer token ids"),
        (dict(bias=torch.zeros(9)), "bias must be"),
        (dict(temperature=0.0), "temperature must be > 0"),
    ],
)
def test_input_errors_are_one_clear_sentence(args, message):
    kwargs = dict(
        hidden=torch.zeros(4, 8),
        weight=torch.zeros(10, 8),
        targets=torch.zeros(4, dtype=torch.long),
        bias=None,
        temperature=1.0,
    )
    kwargs.update(args)
    with pytest.raises(ValueError, match=message):
        fused_token_logprobs(
            kwargs["hidden"],
            kwargs["weight"],
            kwargs["targets"],
            bias=kwargs["bias"],
            temperature=kwargs["temperature"],
        )


def test_imports_and_falls_back_without_triton():
    """With triton unimportable the Triton module still imports and "fused" means chunked."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch
        from stageflow.kernels import triton_logprob
        from stageflow.kernels.logprob import fused_token_logprobs, resolve_impl
        assert not triton_logprob.HAS_TRITON
        assert resolve_impl("fused", torch.device("cpu")) == "chunked"
        h, w, y = torch.randn(5, 4), torch.randn(9, 4), torch.randint(0, 9, (5,))
        assert fused_token_logprobs(h, w, y).logprobs.shape == (5,)
        try:
            fused_token_logprobs(h, w, y, impl="triton")
        except RuntimeError as err:
            assert "needs the triton package" in str(err)
        else:
            raise AssertionError("impl='triton' without triton must raise")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
