"""`math`: arithmetic word problems with integer answers (GSM8K-like, at toy scale).

Answers are short worked solutions ending "The answer is N."; `extract_answer` is the rule
that reads N back from any text and `check` compares it with the row's `target`.
"""

from __future__ import annotations

import random
import re

from stageflow.core.registry import TASKS
from stageflow.core.tasks.holdout import fresh_rows

NAMES = ["Ann", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ivy", "Jo"]
ITEMS = ["apple", "pen", "cup", "coin", "egg", "book", "hat", "card"]
_ANSWER = re.compile(r"answer is\s*(-?\d+)")
FINAL_ANSWER = r"The answer is -?\d+\."  # a well-formed final answer, right or wrong
STATEMENT = r"-?\d+ ?[-+*] ?-?\d+ ?= ?-?\d+"  # one worked step "a op b = c", right or wrong
_INTEGER = re.compile(r"-?\d+")


def extract_answer(text: str) -> int | None:
    """The integer after 'answer is', else the last integer in `text`, else None."""
    found = _ANSWER.search(text)
    if found:
        return int(found.group(1))
    numbers = _INTEGER.findall(text)
    return int(numbers[-1]) if numbers else None


def check(row: dict, completion: str) -> bool:
    return extract_answer(completion) == row["target"]


def _problem(rng: random.Random, steps: int, max_operand: int) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(2, max_operand)
    story, work = [f"{name} has {value} {item}s."], []
    for _ in range(steps):
        op = rng.choice("+-*" if value <= max_operand else "+-")
        if op == "-" and value < 2:
            op = "+"
        b = (
            rng.randint(1, value - 1)
            if op == "-"
            else rng.randint(2, 3 if op == "*" else max_operand)
        )
        new = {"+": value + b, "-": value - b, "*": value * b}[op]
        story.append(
            {"+": f"Gets {b} more.", "-": f"Gives away {b}.", "*": f"Then has {b} times as many."}[
                op
            ]
        )
        work.append(f"{value}{op}{b}={new}.")
        value = new
    prompt = "Q: " + " ".join(story) + f" How many {item}s?\nA:"
    answer = " " + " ".join(work) + f" The answer is {value}."
    return {"prompt": prompt, "answer": answer, "target": value, "steps": steps}


@TASKS.register("math", splits=("train", "eval", "holdout"), check=check)
def generate(rng: random.Random, size: int, difficulty: int = 1) -> dict[str, list[dict]]:
    """`size` training problems (and a quarter as many eval ones, and holdout ones never trained
    on) of `difficulty` steps (1-3)."""
    if difficulty not in (1, 2, 3):
        raise ValueError("math difficulty must be 1, 2 or 3")
    max_operand = 9 * difficulty

    def rows(n: int) -> list[dict]:
        return [_problem(rng, rng.randint(1, difficulty), max_operand) for _ in range(n)]

    splits = {"train": rows(size), "eval": rows(max(1, size // 4))}

    def problem() -> dict:
        return _problem(rng, rng.randint(1, difficulty), max_operand)

    splits["holdout"] = fresh_rows(problem, max(1, size // 4), splits["train"])
    return splits
