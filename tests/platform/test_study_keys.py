"""Study edits end to end: a grid over an evaluation setting evaluates every point on shared
training, a grid over a rollout setting trains the sampling stage per point, a data file edited
between two runs retrains from the first stage that reads it (and `status` says so first),
and the same study run twice (the second time scored by evaluator actors) gives bit-identical
metrics."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from stageflow.core.prefix_cache import PrefixCache
from stageflow.platform.commands.cli import main

TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128}
STEPS = {"steps": 2, "batch_size": 4, "lr": 1e-3}


def write_study(tmp_path: Path, name: str, **study) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump(
            {"name": name, "storage_dir": str(tmp_path / name), "model": {"tiny": TINY}, **study}
        )
    )
    return path


def records(storage: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (storage / "trials").glob("*.json")}


def evaluations(storage: Path) -> int:
    return len(list((storage / "prefixes").glob("*.eval.json")))


EVAL_GRID = {
    "stages": {
        "a": {"kind": "sft", "data": {"task": "facts", "size": 8}, **STEPS},
        "b": {"kind": "sft", "data": {"task": "inst", "size": 8}, **STEPS},
    },
    "orderings": {"explicit": ["a>b"]},
    "evaluation": {
        "sets": {
            "facts": {
                "data": {"task": "facts", "split": "train", "size": 8},
                "metrics": ["accuracy", "avg_loglik", "mia_loss", "mia_min_k"],
                "max_examples": 4,
                "max_new_tokens": 4,
                "temperature": 1.0,
                "samples": 2,
                "holdout": "unseen",
            },
            "unseen": {
                "data": {"task": "facts", "split": "holdout", "size": 8},
                "metrics": ["avg_loglik"],
                "max_examples": 4,
            },
            "inst": {
                "data": {"task": "inst", "split": "eval", "size": 8},
                "metrics": ["avg_loglik", "probability"],
                "max_examples": 2,
            },
        },
        "model_utility": ["inst/probability", "facts/accuracy"],
    },
    "grid": {"evaluation.sets.facts.max_new_tokens": [2, 24]},
    "rollout": {"workers": 1, "max_model_len": 256},
}


@pytest.fixture(scope="module")
def eval_grid_runs(tmp_path_factory, ray_cluster):
    """The evaluation-grid study run twice, in two study directories: its checkpoints scored
    by the trials' learners, then by evaluator actors (`evaluation.placement: evaluators`)."""
    tmp = tmp_path_factory.mktemp("evalgrid")
    out = []
    for name, placement in (("first", "learner"), ("second", "evaluators")):
        evaluation = {**EVAL_GRID["evaluation"], "placement": placement}
        assert (
            main(["run", str(write_study(tmp, name, **{**EVAL_GRID, "evaluation": evaluation}))])
            == 0
        )
        out.append(tmp / name)
    return out


def test_a_grid_over_an_evaluation_setting_evaluates_every_point(eval_grid_runs):
    storage = eval_grid_runs[0]
    assert len(PrefixCache(storage / "prefixes").trained()) == 2  # a and a>b, once for both points
    # facts: per grid point at the base, a and a>b; inst and unseen: once per checkpoint
    assert evaluations(storage) == 2 * 3 + 3 + 3
    found = list(records(storage).values())
    assert len(found) == 2
    by_point = {r["trial"]["hparams"]["evaluation.sets.facts.max_new_tokens"]: r for r in found}
    for short, long in zip(by_point[2]["history"], by_point[24]["history"]):
        assert short["key"] == long["key"]  # the same checkpoint
        assert short["evals"]["facts"] != long["evals"]["facts"]  # each point's own evaluation
        assert short["evals"]["inst"] == long["evals"]["inst"]
    for record in found:  # each point sampled with its own max_new_tokens
        assert record["timing"]["time/eval_generation_s"] > 0
        # membership of facts' rows against the holdout's, both scored in one learner call
        assert 0 <= record["metrics"]["facts/mia_loss"] <= 1
        assert 0 <= record["metrics"]["facts/mia_min_k"] <= 1
        metrics = record["metrics"]
        utility = [metrics["inst/probability"], metrics["facts/accuracy"]]
        expected = 0.0 if min(utility) == 0 else 2 / sum(1 / v for v in utility)
        assert metrics["model_utility"] == pytest.approx(expected)


