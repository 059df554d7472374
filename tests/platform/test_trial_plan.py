"""A trial's plan: which checkpoint and evaluation keys a study edit changes, and which not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from stageflow.core.expand import expand
from stageflow.core.keys import code_version, model_identity
from stageflow.core.study_dir import StudyDir
from stageflow.core.study_file import load_study
from stageflow.platform.engine.trial_plan import Planner, in_memory_rows, materialized_rows

QUICKSTART = Path(__file__).resolve().parents[2] / "studies" / "quickstart.yaml"


def plans(overrides: list[str], model: str = "m", rows=in_memory_rows, path=QUICKSTART) -> dict:
    spec = load_study(path, overrides)
    planner = Planner(spec, rows, model, code_version(), False)
    return {
        (t.ordering, t.seed, tuple(sorted(t.hparams.items()))): planner.plan(t)
        for t in expand(spec)
    }


def keys(plan) -> dict[str, str]:
    return {s.name: s.key for s in plan.steps}


def test_shared_prefixes_share_keys_and_seeds():
    found = plans(["seeds=[0,1]"])
    a, b = (
        found[("pretrain>refusal>facts>inst", 0, ())],
        found[("pretrain>facts>refusal>inst", 0, ())],
    )
    c, d = (
        found[("pretrain>refusal>facts>inst", 1, ())],
        found[("pretrain>facts>inst>refusal", 0, ())],
    )
    assert keys(a)["pretrain"] == keys(b)["pretrain"] != keys(c)["pretrain"]
    assert a.steps[0].seed == b.steps[0].seed != c.steps[0].seed
    assert keys(b)["facts"] == keys(d)["facts"] != keys(a)["facts"]
    assert keys(a)["refusal"] != keys(b)["refusal"] and keys(a)["ga"] != keys(b)["ga"]
    assert a.steps[0].evals == b.steps[0].evals  # the same checkpoint, the same evaluations


def test_a_grid_over_an_evaluation_setting_shares_training_not_evaluation():
    found = plans(
        [
            "seeds=[0]",
            "orderings.insert.positions=[2]",
            "grid={evaluation.sets.facts.max_new_tokens: [2, 40]}",
        ]
    )
    short, long = found.values()
    assert keys(short) == keys(long)
    for s, t in zip(short.steps, long.steps):
        assert s.evals["facts"] != t.evals["facts"] and s.evals["refusal"] == t.evals["refusal"]
    assert short.fingerprint != long.fingerprint


GRPO_STUDY = {
    "name": "rlkeys",
    "model": {
        "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128}
    },
    "stages": {
        "sft": {"kind": "sft", "data": {"task": "math", "size": 8}, "steps": 1},
        "rl": {
            "kind": "grpo",
            "data": {"task": "math", "size": 8},
            "steps": 1,
            "rewards": [{"name": "math_correct"}],
        },
    },
    "orderings": {"explicit": ["sft>rl"]},
    "rollout": {"placement": "per_trial", "backend": "hf"},
    "grid": {"rollout.max_model_len": [256, 320]},
}


def test_a_grid_over_a_rollout_setting_changes_only_stages_that_sample(tmp_path):
    path = tmp_path / "rl.yaml"
    path.write_text(json.dumps(GRPO_STUDY))
    first, second = plans([], path=path).values()
    assert keys(first)["sft"] == keys(second)["sft"] and keys(first)["rl"] != keys(second)["rl"]


def test_a_data_file_edit_changes_keys_from_the_first_stage_reading_it(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(8))
    )
    study = {
        "name": "filekeys",
        "stages": {
            "a": {"kind": "sft", "data": {"task": "inst", "size": 8}, "steps": 1},
            "b": {"kind": "sft", "data": {"file": str(data)}, "steps": 1},
            "c": {"kind": "sft", "data": {"task": "facts", "size": 8}, "steps": 1},
        },
        "orderings": {"explicit": ["a>b>c"]},
    }
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(study))
    (before,) = plans([], path=path).values()
    data.write_text(data.read_text().replace('"a3"', '"another answer"'))  # same path, new rows
    (after,) = plans([], path=path).values()
    assert keys(before)["a"] == keys(after)["a"]
    assert keys(before)["b"] != keys(after)["b"] and keys(before)["c"] != keys(after)["c"]


def test_a_chat_template_edit_changes_every_key(tmp_path, tiny_model_dir):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    before = plans(["seeds=[0]"], model=model_identity(copy))
    config = copy / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": "{{ x }}"}))
    after = plans(["seeds=[0]"], model=model_identity(copy))
    for trial, plan in before.items():
        assert not set(keys(plan).values()) & set(keys(after[trial]).values())


def test_rows_read_in_memory_plan_as_materialized_rows_do(tmp_path):
    """`stageflow status` plans without writing; its keys are the run's."""
    study = StudyDir(tmp_path)
    written = plans(["seeds=[0,1]"], rows=materialized_rows(study.data))
    assert {k: p.fingerprint for k, p in written.items()} == {
        k: p.fingerprint for k, p in plans(["seeds=[0,1]"]).items()
    }


def test_four_stages_in_every_order_plan_64_trainings_not_96(tmp_path):
    """The prefix tree of 4 stages: 4 + 12 + 24 + 24 distinct checkpoints among the 24 paths'
    96 stages (test_study.py checks on 3 stages that a run trains exactly its distinct keys)."""
    study = {
        "name": "perm4",
        "stages": {
            s: {"kind": "sft", "data": {"task": "inst", "size": 8, "seed": i}, "steps": 1}
            for i, s in enumerate("abcd")
        },
        "orderings": {"permutations": list("abcd")},
    }
    path = tmp_path / "perm4.yaml"
    path.write_text(json.dumps(study))
    found = plans([], path=path)
    assert len(found) == 24
    steps = [step for plan in found.values() for step in plan.steps]
    assert len(steps) == 96 and len({s.key for s in steps}) == 64
    by_key = {}
    for s in steps:  # one key, one parent, one seed: the same training wherever it is reached
        assert by_key.setdefault(s.key, (s.parent, s.seed)) == (s.parent, s.seed)
