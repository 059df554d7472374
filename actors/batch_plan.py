"""A stage's batch plan, torch-free (the trial process uses it too): which rows each step
trains on (`batch_indices`), how many steps (`stage_steps`), the LR multiplier of each step
(`lr_multiplier`)."""

from __future__ import annotations

import math
import random


def lr_multiplier(step: int, total: int, schedule: str, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then constant, linear or cosine decay to 0 at `total`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"unknown schedule '{schedule}'; expected constant, linear or cosine")


def batch_indices(n_rows: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Row indices of each step: a fresh seeded permutation per epoch, batches cross epochs."""
    rng, order, out = random.Random(seed), [], []
    for _ in range(steps):
        while len(order) < batch_size:
            perm = list(range(n_rows))
            rng.shuffle(perm)
            order += perm
        out.append(order[:batch_size])
        order = order[batch_size:]
    return out


def stage_steps(steps: int | None, epochs: float | None, batch_size: int, n_rows: int) -> int:
    """`steps` when given, else ceil(epochs x rows / batch_size) (one epoch by default)."""
    if steps:
        return int(steps)
    return max(1, math.ceil((epochs or 1.0) * n_rows / batch_size))
