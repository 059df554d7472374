"""Preferred answers of preference-based unlearning: the "I don't know" set or a data column."""

from __future__ import annotations

from stageflow.core.alternatives import IDK_ANSWERS, alternative_problem, chosen_rows
from stageflow.core.tasks import generate


def test_chosen_answers_from_idk_or_a_column_are_drawn_reproducibly():
    rows = generate("facts", 0, 12)["forget"]
    idk = chosen_rows(rows, "idk", seed=3)
    assert [r["prompt"] for r in idk] == [r["prompt"] for r in rows]
    assert all(r["answer"] in IDK_ANSWERS for r in idk)
    assert len({r["answer"] for r in idk}) > 1  # drawn per row, not one answer for all
    assert chosen_rows(rows, "idk", seed=3) == idk and chosen_rows(rows, "idk", seed=4) != idk
    para = chosen_rows(rows, "paraphrased_answer", seed=0)  # a string column
    assert [c["answer"] for c in para] == [r["paraphrased_answer"] for r in rows]
    wrong = chosen_rows(rows, "perturbed_answers", seed=0)  # a list column: one drawn per row
    assert all(c["answer"] in r["perturbed_answers"] for c, r in zip(wrong, rows))
    assert len({c["answer"] for c in wrong}) > 1
    own = chosen_rows([{"prompt": "p", "answer": "a", "better": "b"}], "better", seed=0)
    assert own == [{"prompt": "p", "answer": "b", "better": "b"}]


def test_a_column_some_row_lacks_is_named():
    rows = [{"prompt": "p", "answer": "a", "better": "b"}, {"prompt": "q", "answer": "a"}]
    assert alternative_problem(rows, "idk") is None
    assert alternative_problem(rows[:1], "better") is None
    assert alternative_problem(rows, "better").startswith("row 2 of the stage's data has no")
    assert alternative_problem([{"better": []}], "better").startswith("row 1")
    assert alternative_problem([{"better": [1]}], "better").startswith("row 1")
