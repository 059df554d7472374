"""What a rollout engine can serve, read from a model's config.json alone: checked by
`stageflow validate` before any work, and again where an engine starts (a guard)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# vLLM-CPU attention kernels support only these head sizes (vllm/v1/attention/backends/cpu_attn.py).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
# Architectures every pinned vLLM serves: checking them needs no import of vLLM's registry.
COMMON_ARCHITECTURES = {
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Phi3ForCausalLM",
}


def head_size(config: dict[str, Any]) -> int | None:
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    return config.get("head_dim") or (hidden // heads if hidden and heads else None)


def serving_problem(
    model_dir: str | Path, backend: str, device: str, max_model_len: int
) -> tuple[str, str] | None:
    """(key, what was expected) when the engine could not serve `model_dir`, else None."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    where = f"model directory '{model_dir}'"
    if backend == "vllm":
        architectures = config.get("architectures") or []
        if any(a not in COMMON_ARCHITECTURES for a in architectures):
            # lazy: vLLM's registry costs seconds, only for uncommon architectures
            from vllm import ModelRegistry

            supported = set(ModelRegistry.get_supported_archs())
            if not any(a in supported for a in architectures):
                return where, (
                    f"an architecture vLLM serves, not {', '.join(architectures)} "
                    "(or rollout.backend: hf)"
                )
        if "Gemma2ForCausalLM" in architectures and config.get("tie_word_embeddings") is False:
            return where, (
                "tie_word_embeddings: true for Gemma2ForCausalLM (vLLM's Gemma2 has no LM head "
                "of its own and reads the embedding; use rollout.backend: hf for an untied one)"
            )
        size = head_size(config)
        if device == "cpu" and size is not None and size not in CPU_HEAD_SIZES:
            return where, (
                f"an attention head size vLLM-CPU supports ({', '.join(map(str, CPU_HEAD_SIZES))}), "
                f"this model has {size} (use rollout.backend: hf or a model with another "
                "hidden_size / num_heads)"
            )
    max_pos = config.get("max_position_embeddings")
    if max_pos is not None and max_model_len > max_pos:
        return "rollout.max_model_len", (
            f"at most the model's max_position_embeddings {max_pos}, got {max_model_len}"
        )
    return None
