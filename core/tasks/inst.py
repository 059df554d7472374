"""`inst`: instruction following with rule-checked outputs (reverse, uppercase, count, sort ...)."""

from __future__ import annotations

import random
import string

from stageflow.core.registry import TASKS
from stageflow.core.tasks.holdout import fresh_rows

RULES = {
    "reverse": ("Reverse", lambda word: word[::-1]),
    "upper": ("Uppercase", str.upper),
    "count": ("Count letters in", lambda word: str(len(word))),
    "sort": ("Sort letters of", lambda word: "".join(sorted(word))),
    "first": ("First letter of", lambda word: word[0]),
    "double": ("Repeat twice", lambda word: word + word),
}


def expected_output(row: dict) -> str:
    return RULES[row["rule"]][1](row["input"])


def check(row: dict, completion: str) -> bool:
    return completion.strip().split("\n")[0].strip() == expected_output(row)


@TASKS.register(
    "inst",
    splits=("train", "eval", "holdout"),
    check=check,
)
def generate(
    rng: random.Random, size: int, min_len: int = 3, max_len: int = 7, rules: tuple = tuple(RULES)
) -> dict[str, list[dict]]:
    """`size` training instructions (and a quarter as many for eval, and for a holdout split of
    prompts never trained on) over random lowercase words."""
    rules = list(rules or RULES)
    unknown = [rule for rule in rules if rule not in RULES]
    if unknown:
        raise ValueError(f"unknown inst rule '{unknown[0]}', expected one of {', '.join(RULES)}")
    if not 1 <= min_len <= max_len:
        raise ValueError("inst lengths need 1 <= min_len <= max_len")

    def row() -> dict:
        rule = rng.choice(rules)
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(min_len, max_len)))
        example = {"rule": rule, "input": word, "prompt": f"{RULES[rule][0]}: {word}\nA:"}
        return {**example, "answer": " " + expected_output(example)}

    splits = {
        "train": [row() for _ in range(size)],
        "eval": [row() for _ in range(max(1, size // 4))],
    }
    splits["holdout"] = fresh_rows(row, max(1, size // 4), splits["train"])
    return splits
