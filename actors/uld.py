"""ULD, unlearning from logit difference: an assistant learns what to forget, and the unlearned
model's logits are the base's minus the assistant's.

The assistant is the first `layers` decoder layers of the model at the stage's start (its
embeddings, final norm and LM head kept) with a new LoRA adapter; it trains with the objectives
reversed (`uld` in actors/objectives.py: descent on the forget rows, the uniform distribution
as the target on the retain rows) while the model itself stays frozen. The unlearned model
(`CombinedPolicy`) reads both, per position, as the ULD code does:

    l = log_softmax(z_base)
    z = l - weight * z_assistant    on the tokens with l >= min(max l + log(relative_top),
                                    the (relative_top * V)-th largest l)
    z = FILTERED                    elsewhere (relative_top 0: every token kept)

It is evaluated (teacher-forced metrics and generation) and trained no further: its
checkpoint is the base model's directory plus `assistant/` (the adapter in peft's format and
`uld.json`, the settings). vLLM cannot serve the combined logits, so its completions are sampled
by transformers on the learner (`sample`), a choice the study states (`generation: hf`).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from stageflow.actors import lora
from stageflow.actors.batching import left_padded
from stageflow.actors.policy import decoder_layers
from stageflow.core.config import LoraSpec
from stageflow.kernels.token_logprobs import TokenLogProbs

# lazy: transformers and peft load when a ULD model samples or loads

ASSISTANT_DIR = "assistant"  # in a ULD checkpoint: the assistant's adapter and settings
SETTINGS_FILE = "uld.json"
FILTERED = -1000.0  # the logit of a token the filter drops (the ULD code's value)


@dataclass(frozen=True)
class UldSettings:
    """The assistant's depth and adapter, and how its logits are subtracted."""

    layers: int
    weight: float = 1.0
    relative_top: float = 0.1
    rank: int = 16
    alpha: float = 32.0

    @classmethod
    def of(cls, params: Any) -> UldSettings:
        """From a `uld` stage's typed parameters (`ObjectiveParams`)."""
        return cls(**{f.name: params.get(f.name) for f in fields(cls)})


def is_uld_checkpoint(model_dir: str | Path) -> bool:
    return (Path(model_dir) / ASSISTANT_DIR / SETTINGS_FILE).is_file()


def assistant_model(lm: torch.nn.Module, layers: int) -> torch.nn.Module:
    """A copy of `lm` with its first `layers` decoder layers only."""
    small = copy.deepcopy(lm)
    blocks = decoder_layers(small)
    del blocks[layers:]
    small.config.num_hidden_layers = layers
    if getattr(small.config, "layer_types", None):  # per-layer attention kinds (Qwen2, Gemma2)
        small.config.layer_types = small.config.layer_types[:layers]
    return small


def attach_assistant_adapter(lm: torch.nn.Module, settings: UldSettings, seed: int) -> Any:
    """The assistant's new LoRA adapter on every linear layer but the head (peft model)."""
    spec = LoraSpec(r=settings.rank, alpha=settings.alpha, dropout=0.0)
    return lora.attach_adapter(lm, spec, seed, None)


