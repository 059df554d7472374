"""A checkpoint's size, known before anything trains: the tiny model's shapes as built, the
weights' bytes as written, a LoRA adapter's parameters as peft makes them."""

from __future__ import annotations

import dataclasses
import json

from stageflow.core.config import LearnerSpec, LoraSpec, ModelSpec, StudySpec
from stageflow.core.footprint import (
    adapter_parameters,
    checkpoint_bytes,
    model_shapes,
    size_text,
    tiny_shapes,
)
from stageflow.core.models import TinyModelSpec, safetensors_table
from stageflow.core.study_dir import tree_bytes

TINY = TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=192, seed=0)


def test_tiny_shapes_are_the_built_models(tiny_model_dir):
    table, _ = safetensors_table(tiny_model_dir / "model.safetensors")
    assert tiny_shapes(TINY) == {name: tuple(t["shape"]) for name, t in table.items()}
    assert model_shapes(ModelSpec(path=str(tiny_model_dir))) == tiny_shapes(TINY)


def test_checkpoint_bytes_match_the_model_directory(tiny_model_dir):
    """The tiny model's directory is what a float32 learner's checkpoint holds."""
    spec = StudySpec(name="x", model=ModelSpec(tiny=TINY))
    written = tree_bytes(tiny_model_dir) - (tiny_model_dir / "stageflow_model.json").stat().st_size
    assert abs(checkpoint_bytes(spec) - written) / written < 0.01
    bf16 = dataclasses.replace(spec, learner=LearnerSpec(dtype="bfloat16"))
    weights = checkpoint_bytes(spec) - checkpoint_bytes(bf16)
    assert abs(weights - 0.5 * written) / written < 0.02  # half the bytes a weight


def test_adapter_parameters_are_peft_s(tiny_model_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=linear))
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    shapes = tiny_shapes(TINY)
    assert adapter_parameters(shapes, LoraSpec(r=4)) == trainable
    only_q = adapter_parameters(shapes, LoraSpec(r=4, target_modules=["q_proj"]))
    assert only_q == TINY.num_layers * 4 * 2 * TINY.hidden_size


def test_size_text():
    assert [size_text(n) for n in (512, 3_527_996, 4.1e9)] == ["512 B", "3.53 MB", "4.1 GB"]
    assert json.dumps(size_text(1e3)) == '"1 kB"'
