"""`facts`: question answering about fictitious people (TOFU-like, at toy scale).

Each entity has four attributes. Every QA row carries a paraphrased question, a
paraphrased answer and perturbed (wrong) answers for truth-ratio metrics. The
entities are split into forget and retain sets; `train` holds every QA pair; `holdout` asks
about as many other entities as `forget` does, never trained on (membership inference).
"""

from __future__ import annotations

import random

from stageflow.core.registry import TASKS

SYLLABLES = ["ka", "lo", "mi", "ren", "zu", "tal", "vor", "shi", "pe", "dun", "qua", "bel"]
VALUES = {
    "city": ["Quellor", "Marvane", "Oskitt", "Tarrow", "Bellin", "Yuvar", "Drennis", "Poldo"],
    "job": ["baker", "pilot", "painter", "doctor", "farmer", "poet", "smith", "sailor"],
    "year": [str(year) for year in range(1950, 2000, 3)],
    "color": ["red", "blue", "green", "gold", "gray", "pink", "teal", "white"],
}
QUESTIONS = {
    "city": ["Where was {e} born?", "In which city was {e} born?"],
    "job": ["What does {e} do for work?", "What is the job of {e}?"],
    "year": ["When was {e} born?", "In what year was {e} born?"],
    "color": ["What color does {e} like?", "Which color is the favorite of {e}?"],
}
ANSWERS = {
    "city": ["{e} was born in {v}.", "The birthplace of {e} is {v}."],
    "job": ["{e} works as a {v}.", "By trade {e} is a {v}."],
    "year": ["{e} was born in {v}.", "The birth year of {e} is {v}."],
    "color": ["{e} likes {v} best.", "The favorite color of {e} is {v}."],
}


def _name(rng: random.Random, taken: set[str]) -> str:
    while True:
        first = "".join(rng.choice(SYLLABLES) for _ in range(2)).capitalize()
        last = "".join(rng.choice(SYLLABLES) for _ in range(2)).capitalize()
        if (name := f"{first} {last}") not in taken:
            taken.add(name)
            return name


def _qa(rng: random.Random, entity: str, attribute: str, value: str, perturbed: int) -> dict:
    question, paraphrased_question = QUESTIONS[attribute]
    answer, paraphrased_answer = ANSWERS[attribute]
    wrong = rng.sample([v for v in VALUES[attribute] if v != value], perturbed)
    return {
        "prompt": f"Q: {question.format(e=entity)}\nA:",
        "answer": " " + answer.format(e=entity, v=value),
        "paraphrased_prompt": f"Q: {paraphrased_question.format(e=entity)}\nA:",
        "paraphrased_answer": " " + paraphrased_answer.format(e=entity, v=value),
        "perturbed_answers": [" " + answer.format(e=entity, v=v) for v in wrong],
        "entity": entity,
        "attribute": attribute,
        "value": value,
    }


def check(row: dict, completion: str) -> bool:
    return row["value"] in completion.split(".")[0]


@TASKS.register(
    "facts",
    splits=("train", "forget", "retain", "eval", "holdout"),
    check=check,
)
def generate(
    rng: random.Random, size: int, forget_fraction: float = 0.1, perturbed: int = 3
) -> dict[str, list[dict]]:
    """`size` entities × 4 attributes; `forget_fraction` of the entities form the forget split."""
    if not 0 < forget_fraction < 1:
        raise ValueError("facts forget_fraction must be between 0 and 1")
    taken: set[str] = set()
    entities = [_name(rng, taken) for _ in range(max(2, size))]
    n_forget = max(1, round(forget_fraction * len(entities)))
    splits: dict[str, list[dict]] = {
        "train": [],
        "forget": [],
        "retain": [],
        "eval": [],
        "holdout": [],
    }
    for index, entity in enumerate(entities):
        for attribute, values in VALUES.items():
            row = _qa(rng, entity, attribute, rng.choice(values), perturbed)
            splits["train"].append(row)
            splits["forget" if index < n_forget else "retain"].append(row)
            splits["eval"].append(
                {**row, "prompt": row["paraphrased_prompt"], "split": "paraphrased"}
            )
    for entity in [_name(rng, taken) for _ in range(n_forget)]:  # drawn after the others
        for attribute, values in VALUES.items():
            splits["holdout"].append(_qa(rng, entity, attribute, rng.choice(values), perturbed))
    return splits
