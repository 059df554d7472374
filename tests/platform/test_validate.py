"""Bad input: one sentence naming the file, the key and what was expected; exit code 2; nothing written."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from stageflow.platform.cli import main

VALID = {
    "name": "bad-input",
    "stages": {
        "inst": {"kind": "sft", "data": {"task": "inst", "size": 8}, "steps": 2},
        "facts": {"kind": "sft", "data": {"task": "facts", "size": 4}, "steps": 2},
        "check": {"kind": "eval"},
    },
    "orderings": {"permutations": ["inst", "facts"]},
    "seeds": [0],
    "evaluation": {
        "sets": {"facts": {"data": {"task": "facts", "split": "eval"}, "metrics": ["avg_loglik"]}}
    },
}


def write_study(tmp_path: Path, change=None, text: str | None = None) -> Path:
    study = copy.deepcopy(VALID)
    study["storage_dir"] = str(tmp_path / "storage")
    if change:
        change(study)
    path = tmp_path / "study.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(study))
    return path


def validate(path: Path, *overrides: str, capsys) -> tuple[int, str]:
    code = main(["validate", str(path), *overrides])
    return code, capsys.readouterr().err.strip()


def test_valid_study_passes(tmp_path, capsys):
    code = main(["validate", str(write_study(tmp_path))])
    assert code == 0, capsys.readouterr().err
    assert "2 orderings, 2 trials" in capsys.readouterr().out


def set_key(path: str, value):
    def change(study):
        node, keys = study, path.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value

    return change


def drop_key(path: str):
    def change(study):
        node, keys = study, path.split(".")
        for key in keys[:-1]:
            node = node[key]
        del node[keys[-1]]

    return change


CASES = [
    ("unknown top-level key", set_key("seedz", [1]), "seedz: unknown key; did you mean 'seeds'?"),
    (
        "unknown stage key",
        set_key("stages.inst.lrr", 0.1),
        "stages.inst.lrr: unknown key; did you mean 'lr'?",
    ),
    ("wrong type", set_key("stages.inst.lr", "fast"), "stages.inst.lr: wrong type"),
    ("missing name", drop_key("name"), "name: a value is required here"),
    (
        "unknown stage kind",
        set_key("stages.inst.kind", "sftt"),
        "stages.inst.kind: unknown stage kind 'sftt'; did you mean 'sft'?",
    ),
    (
        "unknown objective",
        set_key("stages.inst.objective", "nop"),
        "stages.inst.objective: unknown objective 'nop'",
    ),
    (
        "objective of another kind",
        set_key("stages.inst.objective", "npo"),
        "objective 'npo' does not run in a sft stage",
    ),
    (
        "unknown objective parameter",
        lambda s: s["stages"].update(
            forget={
                "kind": "unlearn",
                "objective": "npo",
                "data": {"task": "facts", "split": "forget"},
                "params": {"betta": 0.1},
            }
        ),
        "stages.forget.params.betta: unknown parameter; did you mean 'beta'?",
    ),
    (
        "unlearn stage without method",
        lambda s: s["stages"].update(forget={"kind": "unlearn", "data": {"task": "facts"}}),
        "stages.forget.objective: a unlearn stage needs an objective",
    ),
    (
        "unknown task",
        set_key("stages.inst.data.task", "mathh"),
        "stages.inst.data.task: unknown task 'mathh'; did you mean 'math'?",
    ),
    (
        "unknown split",
        set_key("stages.inst.data.split", "forget"),
        "stages.inst.data.split: task 'inst' has no split 'forget'",
    ),
    (
        "bad task parameter value",
        set_key("stages.inst.data.params", {"rules": ["shout"]}),
        "stages.inst.data.params: unknown inst rule 'shout'",
    ),
    (
        "unknown metric",
        set_key("evaluation.sets.facts.metrics", ["avg_logliq"]),
        "evaluation.sets.facts.metrics[0]: unknown metric 'avg_logliq'; did you mean 'avg_loglik'?",
    ),
    (
        "ordering names unknown stage",
        set_key("orderings.permutations", ["inst", "fact"]),
        "orderings.permutations[1]: unknown stage 'fact'; did you mean 'facts'?",
    ),
    (
        "two ordering forms",
        set_key("orderings.explicit", ["inst>facts"]),
        "orderings: expected exactly one of permutations, insert or explicit",
    ),
    (
        "insertion position out of range",
        set_key("orderings", {"insert": {"stage": "facts", "into": ["inst"], "positions": [1, 3]}}),
        "orderings.insert.positions[1]: position 3 is out of range; expected 1 to 2",
    ),
    (
        "explicit path with unknown stage",
        set_key("orderings", {"explicit": ["inst>math"]}),
        "orderings.explicit[0]: unknown stage 'math'",
    ),
    (
        "unlearning names a non-unlearn stage",
        set_key("unlearning", ["facts"]),
        "unlearning[0]: stage 'facts' is of kind 'sft', expected an unlearn stage",
    ),
    (
        "steps and epochs",
        set_key("stages.inst.epochs", 1),
        "stages.inst.steps: give either steps or epochs, not both",
    ),
    (
        "negative learning rate",
        set_key("stages.inst.lr", -1.0),
        "stages.inst.lr: expected a positive number",
    ),
    (
        "unknown schedule",
        set_key("stages.inst.schedule", "cosin"),
        "stages.inst.schedule: unknown schedule 'cosin'",
    ),
    (
        "zero stage out of range",
        set_key("learner.zero_stage", 4),
        "learner.zero_stage: ZeRO stage 4 is out of range; expected 0, 1, 2 or 3",
    ),
    (
        "unknown rollout backend",
        set_key("rollout.backend", "vlm"),
        "rollout.backend: unknown value 'vlm'; expected one of vllm, hf",
    ),
    (
        "grid over an unknown key",
        set_key("grid", {"stages.inst.lrr": [0.1]}),
        "grid.stages.inst.lrr",
    ),
    (
        "grid over orderings",
        set_key("grid", {"orderings.permutations": [["inst"]]}),
        "grid.orderings.permutations: 'orderings.permutations' cannot be swept",
    ),
    ("duplicate seeds", set_key("seeds", [1, 1]), "seeds: expected distinct seeds"),
    (
        "missing model directory",
        set_key("model.path", "/nonexistent/model"),
        "model.path: /nonexistent/model: expected an existing local model directory",
    ),
    (
        "unreachable tracking server",
        set_key("tracking.uri", "http://127.0.0.1:9"),
        "tracking.uri: MLflow server http://127.0.0.1:9 is unreachable",
    ),
    (
        "unsupported tracking uri",
        set_key("tracking.uri", "ftp://x"),
        "tracking.uri: unsupported tracking URI 'ftp://x'",
    ),
    (
        "tiny model vLLM cannot serve",
        set_key("model.tiny", {"hidden_size": 64, "num_heads": 4}),
        "model.tiny: expected a head size hidden_size/num_heads in 32, 64",
    ),
    (
        "eval stage with unknown set",
        set_key("stages.check.sets", ["math"]),
        "stages.check.sets[0]: unknown evaluation set 'math'",
    ),
]


@pytest.mark.parametrize("change,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_study(tmp_path, capsys, change, expected):
    path = write_study(tmp_path, change)
    code, err = validate(path, capsys=capsys)
    assert code == 2
    assert err.startswith(f"stageflow: error: {path}: "), err
    assert expected in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "storage").exists()


def test_missing_file(tmp_path, capsys):
    code, err = validate(tmp_path / "nope.yaml", capsys=capsys)
    assert code == 2 and "nope.yaml: no such study file" in err


def test_malformed_yaml(tmp_path, capsys):
    code, err = validate(write_study(tmp_path, text="name: x\nstages: [unclosed\n"), capsys=capsys)
    assert code == 2 and "line 3" in err and "expected valid YAML" in err


def test_duplicate_stage_names(tmp_path, capsys):
    text = "name: x\nstages:\n  inst: {kind: sft}\n  inst: {kind: eval}\n"
    code, err = validate(write_study(tmp_path, text=text), capsys=capsys)
    assert code == 2 and "duplicate key 'inst' (first given on line 3)" in err


@pytest.mark.parametrize(
    "content,expected",
    [
        ("", "at least one example (the file is empty)"),
        (
            '{"prompt": "a", "answer": "b"}\n{"prompt": "c", "answer": \n',
            "valid JSON on every line (line 2",
        ),
        (
            '{"prompt": "a", "answer": "b"}\n{"prompt": "c"}\n',
            "a string field 'answer' on every line (line 2 has none)",
        ),
    ],
    ids=["empty", "malformed", "missing field"],
)
def test_bad_jsonl(tmp_path, capsys, content, expected):
    data = tmp_path / "mine.jsonl"
    data.write_text(content)
    path = write_study(tmp_path, set_key("stages.inst.data", {"file": str(data)}))
    code, err = validate(path, capsys=capsys)
    assert code == 2 and f"stages.inst.data.file: {data}: expected {expected}" in err


def test_user_jsonl_is_accepted(tmp_path, capsys):
    data = tmp_path / "mine.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(3))
    )
    assert (
        main(
            [
                "validate",
                str(write_study(tmp_path, set_key("stages.inst.data", {"file": str(data)}))),
            ]
        )
        == 0
    )


def test_unwritable_storage(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    path = write_study(tmp_path, set_key("storage_dir", str(blocker / "sub")))
    code, err = validate(path, capsys=capsys)
    assert code == 2 and "storage_dir:" in err and "expected a writable directory" in err


def test_bad_override(tmp_path, capsys):
    path = write_study(tmp_path)
    code, err = validate(path, "stages.inst.lr=fast", capsys=capsys)
    assert code == 2 and "override 'stages.inst.lr=fast': stages.inst.lr: wrong type" in err
    code, err = validate(path, "seeds", capsys=capsys)
    assert code == 2 and "expected an override of the form key=value" in err


def test_overrides_apply(tmp_path, capsys):
    path = write_study(tmp_path)
    assert main(["validate", str(path), "seeds=[0,1,2]", "stages.inst.lr=1e-4"]) == 0
    assert "6 trials" in capsys.readouterr().out
