"""Name → implementation registries for the parts people extend from YAML.

A new unlearning method, reward, metric, task or answer checker is one function plus one
decorator; a new stage kind is one class. The study validator looks names up here, so a
registered name is valid everywhere. Each registry holds one typed entry kind (`Objective`,
`Reward`, `Metric`, `Task`, `Check`, `StageKind`): the decorator's keywords are that type's
fields, so a misspelt property is an error at import, not a silently ignored key.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import inspect
import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from stageflow.core.alternatives import GENERATED
from stageflow.core.config import RLLoopParams, positive, typed_value

Range = tuple[float, float]


def keyword_defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    """The parameters after the first of `fn` with their defaults: an implementation's
    signature is its parameter schema (`def npo(x, beta=0.1, alpha=0.0)` takes beta, alpha)."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


@dataclass(frozen=True)
class VocabStat:
    """A per-answer-token statistic of the full-vocabulary logits an objective trains on, which
    the learner's head computes chunk by chunk (kernels/vocab_stats.py) and hands to the loss as
    `LossInputs.vocab_stat`: "cross_entropy" to q = softmax(s - shift * onehot(y)), s the
    policy's own logits (detached, `source` "self") or pi_ref's ("reference"), shift inf
    removing the target token (CE-U, UNDIAL); "margin", max_v z - mean_v z (PDU); or
    "uniform_kl", KL(uniform || softmax(z)) (ULD). `skip_first`: answer tokens at the start of
    each answer left out. `rows`: on the forget rows' answers, or the retain rows'."""

    kind: Literal["cross_entropy", "margin", "uniform_kl"]
    source: Literal["self", "reference"] = "self"
    shift: float = math.inf
    skip_first: int = 0
    rows: Literal["forget", "retain"] = "forget"


