"""Per-token statistics of the full-vocabulary logits, chunk by chunk (CE-U, UNDIAL, PDU).

With the model's logits z = h W^T + b per token (soft-capped when the model caps its logits):

- cross-entropy to a target q = softmax(s - shift * onehot(y)), where the source logits s are
  the model's own, detached, or a frozen teacher's (h' W'^T + b', the same cap):

      -sum_v q_v log p_v = lse(z) - q . z,        d / d z = p - q   (q a constant);

  shift = inf removes the target token from q (CE-U); a finite shift lowers it (UNDIAL);
- the logit margin max_v z_v - mean_v z_v,        d / d z = onehot(argmax) - 1/V   (PDU);
- KL from the uniform distribution u = 1/V:
      KL(u || p) = lse(z) - mean_v z_v - log V,      d / d z = p - 1/V               (ULD).

Forward and backward walk chunks of tokens, so a few [chunk, V] buffers are alive at a time,
never N x V; the backward recomputes a chunk's logits and accumulates dh, dW and db.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from stageflow.kernels.chunked import cap_slope, soft_cap_
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
    return z if softcap is None else soft_cap_(z, softcap, 1.0)


def _target(source: Tensor, targets: Tensor, shift: float) -> Tensor:
    """softmax(source - shift * onehot(y)) per row (shift = inf: the target token removed)."""
    index = targets[:, None]
    if math.isinf(shift):
        shifted = source.scatter(1, index, float("-inf"))
    else:
        shifted = source.scatter_add(1, index, source.new_full(index.shape, -shift))
    return torch.softmax(shifted, dim=-1)


def _chunks(n: int, vocab: int) -> list[slice]:
    rows = max(1, CHUNK_ELEMENTS // vocab)
    return [slice(start, start + rows) for start in range(0, n, rows)]


def _accumulate(dz, h, weight, cap, z, part, grads) -> None:
    """Add a chunk's logit gradient dz (through the cap's slope, from the capped z) to
    (dh, dW, db), each None where not needed."""
    dh, dw, db = grads
    if cap is not None:  # through c tanh(raw / c): times 1 - tanh^2
        dz.mul_(cap_slope(z, cap, 1.0, out=z))
    if dh is not None:
        dh[part] = (dz.to(weight.dtype) @ weight).to(dh.dtype)
    if dw is not None:
        dw.addmm_(dz.T, h.to(dz.dtype))
    if db is not None:
        db += dz.sum(0)


def _new_grads(ctx, hidden, weight, bias, dtype):
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    return (
        torch.empty_like(hidden) if need_h else None,
        torch.zeros_like(weight, dtype=dtype) if need_w else None,
        torch.zeros_like(bias, dtype=dtype) if need_b else None,
    )


def _finished(grads, weight, bias):
    dh, dw, db = grads
    return (
        dh,
        None if dw is None else dw.to(weight.dtype),
        None if db is None else db.to(bias.dtype),
    )


class SoftTargetCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, teacher_h, teacher_w, teacher_b, shift, cap):
        dtype = result_dtype(hidden.dtype)
        out = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
        with torch.no_grad():
            for part in _chunks(hidden.shape[0], weight.shape[0]):
                z = _logits(hidden[part], weight, bias, cap, dtype)
                source = (
                    z
                    if teacher_h is None
                    else _logits(teacher_h[part], teacher_w, teacher_b, cap, dtype)
                )
                q = _target(source, targets[part], shift)
                out[part] = torch.logsumexp(z, dim=-1) - (q * z).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, teacher_h, teacher_w, teacher_b)
        ctx.shift, ctx.cap = shift, cap
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, targets, teacher_h, teacher_w, teacher_b = ctx.saved_tensors
        dtype, cap = result_dtype(hidden.dtype), ctx.cap
        grads = _new_grads(ctx, hidden, weight, bias, dtype)
        for part in _chunks(hidden.shape[0], weight.shape[0]):
            h = hidden[part]
            z = _logits(h, weight, bias, cap, dtype)
            source = (
                z
                if teacher_h is None
                else _logits(teacher_h[part], teacher_w, teacher_b, cap, dtype)
            )
            dz = torch.softmax(z, dim=-1).sub_(_target(source, targets[part], ctx.shift))
            _accumulate(dz.mul_(grad[part, None].to(dtype)), h, weight, cap, z, part, grads)
        return (*_finished(grads, weight, bias), None, None, None, None, None, None)


def _margin_grad(z: Tensor, g: Tensor) -> Tensor:
    dz = (-g / z.shape[1]).expand_as(z).clone()
    return dz.scatter_add_(1, z.argmax(-1, keepdim=True), g)


# statistics of the model's own logits: (value per row of z, d value / d z times g [n, 1])
OWN_LOGIT_STATISTICS = {
    "margin": (lambda z: z.amax(-1) - z.mean(-1), _margin_grad),
    "uniform_kl": (
        lambda z: torch.logsumexp(z, dim=-1) - z.mean(-1) - math.log(z.shape[1]),
        lambda z, g: torch.softmax(z, dim=-1).sub_(1.0 / z.shape[1]).mul_(g),
    ),
}


class OwnLogitStatistic(torch.autograd.Function):
    """One of `OWN_LOGIT_STATISTICS` per token, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, cap, kind):
        dtype = result_dtype(hidden.dtype)
        out = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
        value = OWN_LOGIT_STATISTICS[kind][0]
        with torch.no_grad():
            for part in _chunks(hidden.shape[0], weight.shape[0]):
                out[part] = value(_logits(hidden[part], weight, bias, cap, dtype))
        ctx.save_for_backward(hidden, weight, bias)
        ctx.cap, ctx.kind = cap, kind
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias = ctx.saved_tensors
        dtype, cap = result_dtype(hidden.dtype), ctx.cap
        logit_grad = OWN_LOGIT_STATISTICS[ctx.kind][1]
        grads = _new_grads(ctx, hidden, weight, bias, dtype)
        for part in _chunks(hidden.shape[0], weight.shape[0]):
            h = hidden[part]
            z = _logits(h, weight, bias, cap, dtype)
            dz = logit_grad(z, grad[part, None].to(dtype))
            _accumulate(dz, h, weight, cap, z, part, grads)
        return (*_finished(grads, weight, bias), None, None)


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


