"""A user's model directory checked completely before a study runs, without loading weights:
the config with transformers (a known `model_type`, no remote code), the safetensors headers
against the tensors the config's architecture has (names and shapes, from a model built on
the meta device), and the tokenizer (loads, decodes what it encodes, fits the embedding).
Each problem is one sentence naming the file and what was expected; the chat template and the
engines' limits are checked where the study's rows are rendered (platform/commands/validate.py)
and in core/serving.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stageflow.core.models import safetensors_table

# lazy: torch and transformers, only for a study with a model directory of its own

SAMPLE_TEXT = "Q: What is 12 + 7?\nA: 19"  # what every tokenizer must decode as it was encoded


def config_problem(path: Path) -> str | None:
    """Why transformers would not build this model's config without running remote code."""
    config = json.loads((path / "config.json").read_text())
    if config.get("auto_map"):
        return (
            "a model whose code is in transformers (config.json's auto_map asks for remote "
            "code, which stageflow never runs)"
        )
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (ValueError, KeyError, OSError, TypeError) as err:
        reason = str(err).splitlines()[0][:200]
        return (
            f"a config.json transformers loads (model_type '{config.get('model_type')}': {reason})"
        )
    return None


def expected_tensors(path: Path) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """({name: shape} as `save_pretrained` writes the model the config describes, the names
    tied to another tensor and left out of the file when the config ties them), from a model
    built on the meta device (no memory, no weights). Names as written: transformers renames
    some checkpoints' tensors as it loads them (gpt_neox's embed_out is lm_head in memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    state = model.state_dict()
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without load-time conversions: names as in memory
        revert_weight_conversion = None
    if revert_weight_conversion is not None:
        state = revert_weight_conversion(model, state)
    tied = set()
    if getattr(config, "tie_word_embeddings", False):
        tied = set(getattr(model, "_tied_weights_keys", None) or ())
    return {name: tuple(t.shape) for name, t in state.items()}, tied


def tensors_problem(path: Path) -> str | None:
    """Whether the safetensors files hold exactly the tensors of the config's architecture."""
    written: dict[str, tuple[int, ...]] = {}
    for weights in sorted(path.glob("*.safetensors")):
        table, _ = safetensors_table(weights)
        written.update({name: tuple(t["shape"]) for name, t in table.items()})
    expected, tied = expected_tensors(path)
    missing = sorted(set(expected) - set(written) - tied)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        return f"weights with every tensor config.json describes ({missing[0]}{more} missing)"
    unexpected = sorted(set(written) - set(expected))
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        return f"weights of the architecture config.json describes (unexpected tensor {unexpected[0]}{more})"
    for name in sorted(written):
        if written[name] != expected[name]:
            return (
                f"weights of the shapes config.json describes ({name} is "
                f"{list(written[name])}, the config makes it {list(expected[name])})"
            )
    return None


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def tokenizer_problem(path: Path) -> str | None:
    """Whether the tokenizer loads, decodes what it encodes and fits the embedding."""
    try:
        tokenizer = load_tokenizer(path)
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds for broken files
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        return f"a tokenizer transformers loads from the directory's tokenizer files ({reason})"
    ids = tokenizer(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    back = tokenizer.decode(ids, skip_special_tokens=True)
    if back != SAMPLE_TEXT:
        return f"a tokenizer that decodes what it encodes ({SAMPLE_TEXT!r} came back as {back!r})"
    vocab = json.loads((path / "config.json").read_text()).get("vocab_size")
    if vocab is not None and len(tokenizer) > vocab:
        return (
            f"a tokenizer whose tokens fit the embedding ({len(tokenizer)} tokens, "
            f"config.json's vocab_size is {vocab})"
        )
    return None


def model_dir_problem(path: str | Path) -> str | None:
    """What is wrong with a model directory that passed core/models.check_model_dir, or None."""
    path = Path(path)
    return config_problem(path) or tensors_problem(path) or tokenizer_problem(path)
