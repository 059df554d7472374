"""Answer checkers, registered by name in `CHECKS` (what a data set's `check:` names).

A checker is `fn(row, completion) -> bool`. Evaluation accuracy and the answer rewards of RL
stages read a row's checker through `platform.tasks.check_answer`: the row's `check` (a user's
data set: `exact` unless it names one), else its synthetic task's own rule.
"""

from __future__ import annotations

from stageflow.core.registry import CHECKS
from stageflow.core.tasks.math import extract_answer


@CHECKS.register("exact")
def exact(row: dict, completion: str) -> bool:
    """The completion equals the answer, both stripped; the completion is cut to as many lines
    as the answer has (a one-line answer is the completion's first line)."""
    answer = str(row["answer"]).strip()
    lines = completion.strip().split("\n")[: answer.count("\n") + 1]
    return "\n".join(lines).strip() == answer


def _integer(value: object) -> int | None:
    """An integer target as it is; a float with an integral value; else the integer in its text."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return extract_answer(str(value))


@CHECKS.register("math_number")
def math_number(row: dict, completion: str) -> bool:
    """The integer read from the completion (`extract_answer`) equals the row's `target` when
    it has one, else the integer read from its answer."""
    expected = _integer(row["target"] if row.get("target") is not None else row["answer"])
    return expected is not None and extract_answer(completion) == expected
