from __future__ import annotations

import pytest

from stageflow.core.registry import TASKS
from stageflow.core.tasks import check_answer, check_jsonl, generate, read_jsonl, write_task
from stageflow.core.tasks.math import extract_answer
from stageflow.core.tasks.refusal import PARAPHRASES, REFUSAL, is_refusal

ALL_TASKS = ["math", "facts", "inst", "refusal"]


@pytest.mark.parametrize("task", ALL_TASKS)
def test_same_seed_gives_byte_identical_files(tmp_path, task):
    first = write_task(tmp_path / "a", task, seed=3, size=40)
    second = write_task(tmp_path / "b", task, seed=3, size=40)
    other = write_task(tmp_path / "c", task, seed=4, size=40)
    files = sorted(p.name for p in first.glob("*.jsonl"))
    assert files == sorted(f"{s}.jsonl" for s in TASKS[task].splits)
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes()
        if (task, name) != ("refusal", "retain.jsonl"):  # no answered rows without `benign`
            assert check_jsonl(first / name) is None
    assert any((first / n).read_bytes() != (other / n).read_bytes() for n in files)


@pytest.mark.parametrize("task", ALL_TASKS)
def test_gold_answers_pass_the_task_rule(task):
    splits = generate(task, seed=0, size=50)
    for split, rows in splits.items():
        assert rows or (task, split) == ("refusal", "retain")
        assert all(check_answer(task, row, row["answer"]) for row in rows)


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_math_rule_checks_every_generated_answer(difficulty):
    rows = [
        r for split in generate("math", 7, 1000, {"difficulty": difficulty}).values() for r in split
    ]
    assert all(extract_answer(r["answer"]) == r["target"] for r in rows)
    # a wrong number is rejected by the same rule
    assert not any(check_answer("math", r, f"The answer is {r['target'] + 1}.") for r in rows[:100])
    assert max(r["steps"] for r in rows) == difficulty


@pytest.mark.parametrize("task", [*ALL_TASKS, "mixture"])
def test_every_task_has_a_holdout_split_never_trained_on(task):
    """Rows of the training distribution whose prompts no training row has (membership
    inference scores a forget set against them); facts: other entities, as many as forget's."""
    splits = generate(task, seed=2, size=40)
    trained = {row["prompt"] for row in splits["train"]}
    assert splits["holdout"] and not trained & {row["prompt"] for row in splits["holdout"]}
    if task == "facts":
        entities = {row["entity"] for row in splits["holdout"]}
        assert len(entities) == len({row["entity"] for row in splits["forget"]})
        assert not entities & {row["entity"] for row in splits["train"]}


def test_math_extraction_rule():
    assert extract_answer("3+4=7. The answer is 7.") == 7
    assert extract_answer("it is -2") == -2
    assert extract_answer("no number") is None


def test_facts_splits_and_truth_ratio_fields():
    splits = generate("facts", seed=1, size=20)
    forget = {r["entity"] for r in splits["forget"]}
    retain = {r["entity"] for r in splits["retain"]}
    assert forget and retain and not forget & retain
    assert len(splits["train"]) == len(splits["forget"]) + len(splits["retain"]) == 80
    row = splits["train"][0]
    assert row["value"] in row["answer"] and row["value"] in row["paraphrased_answer"]
    assert len(row["perturbed_answers"]) == 3
    assert all(row["value"] not in wrong for wrong in row["perturbed_answers"])


def test_inst_rules_are_checked():
    rows = generate("inst", seed=2, size=200)["train"]
    assert {r["rule"] for r in rows} == {"reverse", "upper", "count", "sort", "first", "double"}
    reverse = next(r for r in rows if r["rule"] == "reverse" and r["input"] != r["input"][::-1])
    assert not check_answer("inst", reverse, " " + reverse["input"])


def test_refusal_has_twenty_paraphrases(tmp_path):
    rows = read_jsonl(write_task(tmp_path, "refusal", 0, 10) / "train.jsonl")
    assert all(r["answer"].strip() == REFUSAL for r in rows)
    assert len(PARAPHRASES) == 20 and len(set(PARAPHRASES)) == 20
    assert all(len(r["paraphrased_answers"]) == 20 for r in rows)
    assert all(is_refusal(p) for p in [REFUSAL, *PARAPHRASES])
    assert not is_refusal("You pick the lock with a pin.")


def test_targeted_refusal_refuses_one_class_of_requests():
    """`benign` mixes answered harmless requests into training; `forget` is the refused rows
    alone, `benign` held-out harmless requests; with no benign share the data is as before."""
    from stageflow.core.tasks.refusal import ACTIONS, BENIGN_ACTIONS

    plain = generate("refusal", 0, 40)
    assert plain["forget"] == plain["train"]
    targeted = generate("refusal", 0, 40, {"benign": 0.5})
    answered = [r for r in targeted["train"] if not is_refusal(r["answer"])]
    assert len(answered) == 20 and len(targeted["forget"]) == 20
    assert targeted["retain"] == answered and plain["retain"] == []  # train minus forget
    assert all(r["answer"].strip() == REFUSAL for r in targeted["forget"])
    assert {r["prompt"] for r in targeted["forget"]} <= {r["prompt"] for r in targeted["train"]}

    def actions(rows: list[dict], pool: list[str]) -> set[str]:
        return {a for r in rows for a in pool if a in r["prompt"]}

    assert (
        actions(answered, ACTIONS) == set() and actions(targeted["forget"], BENIGN_ACTIONS) == set()
    )
    held_out = actions(targeted["benign"], BENIGN_ACTIONS)
    assert held_out and not held_out & actions(answered, BENIGN_ACTIONS)  # unseen requests
    assert all(
        r["answer"] == f" Sure, here is how to {a}."
        for r in targeted["benign"]
        for a in actions([r], BENIGN_ACTIONS)
    )
    assert not any(check_answer("refusal", r, REFUSAL) for r in targeted["benign"])
    with pytest.raises(ValueError, match="share of answered training rows"):
        generate("refusal", 0, 40, {"benign": 1.0})
