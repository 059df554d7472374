"""The study schema: OmegaConf structured configs over frozen dataclasses, checked by themselves.

A study YAML is merged onto these dataclasses, so a key that is not declared here, a value of
the wrong type or a value outside a `Literal` is an error, never a silent default. Dotlist
overrides (`stages.math.lr=1e-4 seeds=[0,1]`) are applied the same way. The same frozen objects
travel to the actors; each spec states its own invariants (`invariants`) and `Spec.check`
reports the first problem as a `StudyError` — the one error type a user sees.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from omegaconf import MISSING

from stageflow.core.models import TinyModelSpec

Dtype = Literal["float32", "bfloat16"]
Device = Literal["auto", "cpu", "cuda"]
Schedule = Literal["constant", "linear", "cosine"]
Kernels = Literal["fused", "naive"]
RolloutBackend = Literal["vllm", "hf"]
# shared: one pool of engines for the study; per_trial: each trial's own engines in its
# placement group; colocated: the engine shares the learner's GPU and sleeps while it trains.
Placement = Literal["shared", "per_trial", "colocated"]
LogprobsMode = Literal["processed_logprobs", "raw_logprobs"]
# How a learner's weights reach the rollout engines; auto: shared memory when the learner and
# the engines share a node, NCCL between GPUs of a trial's own engines, else the object store.
WeightTransport = Literal["auto", "shm", "object_store", "nccl"]
# Where vLLM runs the model: in the rollout actor's own process (no engine-core and worker
# processes to spawn, each importing vLLM again), or in
# vLLM's separate processes (on a GPU its engine core schedules while the model runs, and
# tensor parallelism and sleep mode live there); auto: in_actor on CPU, separate on CUDA.
EngineProcess = Literal["auto", "in_actor", "separate"]

# what DataSpec.fields maps; the answer lists take a string or a list of strings; `text`: a
# raw-text row (MUSE's verbatim and privacy sets): an empty prompt, the text its answer
ANSWER_LISTS = ("paraphrased_answers", "perturbed_answers")
DATA_FIELDS = ("prompt", "answer", "messages", "text", "target", *ANSWER_LISTS)
Problems = Iterator[tuple[str, str]]  # (key relative to the spec, one-sentence problem)


class StudyError(ValueError):
    """A problem with a study's input; `str()` is the one sentence shown to the user:
    `<source>: <key>: <problem>` (source: the study file, or what else was wrong)."""

    def __init__(self, source: str, key: str, problem: str):
        self.source, self.key, self.problem = source, key, problem
        where = ": ".join(part for part in (source, key) if part)
        super().__init__(f"{where}: {problem}" if where else problem)

    def within(self, source: str, prefix: str = "") -> StudyError:
        """The same problem, located in `source` under the key `prefix`."""
        return StudyError(source, join_key(prefix, self.key), self.problem)


def join_key(*parts: str) -> str:
    """'stages.inst' + 'lr' -> 'stages.inst.lr' (empty parts dropped)."""
    return ".".join(part for part in parts if part)


def positive(key: str, value: float | None, allow_zero: bool = False) -> Problems:
    """A problem when `value` is given and is not a (non-negative) finite number."""
    if value is None or isinstance(value, bool):
        return
    if not isinstance(value, (int, float)):
        yield key, f"expected a number, got {value!r}"
        return
    bad = not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero)
    if bad:
        kind = "non-negative" if allow_zero else "positive"
        yield key, f"expected a {kind} number, got {value}"


def literal_choices(hint: Any) -> tuple | None:
    """The allowed values of a `Literal[...]` (or `Optional[Literal[...]]`) hint, else None."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:
        hint = args[0]
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def choice_problem(noun: str, value: Any, choices: tuple) -> str:
    return f"unknown {noun} '{value}'; expected one of {', '.join(map(str, choices))}"


