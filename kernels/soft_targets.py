"""Cross-entropy against a full-vocabulary target distribution, chunk by chunk (CE-U, UNDIAL).

Per token, with the model's logits z = h W^T + b (soft-capped when the model caps its logits)
and a target q = softmax(s - shift * onehot(y)), where the source logits s are the model's own,
detached, or a frozen teacher's (h' W'^T + b', the same cap):

    loss = -sum_v q_v log p_v = lse(z) - q . z,        d loss / d z = p - q   (q a constant).

shift = inf removes the target token from q (CE-U); a finite shift lowers it (UNDIAL). Forward
and backward walk chunks of tokens, so a few [chunk, V] buffers are alive at a time, never N x V;
the backward recomputes a chunk's logits and accumulates dh, dW and db.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from stageflow.kernels.token_logprobs import result_dtype

Tensor = torch.Tensor

# logits elements per [chunk, V] buffer (fp32: 32 MiB); four such buffers live in the backward
CHUNK_ELEMENTS = 2**23


@dataclass(frozen=True)
class Teacher:
    """A frozen model's last hidden states [N, H] and LM head (the source of the target)."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None


def _logits(h: Tensor, w: Tensor, b: Tensor | None, softcap: float | None, dtype) -> Tensor:
    z = (h @ w.T if b is None else torch.addmm(b, h, w.T)).to(dtype)
    return z if softcap is None else z.div_(softcap).tanh_().mul_(softcap)


def _target(source: Tensor, targets: Tensor, shift: float) -> Tensor:
    """softmax(source - shift * onehot(y)) per row (shift = inf: the target token removed)."""
    index = targets[:, None]
    if math.isinf(shift):
        shifted = source.scatter(1, index, float("-inf"))
    else:
        shifted = source.scatter_add(1, index, source.new_full(index.shape, -shift))
    return torch.softmax(shifted, dim=-1)


class SoftTargetCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, teacher_h, teacher_w, teacher_b, shift, cap):
        dtype = result_dtype(hidden.dtype)
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        out = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
        with torch.no_grad():
            for start in range(0, hidden.shape[0], rows):
                part = slice(start, start + rows)
                z = _logits(hidden[part], weight, bias, cap, dtype)
                source = (
                    z
                    if teacher_h is None
                    else _logits(teacher_h[part], teacher_w, teacher_b, cap, dtype)
                )
                q = _target(source, targets[part], shift)
                out[part] = torch.logsumexp(z, dim=-1) - (q * z).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, teacher_h, teacher_w, teacher_b)
        ctx.shift, ctx.cap, ctx.rows = shift, cap, rows
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, targets, teacher_h, teacher_w, teacher_b = ctx.saved_tensors
        dtype, cap = result_dtype(hidden.dtype), ctx.cap
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros_like(weight, dtype=dtype) if need_w else None
        db = torch.zeros_like(bias, dtype=dtype) if need_b else None
        for start in range(0, hidden.shape[0], ctx.rows):
            part = slice(start, start + ctx.rows)
            h = hidden[part]
            z = _logits(h, weight, bias, cap, dtype)
            source = (
                z
                if teacher_h is None
                else _logits(teacher_h[part], teacher_w, teacher_b, cap, dtype)
            )
            dz = torch.softmax(z, dim=-1).sub_(_target(source, targets[part], ctx.shift))
            dz.mul_(grad[part, None].to(dtype))
            if cap is not None:  # through c tanh(z / c): times 1 - tanh^2
                dz.mul_(z.div_(cap).square_().neg_().add_(1.0))
            if need_h:
                dh[part] = (dz.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                dw.addmm_(dz.T, h.to(dtype))
            if need_b:
                db += dz.sum(0)
        dw = None if dw is None else dw.to(weight.dtype)
        db = None if db is None else db.to(bias.dtype)
        return dh, dw, db, None, None, None, None, None, None


def soft_target_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    shift: float,
    teacher: Teacher | None = None,
    bias: Tensor | None = None,
    softcap: float | None = None,
) -> Tensor:
    """-sum_v q_v log p_v per token [N] (fp32; float64 for float64 inputs), q as the module
    docstring says; hidden [N, H], weight [V, H], targets [N]. `teacher` None: the source is the
    model's own logits, detached."""
    if not shift > 0:
        raise ValueError(f"shift must be > 0 (inf removes the target token); got {shift}")
    if teacher is not None and teacher.hidden.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"teacher hidden states {tuple(teacher.hidden.shape)} must have one row per token "
            f"({hidden.shape[0]})"
        )
    t = teacher or Teacher(None, None)  # type: ignore[arg-type]
    return SoftTargetCrossEntropy.apply(
        hidden, weight, bias, targets, t.hidden, t.weight, t.bias, float(shift), softcap
    )


@dataclass(frozen=True)
class SoftTarget:
    """What the learner's head computes besides the log-probs: the cross-entropy against
    softmax(s - shift * onehot(y)) on the tokens of `mask` [B, T]; `teacher_hidden` [B, T, H]
    (aligned with the targets) and the teacher's head, or None for the model's own logits."""

    mask: Tensor
    shift: float
    teacher_hidden: Tensor | None = None
    teacher_weight: Tensor | None = None
    teacher_bias: Tensor | None = None


def per_token_soft_target_ce(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    target: SoftTarget,
    bias: Tensor | None = None,
    softcap: float | None = None,
) -> Tensor:
    """[B, T] cross-entropies against `target` from hidden states [B, T, H]; 0 outside its mask."""
    keep = target.mask.reshape(-1).bool()
    flat = hidden.reshape(-1, hidden.shape[-1])
    teacher = None
    if target.teacher_hidden is not None:
        teacher_h = target.teacher_hidden.reshape(-1, hidden.shape[-1])[keep]
        teacher = Teacher(teacher_h, target.teacher_weight, target.teacher_bias)
    values = soft_target_cross_entropy(
        flat[keep], weight, targets.reshape(-1)[keep], target.shift, teacher, bias, softcap
    )
    full = values.new_zeros(keep.shape[0])
    return full.masked_scatter(keep, values).view(targets.shape)
