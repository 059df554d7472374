"""`stageflow plan` without running a study: its counts by hand, its calibration study, the
power of the declared test (against a simulation of it) and bad pilots. The counts against a
real run's files, and the time estimate from a real run's timings: tests/platform/test_study.py
and tests/test_quickstart.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml

from stageflow.core.expand import expand
from stageflow.core.registry import load_plugins
from stageflow.core.study_file import load_study
from stageflow.platform.commands.cli import main
from stageflow.platform.engine.study_plan import (
    CALIBRATION_STEPS,
    calibration_spec,
    planned_work,
)
from stageflow.platform.results.ordering_test import Design, p_value
from stageflow.platform.results.power import design_effect, power, seeds_needed, smallest_p

STAGES = {
    "a": {"kind": "sft", "data": {"task": "inst", "size": 8}, "steps": 3, "batch_size": 4},
    "b": {"kind": "sft", "data": {"task": "facts", "size": 8}, "epochs": 2, "batch_size": 4},
    "c": {"kind": "sft", "data": {"task": "math", "size": 8}, "steps": 5, "batch_size": 4},
    "u": {"kind": "unlearn", "objective": "ga", "data": {"task": "refusal", "size": 8},
          "steps": 2, "batch_size": 4},
}  # fmt: skip


def study_file(tmp_path, **extra):
    study = {
        "name": "planned",
        "storage_dir": str(tmp_path / "planned"),
        "model": {"tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 2}},
        "stages": STAGES,
        "orderings": {"permutations": ["a", "b", "c"]},
        "seeds": [0, 1],
        "evaluation": {
            "sets": {
                "inst": {"data": {"task": "inst", "split": "eval", "size": 8},
                         "metrics": ["avg_loglik"], "max_examples": 4},
                "gen": {"data": {"task": "inst", "split": "eval", "size": 8},
                        "metrics": ["accuracy"], "max_examples": 2, "max_new_tokens": 5},
            }
        },
        **extra,
    }  # fmt: skip
    path = tmp_path / "planned.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_counts_by_hand(tmp_path):
    """3 stages permuted x 2 seeds: 12 trials walk 36 stages; shared prefixes leave 3 + 6 + 6
    trainings a seed; one branch a trial adds 12; every checkpoint and the base model is
    evaluated on 2 sets."""
    load_plugins()
    work = planned_work(load_study(study_file(tmp_path, unlearning=["u"])))
    assert len(work.trials) == 12 and work.stage_runs == 36 + 12
    assert len(work.trainings) == 2 * 15 + 12
    assert len(work.evaluations) == 2 * (1 + 15 + 6) * 2
    assert len(work.kept) == 2 * (6 + 6)  # each path's end and each branch
    steps = {s.name: work.steps[k] for k, s in work.trainings.items()}
    assert steps == {"a": 3, "b": 16, "c": 5, "u": 2}  # b: 2 epochs of 32 rows (8 people's
    # facts, 4 questions each), 4 a batch
    assert work.units == {"inst": (2, 0), "gen": (0, 2 * 5)}  # inst's eval split: 2 of 8 rows


def test_plan_prints_counts_and_disk_without_running(tmp_path, capsys):
    path = study_file(tmp_path, storage={"max_gb": 1})
    assert main(["plan", str(path), "--time", "none"]) == 0
    out = capsys.readouterr().out
    assert "trials            12 (6 orderings, 2 seeds)" in out
    assert "stage trainings   30 after prefix sharing, of 36 the trials walk" in out
    assert "evaluations       64 evaluation-set results" in out
    assert "checkpoints       30 x " in out and "`prune --keep final` keeps 12" in out
    assert "storage.max_gb    1:" in out
    assert not (tmp_path / "planned").exists()


def test_calibration_study_is_two_short_trials(tmp_path):
    load_plugins()
    spec = load_study(study_file(tmp_path, unlearning=["u"]))
    small = calibration_spec(spec, tmp_path / "cal")
    trials = expand(small)
    assert [t.path for t in trials] == [("a", "b", "c"), ("a", "c", "b")]
    assert {t.seed for t in trials} == {0} and all(t.unlearning == ("u",) for t in trials)
    assert {n: s.steps for n, s in small.stages.items()} == {"a": 3, "b": 4, "c": 4, "u": 2}
    assert all(s.steps <= CALIBRATION_STEPS and s.epochs is None for s in small.stages.values())
    assert small.storage_dir == str(tmp_path / "cal") and small.tracking.uri is None
    one = load_study(study_file(tmp_path, orderings={"explicit": ["a>b"]}))
    assert [(t.path, t.seed) for t in expand(calibration_spec(one, tmp_path))] == [
        (("a", "b"), 0),
        (("a", "b"), 1),
    ]


def test_smallest_p_and_no_effect():
    assert smallest_p(3, 4, "permutation", True) == 1 / 6**3
    assert smallest_p(2, 3, "permutation", False) == 2 * 6**2 / math.factorial(6)
    assert smallest_p(3, 2, "anova", True) == 0.0
    assert seeds_needed(0.0, 1.0, 3, 0.05, "permutation", True) is None
    # a huge effect still needs the seeds at which the permutation test can reject at all
    assert seeds_needed(100.0, 1.0, 2, 0.025, "permutation", True) == 7  # 2^-6 <= 0.025
    assert seeds_needed(100.0, 1.0, 2, 0.025, "anova", True) == 3  # F(1, 1) at 2 seeds: weak


def test_power_agrees_with_a_simulation_of_the_blocked_permutation_test():
    """Normal errors, block effects, 2 orderings 1.5 sd apart (sum of squares 1.125): the
    seeds planned for 80% power reject about 80% of simulated studies."""
    effect_ss, level = 1.125, 0.05
    n = seeds_needed(effect_ss, 1.0, 2, level, "permutation", True)
    assert n is not None and 6 <= n <= 14
    predicted = power(effect_ss, 1.0, 2, n, level, True)
    rng = np.random.default_rng(0)
    rejected, sims = 0, 300
    for _ in range(sims):
        blocks = rng.normal(0, 2, n)
        values = {o: {b: mu + blocks[b] + rng.normal() for b in range(n)}
                  for o, mu in (("x", -0.75), ("y", 0.75))}  # fmt: skip
        p, _, how = p_value(Design.of(values), "permutation", rng)
        rejected += p <= level
    assert how.startswith("permutation, blocked by seed (exact")
    assert abs(rejected / sims - predicted) < 0.08, (rejected / sims, predicted)


def test_design_effect_removes_the_pilots_noise():
    """3 orderings at -1, 0, 1 (sum of squares 2), 4 seeds, unit noise: the observed sum of
    squares is 2 + 2/4 on average, the corrected one 2; without an effect most pilots show
    none."""
    rng = np.random.default_rng(1)

    def pilot(means):
        return Design.of({o: {b: mu + rng.normal() for b in range(4)} for o, mu in means.items()})

    effects = [design_effect(pilot({"x": -1, "y": 0, "z": 1})) for _ in range(400)]
    assert abs(np.mean([e[0] for e in effects]) - 2) < 0.2
    assert abs(np.mean([e[1] for e in effects]) - 1) < 0.1  # the residual variance
    assert all(e[2] == 4 and e[3] for e in effects)
    null = [design_effect(pilot({"x": 0, "y": 0, "z": 0}))[0] for _ in range(400)]
    assert np.mean([e == 0 for e in null]) > 0.5
    assert design_effect(Design.of({"x": {0: 1.0}, "y": {0: 2.0}})) is None  # one seed


def test_bad_pilot(tmp_path, capsys):
    path = study_file(tmp_path)
    assert main(["plan", str(path), "--time", "none", "--pilot", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "--pilot: no study.yaml here" in err and len(err.strip().splitlines()) == 1
    pilot = tmp_path / "pilot"
    pilot.mkdir()
    (pilot / "study.yaml").write_text(path.read_text())  # a study that has no unlearning
    assert main(["plan", str(path), "--time", "none", "--pilot", str(pilot)]) == 2
    assert "the pilot has no finished trial with a primary score" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "x"])
def test_plan_refuses_a_bad_study(tmp_path, capsys, value):
    assert main(["plan", str(study_file(tmp_path)), f"storage.max_gb={value}"]) == 2
    assert "storage.max_gb" in capsys.readouterr().err