class Spec:
    """Base of the schema's dataclasses: `problems()` walks the fields (Literal choices, nested
    specs) and the spec's own `invariants()`; `check()` raises the first as a StudyError."""

    # field -> the noun of its "unknown <noun> 'x'" message (default "value")
    NOUNS: typing.ClassVar[dict[str, str]] = {}

    def invariants(self) -> Problems:
        return iter(())

    def problems(self) -> Problems:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            choices = literal_choices(hints[f.name])
            if choices is not None and value is not None and value not in choices:
                yield f.name, choice_problem(self.NOUNS.get(f.name, "value"), value, choices)
            children = (
                [(f.name, value)]
                if isinstance(value, Spec)
                else [(f"{f.name}.{k}", v) for k, v in value.items()]
                if isinstance(value, dict)
                else [(f"{f.name}[{i}]", v) for i, v in enumerate(value)]
                if isinstance(value, list)
                else []
            )
            for prefix, child in children:
                if isinstance(child, Spec):
                    yield from ((join_key(prefix, k), p) for k, p in child.problems())
        yield from self.invariants()

    def check(self, prefix: str = "", source: str = "") -> None:
        """Raise the first problem as a StudyError naming `prefix.<key>`."""
        for key, problem in self.problems():
            raise StudyError(source, key, problem).within(source, prefix)


def typed_value(key: str, value: Any, default: Any) -> tuple[Any, str | None]:
    """`value` as the type of the parameter's `default` (an int where a float is expected
    becomes a float), or a problem naming what was expected; a None default takes anything."""
    if default is None or value is None:
        return value, None
    if isinstance(default, bool):
        return value, None if isinstance(value, bool) else f"expected true or false, got {value!r}"
    if isinstance(default, int) and not isinstance(value, bool):
        if isinstance(value, int):
            return value, None
        return value, f"expected a whole number, got {value!r}"
    if isinstance(default, float) and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value), None
        return value, f"expected a number, got {value!r}"
    if isinstance(default, str):
        return value, None if isinstance(value, str) else f"expected a string, got {value!r}"
    return value, None


@dataclass(frozen=True)
class RLLoopParams(Spec):
    """The RL loop's own parameters (platform/engine/rl.py), shared by every objective it
    trains: completions per prompt G, sampling temperature and length, optimizer updates per
    rollout batch, prompts per step (None: the stage's batch_size), std division of the group
    advantages (false: "Dr GRPO"), the entropy bonus coefficient, and how many policy versions a
    batch may lag the learner (0: synchronous)."""

    group_size: int = 8
    temperature: float = 1.0
    max_new_tokens: int = 32
    updates_per_batch: int = 1
    prompts_per_step: Optional[int] = None
    scale_rewards: bool = True
    entropy_coef: float = 0.0
    max_staleness: int = 0

    @classmethod
    def of(cls, params: dict[str, Any]) -> RLLoopParams:
        """The loop's parameters among a stage's `params` (the objective's own are skipped)."""
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        defaults["prompts_per_step"] = 1  # None by default, a whole number when given
        return cls(
            **{k: typed_value(k, v, defaults[k])[0] for k, v in params.items() if k in defaults}
        )

    def invariants(self) -> Problems:
        k = self.max_staleness
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            yield "max_staleness", f"expected a whole number of policy versions >= 0, got {k}"
            return
        defaults = RLLoopParams()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = getattr(defaults, f.name) if f.name != "prompts_per_step" else 1
            problem = typed_value(f.name, value, default)[1]
            if problem:
                yield f.name, problem
                return
        if self.group_size < 2:
            yield (
                "group_size",
                (
                    "GRPO compares completions of one prompt with each other; expected a group "
                    f"size of at least 2, got {self.group_size}"
                ),
            )
        for name in ("max_new_tokens", "updates_per_batch", "prompts_per_step", "temperature"):
            yield from positive(name, getattr(self, name))
        yield from positive("entropy_coef", self.entropy_coef, allow_zero=True)


@dataclass(frozen=True)
class ModelSpec(Spec):
    """`path`: a local HF causal-LM directory; when unset the tiny default is built from `tiny`."""

    path: Optional[str] = None
    tiny: TinyModelSpec = field(default_factory=TinyModelSpec)
    dtype: Dtype = "float32"

    def invariants(self) -> Problems:
        problem = self.tiny.problem()
        if self.path is None and problem:
            yield "tiny", f"expected {problem}"


