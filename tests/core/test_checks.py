"""Answer checkers by name, and that accuracy and RL rewards read a row's checker."""

from __future__ import annotations

from stageflow.actors.rewards import Sample, answer_correct, math_correct
from stageflow.core.registry import CHECKS
from stageflow.core.tasks import check_answer
from stageflow.platform.engine.evaluation import EvalJob, sampled_checks

exact, math_number = CHECKS["exact"].fn, CHECKS["math_number"].fn


def test_math_number_reads_the_target_else_the_answer():
    row = {"prompt": "q", "answer": "2 + 2 = 4. The answer is 4."}
    assert math_number(row, " The answer is 4.") and math_number(row, "so 4")
    assert not math_number(row, "The answer is 5.") and not math_number(row, "no number")
    assert math_number({**row, "target": 7}, "The answer is 7.")  # the target wins
    assert math_number({**row, "target": "#### 7"}, "7") and math_number(
        {**row, "target": 7.0}, "7"
    )
    assert not math_number({"prompt": "q", "answer": "none"}, "none")  # no integer to compare


def test_exact_compares_as_many_lines_as_the_answer_has():
    assert exact({"answer": " Paris "}, "Paris\nQ: next") and not exact({"answer": "Par"}, "Paris")
    assert exact({"answer": "a\nb"}, " a\nb\nc") and not exact({"answer": "a\nb"}, "a\nc")


def test_the_row_checker_decides_rewards():
    row = {"prompt": "q", "answer": "so 12", "check": "math_number"}
    assert check_answer(None, row, "The answer is 12.")
    assert not check_answer(None, {**row, "check": None}, "The answer is 12.")  # exact
    assert check_answer("math", {**row, "target": 12}, "12")  # a task's own rule
    assert answer_correct(Sample("12", row)) and math_correct(Sample("it is 12", row)) == 1.0
    user = {"prompt": "q", "answer": "The answer is 3."}  # a user's math row, no target
    assert math_correct(Sample("3", user)) == 1.0 and math_correct(Sample("4", user)) == 0.0


def test_accuracy_uses_the_row_checker():
    rows = [
        {"prompt": "a", "answer": "The answer is 3.", "check": "math_number"},
        {"prompt": "b", "answer": "The answer is 3."},  # exact
    ]

    def generate(prompts, n, **sampling):
        return {"texts": [["3", "The answer is 3."]] * len(prompts)}

    job = EvalJob("mine", rows, ["accuracy"], samples=2)
    assert sampled_checks(job, generate).correct == [[True, True], [False, True]]
