"""`learner.lora` through the platform (its settings in the prefix key: test_keys.py): bad settings refused
before any work (exit 2, one sentence), and a LoRA study run end to end by the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from stageflow.core.prefix_cache import PrefixCache
from stageflow.platform.commands.cli import main

TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128}


def lora_study(tmp_path: Path, lora: dict | None = None, **learner) -> Path:
    """Two one-step SFT stages in one order on the tiny model, evaluated by likelihood only."""
    study = {
        "name": "lora",
        "storage_dir": str(tmp_path / "lora"),
        "model": {"tiny": TINY},
        "stages": {
            name: {
                "kind": "sft",
                "data": {"task": task, "size": 8},
                "steps": 2,
                "batch_size": 4,
                "lr": 1e-2,
            }
            for name, task in (("a", "inst"), ("b", "facts"))
        },
        "orderings": {"explicit": ["a>b"]},
        "evaluation": {
            "sets": {
                "facts": {
                    "data": {"task": "facts", "split": "eval", "size": 4},
                    "metrics": ["avg_loglik"],
                    "max_examples": 2,
                }
            }
        },
        "learner": {"lora": lora if lora is not None else {"r": 4, "alpha": 8}, **learner},
    }
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


BAD = [
    ("zero rank", {"r": 0}, {}, "learner.lora.r: expected a positive number, got 0"),
    ("negative alpha", {"alpha": -1.0}, {}, "learner.lora.alpha: expected a positive number"),
    (
        "dropout of one",
        {"dropout": 1.0},
        {},
        "learner.lora.dropout: expected a probability in [0, 1), got 1.0",
    ),
    ("no target", {"target_modules": []}, {}, "learner.lora.target_modules: expected module"),
    (
        "the LM head as a target",
        {"target_modules": ["q_proj", "lm_head"]},
        {},
        "learner.lora.target_modules: the LM head runs the fused log-prob kernel",
    ),
    (
        "a target the model lacks",
        {"target_modules": ["c_attn"]},
        {},
        "learner.lora.target_modules: 'c_attn' names no linear layer of the model; expected some of down_proj, gate_proj",
    ),
    (
        "an optimizer kept across stages",
        {},
        {"reset_optimizer_per_stage": False},
        "learner.reset_optimizer_per_stage: learner.lora trains a new adapter",
    ),
    ("a rank that is no integer", {"r": "four"}, {}, "learner.lora.r"),
]


@pytest.mark.parametrize("lora,learner,expected", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_lora_settings_exit_2_in_one_sentence(tmp_path, capsys, lora, learner, expected):
    path = lora_study(tmp_path, {"r": 4, **lora}, **learner)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"stageflow: error: {path}: "), err
    assert expected in err and len(err.splitlines()) == 1
    assert not (tmp_path / "lora").exists()


def test_good_lora_settings_validate(tmp_path, capsys):
    for lora in ({}, {"target_modules": ["q_proj", "self_attn.v_proj"], "dropout": 0.05}):
        assert main(["validate", str(lora_study(tmp_path, lora))]) == 0, capsys.readouterr().err
    overrides = ["learner.zero_stage=3", "learner.lora.r=16"]  # ZeRO-3 partitions LoRA too
    assert main(["validate", str(lora_study(tmp_path)), *overrides]) == 0


def test_a_lora_study_runs_end_to_end(tmp_path, ray_cluster, capsys):
    storage = tmp_path / "lora"
    assert main(["run", str(lora_study(tmp_path))]) == 0, capsys.readouterr().err
    cache = PrefixCache(storage / "prefixes")
    trained = cache.trained()
    assert len(trained) == 2
    for meta in trained:
        model = cache.model_dir(meta["key"])
        weights = load_file(model / "model.safetensors")
        assert not any(".lora_" in k or ".base_layer." in k for k in weights)  # merged
        config = json.loads((model / "adapter" / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"]) == (4, 8.0)
        adapter = load_file(model / "adapter" / "adapter_model.safetensors")
        assert len(adapter) == 2 * 14  # A and B of the 7 projections of 2 layers