@dataclass(frozen=True)
class DataSpec(Spec):
    """Where a stage's examples come from: a synthetic `task` or a user's `file` (JSONL, JSON,
    parquet or a `datasets.save_to_disk` folder; core/data_files.py).

    `fields`: stageflow name (prompt, answer, messages, target, paraphrased_answers,
    perturbed_answers) → the file's column; `split`:
    a task's or a DatasetDict's split (a file has one, 'train'); `shuffle`: a seed (None keeps
    the file's order), then the first `limit` rows; `check`: the answer checker (`CHECKS`;
    default: a task's own rule, `exact` for a file); `template`: auto = chat when the model's
    tokenizer has a chat template; `system`: an optional system prompt.
    """

    NOUNS: typing.ClassVar[dict[str, str]] = {"template": "template"}

    task: Optional[str] = None
    file: Optional[str] = None
    split: str = "train"
    size: int = 200
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)
    shuffle: Optional[int] = None
    limit: Optional[int] = None
    check: Optional[str] = None
    template: Literal["auto", "chat", "plain"] = "auto"
    system: Optional[str] = None

    def invariants(self) -> Problems:
        if (self.task is None) == (self.file is None):
            yield "", "expected exactly one of 'task' (a synthetic task) or 'file' (a data file)"
        yield from positive("size", self.size)
        yield from positive("limit", self.limit)
        for name in self.fields:
            if name not in DATA_FIELDS:
                yield f"fields.{name}", choice_problem("stageflow field", name, DATA_FIELDS)
        layouts = [k for k in ("messages", "text") if k in self.fields]
        if len(layouts) > 1 or (layouts and {"prompt", "answer"} & set(self.fields)):
            yield (
                "fields",
                "expected one of a 'messages' column, a 'text' column or 'prompt' and 'answer' columns",
            )
        if self.task is not None and self.fields:
            yield (
                "fields",
                "a synthetic task has no columns to map; expected fields only with a file",
            )


@dataclass(frozen=True)
class RewardSpec:
    name: str = MISSING
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MaskSpec(Spec):
    """Which weights an unlearning stage may change (actors/masks.py): the top `fraction` of
    them by SalUn's saliency |grad L_f| or WAGLE's attribution |(theta - grad L_r / mu) *
    grad L_f|, scored once at the stage's start; the others stay bit-identical."""

    kind: Literal["saliency", "attribution"] = MISSING
    fraction: float = 0.5
    mu: float = 1.0

    def invariants(self) -> Problems:
        if isinstance(self.fraction, (int, float)) and not 0 < self.fraction <= 1:
            yield "fraction", f"expected a fraction in (0, 1], got {self.fraction}"
        yield from positive("mu", self.mu)


@dataclass(frozen=True)
class StageSpec(Spec):
    """One stage of a path. `objective` defaults per kind (sft → sft, grpo → grpo)."""

    NOUNS: typing.ClassVar[dict[str, str]] = {"schedule": "schedule"}

    kind: str = MISSING
    data: DataSpec = field(default_factory=DataSpec)
    objective: Optional[str] = None
    steps: Optional[int] = None
    epochs: Optional[float] = None
    lr: float = 1e-3
    batch_size: int = 8
    max_len: int = 192
    schedule: Schedule = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)
    rewards: list[RewardSpec] = field(default_factory=list)
    retain: Optional[DataSpec] = None
    sets: list[str] = field(default_factory=list)
    mask: Optional[MaskSpec] = None

    def problems(self) -> Problems:
        if self.kind == "eval":  # trains nothing: only which sets it evaluates matters
            return iter(())
        return super().problems()

    def invariants(self) -> Problems:
        if self.steps is not None and self.epochs is not None:
            yield "steps", "give either steps or epochs, not both"
        yield from positive("steps", self.steps)
        yield from positive("epochs", self.epochs)
        yield from positive("lr", self.lr)
        yield from positive("batch_size", self.batch_size)
        yield from positive("max_len", self.max_len)
        yield from positive("warmup_steps", self.warmup_steps, allow_zero=True)
        yield from positive("weight_decay", self.weight_decay, allow_zero=True)
        yield from positive("grad_clip", self.grad_clip, allow_zero=True)


@dataclass(frozen=True)
class InsertSpec:
    """Insert `stage` at each of `positions` (1-based) into the fixed sequence `into`."""

    stage: str = MISSING
    into: list[str] = MISSING
    positions: Optional[list[int]] = None


