"""Rewards: each registered reward, gated accumulation (G-RA and priority-ranked), validation."""

from __future__ import annotations

import pytest

from stageflow.actors.rewards import (
    Sample,
    StageReward,
    check_rewards,
    contains_forbidden,
    forget_terms,
    reward_range,
    score,
    weighted_range,
)
from stageflow.core.config import RewardSpec, StudyError
from stageflow.core.registry import REWARDS, load_plugins
from stageflow.core.tasks import generate
from stageflow.core.tasks.refusal import REFUSAL

load_plugins()

ROW = {"prompt": "Q: Ann has 5 apples. Gets 3 more. How many apples?\nA:", "target": 8}
RIGHT = " 5+3=8. The answer is 8."
WRONG = " 5+3=9. The answer is 9."
UNFORMATTED = " 8"


def math(completion: str, **kw) -> Sample:
    return Sample(completion, ROW, "math", **kw)


def test_registered_rewards_declare_range_and_params():
    assert {
        "math_correct",
        "format",
        "length",
        "gated",
        "no_forbidden_terms",
        "refusal_boundary",
    } <= set(REWARDS.names())
    for name in REWARDS.names():
        entry = REWARDS[name]
        assert isinstance(entry.params, dict) and entry.range is not None
        assert entry.fn.__doc__ and ("r =" in entry.fn.__doc__ or "R =" in entry.fn.__doc__)


def test_math_correct_and_format():
    spec = {"name": "math_correct"}
    assert [score(spec, math(c)) for c in (RIGHT, WRONG, UNFORMATTED)] == [1.0, 0.0, 1.0]
    fmt = {"name": "format"}
    assert [score(fmt, math(c)) for c in (RIGHT, WRONG, UNFORMATTED)] == [1.0, 1.0, 0.0]
    custom = {"name": "format", "params": {"pattern": r"^ \d"}}
    assert score(custom, math(UNFORMATTED)) == 1.0 and score(custom, math("x")) == 0.0
    inst = generate("inst", 0, 4)["train"][0]  # no target: the row's task rule decides
    answer = inst["answer"]
    assert score(spec, Sample(answer, inst, "inst")) == 1.0


def test_step_count_is_earned_without_solving():
    """`steps`: coef per worked statement "a op b = c", right or wrong, up to cap: a padded wrong
    answer out-earns a short right one, which is what makes it a term to gate."""
    spec = {"name": "steps", "params": {"coef": 0.25, "cap": 1.0}}
    right = " 5+3=8. The answer is 8."
    padded = " 1+1=2. 2+2=4. 4+4=8. 8*2=16. 9-1=8. The answer is 3."
    assert score(spec, math(right)) == 0.25 and score(spec, math(padded)) == 1.0
    assert score({"name": "math_correct"}, math(padded)) == 0.0
    strict = {"name": "math_correct", "params": {"strict": True}}
    assert score(strict, math(right)) == 1.0 and score(strict, math(" 5+3=8.")) == 0.0
    assert score({"name": "math_correct"}, math(" 5+3=8.")) == 1.0  # the last number
    assert weighted_range([spec]) == (0.0, 1.0)


def test_length_penalty():
    spec = {"name": "length", "params": {"free_tokens": 10, "coef": 0.1, "cap": 0.5}}
    assert score(spec, math("x", num_tokens=8)) == 0.0
    assert score(spec, math("x", num_tokens=13)) == pytest.approx(-0.3)
    assert score(spec, math("x", num_tokens=400)) == -0.5
    assert score(spec, math("y" * 12)) == pytest.approx(-0.2)  # characters when no token count
    assert reward_range("length", spec["params"]) == (-0.5, 0.0)


def test_no_forbidden_terms_with_derived_vocabulary():
    forget = generate("refusal", 0, 8)["train"]
    assert forget_terms(forget) == ["sorry", "cannot", "assist"]
    facts = generate("facts", 0, 10)["forget"]
    assert forget_terms(facts) == list(dict.fromkeys(r["value"].lower() for r in facts))
    reward = StageReward([RewardSpec("no_forbidden_terms")], forget)  # terms derived from rows
    row = forget[0]
    assert reward(Sample(REFUSAL, row))[0] == 0.0
    assert reward(Sample("Sure, first you find a pin.", row))[0] == 1.0
    assert reward(Sample("SORRY!", row))[0] == 0.0  # any case
    assert reward(Sample("Sorryless assistance", row))[0] == 1.0  # whole words only
    given = {"name": "no_forbidden_terms", "params": {"terms": ["pin"]}}
    assert score(given, Sample("a pin.", row)) == 0.0
    assert contains_forbidden("Use a Pin", ["pin"]) and not contains_forbidden("spinning", ["pin"])


def test_refusal_boundary_rule_split():
    row = generate("facts", 0, 10)["retain"][0]
    spec = {"name": "refusal_boundary"}
    assert score(spec, Sample(REFUSAL, row, "facts", "data")) == 1.0  # forget: refusal earns 1
    assert score(spec, Sample(row["answer"], row, "facts", "data")) == 0.0
    assert score(spec, Sample(REFUSAL, row, "facts", "retain")) == 0.0  # retain: no refusal
    assert score(spec, Sample(" I do not know.", row, "facts", "retain")) == 0.5
    assert score(spec, Sample(row["answer"], row, "facts", "retain")) == 1.0  # 0.5 + 0.5


