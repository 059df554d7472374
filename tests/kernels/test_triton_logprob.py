"""Triton kernels vs the float64 reference.

Without CUDA they run through the Triton interpreter. TRITON_INTERPRET=1 must be set when triton
is first imported (its standard library is jit-wrapped at import), so this module imports
triton itself with the variable set and restores it at once: other test modules and the
processes they start never see it, and the kernels are built while this module's fixture
sets it again. When something imported triton earlier in the session, one test reruns this
module in a fresh interpreter process instead. Skipped when triton is not importable.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


@contextlib.contextmanager
def _interpret_env():
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


if HAS_CUDA:
    MODE = "cuda"
elif os.environ.get("TRITON_INTERPRET") == "1":
    MODE = "interpreter"  # set from the start (e.g. the fresh process below)
elif "triton" not in sys.modules:
    MODE = "interpreter"
    with _interpret_env():
        pytest.importorskip("triton")
else:
    MODE = "fresh-process"  # triton was imported without the interpreter in this session
pytest.importorskip("triton")

from stageflow.kernels import triton_logprob  # noqa: E402
from stageflow.kernels.triton_logprob import triton_token_logprobs  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
N, H, V = 29, 16, 203  # small fp32 shapes: the interpreter runs kernels through numpy


@pytest.fixture(scope="module", autouse=True)
def interpret_without_cuda():
    """TRITON_INTERPRET=1 while this module's tests run (kernels are jit-wrapped on first use)."""
    if MODE != "interpreter" or os.environ.get("TRITON_INTERPRET") == "1":
        yield
        return
    with _interpret_env():
        yield


@pytest.fixture(autouse=True)
def runs_here(request):
    if MODE == "fresh-process" and request.node.name != "test_in_a_fresh_interpreter_process":
        pytest.skip(
            "triton was imported earlier without TRITON_INTERPRET; rerun in a fresh process"
        )


if MODE == "fresh-process":

    def test_in_a_fresh_interpreter_process():
        """Runs this module's tests in a new process where TRITON_INTERPRET=1 from the start."""
        root = Path(__file__).resolve().parents[2]
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
            cwd=root,
            env={**os.environ, "TRITON_INTERPRET": "1"},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def _on_device(inputs):
    if HAS_CUDA:  # move the leaves, keep them leaves
        for name in ("h", "w", "b"):
            t = getattr(inputs, name)
            if t is not None:
                setattr(inputs, name, t.detach().to(DEVICE).requires_grad_(True))
        inputs.y = inputs.y.to(DEVICE)
    return inputs


@pytest.mark.parametrize(
    "chunk, block_v",
    [(8, 64), (29, 256), (4, 32)],
    ids=["split-tokens-and-tiles", "one-chunk-one-tile", "small-tiles"],
)
@pytest.mark.parametrize("with_entropy", [False, True], ids=["lp", "lp+entropy"])
def test_matches_reference(lm_inputs, check_against_reference, chunk, block_v, with_entropy):
    fn = functools.partial(triton_token_logprobs, chunk_size=chunk, block_v=block_v)
    inputs = _on_device(lm_inputs(N, H, V, seed=chunk))
    check_against_reference(fn, inputs, with_entropy=with_entropy)


def test_bias_and_temperature(lm_inputs, check_against_reference):
    fn = functools.partial(triton_token_logprobs, chunk_size=8, block_v=64)
    inputs = _on_device(lm_inputs(N, H, V, bias=True, seed=2))
    check_against_reference(fn, inputs, temperature=0.7, with_entropy=True)


@pytest.mark.parametrize("with_entropy", [False, True], ids=["lp", "lp+entropy"])
def test_soft_cap(lm_inputs, check_against_reference, with_entropy):
    """Gemma2's c tanh(z / c) before the temperature; tile edges masked after the cap."""
    fn = functools.partial(triton_token_logprobs, chunk_size=8, block_v=64)
    inputs = _on_device(lm_inputs(N, H, V, bias=True, seed=4))
    check_against_reference(fn, inputs, temperature=0.7, with_entropy=with_entropy, softcap=2.0)


@pytest.mark.parametrize("logit_scale", [0.01, 60.0], ids=["flat", "peaked"])
def test_invariants(lm_inputs, logit_scale):
    inputs = _on_device(lm_inputs(N, H, V, seed=3, logit_scale=logit_scale))
    with torch.no_grad():
        out = triton_token_logprobs(inputs.h, inputs.w, inputs.y, with_entropy=True, block_v=64)
    assert torch.isfinite(out.logprobs).all() and torch.isfinite(out.entropy).all()
    assert (out.logprobs <= 0).all()
    assert (out.entropy >= -1e-6).all() and (out.entropy <= math.log(V) + 1e-5).all()


def test_kernels_run_interpreted_exactly_when_there_is_no_cuda():
    assert triton_logprob.interpreting() == (not HAS_CUDA)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_at_speed_on_cuda_matches_chunked_and_saves_memory():
    """Compiled kernels at a training-like shape: same numbers as the chunked path, less memory."""
    from stageflow.kernels.chunked import chunked_token_logprobs
    from stageflow.kernels.reference import naive_token_logprobs

    n, hidden, vocab = 8192, 1024, 65536
    gen = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(n, hidden, device="cuda", generator=gen, requires_grad=True)
    w = (torch.randn(vocab, hidden, device="cuda", generator=gen) / hidden**0.5).requires_grad_()
    y = torch.randint(0, vocab, (n,), device="cuda", generator=gen)
    results, peaks = {}, {}
    for name, fn in [
        ("triton", triton_token_logprobs),
        ("chunked", chunked_token_logprobs),
        ("naive", naive_token_logprobs),
    ]:
        h.grad = w.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn(h, w, y, with_entropy=True)
        (out.logprobs.sum() + out.entropy.sum()).backward()
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
        results[name] = (out.logprobs.detach(), out.entropy.detach(), h.grad, w.grad)
    for got, want in zip(results["triton"], results["chunked"]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)
    assert peaks["triton"] < 0.5 * peaks["naive"]
