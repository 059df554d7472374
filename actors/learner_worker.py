"""One learner rank: a DeepSpeed engine over the policy (ZeRO 0-3), as a Ray actor.

The rank trains a stage's objective over its share of each batch (`train_stage`, or `step` from
the RL loop), computes per-token log-probs and teacher-forced answer statistics for evaluation
with the same tokenisation and fused kernels (`logprobs`, `answer_stats`, `grad_norms`: the
scoring half, actors/learner_scoring.py), gathers the full weights on rank 0 (ZeRO-3 included)
for checkpoints and weight sync, and starts over from a checkpoint (`load`). Optimizer and LR
schedule are re-created at every stage unless `reset_optimizer_per_stage` is false; a stage's
weight mask (actors/masks.py) is scored before its first step; a ULD stage trains an assistant
instead (actors/learner_assistant.py). `LearnerGroup`
(actors/learner.py) drives the ranks. One actor class whose methods share the DeepSpeed
engine's state, hence the module's size.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from stageflow.actors import lora, uld
from stageflow.actors.batch_plan import batch_indices, lr_multiplier, stage_steps
from stageflow.actors.batching import (
    place_completion_values,
)
from stageflow.actors.deepspeed_setup import deepspeed_config, release_stale_build_locks
from stageflow.actors.dispatch import ALL, RANK0, REF0, SPLIT_RANK0, dispatch
from stageflow.actors.learner_assistant import LearnerAssistant
from stageflow.actors.learner_scoring import LearnerScoring
from stageflow.actors.objective_inputs import (
    head_statistic,
    mean_over_ranks,
    steering_direction,
    train_only,
)
from stageflow.actors.objectives import LossInputs
from stageflow.actors.policy import PolicyModule
from stageflow.actors.rendering import Completion
from stageflow.actors.weight_sync import write_shared_weights
from stageflow.core.alternatives import chosen_rows
from stageflow.core.config import LearnerSpec, StageSpec
from stageflow.core.files import staged_dir
from stageflow.core.models import attention_implementation
from stageflow.core.registry import (
    OBJECTIVES,
    LayerStates,
    ObjectiveParams,
    VocabStat,
    load_plugins,
)
from stageflow.kernels.peak_memory import PeakMemory

# lazy: DeepSpeed, transformers and safetensors load when a learner rank starts


class LearnerWorker(LearnerScoring, LearnerAssistant):
    """One data-parallel rank: a DeepSpeed engine over the policy, plus a frozen pi_ref when needed."""

    def __init__(self, model_dir: str, spec: LearnerSpec, device: str = "cpu", seed: int = 0):
        self.model_dir, self.spec, self.seed = str(model_dir), spec, seed
        self.device_kind = device
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    # ----- set-up ----------------------------------------------------------------------------
    @dispatch(ALL)
    def setup(self) -> int:
        """Join the process group (after the group set MASTER_ADDR etc.) and load the model."""
        import deepspeed
        from transformers import AutoTokenizer

        load_plugins()
        for lock in release_stale_build_locks():
            print(f"learner: removed the stale build lock {lock} (an interrupted op build)")
        backend = "nccl" if self.device_kind == "cuda" else "gloo"
        deepspeed.init_distributed(dist_backend=backend)
        self.rank = torch.distributed.get_rank()
        self.world = torch.distributed.get_world_size()
        self.device = torch.device("cuda", 0) if self.device_kind == "cuda" else torch.device("cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._load_policy(self._read_model(self.model_dir), new_template=True)
        self.reseed(self.seed)  # after loading, as a learner kept for another trial is (reseed)
        return self.rank

    def _read_model(self, model_dir: str) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        attention = attention_implementation(model_dir)
        lm = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation=attention
        )
        self.hf_config = lm.config
        return lm

    def _load_policy(self, lm: torch.nn.Module, new_template: bool = False) -> None:
        if new_template:  # a plain LM (no DeepSpeed hooks) copied for pi_ref and rebuilds
            self._template = copy.deepcopy(lm)
        self.policy = PolicyModule(lm, self.spec.kernels).to(self.device)
        self.engine: Any = None
        self.ref: PolicyModule | None = None
        self._stage: dict[str, Any] | None = None
        self.adapter: Any = None  # the stage's LoRA adapter (peft model) under `learner.lora`

    @property
    def zero3(self) -> bool:
        return self.spec.engine_zero_stage == 3

    # ----- weights ---------------------------------------------------------------------------
    def gathered_state(
        self, everywhere: bool = False, on_device: bool = False, adapter: bool = False
    ) -> dict[str, torch.Tensor] | None:
        """The full HF state dict on rank 0 (every rank when `everywhere`), on CPU unless
        `on_device`; ZeRO-3 gathers (a collective: every rank must call it). Under LoRA the
        merged weights, or the adapter's own tensors when `adapter`."""
        import deepspeed

        params = list(self.policy.parameters())
        gather = self.zero3 and self.engine is not None
        ctx = (
            deepspeed.zero.GatheredParameters(params, modifier_rank=None)
            if gather
            else nullcontext()
        )
        with ctx:
            if not (everywhere or self.rank == 0):
                return None
            # ZeRO-3's gathered tensors are freed on leaving the context: copy them; else views.
            target = self.device if on_device else torch.device("cpu")
            copy_out = gather or self.device != target
            if self.adapter is None:
                source = self.policy.lm.state_dict()
            else:
                source = (
                    lora.adapter_state(self.adapter)
                    if adapter
                    else lora.merged_state(self.policy.lm)
                )
            state = {
                k: v.detach().to(target, copy=True) if copy_out else v.detach()
                for k, v in source.items()
            }
        if getattr(self.hf_config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        return state

    @dispatch(RANK0)
    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full weights on rank 0 (None on the other ranks, which must still take part)."""
        return self.gathered_state()

    @dispatch(REF0)
    def weights_payload(self) -> bytes | None:
        """Rank 0: the full weights as safetensors bytes (what rollout engines load); a group
        call returns an ObjectRef to them (no copy through the caller)."""
        from safetensors.torch import save

        state = self._served_state()
        return None if state is None else save(state)

    @dispatch(RANK0)
    def write_shared_weights(self, path: str) -> int | None:
        """Rank 0: copy the full weights into the shared-memory file `path` (see weight_sync)."""
        state = self._served_state()
        return None if state is None else write_shared_weights(path, state)

    def _served_state(self) -> dict[str, torch.Tensor] | None:
        """The weights the rollout engines load (rank 0): never a ULD model's (validation
        asks for `generation: hf` there; `sample_combined` samples it)."""
        if self.holds_combined():
            raise RuntimeError("the rollout engines cannot serve a ULD model's combined logits")
        return self.gathered_state()

    @dispatch(RANK0)
    def save(self, out_dir: str) -> str:
        """Write an HF model directory (safetensors, config, tokenizer) from rank 0, atomically;
        under LoRA the merged weights, and the stage's adapter in `adapter/` (peft's format, over
        the weights the stage started from: the parent prefix's model)."""
        from safetensors.torch import save_file

        assisted = self.uld is not None  # a ULD stage: the base's weights plus `assistant/`
        if assisted:
            state, adapter = self._assistant_states()
        else:
            state = self.gathered_state()
            adapter = self.gathered_state(adapter=True) if self.adapter is not None else None
        if state is not None:
            with staged_dir(Path(out_dir), replace=True) as staging:
                if assisted:
                    uld.save_assistant(self.adapter, staging, adapter, self.uld)
                elif adapter is not None:
                    lora.save_adapter(self.adapter, staging / "adapter", adapter)
                save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
                config = copy.deepcopy(self.hf_config)
                config.dtype = self.spec.dtype
                config.save_pretrained(staging)
                self.tokenizer.save_pretrained(staging)
                if (Path(self.model_dir) / "generation_config.json").is_file():
                    shutil.copy(Path(self.model_dir) / "generation_config.json", staging)
        torch.distributed.barrier()
        return str(out_dir)

    @dispatch(ALL)
    def reseed(self, seed: int) -> None:
        """The random state a new learner of `seed` starts with (a learner kept for another trial)."""
        self.seed = seed
        torch.manual_seed(seed)

    @dispatch(ALL)
    def load(self, model_dir: str | Path) -> None:
        """Start over from `model_dir`: new weights, no optimizer state, no engine until next stage."""
        self._drop_engine()
        self.model_dir = str(model_dir)
        self._load_policy(self._read_model(self.model_dir), new_template=True)
        self._forget_assistant()
        if uld.is_uld_checkpoint(self.model_dir):
            self._load_combined(self.model_dir)

    # ----- stages ----------------------------------------------------------------------------
    def _drop_engine(self) -> None:
        if self.engine is not None and hasattr(self.engine, "destroy"):
            self.engine.destroy()
        self.engine = None

    def _fresh_lm(self, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        lm = copy.deepcopy(self._template)
        lm.load_state_dict(state, strict=False)
        return lm

    def _snapshot(self) -> PolicyModule:
        """A plain (non-DeepSpeed) copy of the current policy with full weights, frozen."""
        lm = self._fresh_lm(self.gathered_state(everywhere=True))
        module = PolicyModule(lm, self.spec.kernels).to(self.device).eval()
        for p in module.parameters():
            p.requires_grad_(False)
        return module

    @dispatch(RANK0)
    def begin_stage(
        self, stage: StageSpec, objective: ObjectiveParams, total_steps: int
    ) -> dict[str, Any]:
        """New optimizer (if `reset_optimizer_per_stage`), new LR schedule, pi_ref when needed;
        under `learner.lora` a new adapter over the merged weights (actors/lora.py).
        `objective`: the stage's objective with its parameters, typed by the caller."""
        import deepspeed

        entry, params = OBJECTIVES[objective.objective], objective

        def multiplier(step: int) -> float:
            return lr_multiplier(step, total_steps, stage.schedule, stage.warmup_steps)

        if self.uld is not None or self.combined is not None:
            raise RuntimeError("a ULD model is evaluated, not trained further")  # validated
        states = entry.states(params)
        # a stage that trains some layers only, or follows one, starts a new engine; so does
        # ULD's, which trains an assistant (actors/learner_assistant.py)
        partial = states is not None or (self._stage or {}).get("states") is not None
        assisted = entry.assistant is not None
        if self.engine is None or self.spec.reset_optimizer_per_stage or partial or assisted:
            base = self.model_dir if self.engine is None else None  # the weights' directory
            if assisted:
                self._to_assistant(stage, params)
            elif self.engine is not None:
                state = self.gathered_state(everywhere=True)
                self._drop_engine()
                self._load_policy(self._fresh_lm(state))
            if self.spec.lora is not None and not assisted:
                seed = lora.adapter_seed(self.seed, stage)
                self.adapter = lora.attach_adapter(self.policy.lm, self.spec.lora, seed, base)
            if states is not None and states.trainable is not None:
                train_only(self.policy, states.trainable)
            self.engine, *_ = deepspeed.initialize(
                model=self.policy,
                model_parameters=[p for p in self.policy.parameters() if p.requires_grad],
                config=deepspeed_config(stage, self.spec, self.world),
                lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, multiplier),
            )
            # one rank: its gradients are already the sum (DeepSpeed would flatten and copy them)
            self.engine.enable_backward_allreduce = self.world > 1
        else:
            opt = self.engine.basic_optimizer
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] = stage.lr
                group["weight_decay"] = stage.weight_decay
            self.engine.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(opt, multiplier)
            self.engine._config.gradient_clipping = float(stage.grad_clip or 0.0)
        self.ref = self._snapshot() if entry.needs_reference(params) else None
        loss = dataclasses.asdict(params.loss)  # the loss's keyword arguments
        statistic = entry.statistic(params)
        self._stage = {
            "entry": entry,
            "params": params,
            "loss": loss,
            "statistic": statistic,
            "states": states,
            "direction": None
            if states is None
            else steering_direction(self.seed, stage, self.hf_config.hidden_size, self.device),
            "ref_logprobs": self.ref is not None and not statistic and not states,
            "state": {} if entry.stateful else None,
            "mask": None,  # a weight mask's GradientMask, set by train_stage
            "step": 0,
        }
        return {"objective": objective.objective, **params.flat()}

    def _update(
        self,
        encoded: list,
        retain: list,
        local_n: int,
        global_n: int,
        extra: dict,
        chosen: list | None = None,
        gap_to: torch.Tensor | None = None,
    ) -> dict:
        """One optimizer step on this rank's share: one forward over the forget rows, their
        chosen answers (preference objectives) and the retain rows; loss; step."""
        entry, loss_params = self._stage["entry"], self._stage["loss"]
        stat: VocabStat | None = self._stage["statistic"]
        paired = chosen is not None
        chosen = chosen if encoded and paired else []  # an empty share's dummy row: both
        batch = self._batch(encoded + chosen + retain)
        split = len(encoded) or 1  # an empty share runs the one-row dummy batch of `_batch`
        pairs = slice(split, split + len(chosen)) if chosen else slice(0, split)
        start = time.perf_counter()
        peak = PeakMemory(self.device).start()
        self.engine.train()
        states: LayerStates | None = self._stage["states"]
        mask = batch.mask.to(self.device)
        rest = split + len(chosen)  # where the retain rows start
        head = (
            None
            if stat is None
            else head_statistic(stat, batch, split, rest, self.ref, self.device)
        )
        out = self._forward(
            self.engine, batch, statistic=head, layer=None if states is None else states.layer
        )
        out, layer_out = out if states is not None else (out, None)
        logprobs, values = out if head is not None else (out, None)
        inputs = LossInputs(logprobs=logprobs[:split], mask=mask[:split], **extra)
        if head is not None:
            rows = slice(rest, None) if stat.rows == "retain" else slice(0, split)
            inputs.vocab_stat, inputs.vocab_stat_mask = values[rows], head.mask[rows]
        if paired:
            inputs.chosen_logprobs, inputs.chosen_mask = logprobs[pairs], mask[pairs]
        if retain:
            inputs.retain_logprobs, inputs.retain_mask = logprobs[rest:], mask[rest:]
        if states is not None:
            inputs.states, inputs.direction = layer_out[:split], self._stage["direction"]
            if retain:
                inputs.retain_states = layer_out[rest:]
                with torch.no_grad():
                    inputs.ref_retain_states = self.ref.layer_states(
                        batch.input_ids[rest:].to(self.device),
                        batch.attention_mask[rest:].to(self.device),
                        states.layer,
                    )
        if self._stage["ref_logprobs"] and inputs.ref_logprobs is None:  # forget, chosen rows
            ref_batch = self._batch(encoded + chosen) if retain else batch
            with torch.no_grad():
                ref = self._forward(self.ref, ref_batch)
            ref = torch.nn.functional.pad(ref, (0, logprobs.shape[1] - ref.shape[1]))
            inputs.ref_logprobs = ref[:split]
            if paired:
                inputs.chosen_ref_logprobs = ref[pairs]
        if self._stage["state"] is not None:
            inputs.state, inputs.mean_over_ranks = self._stage["state"], mean_over_ranks
        weight = local_n * self.world / max(global_n, 1)
        loss = entry.fn(inputs, **loss_params) * weight
        lr = self.engine.lr_scheduler.get_last_lr()[0]
        self.engine.backward(loss)
        if self._stage["mask"] is not None:
            self._stage["mask"].apply()  # ZeRO-3: on the gradient partitions
        own_norm = None
        if self.spec.engine_zero_stage == 0:  # DeepSpeed reports no norm without a ZeRO optimizer
            grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
            own_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        self.engine.step()
        self.combined = None  # a ULD model read during the stage is rebuilt on the new weights
        peak_mib = peak.stop()
        elapsed = time.perf_counter() - start
        # sum and count of |log pi_theta - log pi_old| over answer tokens (or, on policy, minus
        # the engine's log-probs of the same weights: `gap_to`)
        gap, gap_to = torch.zeros(2), inputs.old_logprobs if gap_to is None else gap_to
        if gap_to is not None and local_n:
            weights = inputs.mask.float()
            diff = (inputs.logprobs.detach() - gap_to).abs().float()
            gap = torch.stack([(diff * weights).sum(), weights.sum()]).cpu()
        totals = torch.tensor(
            [
                float(loss.detach()) / self.world,
                float(batch.attention_mask.sum()) if local_n else 0.0,
                *gap.tolist(),
            ]
        )
        torch.distributed.all_reduce(totals)
        grad_norm = own_norm if own_norm is not None else self.engine.get_global_grad_norm()
        self._stage["step"] += 1
        gap_mean = float(totals[2] / totals[3].clamp(min=1))
        return {
            **({"old_logprob_gap": gap_mean} if gap_to is not None else {}),
            "loss": float(totals[0]),
            "lr": float(lr),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens_per_s": float(totals[1]) / elapsed,
            "step_time_s": elapsed,
            "peak_mem_mib": peak_mib,
            **{f"state/{k}": float(v) for k, v in (self._stage["state"] or {}).items()},
        }

    @dispatch(RANK0)
    def train_stage(
        self,
        stage: StageSpec,
        objective: ObjectiveParams,
        rows: list[dict],
        retain_rows: list[dict] | None = None,
        seed: int = 0,
        probe: list[dict] | None = None,
    ) -> list[dict[str, float]]:
        """Run the stage's `objective` (typed by the caller) over `rows` (steps or epochs);
        per-step metrics, in order.

        `probe`: answer items whose summed log-probs are read before the first step
        (`probe_start` in step 0's metrics) and after every step (`probe`), lists the caller
        reduces (the probability mass of platform/engine/evaluation.py)."""
        # internal errors: `stageflow validate` refused these stages before any work
        if not rows:
            raise RuntimeError("train_stage got no rows")
        if stage.batch_size < self.world:
            raise RuntimeError(f"batch_size {stage.batch_size} < learner.ranks {self.world}")
        isolated = self._isolate(objective, rows)
        if isolated is not None:
            rows = [rows[i] for i in isolated["rows"]]
        steps = stage_steps(stage.steps, stage.epochs, stage.batch_size, len(rows))
        self.begin_stage(stage, objective, steps)
        entry, params = self._stage["entry"], self._stage["params"]
        use_retain = entry.uses_retain(params)
        if use_retain and not retain_rows:
            raise RuntimeError(f"objective '{entry.name}' weights a retain set; the stage has none")
        encoded = self._encode(rows, stage.max_len)
        retain_enc = self._encode(retain_rows, stage.max_len) if use_retain else []
        source = entry.alternatives(params)  # a preference objective's chosen answers
        chosen_enc = (
            self._encode(chosen_rows(rows, source, seed), stage.max_len) if source else None
        )
        plan = batch_indices(len(rows), stage.batch_size, steps, seed)
        retain_plan = (
            batch_indices(len(retain_enc), stage.batch_size, steps, seed + 1)
            if use_retain
            else None
        )
        metrics = []
        start = self._answer_values(probe, lambda s: s.logprob) if probe else None
        mask = self._weight_mask(stage, encoded, retain_rows) if stage.mask else None
        self._stage["mask"] = mask
        try:
            for step, idx in enumerate(plan):
                mine = idx[self.rank :: self.world]
                retain = (
                    [retain_enc[i] for i in retain_plan[step][self.rank :: self.world]]
                    if use_retain
                    else []
                )
                chosen = None if chosen_enc is None else [chosen_enc[i] for i in mine]
                metrics.append(
                    self._update(
                        [encoded[i] for i in mine], retain, len(mine), len(idx), {}, chosen
                    )
                )
                if probe:
                    metrics[-1]["probe"] = self._answer_values(probe, lambda s: s.logprob)
        finally:
            if mask is not None:
                mask.remove()
        if start is not None:
            metrics[0]["probe_start"] = start
        if mask is not None:
            metrics[0]["mask/fraction"] = mask.fraction
        if isolated is not None:  # the caller keeps the selection beside the stage's metrics
            metrics[0]["isolated"] = isolated
        return metrics

    def _isolate(self, objective: ObjectiveParams, rows: list[dict]) -> dict[str, list] | None:
        """ABL's isolation pass, for an objective that declares one: the indices of the
        lowest-loss fraction of `rows` (mean NLL per answer token under the current weights,
        ties by index) and their losses; None otherwise."""
        fraction = OBJECTIVES[objective.objective].isolated_share(objective)
        if fraction is None:
            return None
        losses = self._answer_values(rows, lambda s: -s.mean_logprob)
        n = max(1, math.ceil(fraction * len(rows)))
        chosen = sorted(range(len(rows)), key=lambda i: (losses[i], i))[:n]
        return {"rows": chosen, "losses": [losses[i] for i in chosen]}

    @dispatch(SPLIT_RANK0)
    def step(self, samples: list[Completion], global_count: int) -> dict[str, float]:
        """RL hook: one optimizer step on this rank's samples, with the objective of `begin_stage`
        (per-sequence advantages, or per-token ones when the samples carry them)."""
        if self._stage is None:
            raise RuntimeError("call begin_stage before step")
        encoded = self._encode(samples)
        batch = self._batch(encoded)
        extra: dict[str, torch.Tensor] = {}
        gap_to: torch.Tensor | None = None
        if samples:
            if samples[0].token_advantages is not None:
                extra["advantages"] = place_completion_values(
                    [s.token_advantages for s in samples], batch
                )
            else:
                extra["advantages"] = torch.tensor([float(s.advantage) for s in samples])
            if samples[0].old_logprobs is not None:
                extra["old_logprobs"] = place_completion_values(
                    [s.old_logprobs for s in samples], batch
                )
            if samples[0].ref_logprobs is not None:
                extra["ref_logprobs"] = place_completion_values(
                    [s.ref_logprobs for s in samples], batch
                )
            if samples[0].sampled_logprobs is not None:
                gap_to = place_completion_values([s.sampled_logprobs for s in samples], batch)
        else:
            extra["advantages"] = torch.zeros(1)
        extra = {k: v.to(self.device) for k, v in extra.items()}
        gap_to = None if gap_to is None else gap_to.to(self.device)
        return self._update(encoded, [], len(samples), global_count, extra, gap_to=gap_to)
