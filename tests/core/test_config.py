"""The schema checks itself: Literal choices, each spec's invariants, one error type."""

from __future__ import annotations

import pytest

from stageflow.core.config import (
    DataSpec,
    LearnerSpec,
    RolloutSpec,
    StageSpec,
    StudyError,
    StudySpec,
)


def test_specs_built_in_python_check_themselves():
    with pytest.raises(StudyError) as err:
        LearnerSpec(kernels="fast").check("learner")  # a Literal outside its choices
    assert str(err.value) == "learner.kernels: unknown value 'fast'; expected one of fused, naive"
    with pytest.raises(StudyError, match="rollout.placement: unknown value 'everywhere'"):
        RolloutSpec(placement="everywhere").check("rollout")
    with pytest.raises(StudyError, match="learner.zero_stage: ZeRO stage 5 is out of range"):
        LearnerSpec(zero_stage=5).check("learner")
    LearnerSpec().check("learner")  # the defaults are valid


def test_zero_partitions_only_across_ranks():
    assert [LearnerSpec(ranks=1, zero_stage=z).engine_zero_stage for z in range(4)] == [0] * 4
    assert [LearnerSpec(ranks=2, zero_stage=z).engine_zero_stage for z in range(4)] == [0, 1, 2, 3]


def test_problems_name_nested_keys():
    spec = StudySpec(
        name="x",
        stages={
            "a": StageSpec(kind="sft", data=DataSpec(task="inst"), lr=float("nan")),
            "e": StageSpec(kind="eval"),  # trains nothing: no data needed
        },
        seeds=[1, 1],
    )
    problems = dict(spec.problems())
    assert problems["stages.a.lr"] == "expected a positive number, got nan"
    assert problems["seeds"] == "expected distinct seeds"
    assert not any(key.startswith("stages.e") for key in problems)


def test_one_error_type_located_by_within():
    err = StudyError("", "rewards[0].name", "unknown reward 'x'").within("s.yaml", "stages.rl")
    assert str(err) == "s.yaml: stages.rl.rewards[0].name: unknown reward 'x'"
    assert isinstance(err, ValueError)
