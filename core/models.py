"""The default model: a tiny Llama-architecture causal LM with a character-level tokenizer.

Built locally and deterministically from a seed as an HF model directory (config.json,
model.safetensors, tokenizer files) that transformers and vLLM both load. Nothing is
downloaded, ever; `model.path` points at any local HF causal-LM directory instead.
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import asdict, dataclass
from pathlib import Path

from stageflow.core.files import staged_dir
from stageflow.core.serving import CPU_HEAD_SIZES

# lazy: tokenizers, transformers and torch load where a model is built or read, not where a spec
# is checked

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
# Every printable ASCII character plus newline and tab: enough for every synthetic task.
CHARACTERS = sorted(set(string.printable) - set("\r\x0b\x0c"))


@dataclass(frozen=True)
class TinyModelSpec:
    """Size and seed of the locally built default model (about 0.9M parameters as given)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    max_seq_len: int = 512
    seed: int = 0

    def problem(self) -> str | None:
        """Why this size cannot be built and served by vLLM on CPU, or None."""
        if self.hidden_size % self.num_heads:
            return f"hidden_size {self.hidden_size} divisible by num_heads {self.num_heads}"
        if self.hidden_size // self.num_heads not in CPU_HEAD_SIZES:
            sizes = ", ".join(map(str, CPU_HEAD_SIZES))
            return f"a head size hidden_size/num_heads in {sizes} (vLLM's CPU attention), got {self.hidden_size // self.num_heads}"
        return None

    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True) + f"|chars={''.join(CHARACTERS)}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def char_tokenizer():
    """A fast HF tokenizer with one token per character and <s> prepended."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )


def build_tiny_model(out_dir: str | Path, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Write the tiny model to `out_dir` (atomically); the same spec gives the same weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    tokenizer = char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_seq_len,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
    with staged_dir(out_dir) as staging:  # another process may finish the same model first
        save_quietly(model, staging)
        tokenizer.save_pretrained(staging)
        (staging / "stageflow_model.json").write_text(json.dumps(asdict(spec), sort_keys=True))
    return out_dir


def save_quietly(model, out_dir: Path) -> None:
    """`model.save_pretrained` as safetensors, without the "Writing model shards" bar."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir, safe_serialization=True)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def ensure_tiny_model(cache_dir: str | Path, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """The tiny model for `spec` under `cache_dir`, built once and reused."""
    path = Path(cache_dir) / f"tiny-{spec.digest()}"
    if not (path / "model.safetensors").exists():
        build_tiny_model(path, spec)
    return path


# Config keys of models that scale the LM head's logits (Granite, Cohere); the learner's log-prob
# head applies Gemma2's final-logit soft-capping (`final_logit_softcapping`) and no other change.
LOGIT_TRANSFORMS = ("logits_scaling", "logit_scale")


def read_config(model_dir: str | Path) -> dict:
    """A model directory's config.json as a dict (no transformers import)."""
    return json.loads((Path(model_dir) / "config.json").read_text())


def attention_implementation(model_dir: str | Path) -> str | None:
    """Eager attention ("eager") where the config soft-caps attention scores (Gemma2's
    attn_logit_softcapping; transformers' SDPA path ignores it and learner and vLLM then
    disagree), else None (transformers' default). Learner and `hf` engine load with it."""
    return "eager" if read_config(model_dir).get("attn_logit_softcapping") else None


def logit_transform(model_dir: str | Path) -> str | None:
    """Why the learner cannot train this model (its config transforms the logits), or None."""
    config = read_config(model_dir)
    for key in LOGIT_TRANSFORMS:
        if config.get(key) not in (None, 1.0):
            return f"a model whose LM head is a plain linear layer (its config sets {key}={config[key]}, which the learner's log-prob head does not apply)"
    return None


def has_chat_template(model_dir: str | Path) -> bool:
    """Whether the model's tokenizer carries a chat template (read from its files, no loading)."""
    path = Path(model_dir)
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    config = path / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))


def check_model_dir(path: str | Path) -> str | None:
    """Why `path` is not a loadable HF causal-LM directory, or None when it looks fine."""
    path = Path(path)
    if not path.is_dir():
        return "an existing local model directory"
    if not (path / "config.json").is_file():
        return "a model directory with config.json (an HF causal-LM directory)"
    if not any(path.glob("*.safetensors")):
        return "a model directory with safetensors weights (*.safetensors)"
    try:
        json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as err:
        return f"a readable config.json (it is not valid JSON: {err.msg})"
    for weights in sorted(path.glob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem:
            return f"complete safetensors weights ({weights.name}: {problem})"
    return None


def safetensors_table(path: Path) -> tuple[dict, int]:
    """A safetensors file's table of tensors ({name: {dtype, shape, data_offsets}}) and the
    header's length; only the header is read: an 8-byte length, then the JSON table. Raises
    ValueError when the file is too short for it or the table is not JSON."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{size} bytes, shorter than a header")
        length = int.from_bytes(head, "little")
        if 8 + length > size:
            raise ValueError(f"its header needs {8 + length} bytes, the file has {size}")
        try:
            table = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError("its header is not valid JSON") from None
    table.pop("__metadata__", None)
    return table, length


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is unreadable (a truncated download or copy), or None: its header
    and the data its tensors point into must fit the file."""
    try:
        table, length = safetensors_table(path)
    except ValueError as err:
        return str(err)
    size = path.stat().st_size
    need = 8 + length + max((t["data_offsets"][1] for t in table.values()), default=0)
    return f"its tensors need {need} bytes, the file has {size}" if need > size else None
