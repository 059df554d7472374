"""`mixture`: rows of several tasks interleaved, e.g. to pre-train a base model on their formats."""

from __future__ import annotations

import random

from stageflow.core.registry import TASKS


@TASKS.register(
    "mixture",
    splits=("train", "eval", "holdout"),
    check=lambda row, completion: TASKS[row["task"]].check(row, completion),
)
def generate(
    rng: random.Random,
    size: int,
    tasks: tuple = ("inst", "facts", "math", "refusal"),
    mix_seed: int = 1000,
) -> dict[str, list[dict]]:
    """About `size` training rows in all, an equal share from each task (generated with seeds
    offset by `mix_seed`, so they differ from the tasks' own stage data), shuffled."""
    names = list(tasks or [])
    unknown = [name for name in names if name not in TASKS or name == "mixture"]
    if not names or unknown:
        raise ValueError(f"mixture tasks must name other registered tasks, got {unknown or names}")
    share = max(1, size // len(names))
    splits: dict[str, list[dict]] = {"train": [], "eval": [], "holdout": []}
    for name in names:
        seed = mix_seed + rng.randrange(1 << 20)
        for split, rows in TASKS[name].rows(seed, share).items():
            if split in splits:
                splits[split] += [{**row, "task": name} for row in rows]
    for rows in splits.values():
        rng.shuffle(rows)
    return splits