def logit_margin(
    hidden: Tensor, weight: Tensor, bias: Tensor | None = None, softcap: float | None = None
) -> Tensor:
    """max_v z_v - mean_v z_v per token [N] (fp32; float64 for float64 inputs); hidden [N, H],
    weight [V, H]."""
    return OwnLogitStatistic.apply(hidden, weight, bias, softcap, "margin")


def uniform_kl(
    hidden: Tensor, weight: Tensor, bias: Tensor | None = None, softcap: float | None = None
) -> Tensor:
    """KL(u || p) per token [N], u uniform over the V tokens (fp32; float64 for float64
    inputs); hidden [N, H], weight [V, H]."""
    return OwnLogitStatistic.apply(hidden, weight, bias, softcap, "uniform_kl")


@dataclass(frozen=True)
class HeadStatistic:
    """What the learner's head computes besides the log-probs, on the tokens of `mask` [B, T]:
    "cross_entropy" to softmax(s - shift * onehot(y)), with `teacher_hidden` [B, T, H] (aligned
    with the targets) and the teacher's head as the source, or the model's own logits when None;
    "margin"; or "uniform_kl"."""

    mask: Tensor
    kind: str = "cross_entropy"
    shift: float = math.inf
    teacher_hidden: Tensor | None = None
    teacher_weight: Tensor | None = None
    teacher_bias: Tensor | None = None


def per_token_statistic(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    stat: HeadStatistic,
    bias: Tensor | None = None,
    softcap: float | None = None,
) -> Tensor:
    """[B, T] values of `stat` from hidden states [B, T, H]; 0 outside its mask."""
    keep = stat.mask.reshape(-1).bool()
    flat = hidden.reshape(-1, hidden.shape[-1])[keep]
    if stat.kind == "margin":
        values = logit_margin(flat, weight, bias, softcap)
    elif stat.kind == "uniform_kl":
        values = uniform_kl(flat, weight, bias, softcap)
    else:
        teacher = None
        if stat.teacher_hidden is not None:
            teacher_h = stat.teacher_hidden.reshape(-1, hidden.shape[-1])[keep]
            teacher = Teacher(teacher_h, stat.teacher_weight, stat.teacher_bias)
        values = soft_target_cross_entropy(
            flat, weight, targets.reshape(-1)[keep], stat.shift, teacher, bias, softcap
        )
    full = values.new_zeros(keep.shape[0])
    return full.masked_scatter(keep, values).view(targets.shape)
