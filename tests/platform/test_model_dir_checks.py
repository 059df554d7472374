"""A model directory of one's own, checked completely by `stageflow validate` before anything
runs: each broken copy of a good tiny model (qwen2: BPE tokenizer, chat template) is refused
with one sentence naming the file and what was expected, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from stageflow.core.arch_models import build_arch_model
from stageflow.platform.commands.cli import main


@pytest.fixture(scope="module")
def good_model(tmp_path_factory) -> Path:
    return build_arch_model("qwen2", tmp_path_factory.mktemp("models") / "qwen2")


def study(tmp_path: Path, model: Path) -> Path:
    spec = {
        "name": "own-model",
        "storage_dir": str(tmp_path / "storage"),
        "model": {"path": str(model)},
        "stages": {"facts": {"kind": "sft", "data": {"task": "facts", "size": 8}, "steps": 1}},
        "orderings": {"explicit": ["facts"]},
        "evaluation": {
            "sets": {"facts": {"data": {"task": "facts", "size": 8}, "metrics": ["avg_loglik"]}}
        },
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def rewrite_weights(model: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(model / "model.safetensors")
    change(tensors)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})


def drop_tensor(tensors):
    tensors.pop(sorted(k for k in tensors if "mlp.down_proj" in k)[0])


def reshape_tensor(tensors):
    name = sorted(k for k in tensors if "q_proj.weight" in k)[0]
    tensors[name] = tensors[name][:-2].clone()


def add_tensor(tensors):
    import torch

    tensors["model.extra.weight"] = torch.zeros(2, 2)


CASES = [
    ("remote code", lambda m: edit_json(m / "config.json", auto_map={"AutoModel": "x.Model"}),
     "expected a model whose code is in transformers (config.json's auto_map asks for remote code"),
    ("unknown model type", lambda m: edit_json(m / "config.json", model_type="nosuchmodel"),
     "expected a config.json transformers loads (model_type 'nosuchmodel'"),
    ("a missing tensor", lambda m: rewrite_weights(m, drop_tensor),
     "expected weights with every tensor config.json describes (model.layers.0.mlp.down_proj.weight"),
    ("a wrong shape", lambda m: rewrite_weights(m, reshape_tensor),
     "expected weights of the shapes config.json describes (model.layers.0.self_attn.q_proj.weight is"),
    ("an extra tensor", lambda m: rewrite_weights(m, add_tensor),
     "expected weights of the architecture config.json describes (unexpected tensor model.extra.weight)"),
    ("a corrupt tokenizer", lambda m: (m / "tokenizer.json").write_text("{not json"),
     "expected a tokenizer transformers loads from the directory's tokenizer files"),
    ("more tokens than the embedding", lambda m: edit_json(m / "config.json", vocab_size=8)
     or rewrite_weights(m, lambda t: t.update({k: v[:8].clone() for k, v in t.items()
                                              if "embed_tokens" in k or "lm_head" in k})),
     "expected a tokenizer whose tokens fit the embedding"),
    ("a chat template that fails", lambda m: (m / "chat_template.jinja").write_text(
        "{{ messages[0]['content'] | nosuchfilter }}"),
     "/chat_template.jinja: expected a chat template that renders this data's rows"),
]  # fmt: skip


@pytest.mark.parametrize("damage,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_broken_model_directory(tmp_path, capsys, good_model, damage, expected):
    model = tmp_path / "model"
    shutil.copytree(good_model, model)
    damage(model)
    path = study(tmp_path, model)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"stageflow: error: {path}: ") and len(err.splitlines()) == 1, err
    assert expected in err, err
    assert not (tmp_path / "storage").exists()


def test_good_model_directory_passes(tmp_path, capsys, good_model):
    assert main(["validate", str(study(tmp_path, good_model))]) == 0, capsys.readouterr().err


def test_untied_gemma2_refused_for_vllm(tmp_path, capsys):
    """transformers loads a Gemma2 with its own LM head; vLLM's Gemma2 has none and would fail at
    engine start: validate says so (for a study that samples from the engines)."""
    model = build_arch_model("gemma2", tmp_path / "gemma2")
    edit_json(model / "config.json", tie_word_embeddings=False)
    rewrite_weights(
        model, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()})
    )
    path = study(tmp_path, model)
    spec = yaml.safe_load(path.read_text())
    spec["evaluation"]["sets"]["facts"]["metrics"].append("accuracy")  # generation: an engine
    path.write_text(yaml.safe_dump(spec))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        "expected tie_word_embeddings: true for Gemma2ForCausalLM" in err
        and len(err.splitlines()) == 1
    ), err
    assert main(["validate", str(path), "rollout.backend=hf"]) == 0, capsys.readouterr().err
