"""LoRA adapters (peft) for the learner: one new adapter per stage over the merged weights.

With `learner.lora`, a stage injects a fresh adapter into the policy's linear layers (the LM
head excepted: it runs the fused log-prob kernel), so that each adapted layer computes

    y = W x + (alpha / r) * B (A dropout(x))      # W: out x in (frozen), A: r x in, B: out x r

and only A and B train. Everything outside the learner sees the merged model: `merged_state`
gives W' = W + (alpha / r) B A under the base model's HF names (no `.base_layer`, no `lora_`),
which the rollout engines load, checkpoints hold and pi_ref copies. W itself never changes, so
the next stage starts from the merged weights with a new adapter, exactly as a run resumed from
the merged checkpoint does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from stageflow.core.config import LoraSpec, StageSpec

# lazy: peft, transformers and safetensors load only for a study with LoRA

ADAPTER = "default"  # peft's name of a model's only adapter
BASE_LAYER = ".base_layer."


def adapter_seed(seed: int, stage: StageSpec) -> int:
    """The seed of a stage's adapter: the trial's seed and the stage's settings, so a trial
    resumed from a checkpoint draws the same adapter as one that ran through."""
    text = json.dumps([seed, asdict(stage)], sort_keys=True, default=str)
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def attach_adapter(lm: torch.nn.Module, spec: LoraSpec, seed: int, base: str | None) -> Any:
    """Inject a new adapter into `lm` in place (B = 0, so the model's outputs are unchanged)
    and freeze everything else; returns the peft model around `lm` (for `save_adapter`).

    Seeds torch's generator with `seed` first: A's initialisation and the stage's dropout masks
    then depend on the stage alone. `base`: the adapter's base model directory, if one holds
    exactly the weights it starts from (recorded in adapter_config.json).
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules) if spec.target_modules else "all-linear",
        bias="none",
        task_type="CAUSAL_LM",
    )
    lm.name_or_path = base or ""  # what peft records as the adapter's base ("": none)
    torch.manual_seed(seed)
    return get_peft_model(lm, config)


def merged_state(lm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`lm`'s state dict under the base model's names, each adapted weight merged:
    W + (alpha / r) B A (a new tensor; W is left as it is). A plain LM's own state dict."""
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        deltas = {
            f"{name}{BASE_LAYER}weight": module.get_delta_weight(ADAPTER)
            for name, module in lm.named_modules()
            if isinstance(module, LoraLayer) and ADAPTER in module.scaling
        }
        return {
            key.replace(BASE_LAYER, "."): value + deltas[key] if key in deltas else value
            for key, value in lm.state_dict().items()
            if ".lora_" not in key
        }


def adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """The adapter's tensors (A and B of every adapted layer) under the peft model's names."""
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


def save_adapter(model: Any, out_dir: Path, state: dict[str, torch.Tensor]) -> None:
    """Write the adapter as peft does (adapter_model.safetensors, adapter_config.json) from
    `state` (`adapter_state`, gathered: under ZeRO-3 the live tensors are partitions)."""
    model.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)


def linear_layers(model_dir: str | Path | None) -> list[str]:
    """Names of the model's layers an adapter can target: those with a 2-D weight, less the
    token embeddings and the LM head (vocab-sized rows). Read from the safetensors headers
    (nothing loaded); `None`: the tiny default model, a Llama (core/models.py)."""
    if model_dir is None:
        from transformers import LlamaConfig, LlamaForCausalLM

        vocab = 16
        small = LlamaConfig(
            vocab_size=vocab,
            hidden_size=8,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=1,
        )
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in LlamaForCausalLM(small).state_dict().items()}
    else:
        from safetensors import safe_open

        vocab = json.loads((Path(model_dir) / "config.json").read_text()).get("vocab_size")
        shapes = {}
        for weights in sorted(Path(model_dir).glob("*.safetensors")):
            with safe_open(str(weights), "pt") as f:
                shapes.update({k: f.get_slice(k).get_shape() for k in f.keys()})
    return sorted(
        k.removesuffix(".weight")
        for k, shape in shapes.items()
        if k.endswith(".weight") and len(shape) == 2 and shape[0] != vocab
    )


def unknown_target(target_modules: list[str], layers: list[str]) -> str | None:
    """The first of `target_modules` that names none of `layers` (peft matches a layer's full
    name or its last dotted parts), else None."""
    for target in target_modules:
        if not any(name == target or name.endswith("." + target) for name in layers):
            return target
    return None
