"""The learner's policy: a causal LM whose LM head returns per-token log-probs of the targets.

The head runs the fused log-prob kernel (`kernels: fused`) or the naive full-logits path
(`kernels: naive`), so with `fused` the N x V logits are never materialised.
"""

from __future__ import annotations

import torch

from stageflow.core.models import LOGIT_TRANSFORMS
from stageflow.kernels.logprob import per_token_logprobs


class LogProbHead(torch.nn.Linear):
    """The LM head; called with targets it returns per-token log-probs (fused kernel), and with
    `with_argmax` also whether each target is the argmax (evaluation).

    Going through the head's own `__call__` keeps ZeRO-3's parameter gathering hooks in charge.
    """

    impl = "fused"
    softcap: float | None = None  # Gemma2's final-logit soft-capping (config)

    def forward(self, hidden, targets=None, mask=None, temperature=1.0, with_argmax=False):  # type: ignore[override]
        if targets is None:
            return super().forward(hidden)
        out = per_token_logprobs(
            hidden,
            self.weight,
            targets,
            mask,
            bias=self.bias,
            temperature=temperature,
            softcap=self.softcap,
            with_argmax=with_argmax,
            impl=self.impl,
        )
        return (out.logprobs.float(), out.is_argmax) if with_argmax else out.logprobs.float()


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

    def forward(self, input_ids, attention_mask, mask, temperature=1.0, with_argmax=False):
        base = getattr(self.lm, self.lm.base_model_prefix)
        hidden = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return self.lm.lm_head(
            hidden.last_hidden_state[:, :-1], input_ids[:, 1:], mask, temperature, with_argmax
        )