@dataclass(frozen=True)
class SampleSpec:
    """`n` orderings of `stages` drawn uniformly without replacement (seeded by `seed`): the
    report estimates each score's mean and standard deviation over all len(stages)! orderings."""

    stages: list[str] = MISSING
    n: int = MISSING
    seed: int = 0


@dataclass(frozen=True)
class SearchSpec:
    """An adaptive search over the orderings of `stages` for the one that maximises or
    minimises `score` (an analysis score, e.g. forget_score, or a metric '<set>/<metric>' at
    the path's end; of the unlearning branch `branch`, default the study's first), spending
    at most `budget` stage trainings (cached or not; core/ordering_search.py). `method`:
    bayes (expected improvement per training under a model of the orderings) or random (the
    baseline: orderings drawn uniformly)."""

    stages: list[str] = MISSING
    score: str = MISSING
    goal: str = "max"
    budget: int = MISSING
    method: str = "bayes"
    branch: Optional[str] = None
    seed: int = 0


SEARCH_METHODS = ("bayes", "random")


@dataclass(frozen=True)
class OrderingSpec:
    """Exactly one of: all permutations of a list, one insertion sweep, explicit paths 'a>b>c',
    a uniform sample of the permutations, a search over them."""

    permutations: Optional[list[str]] = None
    insert: Optional[InsertSpec] = None
    explicit: Optional[list[str]] = None
    sample: Optional[SampleSpec] = None
    search: Optional[SearchSpec] = None


@dataclass(frozen=True)
class EvalSetSpec(Spec):
    """An evaluation set and the registered metrics computed on it. `holdout`: another
    evaluation set, of rows never trained on, that membership-inference metrics (`mia_*`)
    score this set's rows against; `min_k`: the fraction of lowest token log-probs Min-K% and
    Min-K%++ average; `reference`: the model `mia_reference` compares with, the study's base
    model (logged at every evaluation) or the oracle (the trial's path without its forget
    stage, scored in the analysis after unlearning)."""

    data: DataSpec = field(default_factory=DataSpec)
    metrics: list[str] = MISSING
    samples: int = 1
    max_examples: Optional[int] = 64
    max_new_tokens: int = 32
    temperature: float = 1.0
    holdout: Optional[str] = None
    min_k: float = 0.2
    reference: Literal["base", "oracle"] = "base"

    def invariants(self) -> Problems:
        yield from positive("samples", self.samples)
        yield from positive("max_examples", self.max_examples)
        yield from positive("max_new_tokens", self.max_new_tokens)
        yield from positive("temperature", self.temperature, allow_zero=True)
        if isinstance(self.min_k, (int, float)) and not 0 < self.min_k <= 1:
            yield "min_k", f"expected a fraction in (0, 1], got {self.min_k}"


@dataclass(frozen=True)
class EvaluationSpec(Spec):
    """`model_utility`: '<set>/<metric>' names whose harmonic mean is logged as
    `model_utility` wherever they are all evaluated (TOFU's model utility). `placement`: who
    scores a checkpoint: the trial's `learner` on the weights it holds, before it trains on, or
    an `evaluators` actor of the trial that scores the committed checkpoint while the learner
    trains the next stage (actors/evaluator.py); the results and their cache keys are the same."""

    after_every_stage: bool = True
    sets: dict[str, EvalSetSpec] = field(default_factory=dict)
    model_utility: list[str] = field(default_factory=list)
    placement: Literal["learner", "evaluators"] = "learner"


