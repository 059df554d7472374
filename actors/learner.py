"""Learners: one DeepSpeed engine per rank (ZeRO 0-3, data parallel), as Ray actors in one group.

`LearnerGroup` starts `ranks` `LearnerWorker` actors through `ActorGroup` (torch.distributed over
gloo on CPU, nccl on GPU) and exposes what the trial pipeline needs: `train_stage` (supervised
or unlearning objectives over a stage's rows), `begin_stage` + `step` (the RL hook), `logprobs`,
`state_dict` / `weights_payload` (gathered on rank 0, ZeRO-3 included), `save` (an HF model
directory vLLM and transformers load) and `load`. Optimizer and LR schedule are re-created at
every stage unless `reset_optimizer_per_stage` is false. The LM head runs the fused per-token
log-prob kernel (`kernels: fused|naive`), so the N x V logits are never materialised.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import torch

from stageflow.actors import objectives
from stageflow.actors.batching import (
    TokenBatch,
    batch_indices,
    collate,
    completion_values,
    encode_item,
    lr_multiplier,
    place_completion_values,
    stage_steps,
    stage_value,
)
from stageflow.actors.group import ActorGroup, ActorSetupError, check_fits, first
from stageflow.actors.policy import PolicyModule
from stageflow.kernels.peak_memory import PeakMemory
from stageflow.platform.models import check_model_dir

LOGPROB_MICRO_BATCH = 32


@dataclass(frozen=True)
class LearnerOptions:
    """The LearnerSpec fields a rank needs (ranks, ZeRO stage, dtype, kernels, optimizer reset)."""

    ranks: int = 1
    zero_stage: int = 1
    dtype: str = "float32"
    kernels: str = "fused"
    reset_optimizer_per_stage: bool = True

    @classmethod
    def from_spec(cls, spec: Any = None, **overrides: Any) -> LearnerOptions:
        values = asdict(spec) if is_dataclass(spec) else dict(spec or {})
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in {**values, **overrides}.items() if k in names})


def check_learner(model_dir: str | Path, options: LearnerOptions, cpus_per_actor: float) -> None:
    """Raise ActorSetupError (one sentence) for a learner that could not start."""
    why = check_model_dir(model_dir)
    if why:
        raise ActorSetupError(f"model directory '{model_dir}': expected {why}")
    if options.zero_stage not in (0, 1, 2, 3):
        raise ActorSetupError(
            f"learner.zero_stage: ZeRO stage {options.zero_stage} is out of range; expected 0, 1, 2 or 3"
        )
    if options.dtype not in ("float32", "bfloat16"):
        raise ActorSetupError(f"learner.dtype: expected float32 or bfloat16, got '{options.dtype}'")
    if options.kernels not in ("fused", "naive"):
        raise ActorSetupError(f"learner.kernels: expected fused or naive, got '{options.kernels}'")
    check_fits("learner.ranks", options.ranks, cpus_per_actor)


STALE_BUILD_LOCK_S = 600.0  # DeepSpeed's CPU op builds in about a minute; an older lock is orphaned


def release_stale_build_locks(max_age_s: float = STALE_BUILD_LOCK_S) -> list[Path]:
    """Remove torch-extension build locks older than `max_age_s`, and return them.

    A build killed midway leaves its `lock` file behind; every later build of the same op
    (DeepSpeed's CPU comm op, at a learner's first start) would then wait on it forever.
    """
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    removed = []
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
        try:
            if time.time() - lock.stat().st_mtime > max_age_s:
                lock.unlink()
                removed.append(lock)
        except FileNotFoundError:  # its build finished meanwhile
            pass
    return removed


class LearnerWorker:
    """One data-parallel rank: a DeepSpeed engine over the policy, plus a frozen pi_ref when needed."""

    def __init__(self, model_dir: str, options: LearnerOptions, device: str = "cpu", seed: int = 0):
        self.model_dir, self.options, self.seed = str(model_dir), options, seed
        self.device_kind = device
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    # ----- set-up ----------------------------------------------------------------------------
    def setup(self) -> int:
        """Join the process group (after the group set MASTER_ADDR etc.) and load the model."""
        import deepspeed
        from transformers import AutoTokenizer

        for lock in release_stale_build_locks():
            print(f"learner: removed the stale build lock {lock} (an interrupted op build)")
        backend = "nccl" if self.device_kind == "cuda" else "gloo"
        deepspeed.init_distributed(dist_backend=backend)
        self.rank = torch.distributed.get_rank()
        self.world = torch.distributed.get_world_size()
        self.device = torch.device("cuda", 0) if self.device_kind == "cuda" else torch.device("cpu")
        torch.manual_seed(self.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._load_policy(self._read_model(self.model_dir), new_template=True)
        return self.rank

    def _read_model(self, model_dir: str) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.hf_config = lm.config
        return lm

    def _load_policy(self, lm: torch.nn.Module, new_template: bool = False) -> None:
        if new_template:  # a plain LM (no DeepSpeed hooks) copied for pi_ref and rebuilds
            self._template = copy.deepcopy(lm)
        self.policy = PolicyModule(lm, self.options.kernels).to(self.device)
        self.engine: Any = None
        self.ref: PolicyModule | None = None
        self._stage: dict[str, Any] | None = None

    @property
    def zero3(self) -> bool:
        return self.options.zero_stage == 3

    # ----- weights ---------------------------------------------------------------------------
    def _gathered_state(
        self, everywhere: bool = False, on_device: bool = False
    ) -> dict[str, torch.Tensor] | None:
        """The full HF state dict on rank 0 (every rank when `everywhere`), on CPU unless
        `on_device`; ZeRO-3 gathers (a collective: every rank must call it)."""
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
            state = {
                k: v.detach().to(target, copy=True) if copy_out else v.detach()
                for k, v in self.policy.lm.state_dict().items()
            }
        if getattr(self.hf_config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        return state

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full weights on rank 0 (None on the other ranks, which must still take part)."""
        return self._gathered_state()

    def weights_payload(self) -> bytes | None:
        """Rank 0: the full weights as safetensors bytes (what rollout workers load)."""
        from safetensors.torch import save

        state = self._gathered_state()
        return None if state is None else save(state)

    def write_shared_weights(self, path: str) -> int | None:
        """Rank 0: copy the full weights into the shared-memory file `path` (see weight_sync)."""
        from stageflow.actors.weight_sync import write_shared_weights

        state = self._gathered_state()
        return None if state is None else write_shared_weights(path, state)

    def save(self, out_dir: str) -> str:
        """Write an HF model directory (safetensors, config, tokenizer) from rank 0, atomically."""
        from safetensors.torch import save_file

        state = self._gathered_state()
        out = Path(out_dir)
        if state is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=out.parent))
            save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
            config = copy.deepcopy(self.hf_config)
            config.dtype = self.options.dtype
            config.save_pretrained(staging)
            self.tokenizer.save_pretrained(staging)
            if (Path(self.model_dir) / "generation_config.json").is_file():
                shutil.copy(Path(self.model_dir) / "generation_config.json", staging)
            if out.exists():
                shutil.rmtree(out)
            os.replace(staging, out)
        torch.distributed.barrier()
        return str(out)

    def load(self, model_dir: str) -> None:
        """Start over from `model_dir`: new weights, no optimizer state, no engine until next stage."""
        self._drop_engine()
        self.model_dir = str(model_dir)
        self._load_policy(self._read_model(self.model_dir), new_template=True)

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
        lm = self._fresh_lm(self._gathered_state(everywhere=True))
        module = PolicyModule(lm, self.options.kernels).to(self.device).eval()
        for p in module.parameters():
            p.requires_grad_(False)
        return module

    def begin_stage(self, stage: Any, total_steps: int) -> dict[str, Any]:
        """New optimizer (if `reset_optimizer_per_stage`), new LR schedule, pi_ref when needed."""
        import deepspeed

        name = objectives.objective_of(stage)
        if name is None:
            raise ValueError(f"a {stage_value(stage, 'kind')} stage needs an objective")
        entry, params = objectives.resolve(name, dict(stage_value(stage, "params") or {}))
        lr = float(stage_value(stage, "lr", 1e-3))
        schedule, warmup = (
            stage_value(stage, "schedule", "constant"),
            int(stage_value(stage, "warmup_steps", 0)),
        )

        def multiplier(step: int) -> float:
            return lr_multiplier(step, total_steps, schedule, warmup)

        if self.engine is None or self.options.reset_optimizer_per_stage:
            if self.engine is not None:
                state = self._gathered_state(everywhere=True)
                self._drop_engine()
                self._load_policy(self._fresh_lm(state))
            config = {
                "train_micro_batch_size_per_gpu": 1,
                "gradient_accumulation_steps": 1,
                "train_batch_size": self.world,
                "gradient_clipping": float(stage_value(stage, "grad_clip", 1.0) or 0.0),
                "zero_optimization": {"stage": self.options.zero_stage},
                "bf16": {"enabled": self.options.dtype == "bfloat16"},
                "optimizer": {
                    "type": "AdamW",
                    "params": {
                        "lr": lr,
                        "weight_decay": float(stage_value(stage, "weight_decay", 0.0)),
                        "torch_adam": True,
                    },
                },
                "steps_per_print": 1 << 30,
            }
            self.engine, *_ = deepspeed.initialize(
                model=self.policy,
                model_parameters=[p for p in self.policy.parameters() if p.requires_grad],
                config=config,
                lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, multiplier),
            )
        else:
            opt = self.engine.basic_optimizer
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] = lr
                group["weight_decay"] = float(stage_value(stage, "weight_decay", 0.0))
            self.engine.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(opt, multiplier)
            self.engine._config.gradient_clipping = float(
                stage_value(stage, "grad_clip", 1.0) or 0.0
            )
        self.ref = self._snapshot() if objectives.needs_ref(entry, params) else None
        self._stage = {"entry": entry, "params": params, "step": 0}
        return {"objective": name, **params}

    def _encode(self, items: list[dict], max_len: int = 1 << 30) -> list[tuple[list[int], int]]:
        return [encode_item(self.tokenizer, it, max_len) for it in items]

    def _batch(self, encoded: list[tuple[list[int], int]]) -> TokenBatch:
        if not encoded:  # a rank with no rows still runs one forward (ZeRO-3 collectives); weight 0
            encoded = [([self.tokenizer.bos_token_id or 0, self.tokenizer.eos_token_id or 0], 1)]
        return collate([e[0] for e in encoded], [e[1] for e in encoded], self.pad_id)

    def _forward(self, module: Any, batch: TokenBatch, temperature: float = 1.0) -> torch.Tensor:
        return module(
            batch.input_ids.to(self.device),
            batch.attention_mask.to(self.device),
            batch.mask.to(self.device),
            temperature,
        )

    def _update(
        self, encoded: list, retain: list, local_n: int, global_n: int, extra: dict
    ) -> dict:
        """One optimizer step on this rank's share: forward (forget + retain together), loss, step."""
        entry, params = self._stage["entry"], self._stage["params"]
        batch = self._batch(encoded + retain)
        split = len(encoded) or 1  # an empty share runs the one-row dummy batch of `_batch`
        start = time.perf_counter()
        peak = PeakMemory(self.device).start()
        self.engine.train()
        logprobs = self._forward(self.engine, batch)
        mask = batch.mask.to(self.device)
        inputs = objectives.LossInputs(logprobs=logprobs[:split], mask=mask[:split], **extra)
        if retain:
            inputs.retain_logprobs, inputs.retain_mask = logprobs[split:], mask[split:]
        if self.ref is not None and inputs.ref_logprobs is None:  # pi_ref: the forget rows only
            ref_batch = self._batch(encoded) if retain else batch
            with torch.no_grad():
                ref = self._forward(self.ref, ref_batch)
            inputs.ref_logprobs = torch.nn.functional.pad(
                ref, (0, logprobs.shape[1] - ref.shape[1])
            )
        weight = local_n * self.world / max(global_n, 1)
        loss = entry.fn(inputs, **params) * weight
        lr = self.engine.lr_scheduler.get_last_lr()[0]
        self.engine.backward(loss)
        own_norm = None
        if self.options.zero_stage == 0:  # DeepSpeed reports no norm without a ZeRO optimizer
            grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
            own_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        self.engine.step()
        peak_mib = peak.stop()
        elapsed = time.perf_counter() - start
        totals = torch.tensor(
            [
                float(loss.detach()) / self.world,
                float(batch.attention_mask.sum()) if local_n else 0.0,
            ]
        )
        torch.distributed.all_reduce(totals)
        grad_norm = own_norm if own_norm is not None else self.engine.get_global_grad_norm()
        self._stage["step"] += 1
        return {
            "loss": float(totals[0]),
            "lr": float(lr),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens_per_s": float(totals[1]) / elapsed,
            "step_time_s": elapsed,
            "peak_mem_mib": peak_mib,
        }

    def train_stage(
        self, stage: Any, rows: list[dict], retain_rows: list[dict] | None = None, seed: int = 0
    ) -> list[dict[str, float]]:
        """Run the stage's objective over `rows` (steps or epochs); per-step metrics, in order."""
        batch_size = int(stage_value(stage, "batch_size", 8))
        max_len = int(stage_value(stage, "max_len", 192))
        if not rows:
            raise ValueError("train_stage got no rows")
        if batch_size < self.world:
            raise ValueError(f"batch_size {batch_size} is smaller than learner.ranks {self.world}")
        steps = stage_steps(stage, len(rows))
        self.begin_stage(stage, steps)
        entry, params = self._stage["entry"], self._stage["params"]
        use_retain = objectives.uses_retain(entry, params)
        if use_retain and not retain_rows:
            raise ValueError(
                f"objective '{entry.name}' weights a retain set but the stage has none"
            )
        encoded = self._encode(rows, max_len)
        retain_enc = self._encode(retain_rows, max_len) if use_retain else []
        plan = batch_indices(len(rows), batch_size, steps, seed)
        retain_plan = (
            batch_indices(len(retain_enc), batch_size, steps, seed + 1) if use_retain else None
        )
        metrics = []
        for step, idx in enumerate(plan):
            mine = idx[self.rank :: self.world]
            retain = (
                [retain_enc[i] for i in retain_plan[step][self.rank :: self.world]]
                if use_retain
                else []
            )
            metrics.append(
                self._update([encoded[i] for i in mine], retain, len(mine), len(idx), extra={})
            )
        return metrics

    def step(self, samples: list[dict], global_count: int) -> dict[str, float]:
        """RL hook: one optimizer step on this rank's samples, with the objective of `begin_stage`.

        A sample: `prompt_token_ids`, `completion_token_ids`, `advantage` (float) or `advantages`
        (per completion token), optional `old_logprobs` / `ref_logprobs` (per completion token).
        """
        if self._stage is None:
            raise RuntimeError("call begin_stage before step")
        encoded = self._encode(samples)
        batch = self._batch(encoded)
        extra: dict[str, torch.Tensor] = {}
        if samples:
            if "advantages" in samples[0]:
                extra["advantages"] = place_completion_values(
                    [s["advantages"] for s in samples], batch
                )
            else:
                extra["advantages"] = torch.tensor(
                    [float(s.get("advantage", 0.0)) for s in samples]
                )
            for key in ("old_logprobs", "ref_logprobs"):
                if samples[0].get(key) is not None:
                    extra[key] = place_completion_values([s[key] for s in samples], batch)
        else:
            extra["advantages"] = torch.zeros(1)
        extra = {k: v.to(self.device) for k, v in extra.items()}
        return self._update(encoded, [], len(samples), global_count, extra)

    def logprobs(
        self, items: list[dict], temperature: float = 1.0, reference: bool = False
    ) -> list[list[float]]:
        """Per-token log-probs of each item's answer (`prompt`/`answer`) or completion (token ids);
        under pi_ref (taken by `begin_stage`) when `reference`."""
        encoded = self._encode(items)
        module = self.engine if self.engine is not None else self.policy
        if reference:
            if self.ref is None:
                raise RuntimeError("no pi_ref: the stage's objective does not need one")
            module = self.ref
        chunks = [
            encoded[i : i + LOGPROB_MICRO_BATCH]
            for i in range(0, len(encoded), LOGPROB_MICRO_BATCH)
        ]
        n_calls = len(chunks)
        if self.zero3 and self.engine is not None:  # ranks must run equally many forwards
            count = torch.tensor([n_calls])
            torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
            n_calls = int(count)
        out: list[list[float]] = []
        module.eval()
        with torch.no_grad():
            for i in range(n_calls):
                chunk = chunks[i] if i < len(chunks) else []
                batch = self._batch(chunk)
                values = completion_values(self._forward(module, batch, temperature).cpu(), batch)
                out += values[: len(chunk)]
        return out


