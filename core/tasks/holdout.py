"""Holdout splits: rows of a task's training distribution that were never trained on."""

from __future__ import annotations

from collections.abc import Callable


def fresh_rows(make: Callable[[], dict], n: int, trained: list[dict]) -> list[dict]:
    """`n` rows of `make()` whose prompts no trained row has (a holdout split: the same
    distribution, never trained on); fewer when the generator runs out of new prompts."""
    seen, out = {row["prompt"] for row in trained}, []
    for _ in range(20 * n):
        if len(out) == n:
            break
        row = make()
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            out.append(row)
    return out