@dataclass(frozen=True)
class LoraSpec(Spec):
    """A LoRA adapter trained at every stage on top of the merged weights (actors/lora.py):
    W' = W + (alpha / r) B A, with A: r x in, B: out x r. `target_modules`: names of the
    linear layers that take an adapter; unset: every linear layer but the LM head."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Optional[list[str]] = None

    def invariants(self) -> Problems:
        yield from positive("r", self.r)
        yield from positive("alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            yield "dropout", f"expected a probability in [0, 1), got {self.dropout}"
        if self.target_modules is not None and not self.target_modules:
            yield "target_modules", "expected module names, or no key for every linear layer"
        if "lm_head" in (self.target_modules or []):
            yield (
                "target_modules",
                "the LM head runs the fused log-prob kernel and takes no adapter; expected other layers",
            )


@dataclass(frozen=True)
class LearnerSpec(Spec):
    """DeepSpeed learner ranks of one trial (data parallel) and how they train; with `lora`,
    each stage trains a new LoRA adapter and the rest of the model stays frozen."""

    ranks: int = 1
    zero_stage: int = 1
    dtype: Dtype = "float32"
    kernels: Kernels = "fused"
    reset_optimizer_per_stage: bool = True
    lora: Optional[LoraSpec] = None

    @property
    def engine_zero_stage(self) -> int:
        """The ZeRO stage the engine runs: `zero_stage`, or 0 at one rank, where ZeRO has
        nothing to partition and its flat buffers only cost copies (the same AdamW, the same
        results; recorded as each stage run's `zero_stage` param)."""
        return self.zero_stage if self.ranks > 1 else 0

    def invariants(self) -> Problems:
        if self.zero_stage not in (0, 1, 2, 3):
            yield (
                "zero_stage",
                f"ZeRO stage {self.zero_stage} is out of range; expected 0, 1, 2 or 3",
            )
        yield from positive("ranks", self.ranks)
        if self.lora is not None and not self.reset_optimizer_per_stage:
            yield (
                "reset_optimizer_per_stage",
                "learner.lora trains a new adapter with a new optimizer at every stage; expected true",
            )


@dataclass(frozen=True)
class RolloutSpec(Spec):
    """Generation engines: where they run (`placement`), which backend, how they are sized.

    `backend: hf` (transformers generate) is an explicit, recorded choice, never a fallback.
    `workers`: engines of the shared pool, or of each trial (per_trial, colocated).
    """

    placement: Placement = "shared"
    backend: RolloutBackend = "vllm"
    workers: int = 1
    dtype: Dtype = "float32"
    max_model_len: int = 512
    kv_cache_gib: float = 0.5
    gpu_memory_utilization: float = 0.25
    logprobs_mode: LogprobsMode = "processed_logprobs"
    weight_sync: WeightTransport = "auto"
    engine_process: EngineProcess = "auto"

    def invariants(self) -> Problems:
        yield from positive("workers", self.workers, allow_zero=True)
        yield from positive("max_model_len", self.max_model_len)
        yield from positive("kv_cache_gib", self.kv_cache_gib)
        if not 0 < self.gpu_memory_utilization <= 1:
            yield "gpu_memory_utilization", "expected a fraction in (0, 1]"


@dataclass(frozen=True)
class ResourcesSpec(Spec):
    """Ray resources. `shared_actor_resources`: custom Ray resources the study's shared actors
    (tracker, shared rollout pool) ask for, to pin them to service nodes (e.g. {head: 0.01}).
    `threads_per_actor`: math-library threads of each learner rank and engine; unset: on a
    cluster the actor's CPUs, on the embedded one-machine Ray the machine's cores shared among
    the trials that run at once (a trial's learner and engines take turns)."""

    device: Device = "auto"
    cpus_per_actor: float = 1.0
    threads_per_actor: Optional[int] = None
    max_concurrent_trials: Optional[int] = None
    shared_actor_resources: dict[str, float] = field(default_factory=dict)

    def invariants(self) -> Problems:
        yield from positive("cpus_per_actor", self.cpus_per_actor)
        yield from positive("threads_per_actor", self.threads_per_actor)
        yield from positive("max_concurrent_trials", self.max_concurrent_trials)
        for name, amount in self.shared_actor_resources.items():
            yield from positive(f"shared_actor_resources.{name}", amount)


@dataclass(frozen=True)
class StorageSpec(Spec):
    """`max_gb`: the most disk (GB, 10^9 bytes) the study's prefix checkpoints may take while it
    runs; above it the driver removes the checkpoints of intermediate prefixes no trial still
    needs (platform/engine/storage_cap.py). Path ends and unlearning branches always stay."""

    max_gb: Optional[float] = None

    def invariants(self) -> Problems:
        yield from positive("max_gb", self.max_gb)


@dataclass(frozen=True)
class TrackingSpec(Spec):
    uri: Optional[str] = None
    experiment: Optional[str] = None


@dataclass(frozen=True)
class RewardAnalysisSpec(Spec):
    """Which of an RL stage's reward terms is the outcome and which are shaping (reward names;
    a gated reward's levels count by their names): the report follows each per step and
    measures reward hacking, shaping rising while the outcome falls (docs/formulas.md#gated-rewards)."""

    outcome: str = MISSING
    shaping: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class AnalysisSpec(Spec):
    """How unlearning outcomes are scored across orderings (docs/formulas.md#study-analysis).

    `forget_score`: a "<set>/<metric>" log-likelihood whose drop under unlearning is the
    forget score; `utilities`: name → "<set>/<metric>" (an accuracy gives Δ accuracy, a
    log-likelihood gives 1 − |Δ|); `forget_quality`: an eval set whose per-example truth
    ratios are compared with the oracle's by a two-sample KS test (its p-value);
    `probability_mass`: an eval set whose answers, paraphrases and alternative (perturbed)
    answers the learner scores at every step of the unlearning branches (where the mass goes);
    `over_refusal`: "<set>/refusal_rate" metrics on prompts that should be answered, read at
    each path's end, before unlearning; `privleak`: a "<set>/mia_*" membership AUC compared
    with the oracle's after unlearning (MUSE's privacy leakage). With `evaluation.model_utility`,
    the model utility after unlearning is a score too. `rewards`: an RL study's outcome and
    shaping reward terms (`RewardAnalysisSpec`).

    Whether the ordering changes a score is decided by `test` (platform/results/ordering_test.py) at
    level `alpha`, Holm-corrected over the unlearning methods and the scores of one family:
    `primary` (default: forget_score when set) alone is the study's headline; the other
    declared scores (utilities, forget_quality, mass_shift) form the secondary family.
    """

    NOUNS: typing.ClassVar[dict[str, str]] = {"test": "test"}

    forget_score: Optional[str] = None
    utilities: dict[str, str] = field(default_factory=dict)
    forget_quality: Optional[str] = None
    probability_mass: Optional[str] = None
    over_refusal: list[str] = field(default_factory=list)
    privleak: Optional[str] = None
    rewards: Optional[RewardAnalysisSpec] = None
    primary: Optional[str] = None
    test: Literal["permutation", "anova"] = "permutation"
    alpha: float = 0.05

    def invariants(self) -> Problems:
        if not 0 < self.alpha < 1:
            yield "alpha", f"expected a significance level in (0, 1), got {self.alpha}"

    @property
    def declared_scores(self) -> list[str]:
        """The scores the study declares, each tested for an ordering effect."""
        names = ["forget_score"] if self.forget_score else []
        names += list(self.utilities)
        names += ["forget_quality"] if self.forget_quality else []
        names += ["privleak"] if self.privleak else []
        return names + (["mass_shift"] if self.probability_mass else [])

    @property
    def primary_score(self) -> str | None:
        if self.primary is not None:
            return self.primary
        return "forget_score" if self.forget_score else None


@dataclass(frozen=True)
class StudySpec(Spec):
    """A whole study: what trains in which orders, how it is evaluated, where it runs."""

    name: str = MISSING
    storage_dir: Optional[str] = None
    # values the file refers to as ${vars.<name>}, e.g. a data folder given on the command line
    vars: dict[str, Any] = field(default_factory=dict)
    storage: StorageSpec = field(default_factory=StorageSpec)
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

    @property
    def experiment(self) -> str:
        """The study's MLflow experiment: tracking.experiment, else the study's name."""
        return self.tracking.experiment or self.name

    def invariants(self) -> Problems:
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            yield "name", "expected a study name of letters, digits, '-', '_' or '.'"
        if not self.stages:
            yield "stages", "expected at least one stage"
        if not self.seeds:
            yield "seeds", "expected at least one seed"
        if len(set(self.seeds)) != len(self.seeds):
            yield "seeds", "expected distinct seeds"
        if self.rollout.placement == "colocated" and self.resources.device == "cpu":
            yield (
                "rollout.placement",
                "colocated shares a GPU between a learner and its vLLM engine (sleep mode); "
                "expected shared or per_trial on a CPU study (resources.device: cpu)",
            )