class LearnerGroup:
    """`ranks` learner actors training one model together (DeepSpeed data parallel)."""

    def __init__(
        self,
        model_dir: str | Path,
        spec: Any = None,
        *,
        device: str = "auto",
        cpus_per_actor: float = 1.0,
        seed: int = 0,
        **overrides: Any,
    ):
        from stageflow.actors.rollout import resolve_device

        self.options = LearnerOptions.from_spec(spec, **overrides)
        self.device = resolve_device(device)
        check_learner(model_dir, self.options, cpus_per_actor)
        self.group = ActorGroup(
            LearnerWorker,
            self.options.ranks,
            args=(str(model_dir), self.options, self.device, seed),
            num_cpus=cpus_per_actor,
            num_gpus=1.0 if self.device == "cuda" else 0.0,
            distributed=True,
            name="learner",
        )
        try:
            self.group.call("setup")
        except Exception:
            self.group.shutdown()
            raise

    def train_stage(
        self, stage: Any, rows: list[dict], retain_rows: list[dict] | None = None, seed: int = 0
    ) -> list[dict[str, float]]:
        """Train one stage on every rank (rows shared through the object store); rank 0's metrics."""
        import ray

        rows_ref = ray.put(list(rows))
        retain_ref = ray.put(list(retain_rows)) if retain_rows else None
        return self.group.call("train_stage", stage, rows_ref, retain_ref, seed)[0]

    def begin_stage(self, stage: Any, total_steps: int) -> dict[str, Any]:
        """Start an RL stage: optimizer/schedule (re)created, pi_ref taken when the objective needs it."""
        return self.group.call("begin_stage", stage, total_steps)[0]

    def step(self, samples: list[dict]) -> dict[str, float]:
        """One RL optimizer step over `samples`, split across ranks; rank 0's metrics."""
        return self.group.call_split("step", list(samples), len(samples), combine=first)

    def logprobs(
        self, items: list[dict], temperature: float = 1.0, reference: bool = False
    ) -> list[list[float]]:
        """Per-token log-probs of answers / completions (under pi_ref when `reference`), items
        split across ranks."""
        return self.group.call_split("logprobs", list(items), temperature, reference)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.group.call("state_dict")[0]

    def weights_payload_ref(self) -> Any:
        """ObjectRef to rank 0's safetensors payload (no copy through the driver)."""
        import ray

        refs = self.group.call_async("weights_payload")
        ray.wait(refs, num_returns=len(refs))
        return refs[0]

    def save(self, out_dir: str | Path) -> Path:
        return Path(self.group.call("save", str(out_dir))[0])

    def load(self, model_dir: str | Path) -> None:
        self.group.call("load", str(model_dir))

    def shutdown(self) -> None:
        self.group.shutdown()
