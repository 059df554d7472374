"""What one checkpoint of a study weighs on disk, known before anything trains.

A checkpoint (core/prefix_cache.py) is the learner's full weights in the learner's dtype, one
safetensors file beside the model's config and tokenizer files, plus the stage's LoRA adapter
under `learner.lora`. The weights' shapes come from the model's safetensors headers (no tensor
is read) or, for the tiny default model, from its size; nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stageflow.core.models import CHARACTERS, SPECIAL_TOKENS, TinyModelSpec, safetensors_table

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
SIDE_FILES_BYTES = 8 * 1024  # config, generation config, tokenizer of a model not yet built


def tiny_shapes(tiny: TinyModelSpec) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of the tiny Llama model core/models.py builds from `tiny`."""
    vocab, h, inner = (
        len(SPECIAL_TOKENS) + len(CHARACTERS),
        tiny.hidden_size,
        tiny.intermediate_size,
    )
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for layer in range(tiny.num_layers):
        at = f"model.layers.{layer}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{at}.self_attn.{proj}.weight"] = (h, h)
        shapes[f"{at}.mlp.gate_proj.weight"] = (inner, h)
        shapes[f"{at}.mlp.up_proj.weight"] = (inner, h)
        shapes[f"{at}.mlp.down_proj.weight"] = (h, inner)
        shapes[f"{at}.input_layernorm.weight"] = (h,)
        shapes[f"{at}.post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (vocab, h)
    return shapes


def model_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a study's base model (`model`: its ModelSpec)."""
    if model.path is None:
        return tiny_shapes(model.tiny)
    shapes = {}
    for weights in sorted(Path(model.path).glob("*.safetensors")):
        table, _ = safetensors_table(weights)
        shapes.update({name: tuple(t["shape"]) for name, t in table.items()})
    return shapes


def numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def adapter_parameters(shapes: dict[str, tuple[int, ...]], lora: Any) -> int:
    """The parameters of a LoRA adapter on the model's linear layers (r x in + out x r each):
    `lora.target_modules`, or every linear layer but the LM head and the embeddings."""
    total = 0
    for name, shape in shapes.items():
        module = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
        if len(shape) != 2 or "embed" in module or module == "lm_head":
            continue
        if lora.target_modules is None or module in lora.target_modules:
            total += lora.r * (shape[0] + shape[1])
    return total


def side_files_bytes(model: Any) -> int:
    """The config and tokenizer files a checkpoint copies from the model directory."""
    if model.path is None:
        return SIDE_FILES_BYTES
    files = [p for p in Path(model.path).iterdir() if p.is_file() and p.suffix != ".safetensors"]
    return sum(p.stat().st_size for p in files)


def checkpoint_bytes(spec: Any) -> int:
    """About the bytes of one checkpoint of the study `spec` (its weights exactly, the files
    beside them approximately)."""
    shapes = model_shapes(spec.model)
    per_value = DTYPE_BYTES[spec.learner.dtype]
    weights = sum(map(numel, shapes.values())) * per_value
    header = 100 * len(shapes)  # the safetensors table: about a hundred bytes a tensor
    lora = spec.learner.lora
    adapter = adapter_parameters(shapes, lora) * per_value if lora is not None else 0
    return weights + header + adapter + side_files_bytes(spec.model)


def size_text(size: float) -> str:
    """'3.4 MB', '812 kB', '4.1 GB' (powers of 1000, as `storage.max_gb`)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{int(size)} B"
