"""Triton path of the fused log-prob primitive (CUDA; tested on CPU with TRITON_INTERPRET=1).

Per chunk of tokens, the chunk's logits come from one cuBLAS matmul (h_c @ W.T + b, in the
input dtype); Triton kernels then stream each row over the vocabulary:
- forward: online log-sum-exp, the target's logit and the entropy, in fp32 registers;
- backward: the chunk's logits are recomputed and overwritten in place by their gradient
  dz = (g (onehot(y) - p) - g_ent p (log p + H)) / T, then dh = dz @ W and dW += dz.T @ h_c.
With a soft cap c (Gemma2) the kernels read each logit as c tanh(z / c) and the backward scales
dz by the cap's slope 1 - tanh^2.
Only one [chunk, V] logits buffer is alive at a time. The module imports without triton
(`HAS_TRITON` is then False); kernels are built on first use, so whether they are interpreted
follows TRITON_INTERPRET at that moment.
"""

from __future__ import annotations

import functools
import os

import torch
from typing_extensions import Unpack

from stageflow.kernels.token_logprobs import (
    LogProbOptions,
    Options,
    Tensor,
    TokenLogProbs,
    check_inputs,
)

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs: the chunked torch path serves
    triton = tl = None
    HAS_TRITON = False

# Logits elements per chunk when the caller gives no chunk size (2**24 bf16 = 32 MiB).
DEFAULT_CHUNK_ELEMENTS = 2**24
MAX_BLOCK_V = 4096


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tanh(x):
    """tanh from exp (triton.language has none): 1 - 2 / (e^2x + 1), exact at +-inf."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


def _fwd_kernel(
    z_ptr, z_stride, y_ptr, lse_ptr, logp_ptr, ent_ptr, n_vocab, inv_t, cap,
    WITH_ENTROPY: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """One program per row: online LSE over vocab tiles, selected log-prob, entropy."""
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    m = float("-inf")
    s = 0.0
    t = 0.0  # sum exp(z - m) * (z - m), for the entropy
    for v0 in range(0, n_vocab, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < n_vocab
        z = tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32)
        if SOFTCAP:
            z = cap * _tanh(z / cap)
        z = tl.where(mask, z * inv_t, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        scale = tl.exp(m - m_new)
        e = tl.exp(z - m_new)
        if WITH_ENTROPY:
            shift = s * tl.where(s > 0.0, m - m_new, 0.0)  # 0 on the first tile (m = -inf)
            t = scale * (t + shift) + tl.sum(e * tl.where(mask, z - m_new, 0.0), axis=0)
        s = s * scale + tl.sum(e, axis=0)
        m = m_new
    lse = m + tl.log(s)
    y = tl.load(y_ptr + row)
    z_y = tl.load(z_row + y).to(tl.float32)
    if SOFTCAP:
        z_y = cap * _tanh(z_y / cap)
    z_y = z_y * inv_t
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, z_y - lse)
    if WITH_ENTROPY:
        tl.store(ent_ptr + row, tl.log(s) - t / s)


def _bwd_kernel(
    z_ptr, z_stride, y_ptr, lse_ptr, ent_ptr, g_ptr, g_ent_ptr, n_vocab, inv_t, cap,
    WITH_ENTROPY_GRAD: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """One program per row: overwrite the row's logits with their gradient (see module doc)."""
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    y = tl.load(y_ptr + row)
    lse = tl.load(lse_ptr + row)
    g = tl.load(g_ptr + row)
    if WITH_ENTROPY_GRAD:
        g_ent = tl.load(g_ent_ptr + row)
        ent = tl.load(ent_ptr + row)
    for v0 in range(0, n_vocab, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < n_vocab
        z = tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32)
        if SOFTCAP:
            t = _tanh(z / cap)
            z = cap * t
        logp = z * inv_t - lse
        p = tl.exp(logp)
        if WITH_ENTROPY_GRAD:
            dz = -p * (g + g_ent * (logp + ent))
        else:
            dz = -p * g
        dz = tl.where(offs == y, dz + g, dz) * inv_t
        if SOFTCAP:
            dz = dz * (1.0 - t * t)
        tl.store(z_row + offs, dz.to(z_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _kernels(interpret: bool) -> tuple:
    """JIT the kernels once per mode (compiled for CUDA, or interpreted on CPU)."""
    del interpret  # part of the cache key: triton.jit reads TRITON_INTERPRET when it wraps
    return triton.jit(_fwd_kernel), triton.jit(_bwd_kernel)


def _launch_config(n_vocab: int) -> tuple[int, int]:
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(n_vocab))
    return block_v, (16 if block_v >= 4096 else 8 if block_v >= 1024 else 4)


def _chunk_logits(h_c: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    return h_c @ weight.T if bias is None else torch.addmm(bias, h_c, weight.T)


class TritonTokenLogProbs(torch.autograd.Function):
    """autograd.Function over (hidden, weight, bias) backed by the two kernels above."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, targets, temperature, softcap, with_entropy, token_chunk, block_v
    ):
        n, vocab = hidden.shape[0], weight.shape[0]
        fwd, _ = _kernels(interpreting())
        num_warps = _launch_config(vocab)[1]
        targets = targets.long().contiguous()
        lse = hidden.new_empty(n, dtype=torch.float32)
        logprobs = hidden.new_empty(n, dtype=torch.float32)
        entropy = hidden.new_empty(n if with_entropy else 0, dtype=torch.float32)
        for s in range(0, n, token_chunk):
            e = min(s + token_chunk, n)
            z = _chunk_logits(hidden[s:e], weight, bias)
            fwd[(e - s,)](
                z, z.stride(0), targets[s:e], lse[s:], logprobs[s:],
                entropy[s:] if with_entropy else lse, vocab, 1.0 / temperature, softcap or 1.0,
                WITH_ENTROPY=with_entropy, SOFTCAP=softcap is not None, BLOCK_V=block_v,
                num_warps=num_warps,
            )  # fmt: skip
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature, ctx.softcap, ctx.with_entropy = temperature, softcap, with_entropy
        ctx.token_chunk, ctx.block_v = token_chunk, block_v
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        n, vocab = hidden.shape[0], weight.shape[0]
        _, bwd = _kernels(interpreting())
        num_warps = _launch_config(vocab)[1]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        g = lse.new_zeros(n) if grad_logprobs is None else grad_logprobs.float().contiguous()
        use_ent = ctx.with_entropy and grad_entropy is not None
        g_ent = grad_entropy.float().contiguous() if use_ent else g
        acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        db = torch.zeros(vocab, dtype=acc_dtype, device=weight.device) if need_b else None
        for s in range(0, n, ctx.token_chunk):
            e = min(s + ctx.token_chunk, n)
            h_c = hidden[s:e]
            dz = _chunk_logits(h_c, weight, bias)
            bwd[(e - s,)](
                dz, dz.stride(0), targets[s:e], lse[s:], entropy[s:] if use_ent else lse[s:],
                g[s:], g_ent[s:], vocab, 1.0 / ctx.temperature, ctx.softcap or 1.0,
                WITH_ENTROPY_GRAD=use_ent, SOFTCAP=ctx.softcap is not None, BLOCK_V=ctx.block_v,
                num_warps=num_warps,
            )  # fmt: skip
            if need_h:
                torch.mm(dz, weight, out=dh[s:e])
            if need_w:
                if dw.dtype == dz.dtype:
                    dw.addmm_(dz.T, h_c)
                else:
                    dw += (dz.T @ h_c).to(dw.dtype)
            if need_b:
                db += dz.sum(0, dtype=db.dtype)
        dw = None if dw is None else dw.to(weight.dtype)
        db = None if db is None else db.to(bias.dtype)
        return dh, dw, db, *[None] * 6


def triton_token_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, **options: Unpack[LogProbOptions]
) -> TokenLogProbs:
    """Per-token log-probs (and entropy) of cap(h @ W.T + b) / T with Triton kernels (no argmax).

    Needs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests). `chunk_size` tokens per
    [chunk, V] logits buffer; `block_v` the vocabulary tile of the kernels.
    """
    o = Options.of("triton_token_logprobs", options, ("chunk_size", "block_v"))
    if not HAS_TRITON:
        raise RuntimeError("impl='triton' needs the triton package; use impl='chunked'.")
    if not hidden.is_cuda and not interpreting():
        raise RuntimeError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU).")
    if o.with_argmax or o.with_std:
        raise ValueError("the Triton kernels have no is_argmax or std output; use impl='chunked'")
    check_inputs(hidden, weight, targets, o)
    n, vocab = hidden.shape[0], weight.shape[0]
    token_chunk = o.chunk_size or max(16, DEFAULT_CHUNK_ELEMENTS // vocab)
    token_chunk = min(token_chunk, max(n, 1))
    block_v = o.block_v or _launch_config(vocab)[0]
    logprobs, entropy = TritonTokenLogProbs.apply(
        hidden.contiguous(), weight.contiguous(), o.bias, targets, o.temperature, o.softcap,
        o.with_entropy, token_chunk, block_v,
    )  # fmt: skip
    return TokenLogProbs(logprobs, entropy if o.with_entropy else None)
