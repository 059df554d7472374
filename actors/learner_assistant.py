"""A learner rank's ULD half (actors/uld.py): the stage that trains an assistant instead of the
model, and the unlearned model (base - weight * assistant) it leaves, which the rank evaluates
(`_module`), samples from (`sample_combined`) and saves as the base's directory plus
`assistant/`; a ULD checkpoint loads back into the same combined model. `LearnerWorker`
(actors/learner_worker.py) inherits it; the methods read and set the rank's state (`policy`,
`adapter`, `engine`, `_template`, `uld`, `uld_base`, `combined`).
"""

from __future__ import annotations

import dataclasses

import torch

from stageflow.actors import lora, uld
from stageflow.actors.dispatch import RANK0, SPLIT, dispatch
from stageflow.actors.policy import decoder_layers
from stageflow.actors.rendering import Prompt, encode_prompts
from stageflow.core.config import StageSpec
from stageflow.core.registry import ObjectiveParams


class LearnerAssistant:
    """ULD on a learner rank (see the module docstring)."""

    uld: uld.UldSettings | None = None  # while the rank holds a ULD stage's assistant
    uld_base: torch.nn.Module | None = None  # the frozen model the assistant's logits offset
    combined: uld.CombinedPolicy | None = None  # the unlearned model, built when first read

    def _forget_assistant(self) -> None:
        self.uld = self.uld_base = self.combined = None

    def _to_assistant(self, stage: StageSpec, params: ObjectiveParams) -> None:
        """Keep the current weights frozen as the base and make the policy a new assistant:
        its first layers with a fresh adapter (the engine is built around it next)."""
        base = self._fresh_lm(self.gathered_state(everywhere=True)).to(self.device).eval()
        for p in base.parameters():
            p.requires_grad_(False)
        settings = uld_settings(params, len(decoder_layers(base)))
        self._drop_engine()
        self._load_policy(uld.assistant_model(self._template, settings.layers))
        self.policy.lm.load_state_dict(base.state_dict(), strict=False)  # the first layers'
        seed = lora.adapter_seed(self.seed, stage)
        self.adapter = uld.attach_assistant_adapter(self.policy.lm, settings, seed)
        self.uld, self.uld_base, self.combined = settings, base, None

    def _combined_module(self) -> uld.CombinedPolicy:
        """The unlearned model on the assistant's current weights (merged, gathered on every
        rank: a collective under ZeRO-3), built once per state."""
        if self.combined is None:
            if self.uld is None:  # internal: callers ask `holds_combined` first
                raise RuntimeError("this learner holds no ULD model")
            assistant = uld.assistant_model(self._template, self.uld.layers)
            assistant.load_state_dict(self.gathered_state(everywhere=True), strict=False)
            self.combined = uld.CombinedPolicy(self.uld_base, assistant.to(self.device), self.uld)
        return self.combined

    def _load_combined(self, model_dir: str) -> None:
        """After `load` of a ULD checkpoint: the combined model over the loaded base (the
        policy itself: a ULD model is not trained further)."""
        assistant, settings = uld.load_assistant(self._template, model_dir)
        self.combined = uld.CombinedPolicy(self.policy.lm, assistant.to(self.device), settings)

    def _assistant_states(self) -> tuple[dict | None, dict | None]:
        """What a ULD checkpoint holds, on rank 0 (None elsewhere; the adapter is gathered on
        every rank): the base's weights (the directory's model) and the assistant's adapter."""
        adapter = self.gathered_state(adapter=True)
        if self.rank != 0:
            return None, None
        state = {k: v.detach().cpu() for k, v in self.uld_base.state_dict().items()}
        if getattr(self.hf_config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        return state, adapter

    @dispatch(RANK0)
    def holds_combined(self) -> bool:
        """Whether the rank holds a ULD model (its completions come from `sample_combined`)."""
        return self.uld is not None or self.combined is not None

    @dispatch(SPLIT)
    def sample_combined(
        self,
        prompts: list[Prompt],
        n: int = 1,
        temperature: float = 1.0,
        max_tokens: int = 32,
        seed: int = 0,
    ) -> list[list[str]]:
        """`n` completions per prompt from the ULD model, sampled by transformers (vLLM cannot
        serve its combined logits): the texts, per prompt."""
        module = self._combined_module()
        if not prompts:
            return []
        tok = self.tokenizer
        samples = module.sample(
            encode_prompts(tok, prompts),
            n,
            temperature,
            max_tokens,
            seed * 1009 + self.rank,  # each rank's share its own draws
            self.pad_id,
            tok.eos_token_id,
        )
        return [[tok.decode(s, skip_special_tokens=True) for s in seqs] for seqs in samples]


def uld_settings(params: ObjectiveParams, model_layers: int) -> uld.UldSettings:
    """A ULD stage's settings; `layers` 0: a quarter of the model's decoder layers, at least one."""
    settings = uld.UldSettings.of(params)
    if settings.layers == 0:
        return dataclasses.replace(settings, layers=max(1, model_layers // 4))
    return settings
