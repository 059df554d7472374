"""The study schema: OmegaConf structured configs over frozen dataclasses.

A study YAML is merged onto these dataclasses, so a key that is not declared here or a
value of the wrong type is an error, never a silent default. Dotlist overrides
(`stages.math.lr=1e-4 seeds=[0,1]`) are applied the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from stageflow.platform.models import TinyModelSpec


@dataclass(frozen=True)
class ModelSpec:
    """`path`: a local HF causal-LM directory; when unset the tiny default is built from `tiny`."""

    path: Optional[str] = None
    tiny: TinyModelSpec = field(default_factory=TinyModelSpec)
    dtype: str = "float32"


@dataclass(frozen=True)
class DataSpec:
    """Where a stage's examples come from: a synthetic `task` or a user's JSONL `file`."""

    task: Optional[str] = None
    file: Optional[str] = None
    split: str = "train"
    size: int = 200
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RewardSpec:
    name: str = MISSING
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StageSpec:
    """One stage of a path. `objective` defaults per kind (sft → sft, grpo → grpo)."""

    kind: str = MISSING
    data: DataSpec = field(default_factory=DataSpec)
    objective: Optional[str] = None
    steps: Optional[int] = None
    epochs: Optional[float] = None
    lr: float = 1e-3
    batch_size: int = 8
    max_len: int = 192
    schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)
    rewards: list[RewardSpec] = field(default_factory=list)
    retain: Optional[DataSpec] = None
    sets: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class InsertSpec:
    """Insert `stage` at each of `positions` (1-based) into the fixed sequence `into`."""

    stage: str = MISSING
    into: list[str] = MISSING
    positions: Optional[list[int]] = None


@dataclass(frozen=True)
class OrderingSpec:
    """Exactly one of: all permutations of a list, one insertion sweep, explicit paths 'a>b>c'."""

    permutations: Optional[list[str]] = None
    insert: Optional[InsertSpec] = None
    explicit: Optional[list[str]] = None


@dataclass(frozen=True)
class EvalSetSpec:
    """An evaluation set and the registered metrics computed on it."""

    data: DataSpec = field(default_factory=DataSpec)
    metrics: list[str] = MISSING
    samples: int = 1
    max_examples: Optional[int] = 64
    max_new_tokens: int = 32
    temperature: float = 1.0


@dataclass(frozen=True)
class EvaluationSpec:
    after_every_stage: bool = True
    sets: dict[str, EvalSetSpec] = field(default_factory=dict)


@dataclass(frozen=True)
class LearnerSpec:
    ranks: int = 1
    zero_stage: int = 1
    dtype: str = "float32"
    kernels: str = "fused"
    reset_optimizer_per_stage: bool = True


@dataclass(frozen=True)
class RolloutSpec:
    """`backend: hf` (transformers generate) is an explicit, recorded choice, never a fallback."""

    backend: str = "vllm"
    workers: int = 1
    dtype: str = "float32"
    max_model_len: int = 512
    kv_cache_gib: float = 0.5
    gpu_memory_utilization: float = 0.25


@dataclass(frozen=True)
class ResourcesSpec:
    device: str = "auto"
    cpus_per_actor: float = 1.0
    max_concurrent_trials: Optional[int] = None


@dataclass(frozen=True)
class TrackingSpec:
    uri: Optional[str] = None
    experiment: Optional[str] = None


@dataclass(frozen=True)
class AnalysisSpec:
    """How unlearning outcomes are scored across orderings (REFERENCES.md).

    `forget_score`: a "<set>/<metric>" log-likelihood whose drop under unlearning is the
    forget score; `utilities`: name → "<set>/<metric>" (an accuracy gives Δ accuracy, a
    log-likelihood gives 1 − |Δ|); `forget_quality`: an eval set whose per-example truth
    ratios are compared with the oracle's by a two-sample KS test (its p-value).
    """

    forget_score: Optional[str] = None
    utilities: dict[str, str] = field(default_factory=dict)
    forget_quality: Optional[str] = None


@dataclass(frozen=True)
class StudySpec:
    """A whole study: what trains in which orders, how it is evaluated, where it runs."""

    name: str = MISSING
    storage_dir: Optional[str] = None
    model: ModelSpec = field(default_factory=ModelSpec)
    stages: dict[str, StageSpec] = field(default_factory=dict)
    orderings: OrderingSpec = field(default_factory=OrderingSpec)
    unlearning: list[str] = field(default_factory=list)
    oracle: bool = False
    grid: dict[str, list[Any]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    learner: LearnerSpec = field(default_factory=LearnerSpec)
    rollout: RolloutSpec = field(default_factory=RolloutSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    analysis: AnalysisSpec = field(default_factory=AnalysisSpec)
