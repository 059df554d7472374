"""DeepSpeed pieces a learner rank sets itself up with: each stage's engine config, and a guard
against the lock an interrupted op build leaves behind."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from stageflow.core.config import LearnerSpec, StageSpec

# lazy: torch loads in the learner's process, not where its config is written

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


def deepspeed_config(stage: StageSpec, spec: LearnerSpec, world: int) -> dict[str, Any]:
    """The DeepSpeed config of one stage: AdamW (torch), ZeRO stage, gradient clipping."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world,
        "gradient_clipping": float(stage.grad_clip or 0.0),
        "zero_optimization": {"stage": spec.engine_zero_stage},
        "bf16": {"enabled": spec.dtype == "bfloat16"},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": stage.lr, "weight_decay": stage.weight_decay, "torch_adam": True},
        },
        "steps_per_print": 1 << 30,
    }
