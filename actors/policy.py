"""The learner's policy: a causal LM whose LM head returns per-token log-probs of the targets.

The head runs the fused log-prob kernel (`kernels: fused`) or the naive full-logits path
(`kernels: naive`), so with `fused` the N x V logits are never materialised; given a
`HeadStatistic` it also returns a per-token statistic of the full-vocabulary logits, chunk by
chunk (kernels/vocab_stats.py), inside the head's forward where ZeRO-3 has gathered its weight.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from stageflow.core.models import LOGIT_TRANSFORMS
from stageflow.kernels.logprob import per_token_logprobs
from stageflow.kernels.vocab_stats import HeadStatistic, per_token_statistic


class LogProbHead(torch.nn.Linear):
    """The LM head; called with targets it returns per-token log-probs (fused kernel); with
    `with_argmax` or `with_std` (evaluation) the `TokenLogProbs` with whether each target is the
    argmax, and the entropy and std of log p under p (Min-K%++).

    Going through the head's own `__call__` keeps ZeRO-3's parameter gathering hooks in charge.
    """

    impl = "fused"
    softcap: float | None = None  # Gemma2's final-logit soft-capping (config)

    def forward(  # type: ignore[override]
        self,
        hidden,
        targets=None,
        mask=None,
        temperature=1.0,
        with_argmax=False,
        statistic=None,
        with_std=False,
    ):
        if targets is None:
            return super().forward(hidden)
        if statistic is not None:  # training at T = 1: log-probs and the statistic
            logprobs = self.forward(hidden, targets, mask)
            values = per_token_statistic(
                hidden, self.weight, targets, statistic, bias=self.bias, softcap=self.softcap
            )
            return logprobs, values
        out = per_token_logprobs(
            hidden,
            self.weight,
            targets,
            mask,
            bias=self.bias,
            temperature=temperature,
            softcap=self.softcap,
            with_argmax=with_argmax,
            with_entropy=with_std,
            with_std=with_std,
            impl=self.impl,
        )
        if with_argmax or with_std:
            return out._replace(logprobs=out.logprobs.float())
        return out.logprobs.float()


class PolicyModule(torch.nn.Module):
    """A causal LM whose forward returns per-token log-probs of the targets [B, T-1]."""

    def __init__(self, lm: torch.nn.Module, impl: str = "fused"):
        super().__init__()
        # internal errors: `stageflow validate` refused these models before any work
        if type(lm.lm_head) is not torch.nn.Linear:
            raise RuntimeError(f"expected an nn.Linear lm_head, got {type(lm.lm_head).__name__}")
        for key in LOGIT_TRANSFORMS:  # the head applies the soft cap and no other logit change
            if getattr(lm.config, key, None) not in (None, 1.0):
                raise RuntimeError(f"the model's config sets {key}; the log-prob head applies none")
        lm.lm_head.__class__ = LogProbHead
        lm.lm_head.impl = impl
        lm.lm_head.softcap = getattr(lm.config, "final_logit_softcapping", None)
        self.lm = lm

    def forward(
        self,
        input_ids,
        attention_mask,
        mask,
        temperature=1.0,
        with_argmax=False,
        statistic: HeadStatistic | None = None,
        layer: int | None = None,
        with_std: bool = False,
    ):
        """Per-token log-probs [B, T-1]; with `with_argmax` or `with_std` the `TokenLogProbs`
        (argmax flags; entropy and std), with `statistic` also its values (a pair); with
        `layer`, (that, the decoder layer's output at the target positions [B, T-1, H])."""
        with self.capture(layer) as states:
            out = self.lm.lm_head(
                self.hidden_states(input_ids, attention_mask),
                input_ids[:, 1:],
                mask,
                temperature,
                with_argmax,
                statistic,
                with_std,
            )
        return out if layer is None else (out, states[0])

    def hidden_states(self, input_ids, attention_mask):
        """The last layer's hidden states aligned with the targets: [B, T-1, H]."""
        base = getattr(self.lm, self.lm.base_model_prefix)
        hidden = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return hidden.last_hidden_state[:, :-1]

    def layer_states(self, input_ids, attention_mask, layer: int):
        """Decoder layer `layer`'s output at the target positions (each answer token's own
        position): [B, T-1, H]."""
        with self.capture(layer) as states:
            self.hidden_states(input_ids, attention_mask)
        return states[0]

    @contextmanager
    def capture(self, layer: int | None):
        """A list that receives decoder layer `layer`'s output [B, T-1, H] (from position 1 on,
        aligned with the targets) during the block; nothing when `layer` is None."""
        states: list[torch.Tensor] = []
        if layer is None:
            yield states
            return

        def keep(module, args, output):
            states.append((output[0] if isinstance(output, tuple) else output)[:, 1:])

        handle = decoder_layers(self.lm)[layer].register_forward_hook(keep)
        try:
            yield states
        finally:
            handle.remove()


def decoder_layers(lm: torch.nn.Module) -> torch.nn.ModuleList:
    """The causal LM's stack of decoder layers (`layers`, or GPT-2's `h`)."""
    base = getattr(lm, lm.base_model_prefix)
    found = getattr(base, "layers", None) or getattr(base, "h", None)
    if not isinstance(found, torch.nn.ModuleList):  # internal: validate checks the architecture
        raise RuntimeError(f"no decoder layer list in {type(base).__name__}")
    return found
