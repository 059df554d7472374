"""Evaluators: the third role beside learners and rollout workers. An evaluator scores a
committed checkpoint (a prefix cache directory) with the learner's tokenisation, batching and
fused kernels (`LearnerScoring`, the same code), in a process of its own, so that the trial's
learner trains the next stage meanwhile (`evaluation.placement: evaluators`). It holds one
model at a time, a plain `PolicyModule` in the learner's dtype and kernels: no DeepSpeed
engine, no optimizer, one rank. A ULD checkpoint (two models' logits) is scored by the learner.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from stageflow.actors.dispatch import ALL, dispatch
from stageflow.actors.group import ModelGroup, check_fits
from stageflow.actors.learner_scoring import LearnerScoring
from stageflow.actors.policy import PolicyModule
from stageflow.core.config import LearnerSpec, StudyError
from stageflow.core.models import attention_implementation, check_model_dir

# lazy: transformers loads when an evaluator starts


class EvaluatorWorker(LearnerScoring):
    """One evaluator process: the weights of one checkpoint and the learner's scoring calls
    (`answer_stats`, `grad_norms`, `logprobs`) on them."""

    zero3 = False  # one rank holds the whole model
    engine = ref = uld = combined = None  # what LearnerScoring reads of a learner rank

    def __init__(self, model_dir: str, spec: LearnerSpec, device: str = "cpu", seed: int = 0):
        self.model_dir, self.spec, self.seed = str(model_dir), spec, seed
        self.device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        self.rank, self.world = 0, 1
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    @dispatch(ALL)
    def setup(self) -> int:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._read(self.model_dir)
        return self.rank

    def _read(self, model_dir: str) -> None:
        from transformers import AutoModelForCausalLM

        lm = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation=attention_implementation(model_dir)
        )
        if self.spec.dtype == "bfloat16":  # the learner's weights, as it would score them
            lm = lm.to(torch.bfloat16)
        self.policy = PolicyModule(lm, self.spec.kernels).to(self.device)
        self.policy.requires_grad_(False)
        self.model_dir = str(model_dir)

    @dispatch(ALL)
    def load(self, model_dir: str | Path) -> None:
        """Hold the checkpoint in `model_dir` (the tokenizer stays: checkpoints of one study
        share it)."""
        self._read(str(model_dir))

    @dispatch(ALL)
    def reseed(self, seed: int) -> None:
        self.seed = seed
        torch.manual_seed(seed)


class EvaluatorGroup(ModelGroup):
    """One evaluator actor (a group of one rank, so that its calls are typed as a learner's)."""

    worker, name, distributed, set_up = EvaluatorWorker, "evaluator", False, True

    @property
    def ranks(self) -> int:
        return 1

    def check(self, model_dir: str | Path, cpus: float) -> None:
        why = check_model_dir(model_dir)
        if why:
            raise StudyError("", f"model directory '{model_dir}'", f"expected {why}")
        check_fits("evaluation.placement", 1, cpus)