def test_the_same_study_twice_gives_bit_identical_metrics(eval_grid_runs):
    """Run again, with evaluator actors scoring the committed checkpoints beside the training
    instead of the learners: every metric the same to the bit, logged in the path's order."""
    first, second = (records(storage) for storage in eval_grid_runs)
    assert first.keys() == second.keys()
    for trial_id, record in second.items():
        theirs = first[trial_id]
        assert record["metrics"] == theirs["metrics"]  # every float, every bit
        assert record["fingerprint"] == theirs["fingerprint"]  # the same keys: one cache
        assert [h["stage"] for h in record["history"]] == ["base", "a", "b"]
        assert [h["metrics"] for h in record["history"]] == [
            h["metrics"] for h in theirs["history"]
        ]
        timing = record["timing"]  # the evaluations ran on the thread beside the trial's
        assert timing["time/bg_eval_loglik_s"] > 0 and "time/eval_loglik_s" not in timing
        assert "time/bg_evaluator_start_s" in timing and "time/wait_evaluations_s" in timing


def test_a_swept_rollout_setting_with_a_shared_pool_is_refused(tmp_path, capsys):
    path = write_study(
        tmp_path, "sharedgrid", **{**EVAL_GRID, "grid": {"rollout.max_model_len": [256, 320]}}
    )
    assert main(["validate", str(path)]) == 2
    assert (
        "grid.rollout.max_model_len: the shared engine pool is started once"
        in capsys.readouterr().err
    )


def test_a_grid_over_a_rollout_setting_trains_the_rl_stage_per_point(tmp_path, ray_cluster):
    study = {
        "stages": {
            "sft": {"kind": "sft", "data": {"task": "math", "size": 8}, **STEPS},
            "rl": {
                "kind": "grpo",
                "data": {"task": "math", "size": 8},
                "steps": 1,
                "batch_size": 2,
                "params": {"group_size": 2, "max_new_tokens": 8},
                "rewards": [{"name": "math_correct"}],
            },
        },
        "orderings": {"explicit": ["sft>rl"]},
        "evaluation": {"sets": {}},
        # the trial's own engines (transformers generate: an explicit, cheap backend) get its value
        "rollout": {"placement": "per_trial", "backend": "hf", "workers": 1, "max_model_len": 256},
        "grid": {"rollout.max_model_len": [256, 320]},
    }
    storage = tmp_path / "rlgrid"
    assert main(["run", str(write_study(tmp_path, "rlgrid", **study))]) == 0
    trained = [m["stage"] for m in PrefixCache(storage / "prefixes").trained()]
    assert sorted(trained) == ["rl", "rl", "sft"]


def test_an_edited_data_file_retrains_from_the_stage_that_reads_it(tmp_path, ray_cluster, capsys):
    data = tmp_path / "qa.jsonl"
    rows = [{"prompt": f"Q: what is {i}?\nA:", "answer": f" {i}"} for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    study = {
        "stages": {
            "a": {"kind": "sft", "data": {"task": "inst", "size": 8}, **STEPS},
            "b": {"kind": "sft", "data": {"file": str(data)}, **STEPS},
            "c": {"kind": "sft", "data": {"task": "facts", "size": 8}, **STEPS},
        },
        "orderings": {"explicit": ["a>b>c", "a>c"]},
        "evaluation": {"sets": {"inst": EVAL_GRID["evaluation"]["sets"]["inst"]}},
    }
    path, storage = write_study(tmp_path, "edited", **study), tmp_path / "edited"
    assert main(["run", str(path)]) == 0
    before = records(storage)
    assert len(PrefixCache(storage / "prefixes").trained()) == 4  # a, a>b, a>b>c, a>c
    capsys.readouterr()
    assert main(["status", str(storage)]) == 0
    assert "2 of 2 trials done" in capsys.readouterr().out

    data.write_text(data.read_text().replace('" 3"', '" three"'))  # the same file, one row edited
    assert main(["status", str(storage)]) == 0
    status = capsys.readouterr().out
    assert (
        "1 of 2 trials done" in status and "changed, runs again (1/3 stages still valid)" in status
    )
    assert "left to run: 2 stage trainings, 2 evaluation-set results" in status
    assert main(["report", str(storage)]) == 0  # the finished trials as they were run
    report = capsys.readouterr().out
    table = report.split("# Study report")[0]  # the trials table, then the written report
    assert table.count("a>b>c") == 1 and table.count("a>c") == 1
    assert "note: 1 of these trials were made by another version" in report
    assert main(["run", str(path)]) == 0
    trained = Counter(m["stage"] for m in PrefixCache(storage / "prefixes").trained())
    assert trained == {"a": 1, "b": 2, "c": 3}  # b and the c after it trained again
    after = records(storage)
    unchanged = next(t for t, r in before.items() if r["trial"]["path"] == ["a", "c"])
    assert after[unchanged] == before[unchanged]  # not run again
    changed = next(t for t in before if t != unchanged)
    assert after[changed]["fingerprint"] != before[changed]["fingerprint"]
    assert after[changed]["history"][1]["key"] == before[changed]["history"][1]["key"]  # a reused
    capsys.readouterr()
    assert main(["status", str(storage)]) == 0
    assert "2 of 2 trials done" in capsys.readouterr().out
