"""Chunked torch path of the fused log-prob primitive (default on CPU; works under torch.compile).

Forward: for each chunk of tokens, and each block of the vocabulary, compute the block's logits
z = (h_c @ W_v.T + b_v) / T and fold them into an online log-sum-exp (running max m, sum
s = sum exp(z - m) and, for the entropy, t = sum exp(z - m) * (z - m)); pick the target's logit.
lse = m + log s, log-prob = z_y - lse, entropy = log s - t / s, is_argmax = z_y >= m (final m);
for the std of log p under p (evaluation, no gradient) also q = sum exp(z - m) (z - m)^2:
var = q / s - (t / s)^2.
With a soft cap c (Gemma2) each block's logits become c tanh(z / c) / T, and the backward scales
the logit gradient by the cap's slope 1 - tanh^2 (the two shortcuts below are then not taken).
Only lse (and the entropy) per token are saved. Backward recomputes each block's logits, turns
them into the logit gradient in place and accumulates dh, dW and db; at most one [chunk, vocab
block] buffer (two with the entropy) is alive at a time, never N x V. When W is frozen (LoRA) and
no entropy is asked for, the forward also accumulates E_p[W] = p @ W per token (online, like
flash attention's output), so the backward is dh = g (W_y - E_p[W]) / T with no matmul: two
matmuls in all, as naive.
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

# Logits elements per [token chunk, vocab block] buffer when the caller gives no chunk size:
# 2**25 fp32 = 128 MiB (1024 tokens x 32768 vocab). Smaller chunks make the matmuls slower on
# CPU (see the chunk-size table of benchmarks/results/fused_logprob.md).
DEFAULT_CHUNK_ELEMENTS = 2**25
DEFAULT_VOCAB_BLOCK = 32768


def default_chunk_sizes(n_tokens: int, vocab: int) -> tuple[int, int]:
    """(token chunk, vocab block) used when the caller does not choose them."""
    vocab_block = min(vocab, DEFAULT_VOCAB_BLOCK)
    token_chunk = max(16, DEFAULT_CHUNK_ELEMENTS // vocab_block)
    return min(token_chunk, max(n_tokens, 1)), vocab_block


def _block_logits(
    buf: torch.Tensor, h_c: torch.Tensor, w_v: torch.Tensor, b_v: torch.Tensor | None
) -> torch.Tensor:
    """h_c @ w_v.T + b_v written into the front of the reusable buffer `buf` (compute dtype).

    Reusing one buffer instead of allocating a fresh [chunk, block] tensor per block saves the
    page faults of a new allocation (about 20% of the matmul time on CPU).
    """
    rows, cols = h_c.shape[0], w_v.shape[0]
    if h_c.dtype != buf.dtype:  # half inputs: matmul in the input dtype, softmax math in fp32
        z = h_c @ w_v.T if b_v is None else torch.addmm(b_v, h_c, w_v.T)
        return z.to(buf.dtype)
    z = buf[: rows * cols].view(rows, cols)
    if b_v is None:
        return z.addmm_(h_c, w_v.T, beta=0)
    return z.copy_(b_v.expand(rows, cols)).addmm_(h_c, w_v.T)


def soft_cap_(z: torch.Tensor, softcap: float, inv_t: float) -> torch.Tensor:
    """z <- c tanh(z / c) / T in place: the logits soft-capped, then tempered."""
    return z.div_(softcap).tanh_().mul_(softcap * inv_t)


def cap_slope(capped: torch.Tensor, softcap: float, temperature: float, out: torch.Tensor):
    """d cap(z) / dz = 1 - tanh^2(z / c), from the capped logits c tanh(z / c) / T."""
    return torch.mul(capped, temperature / softcap, out=out).square_().neg_().add_(1.0)


def _prescaled(hidden: torch.Tensor, bias: torch.Tensor | None, temperature: float, softcap):
    """(h, b) as the block matmuls take them: divided by T up front unless a cap comes first."""
    if softcap is not None or temperature == 1.0:
        return hidden, bias
    return hidden * (1.0 / temperature), None if bias is None else bias * (1.0 / temperature)


class ChunkedTokenLogProbs(torch.autograd.Function):
    """autograd.Function over (hidden, weight, bias); see the module docstring for the algorithm."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        temperature: float,
        softcap: float | None,
        with_entropy: bool,
        with_argmax: bool,
        with_std: bool,
        token_chunk: int,
        vocab_block: int,
        precompute_dh: bool,
        keep_last: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, vocab = hidden.shape[0], weight.shape[0]
        cdtype = result_dtype(hidden.dtype)
        inv_t = 1.0 / temperature
        targets = targets.long()
        hidden_in, bias_in = _prescaled(hidden, bias, temperature, softcap)
        lse = hidden.new_empty(n, dtype=cdtype)
        selected = hidden.new_empty(n, dtype=cdtype)
        entropy = hidden.new_empty(n if with_entropy else 0, dtype=cdtype)
        is_argmax = hidden.new_empty(n if with_argmax else 0, dtype=torch.bool)
        std = hidden.new_empty(n if with_std else 0, dtype=cdtype)
        moments = with_entropy or with_std  # t (and q) accumulated
        slope_y = hidden.new_empty(n if softcap is not None else 0, dtype=cdtype)
        # E_p[W] per token (softmax-weighted mean of W's rows): then dh = g (W_y - E_p[W]) / T
        # needs no matmul in the backward (used when W is frozen and there is no entropy).
        mean_w = hidden.new_empty((n, hidden.shape[1]) if precompute_dh else (0,), dtype=cdtype)
        buf_size = min(token_chunk, n) * min(vocab_block, vocab)
        buf = hidden.new_empty(buf_size, dtype=cdtype)
        buf_p = hidden.new_empty(buf_size if moments else 0, dtype=cdtype)
        for s in range(0, n, token_chunk):
            e = min(s + token_chunk, n)
            h_c = hidden_in[s:e]
            y_c = targets[s:e].unsqueeze(1)
            m = run_sum = run_t = run_q = run_w = sel = None
            for v0 in range(0, vocab, vocab_block):
                v1 = min(v0 + vocab_block, vocab)
                b_v = None if bias_in is None else bias_in[v0:v1]
                z = _block_logits(buf, h_c, weight[v0:v1], b_v)
                if softcap is not None:
                    soft_cap_(z, softcap, inv_t)
                in_block = (y_c >= v0) & (y_c < v1)
                picked = z.gather(1, (y_c - v0).clamp(0, v1 - v0 - 1))
                sel = picked if sel is None else torch.where(in_block, picked, sel)
                m_blk = z.amax(1, keepdim=True)
                m_new = m_blk if m is None else torch.maximum(m, m_blk)
                z.sub_(m_new)  # z - m_new, in place
                if moments:
                    p = buf_p[: z.numel()].view_as(z).copy_(z).exp_()  # exp(z - m_new)
                else:
                    p = z.exp_()
                blk_sum = p.sum(1, keepdim=True)
                if precompute_dh:
                    blk_w = (p.to(weight.dtype) @ weight[v0:v1]).to(cdtype)
                if moments:
                    blk_t = p.mul_(z).sum(1, keepdim=True)
                if with_std:
                    blk_q = p.mul_(z).sum(1, keepdim=True)
                if m is None:
                    run_sum = blk_sum
                    run_t = blk_t if moments else None
                    run_q = blk_q if with_std else None
                    run_w = blk_w if precompute_dh else None
                else:
                    scale = torch.exp(m - m_new)
                    if with_std:  # sum p (z - m_new)^2, with d = m_old - m_new
                        d = m - m_new
                        run_q = scale * (run_q + d * (2 * run_t + d * run_sum)) + blk_q
                    if moments:
                        # sum p (z - m_new) = scale * (t_old + s_old (m_old - m_new)) + block term
                        run_t = scale * (run_t + run_sum * (m - m_new)) + blk_t
                    run_sum = run_sum * scale + blk_sum
                    if precompute_dh:
                        run_w = run_w * scale + blk_w
                m = m_new
            lse[s:e] = (m + run_sum.log()).squeeze(1)
            selected[s:e] = sel.squeeze(1)
            if softcap is not None:
                cap_slope(sel.squeeze(1), softcap, temperature, out=slope_y[s:e])
            if with_entropy:
                entropy[s:e] = (run_sum.log() - run_t / run_sum).squeeze(1)
            if with_std:
                var = run_q / run_sum - (run_t / run_sum).square()
                std[s:e] = var.clamp_(min=0).sqrt_().squeeze(1)
            if precompute_dh:
                mean_w[s:e] = run_w / run_sum
            if with_argmax:  # the target's logit against the final max of the same logits
                is_argmax[s:e] = (sel >= m).squeeze(1)
        logprobs = selected - lse
        # The buffer still holds the last block of the last chunk as exp(z - m) (z - m with the
        # entropy), m the final max: the backward starts there and skips that recompute. A plain
        # ctx attribute, not a saved tensor: the backward overwrites it (a second one recomputes).
        keep_last = keep_last and hidden.dtype == cdtype and n > 0
        ctx.kept = (buf, run_sum.log()) if keep_last else None
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy, mean_w, slope_y)
        ctx.temperature, ctx.softcap = temperature, softcap
        ctx.with_entropy = with_entropy
        ctx.kept_centered = moments  # the kept block holds z - m, not exp(z - m)
        ctx.token_chunk = token_chunk
        ctx.vocab_block = vocab_block
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        ctx.mark_non_differentiable(is_argmax, std)
        return logprobs, entropy, is_argmax, std

    @staticmethod
    def backward(
        ctx,
        grad_logprobs: torch.Tensor | None,
        grad_entropy: torch.Tensor | None,
        grad_is_argmax: torch.Tensor | None,  # unused: is_argmax is non-differentiable
        grad_std: torch.Tensor | None,  # unused: std is non-differentiable
    ):
        """Gradient of the logits: dz = g (onehot(y) - p) - g_ent p (log p + H), times 1/T.

        It is applied as dz = r * M + g * onehot(y), where M is a [chunk, block] matrix and r a
        per-token scale (M = p, r = -g without entropy, so no [chunk, block] multiply is needed);
        the onehot part is an index_add of rows of W and h.
        """
        hidden, weight, bias, targets, lse, entropy, mean_w, slope_y = ctx.saved_tensors
        n, vocab = hidden.shape[0], weight.shape[0]
        cdtype = lse.dtype
        temperature, token_chunk, vocab_block = ctx.temperature, ctx.token_chunk, ctx.vocab_block
        softcap = ctx.softcap
        inv_t = 1.0 / temperature
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        # dz is linear in (g, g_ent): fold the 1/T of the chain rule into them.
        g = lse.new_zeros(n) if grad_logprobs is None else grad_logprobs.to(cdtype) * inv_t
        use_ent = ctx.with_entropy and grad_entropy is not None
        g_ent = grad_entropy.to(cdtype) * inv_t if use_ent else None
        if mean_w.numel() and not (use_ent or need_w or need_b):  # frozen W: no matmul left
            dh = (g.unsqueeze(1) * (weight[targets].to(cdtype) - mean_w)).to(hidden.dtype)
            return (dh if need_h else None), *[None] * 12
        hidden_in, bias_in = _prescaled(hidden, bias, temperature, softcap)
        acc_dtype = result_dtype(weight.dtype)
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        db = torch.zeros(vocab, dtype=acc_dtype, device=weight.device) if need_b else None
        kept, ctx.kept = ctx.kept, None
        buf_size = min(token_chunk, n) * min(vocab_block, vocab)
        buf = kept[0] if kept is not None else hidden.new_empty(buf_size, dtype=cdtype)
        buf_p = hidden.new_empty(buf_size if use_ent else 0, dtype=cdtype)
        buf_slope = hidden.new_empty(buf_size if softcap is not None else 0, dtype=cdtype)
        last_s = (n - 1) // token_chunk * token_chunk
        last_v0 = (vocab - 1) // vocab_block * vocab_block
        for s in reversed(range(0, n, token_chunk)):  # the last chunk first (see `kept`)
            e = min(s + token_chunk, n)
            h_raw, h_c = hidden[s:e], hidden_in[s:e]
            y_c = targets[s:e]
            g_c = g[s:e].unsqueeze(1)
            g_y = g_c if softcap is None else g_c * slope_y[s:e].unsqueeze(1)  # onehot part
            if use_ent:
                r = torch.ones_like(g_c)
            else:
                r = -g_c
            rh = (r * h_raw).to(hidden.dtype) if (need_w or need_b) else None
            dh_acc = None
            for v0 in reversed(range(0, vocab, vocab_block)):
                v1 = min(v0 + vocab_block, vocab)
                b_v = None if bias_in is None else bias_in[v0:v1]
                is_p = False
                slope = None
                if kept is not None and s == last_s and v0 == last_v0:  # kept: no recompute
                    mat = buf[: (e - s) * (v1 - v0)].view(e - s, v1 - v0)
                    if ctx.kept_centered:
                        mat.sub_(kept[1])  # z - m - log s = log p
                    else:
                        mat.mul_(torch.exp(-kept[1]))  # exp(z - m) / s = p
                        is_p = True
                else:
                    mat = _block_logits(buf, h_c, weight[v0:v1], b_v)
                    if softcap is not None:
                        soft_cap_(mat, softcap, inv_t)
                        slope = buf_slope[: mat.numel()].view_as(mat)
                        cap_slope(mat, softcap, temperature, out=slope)
                    mat.sub_(lse[s:e].unsqueeze(1))  # log p
                if use_ent:  # M = -p (g + g_ent (log p + H))
                    p = buf_p[: mat.numel()].view_as(mat).copy_(mat).exp_()
                    mat.add_(entropy[s:e].unsqueeze(1)).mul_(g_ent[s:e].unsqueeze(1))
                    mat.add_(g_c).mul_(p).neg_()
                elif not is_p:  # M = p
                    mat.exp_()
                if slope is not None:  # through the cap: dz_raw = dz_capped * (1 - tanh^2)
                    mat.mul_(slope)
                mat = mat.to(hidden.dtype)
                if need_h:
                    part = mat @ weight[v0:v1]
                    dh_acc = part if dh_acc is None else dh_acc.add_(part)
                if need_w:
                    if dw.dtype == mat.dtype:
                        dw[v0:v1].addmm_(mat.T, rh)
                    else:
                        dw[v0:v1] += (mat.T @ rh).to(dw.dtype)
                if need_b:
                    db[v0:v1] += (mat.T @ r.to(mat.dtype)).squeeze(1).to(db.dtype)
            if need_h:
                onehot_part = g_y * weight[y_c].to(cdtype)
                dh[s:e] = (r * dh_acc.to(cdtype) + onehot_part).to(hidden.dtype)
            if need_w:
                dw.index_add_(0, y_c, (g_y * h_raw).to(dw.dtype))
            if need_b:
                db.index_add_(0, y_c, g_y.squeeze(1).to(db.dtype))
        dw = None if dw is None else dw.to(weight.dtype)
        db = None if db is None else db.to(bias.dtype)
        return dh, dw, db, *[None] * 10