def combine(base_logits: torch.Tensor, assistant_logits: torch.Tensor, settings: UldSettings):
    """The unlearned model's logits from the two models' logits [..., V] (module docstring)."""
    dtype = torch.promote_types(base_logits.dtype, torch.float32)  # float64 stays float64
    base = torch.log_softmax(base_logits.to(dtype), dim=-1)
    combined = base - settings.weight * assistant_logits.to(dtype)
    if settings.relative_top <= 0:
        return combined
    keep_min = max(1, int(settings.relative_top * base.shape[-1]))
    kth = base.topk(keep_min, dim=-1).values[..., -1:]
    floor = torch.minimum(kth, base.amax(-1, keepdim=True) + math.log(settings.relative_top))
    return torch.where(base >= floor, combined, torch.full_like(combined, FILTERED))


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids under left padding (what `generate` gives the model)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class CombinedPolicy(torch.nn.Module):
    """The unlearned model: frozen base and assistant, their logits combined. Its forward is
    `PolicyModule`'s for evaluation (per-token log-probs of the targets; argmax, entropy and
    std on request) from the full [B, T, V] logits of a micro-batch."""

    def __init__(self, base: torch.nn.Module, assistant: torch.nn.Module, settings: UldSettings):
        super().__init__()
        self.base, self.assistant, self.settings = base.eval(), assistant.eval(), settings
        for p in self.parameters():
            p.requires_grad_(False)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions(attention_mask),
            use_cache=False,
        )
        return combine(self.base(**kwargs).logits, self.assistant(**kwargs).logits, self.settings)

    def forward(
        self,
        input_ids,
        attention_mask,
        mask,
        temperature=1.0,
        with_argmax=False,
        statistic=None,
        layer=None,
        with_std=False,
    ):
        if statistic is not None or layer is not None:  # internal: validation keeps ULD terminal
            raise RuntimeError("a ULD model is evaluated, not trained")
        z = self.logits(input_ids, attention_mask)[:, :-1] / temperature
        logp = torch.log_softmax(z, dim=-1)
        targets = input_ids[:, 1:, None]
        chosen = logp.gather(-1, targets)[..., 0]
        if not (with_argmax or with_std):
            return chosen
        p = logp.exp()
        entropy = -(p * logp).sum(-1)
        std = (p * (logp + entropy[..., None]).square()).sum(-1).sqrt()
        is_argmax = z.gather(-1, targets)[..., 0] >= z.amax(-1)
        return TokenLogProbs(
            chosen, entropy if with_std else None, is_argmax, std if with_std else None
        )

    def sample(
        self,
        prompt_ids: list[list[int]],
        n: int,
        temperature: float,
        max_tokens: int,
        seed: int,
        pad_id: int,
        eos_id: int | None,
    ) -> list[list[list[int]]]:
        """`n` completions per prompt (token ids, up to and with EOS) sampled by transformers'
        `generate` from the combined logits (then temperature; greedy at temperature 0)."""
        from transformers import LogitsProcessorList

        ids, attention = left_padded(prompt_ids, pad_id)
        width = ids.shape[1]
        device = next(self.base.parameters()).device
        prompt_mask = attention.repeat_interleave(n, dim=0).to(device)
        torch.manual_seed(seed)
        greedy = temperature <= 0
        with torch.no_grad():
            out = self.base.generate(
                input_ids=ids.to(device),
                attention_mask=attention.to(device),
                logits_processor=LogitsProcessorList([_Subtract(self, prompt_mask)]),
                do_sample=not greedy,
                temperature=None if greedy else temperature,
                top_p=None,
                top_k=None,
                max_new_tokens=max_tokens,
                num_return_sequences=n,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
            )
        new = out[:, width:].cpu().tolist()
        samples = []
        for i in range(len(prompt_ids)):
            seqs = []
            for row in new[i * n : (i + 1) * n]:
                stop = row.index(eos_id) + 1 if eos_id in row else len(row)
                seqs.append(row[:stop])
            samples.append(seqs)
        return samples


class _Subtract:
    """A `generate` logits processor: the base's next-token logits become the combined ones
    (the assistant re-reads the whole sequence: it is a few layers deep)."""

    def __init__(self, model: CombinedPolicy, prompt_mask: torch.Tensor):
        self.model, self.prompt_mask = model, prompt_mask

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        grown = input_ids.shape[1] - self.prompt_mask.shape[1]
        ones = self.prompt_mask.new_ones(input_ids.shape[0], grown)
        attention = torch.cat([self.prompt_mask, ones], dim=1)
        assistant = self.model.assistant(
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=positions(attention),
            use_cache=False,
        ).logits[:, -1]
        return combine(scores, assistant, self.model.settings).to(scores.dtype)


def save_assistant(peft_model: Any, out_dir: Path, state: dict, settings: UldSettings) -> None:
    """`assistant/` of a ULD checkpoint: the adapter (peft's format) and the settings."""
    target = out_dir / ASSISTANT_DIR
    lora.save_adapter(peft_model, target, state)
    (target / SETTINGS_FILE).write_text(json.dumps(asdict(settings), indent=1))


def load_assistant(base_lm: torch.nn.Module, model_dir: str | Path) -> tuple[Any, UldSettings]:
    """The assistant of a ULD checkpoint over its base model `base_lm` (left as it is), its
    adapter merged; and its settings."""
    from peft import PeftModel

    target = Path(model_dir) / ASSISTANT_DIR
    settings = UldSettings(**json.loads((target / SETTINGS_FILE).read_text()))
    small = assistant_model(base_lm, settings.layers)
    merged = PeftModel.from_pretrained(small, str(target)).merge_and_unload()
    return merged.eval(), settings