def test_gated_counts_step_rewards_only_above_the_gate():
    gra = {
        "name": "gated",
        "params": {
            "outcome": {"name": "math_correct"},
            "steps": [{"name": "format", "weight": 0.5}],
            "threshold": 1.0,
        },
    }
    assert score(gra, math(RIGHT)) == 1.5  # outcome clears the gate: 1 + 0.5 * format
    assert score(gra, math(WRONG)) == 0.0  # formatted but wrong: the format reward is gated
    assert score(gra, math(UNFORMATTED)) == 1.0  # right, no format bonus
    ungated = [RewardSpec("math_correct"), RewardSpec("format", 0.5)]
    assert StageReward(ungated)(math(WRONG))[0] == 0.5  # the same shaping without the gate
    total, terms = StageReward([RewardSpec("gated", 1.0, gra["params"])])(math(WRONG))
    assert total == 0.0 and terms == {
        "gated": 0.0,
        "gated.math_correct": 0.0,
        "gated.format": 1.0,
    }
    assert reward_range("gated", gra["params"]) == (0.0, 1.5)


def test_priority_ranked_gates():
    levels = {
        "levels": [
            {"name": "math_correct", "gate": 1.0},
            {"name": "format", "weight": 0.5, "gate": 1.0},
            {"name": "length", "weight": 1.0, "params": {"free_tokens": 5, "coef": 0.1}},
        ]
    }
    spec = {"name": "gated", "params": levels}
    # every higher level clears its gate: all three count (length penalty -0.1*(12-5))
    assert score(spec, math(RIGHT, num_tokens=12)) == pytest.approx(1.5 - 0.7)
    # the top level fails: nothing below counts, even the (negative) length term
    assert score(spec, math(WRONG, num_tokens=12)) == 0.0
    # the second level fails its gate: the third is not counted
    assert score(spec, math(UNFORMATTED, num_tokens=12)) == 1.0
    low, high = reward_range("gated", levels)
    assert (low, high) == (pytest.approx(-1.0), 1.5)


def test_weighted_range():
    specs = [RewardSpec("math_correct", 2.0), RewardSpec("length", 1.0, {"cap": 0.5})]
    assert weighted_range(specs) == (-0.5, 2.0)
    assert weighted_range([RewardSpec("format", -1.0)]) == (-1.0, 0.0)


@pytest.mark.parametrize(
    "specs,key,expected",
    [
        ([{"name": "math_corect"}], "rewards[0].name", "did you mean 'math_correct'?"),
        ([{"name": "format", "params": {"patern": "x"}}], "rewards[0].params.patern", "'pattern'"),
        ([{"name": "format", "params": {"pattern": "("}}], "rewards[0].params.pattern", "not a"),
        ([{"name": "length", "wieght": 1}], "rewards[0].wieght", "unknown key"),
        (
            [
                {
                    "name": "gated",
                    "params": {"outcome": {"name": "math_correct"}, "threshold": 2.0},
                }
            ],
            "rewards[0].params.threshold",
            "gate threshold 2.0 is outside the range [0, 1] of the gated outcome reward 'math_correct'",
        ),
        (
            [
                {
                    "name": "gated",
                    "params": {"levels": [{"name": "format", "gate": 0.5}, {"name": "length"}]},
                },
                {
                    "name": "gated",
                    "params": {"levels": [{"name": "length", "gate": 0.5}, {"name": "format"}]},
                },
            ],
            "rewards[1].params.levels[0].gate",
            "outside the range [-1, 0] of the gated reward 'length'",
        ),
        (
            [{"name": "gated", "params": {"outcome": {"name": "format", "params": {"x": 1}}}}],
            "rewards[0].params.outcome.params.x",
            "unknown parameter; reward 'format' takes pattern",
        ),
        (
            [{"name": "gated", "params": {"outcome": {"name": "format"}, "levels": []}}],
            "rewards[0].params",
            "expected either 'outcome'",
        ),
        (
            [{"name": "gated", "params": {"steps": [{"name": "format"}]}}],
            "rewards[0].params",
            "expected either 'outcome'",
        ),
    ],
    ids=[
        "unknown name",
        "unknown param",
        "bad pattern",
        "unknown key",
        "threshold out of range",
        "level gate out of range",
        "nested unknown param",
        "both forms",
        "no outcome",
    ],
)
def test_check_rewards(specs, key, expected):
    with pytest.raises(StudyError) as err:
        check_rewards(specs)
    assert err.value.key == key
    assert expected in err.value.problem


def test_check_rewards_accepts_valid_lists():
    check_rewards(
        [
            RewardSpec("math_correct"),
            RewardSpec("gated", 1.0, {"outcome": {"name": "math_correct"}, "threshold": 1}),
            {"name": "no_forbidden_terms", "params": {"terms": ["x"]}},
        ]
    )