@dataclass(frozen=True)
class LayerStates:
    """What a representation objective reads (RMU): decoder layer `layer`'s output on the stage's
    rows (and pi_ref's on the retain rows, `LossInputs.states`, `ref_retain_states`), with only
    the parameters of decoder layers `trainable` training (None: every parameter)."""

    layer: int
    trainable: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Objective:
    """A training objective: `fn(LossInputs, **params) -> loss`.

    Its parameters: the loss's, from `fn`'s signature (the frozen dataclass `Params`), plus
    `extra_params` (used by neither the loss nor the loop: its default rewards', a pass
    before the stage; the frozen dataclass `Extra`), plus the RL loop's (`RLLoopParams`) when
    `rl_loop` (trained by platform/engine/rl.py on sampled completions); `typed(params)`
    builds all three from a stage's `params` (`ObjectiveParams`). `kinds`: stage kinds that
    accept it; `needs_ref`: pi_ref log-probs are required; `retain_weight`: the parameter
    weighting the retain-set NLL; `retain_prompts`: the RL loop also samples the stage's
    retain prompts; `default_rewards(ObjectiveParams)`: rewards used when a stage lists none;
    `nonnegative`, `positive`: loss parameters checked >= 0, > 0; `vocab_stat(Params)`: the
    `VocabStat` of an objective on the full-vocabulary logits (CE-U, UNDIAL, PDU); `alternative(Params)`: where a
    preference objective's chosen answers come from (core/alternatives.py: `idk` or a column;
    None: not given), each forget answer being the rejected one (DPO, IdkDPO);
    `layer_states(Params)`: the `LayerStates` of a representation objective (RMU);
    `needs_retain`: a retain set always; `stateful`: a dict kept across the stage's steps is
    `LossInputs.state` (its numbers are logged per step as `state/<name>`; PDU's dual variable);
    `isolate`: the parameter giving the fraction of the stage's rows, lowest loss under the
    model at the stage's start, that the stage trains on alone (ABL's isolation pass);
    `assistant`: the parameter giving the depth of an assistant model that the stage trains
    while the model stays frozen, the two combined afterwards (ULD: a terminal branch).
    """

    name: str
    fn: Callable[..., Any]
    kinds: tuple[str, ...]
    extra_params: dict[str, Any] = field(default_factory=dict)
    needs_ref: bool = False
    retain_weight: str | None = None
    rl_loop: bool = False
    retain_prompts: bool = False
    default_rewards: Callable[[ObjectiveParams], list[dict[str, Any]]] | None = None
    nonnegative: tuple[str, ...] = ()  # loss parameters that must be >= 0
    positive: tuple[str, ...] = ()  # loss parameters that must be > 0
    vocab_stat: Callable[[Any], VocabStat] | None = None
    alternative: Callable[[Any], str | None] | None = None
    layer_states: Callable[[Any], LayerStates] | None = None
    needs_retain: bool = False  # a retain set whatever the parameters (a constraint on it)
    stateful: bool = False  # keeps state across a stage's steps (LossInputs.state)
    isolate: str | None = None  # its fraction parameter: train on the lowest-loss rows alone
    assistant: str | None = None  # its depth parameter: trains an assistant, the model frozen

    @property
    def params(self) -> dict[str, Any]:
        loop = dataclasses.asdict(RLLoopParams()) if self.rl_loop else {}
        return {**keyword_defaults(self.fn), **self.extra_params, **loop}

    @functools.cached_property
    def Params(self) -> type:  # noqa: N802 - a class
        """The frozen dataclass of the loss's parameters (`fn`'s signature after its input)."""
        return _frozen(f"{self.name}_params", keyword_defaults(self.fn))

    @functools.cached_property
    def Extra(self) -> type:  # noqa: N802 - a class
        """The frozen dataclass of its other parameters (`extra_params`)."""
        return _frozen(f"{self.name}_extra", self.extra_params)

    def typed(self, params: dict[str, Any] | None = None) -> ObjectiveParams:
        """A stage's `params` resolved and typed: unknown names and badly typed values raise
        ValueError(name, problem)."""
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise ValueError(
                unknown[0],
                f"objective '{self.name}' has no parameter {', '.join(unknown)}; "
                f"it takes {', '.join(self.params) or 'none'}",
            )
        return ObjectiveParams(
            self.name,
            self.Params(**_typed_values(keyword_defaults(self.fn), params)),
            self.Extra(**_typed_values(self.extra_params, params)),
            RLLoopParams.of(params) if self.rl_loop else None,
        )

    def problems(self, params: dict[str, Any]) -> Iterator[tuple[str, str]]:
        """(param, problem) for a parameter the objective does not take or a badly typed one."""
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            hint = closest(unknown[0], list(self.params))
            expected = (
                f"did you mean '{hint}'?"
                if hint
                else f"objective '{self.name}' takes {', '.join(self.params) or 'no parameters'}"
            )
            yield unknown[0], f"unknown parameter; {expected}"
            return
        try:
            typed = self.typed(params)
        except ValueError as err:
            yield err.args[0], err.args[1]
            return
        for name in self.nonnegative:
            yield from positive(name, getattr(typed.loss, name), allow_zero=True)
        for name in self.positive:
            yield from positive(name, getattr(typed.loss, name))
        if typed.loop is not None:
            yield from typed.loop.problems()

    def needs_reference(self, p: ObjectiveParams) -> bool:
        """Whether the stage keeps a frozen pi_ref: for its log-probs (NPO; an RL loop with a KL
        coefficient), its logits (a `VocabStat` from the reference) or its layer states on
        the retain rows (`LayerStates` with a retain term)."""
        target = self.statistic(p)
        return (
            self.needs_ref
            or (p.loop is not None and (p.get("beta") or 0) > 0)
            or (target is not None and target.source == "reference")
            or (self.layer_states is not None and self.uses_retain(p))
        )

    def states(self, p: ObjectiveParams) -> LayerStates | None:
        """The layer a representation objective reads with these parameters, or None."""
        return None if self.layer_states is None else self.layer_states(p.loss)

    def alternatives(self, p: ObjectiveParams) -> str | None:
        """The source of a preference objective's chosen answers, or None."""
        return None if self.alternative is None else self.alternative(p.loss)

    def statistic(self, p: ObjectiveParams) -> VocabStat | None:
        """The full-vocabulary statistic the objective trains on, or None."""
        return None if self.vocab_stat is None else self.vocab_stat(p.loss)

    def uses_retain(self, p: ObjectiveParams) -> bool:
        """Whether the retain batch contributes (the objective's retain weight is non-zero)."""
        return self.needs_retain or (
            self.retain_weight is not None and bool(p.get(self.retain_weight))
        )

    def isolated_share(self, p: ObjectiveParams) -> float | None:
        """The share of a stage's rows its isolation pass keeps (ABL), or None."""
        return None if self.isolate is None else float(p.get(self.isolate))


@dataclass(frozen=True)
class ObjectiveParams:
    """An objective's parameters for one stage, resolved, checked and typed once where the stage
    is read: the loss's keyword arguments (`loss`, the objective's `Params`), its other
    parameters (`extra`, its `Extra`: default rewards', a pass before the stage) and the RL
    loop's (`loop`, for an objective the loop trains). What crosses to the actors."""

    objective: str
    loss: Any
    extra: Any
    loop: RLLoopParams | None = None

    def flat(self) -> dict[str, Any]:
        """Every parameter by name (the loop's last; what a stage run logs)."""
        parts = [p for p in (self.loss, self.extra, self.loop) if p is not None]
        return {k: v for part in parts for k, v in dataclasses.asdict(part).items()}

    def get(self, name: str, default: Any = None) -> Any:
        """A parameter by name, wherever it is declared (`default` where it is not)."""
        return self.flat().get(name, default)


