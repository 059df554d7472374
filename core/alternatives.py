"""Preferred answers for preference-based unlearning (DPO, IdkDPO, AltPO): each forget row's
answer is the rejected one, and its chosen answer comes from the built-in "I don't know" set
(`idk`), from a column of the stage's data (a string, or a list of strings of which one is
drawn), or is `generated`: sampled from the model at the stage's start by the rollout engines,
which the trial writes into each row's `generated` column (AltPO)."""

from __future__ import annotations

import random
from collections.abc import Sequence

IDK = "idk"
GENERATED = "generated"  # the source, and the column the trial fills with sampled answers
IDK_ANSWERS = (
    "I don't know.",
    "I'm not sure.",
    "I have no idea.",
    "I don't have that information.",
    "I can't say.",
    "That's not something I know.",
    "I'm afraid I don't know.",
    "I have no information about that.",
    "I'm unable to answer that.",
    "I don't have an answer to that.",
    "Sorry, I don't know.",
    "I'm not able to tell you.",
    "I don't recall.",
    "I have no knowledge of that.",
    "That I don't know.",
    "I really couldn't say.",
)


def _choices(row: dict, source: str) -> Sequence[str]:
    if source == IDK:
        return IDK_ANSWERS
    value = row.get(source)
    return [value] if isinstance(value, str) else value


def alternative_problem(rows: Sequence[dict], source: str) -> str | None:
    """Why `source` cannot give every row a preferred answer, or None."""
    if source in (IDK, GENERATED):
        return None
    for number, row in enumerate(rows, start=1):
        value = row.get(source)
        ok = isinstance(value, str) or (
            isinstance(value, list) and value and all(isinstance(v, str) for v in value)
        )
        if not ok:
            return (
                f"row {number} of the stage's data has no '{source}' answer; expected '{IDK}' "
                '(the built-in "I don\'t know" answers) or a column holding a string or a '
                "non-empty list of strings in every row"
            )
    return None


def chosen_rows(rows: Sequence[dict], source: str, seed: int) -> list[dict]:
    """Each row with its answer replaced by a preferred one (one drawn per row from a list, the
    same for the same rows, source and seed)."""
    rng = random.Random(f"alternatives:{source}:{seed}")
    return [{**row, "answer": rng.choice(list(_choices(row, source)))} for row in rows]
