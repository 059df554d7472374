from __future__ import annotations

import dataclasses
import itertools
from collections import Counter

from stageflow.core.config import (
    DataSpec,
    InsertSpec,
    OrderingSpec,
    SampleSpec,
    StageSpec,
    StudySpec,
)
from stageflow.core.expand import (
    apply_hparams,
    expand,
    nth_permutation,
    ordering_paths,
    trial_count,
    trial_spec,
)


def stage(
    task: str, split: str = "train", kind: str = "sft", objective: str | None = None
) -> StageSpec:
    return StageSpec(kind=kind, objective=objective, data=DataSpec(task=task, split=split))


def spec(**changes) -> StudySpec:
    base = StudySpec(
        name="s",
        stages={
            "inst": stage("inst"),
            "facts": stage("facts"),
            "refusal": stage("refusal"),
            "npo": stage("refusal", kind="unlearn", objective="npo"),
        },
        orderings=OrderingSpec(permutations=["inst", "facts", "refusal"]),
        unlearning=["npo"],
    )
    return dataclasses.replace(base, **changes)


def test_orderings():
    assert len(ordering_paths(OrderingSpec(permutations=["a", "b", "c"]))) == 6
    inserted = ordering_paths(OrderingSpec(insert=InsertSpec(stage="u", into=["a", "b", "c"])))
    assert inserted == [
        ("u", "a", "b", "c"),
        ("a", "u", "b", "c"),
        ("a", "b", "u", "c"),
        ("a", "b", "c", "u"),
    ]
    assert ordering_paths(
        OrderingSpec(insert=InsertSpec(stage="u", into=["a", "b"], positions=[3]))
    ) == [("a", "b", "u")]
    assert ordering_paths(OrderingSpec(explicit=["a>b", " b > a "])) == [("a", "b"), ("b", "a")]


def test_trials_cross_grid_and_seeds_with_stable_ids():
    s = spec(grid={"stages.inst.lr": [1e-3, 1e-4]}, seeds=[0, 1, 2])
    trials = expand(s)
    assert len(trials) == 6 * 2 * 3
    assert len({t.trial_id for t in trials}) == len(trials)
    assert [t.trial_id for t in expand(s)] == [t.trial_id for t in trials]
    assert apply_hparams(s, trials[-1].hparams).stages["inst"].lr in (1e-3, 1e-4)


def test_oracle_drops_the_forget_stage():
    trials = expand(spec(oracle=True))
    oracles = [t for t in trials if t.oracle]
    # refusal is the forget set: every ordering's oracle is inst/facts in their order
    assert sorted(t.path for t in oracles) == [("facts", "inst"), ("inst", "facts")]
    assert all(t.unlearning == () for t in oracles)


def test_oracle_trains_facts_on_its_retain_split():
    forget_facts = stage("facts", split="forget", kind="unlearn", objective="ga")
    s = spec(stages={**spec().stages, "npo": forget_facts}, oracle=True)
    oracle = next(t for t in expand(s) if t.oracle)
    assert oracle.path == ("inst", "facts", "refusal")
    assert trial_spec(s, oracle).stages["facts"].data.split == "retain"
    normal = next(t for t in expand(s) if not t.oracle)
    assert trial_spec(s, normal).stages["facts"].data.split == "train"


def test_oracle_keeps_a_forget_stages_harmless_rows():
    """A refusal stage with answered harmless rows: the oracle trains on those (the stage's
    retain split), its refused rows alone dropped; without harmless rows the stage goes."""
    for benign, kept in ((0.5, True), (0.0, False)):
        data = DataSpec(task="refusal", params={"benign": benign})
        forget = dataclasses.replace(data, split="forget")
        stages = {
            "inst": stage("inst"),
            "refusal": StageSpec(kind="sft", data=data),
            "ga": StageSpec(kind="unlearn", objective="ga", data=forget),
        }
        orderings = OrderingSpec(permutations=["inst", "refusal"])
        s = spec(stages=stages, orderings=orderings, unlearning=["ga"], oracle=True)
        oracle = next(t for t in expand(s) if t.oracle)
        assert ("refusal" in oracle.path) == kept
        if kept:
            assert trial_spec(s, oracle).stages["refusal"].data.split == "retain"


def test_trial_count_is_the_number_of_trials_without_making_them():
    grid = {"stages.inst.lr": [1e-3, 1e-4], "stages.facts.batch_size": [4, 8, 16]}
    data_grid = {"stages.refusal.data.task": ["refusal", "facts"]}  # moves the forget set
    for s in (
        spec(),
        spec(grid=grid, seeds=[0, 1]),
        spec(grid=grid, oracle=True),
        spec(grid=data_grid, oracle=True),
        spec(orderings=OrderingSpec(explicit=["inst>facts", "inst>facts"])),  # one path twice
    ):
        assert trial_count(s) == len(expand(s))
    million = {
        f"stages.{n}.lr": [i * 1e-6 for i in range(1, 101)] for n in ("inst", "facts", "npo")
    }
    assert trial_count(spec(grid=million, seeds=[0, 1])) == 6 * 10**6 * 2


def test_sampled_orderings_are_a_uniform_draw_without_replacement():
    stages = ["a", "b", "c", "d"]
    assert [nth_permutation(stages, r) for r in range(24)] == list(itertools.permutations(stages))
    draws = [
        ordering_paths(OrderingSpec(sample=SampleSpec(stages, 5, seed))) for seed in range(2400)
    ]
    assert all(len(set(d)) == 5 == len(d) and d == sorted(d) for d in draws)
    assert draws[7] == ordering_paths(OrderingSpec(sample=SampleSpec(stages, 5, 7)))  # seeded
    counts = Counter(p for d in draws for p in d)
    assert len(counts) == 24  # every ordering can be drawn, each about 2400 * 5 / 24 = 500 times
    assert all(abs(c - 500) < 4 * (500 * (1 - 5 / 24)) ** 0.5 for c in counts.values()), counts
    # every pair of orderings is drawn together alike: 2400 * (5 * 4) / (24 * 23) = 87 times
    pairs = Counter(frozenset(pair) for d in draws for pair in itertools.combinations(d, 2))
    assert len(pairs) == 24 * 23 // 2 and all(abs(c - 87) < 5 * 87**0.5 for c in pairs.values())
    seven = OrderingSpec(sample=SampleSpec([f"s{i}" for i in range(7)], 300, 0))
    assert len(set(ordering_paths(seven))) == 300  # of 5,040, without enumerating them