def _frozen(name: str, defaults: dict[str, Any]) -> type:
    fields = [(k, Any, field(default=v)) for k, v in defaults.items()]
    return dataclasses.make_dataclass(name, fields, frozen=True)


def _typed_values(defaults: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The values of `defaults`' names in `params` (else the default), typed like the default;
    ValueError(name, problem) for a badly typed one."""
    values = {}
    for name, default in defaults.items():
        value, problem = typed_value(name, params.get(name, default), default)
        if problem:
            raise ValueError(name, problem)
        values[name] = value
    return values


@dataclass(frozen=True)
class Reward:
    """A reward `fn(Sample, **params) -> float` (or `Scored`, with named sub-terms); its
    parameters and their defaults are `fn`'s signature.

    `range`: (low, high), or a function of the parameters; `prepare(params, rows)`: parameters
    derived from the stage's rows; `check(params)`: (key, problem) for a bad value, or None.
    """

    name: str
    fn: Callable[..., Any]
    range: Range | Callable[[dict[str, Any]], Range] = (0.0, 1.0)
    prepare: Callable[[dict[str, Any], Sequence[dict]], dict[str, Any]] | None = None
    check: Callable[[dict[str, Any]], tuple[str, str] | None] | None = None

    @property
    def params(self) -> dict[str, Any]:
        return keyword_defaults(self.fn)


AnswerKind = Literal["answer", "paraphrased", "perturbed"]


@dataclass(frozen=True)
class Metric:
    """An evaluation metric: `fn(per-example stats) -> float`; `needs` says which stats:
    teacher-forced answer statistics (loglik) or checked sampled completions (generation);
    `reads`: which of a row's answers a loglik metric scores (only those are computed).
    A `membership` metric is a membership-inference attack: `fn(example, k) -> score` per
    example (higher: more likely trained on), reported as the ROC AUC of the set's rows against
    its `holdout` set's rows. `unit`: its values lie in [0, 1] (it may enter model utility).
    What a membership score reads beyond the log-probs is computed only when a metric asks:
    `standardized` token log-probs (from the same head pass), the `grad_norm` of the answer's
    loss (a backward per row, on the learner), the log-probs under a `reference` model."""

    name: str
    fn: Callable[..., float]
    needs: Literal["loglik", "generation"]
    reads: tuple[AnswerKind, ...] = ("answer",)
    membership: bool = False
    unit: bool = False
    standardized: bool = False
    grad_norm: bool = False
    reference: bool = False


@dataclass(frozen=True)
class Task:
    """A synthetic task: `fn(rng, size, **params) -> {split: rows}` and its answer checker."""

    name: str
    fn: Callable[..., dict[str, list[dict]]]
    splits: tuple[str, ...]
    check: Callable[[dict, str], bool]

    @property
    def params(self) -> dict[str, Any]:
        """Parameters after (rng, size), from the generator's signature."""
        return {k: v for k, v in keyword_defaults(self.fn).items() if k != "size"}

    def rows(self, seed: int, size: int, params: dict[str, Any] | None = None) -> dict:
        """All splits as {split: [row, ...]}; the same arguments give the same rows."""
        rng = random.Random(f"{self.name}:{seed}")
        return self.fn(rng, size, **{**self.params, **(params or {})})


@dataclass(frozen=True)
class Check:
    """An answer checker: `fn(row, completion) -> bool`, named by a data set's `check`."""

    name: str
    fn: Callable[[dict, str], bool]


class StageKind:
    """A kind of stage (`kind:` in YAML); `run` is what the trial pipeline calls for it.

    `default_objective`: the objective of a stage that names none (None: it must name one,
    or the kind trains nothing). Subclasses live in platform/engine/stages.py.
    """

    trains = True

    def __init__(self, name: str, default_objective: str | None, doc: str):
        self.name, self.default_objective, self.doc = name, default_objective, doc
        self.params: dict[str, Any] = {}

    def run(self, trial: Any, step: Any) -> Any:  # pragma: no cover - see platform/engine/stages.py
        raise NotImplementedError


E = TypeVar("E")


class Registry(Generic[E]):
    """Named entries of one type; `register(name, **fields)` decorates the implementation.
    `plugin`: the module whose import registers the built-in entries, imported at the first
    lookup, so a caller never depends on having imported it."""

    def __init__(self, what: str, entry_type: type[E], plugin: str):
        self.what, self.entry_type, self.plugin = what, entry_type, plugin
        self._entries: dict[str, E] = {}
        self._loaded = False

    def _all(self) -> dict[str, E]:
        if not self._loaded:
            before = dict(self._entries)
            self._loaded = True  # before the import: the module registers through `add`
            try:
                importlib.import_module(self.plugin)
            except BaseException:  # a failed import leaves the registry as it was, not loaded
                self._entries, self._loaded = before, False
                raise
        return self._entries

    def register(self, name: str, **fields: Any) -> Callable[[Any], Any]:
        """Decorator: `fn` becomes the entry `entry_type(name=name, fn=fn, **fields)`."""

        def add(fn: Any) -> Any:
            self.add(self.entry_type(name=name, fn=fn, **fields))  # type: ignore[call-arg]
            return fn

        return add

    def add(self, entry: E) -> E:
        name = entry.name  # type: ignore[attr-defined]
        if name in self._entries:
            raise ValueError(f"{self.what} '{name}' is registered twice")
        self._entries[name] = entry
        return entry

    def __contains__(self, name: object) -> bool:
        return name in self._all()

    def __getitem__(self, name: str) -> E:
        if name not in self._all():
            raise KeyError(f"unknown {self.what} '{name}'; {self.expected()}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._all())

    def expected(self, name: str | None = None) -> str:
        """'expected one of a, b, c' plus a close match for `name` when there is one."""
        text = "expected one of " + ", ".join(self.names())
        hint = closest(name, self.names()) if name else None
        return f"did you mean '{hint}'? ({text})" if hint else text

    def unknown_param(self, name: str, params: Iterable[str]) -> tuple[str, str] | None:
        """(param, problem) for the first of `params` that entry `name` does not take, or None."""
        declared = list(self[name].params)  # type: ignore[attr-defined]
        for param in params:
            if param not in declared:
                hint = closest(param, declared)
                expected = (
                    f"did you mean '{hint}'?"
                    if hint
                    else f"{self.what} '{name}' takes {', '.join(declared) or 'no parameters'}"
                )
                return param, f"unknown parameter; {expected}"
        return None


def closest(name: str, candidates: list[str]) -> str | None:
    """The candidate most like `name`, if any is reasonably close."""
    found = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return found[0] if found else None


STAGE_KINDS: Registry[StageKind] = Registry(
    "stage kind", StageKind, "stageflow.platform.engine.stages"
)
OBJECTIVES: Registry[Objective] = Registry("objective", Objective, "stageflow.actors.objectives")
REWARDS: Registry[Reward] = Registry("reward", Reward, "stageflow.actors.rewards")
METRICS: Registry[Metric] = Registry("metric", Metric, "stageflow.actors.metrics")
TASKS: Registry[Task] = Registry("task", Task, "stageflow.core.tasks")
CHECKS: Registry[Check] = Registry("checker", Check, "stageflow.core.checks")
REGISTRIES = (STAGE_KINDS, OBJECTIVES, REWARDS, METRICS, TASKS, CHECKS)


def load_plugins() -> None:
    """Import every module that registers built-in entries (each registry also does so at
    its first lookup), e.g. before listing what a study may name."""
    for registry in REGISTRIES:
        registry.names()


def objective_of(stage: Any) -> str | None:
    """A stage's objective name: its own, else its kind's default."""
    if stage.objective is not None:
        return stage.objective
    kind = STAGE_KINDS[stage.kind] if stage.kind in STAGE_KINDS else None
    return kind.default_objective if kind else None


def stage_objective(stage: Any) -> ObjectiveParams:
    """A stage's objective with its parameters typed (ValueError(name, problem) when bad)."""
    return OBJECTIVES[objective_of(stage)].typed(stage.params)


def trains_assistant(stage: Any) -> bool:
    """Whether the stage trains an assistant model beside the frozen one (ULD), whose combined
    model only the learner that trained it holds."""
    name = objective_of(stage)
    return name in OBJECTIVES and OBJECTIVES[name].assistant is not None


def samples_alternatives(stage: Any) -> bool:
    """Whether the stage's preference objective samples its chosen answers from the model
    (AltPO: the rollout engines draw them at the stage's start)."""
    name = objective_of(stage)
    if name not in OBJECTIVES or OBJECTIVES[name].alternative is None:
        return False
    return OBJECTIVES[name].alternatives(stage_objective(stage)) == GENERATED


def runs_rl_loop(stage: Any) -> bool:
    """Whether the stage's objective is trained by the RL loop (platform/engine/rl.py)."""
    name = objective_of(stage)
    return name in OBJECTIVES and OBJECTIVES[name].rl_loop