def chunked_token_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, **options: Unpack[LogProbOptions]
) -> TokenLogProbs:
    """Per-token log-probs (and entropy, argmax flag, std of log p) of logits cap(h @ W.T + b) / T
    (cap: the optional `softcap`), no N x V logits.

    `chunk_size` tokens and `vocab_chunk_size` vocabulary rows per block (defaults:
    `default_chunk_sizes`). Gradients flow to hidden, weight and bias.
    """
    o = Options.of("chunked_token_logprobs", options, ("chunk_size", "vocab_chunk_size"))
    check_inputs(hidden, weight, targets, o)
    bias, temperature, with_entropy, with_argmax = (
        o.bias,
        o.temperature,
        o.with_entropy,
        o.with_argmax,
    )
    auto_tokens, auto_vocab = default_chunk_sizes(hidden.shape[0], weight.shape[0])
    token_chunk = o.chunk_size or auto_tokens
    vocab_block = o.vocab_chunk_size or auto_vocab
    if token_chunk < 1 or vocab_block < 1:
        raise ValueError(f"chunk sizes must be >= 1; got {token_chunk} and {vocab_block}")
    # W frozen (e.g. LoRA), no entropy: one matmul moves from the backward's recompute to the
    # forward (E_p[W]), so forward + backward cost two matmuls instead of three.
    precompute_dh = (
        torch.is_grad_enabled()
        and hidden.requires_grad
        and not weight.requires_grad
        and (bias is None or not bias.requires_grad)
        and not with_entropy
        and not o.with_std
        and o.softcap is None
    )
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    keep_last = needs_grad and not precompute_dh and not torch.compiler.is_compiling()
    keep_last = keep_last and o.softcap is None  # the kept block has lost the cap's slope
    logprobs, entropy, is_argmax, std = ChunkedTokenLogProbs.apply(
        hidden, weight, bias, targets, temperature, o.softcap, with_entropy, with_argmax,
        o.with_std, token_chunk, vocab_block, precompute_dh, keep_last,
    )  # fmt: skip
    return TokenLogProbs(
        logprobs,
        entropy if with_entropy else None,
        is_argmax if with_argmax else None,
        std if o.with_std else None,
    )
