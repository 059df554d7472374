"""Rewards for RL stages, registered by name in `REWARDS` (what a stage's `rewards:` lists).

A reward is a function of one sampled completion (`Sample`: its text, its prompt's row, the
row's task, whether the prompt came from the stage's `data` or its `retain` set) and its
parameters, returning a float, or a `Scored` value with named parts (a composite reward such
as `gated` reports each of its levels). Each entry is a `registry.Reward`: parameters with
defaults, the range, optional `prepare` (parameters derived from the stage's rows) and
`check` (problems with parameter values, for validation). A stage's reward is
R = sum_i weight_i * r_i over its list (`StageReward`); see docs/formulas.md#rl-objectives.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, is_dataclass
from typing import Any, NamedTuple

from stageflow.core.checks import math_number
from stageflow.core.config import RewardSpec, StudyError
from stageflow.core.registry import REWARDS, Range
from stageflow.core.tasks import check_answer
from stageflow.core.tasks.math import FINAL_ANSWER, STATEMENT
from stageflow.core.tasks.refusal import is_refusal

SPEC_KEYS = ("name", "weight", "params")
STOPWORDS = {
    "about", "after", "answer", "been", "does", "from", "have", "into", "like", "more",
    "that", "than", "them", "then", "there", "they", "this", "were", "what", "when",
    "where", "which", "will", "with", "your",
}  # fmt: skip


@dataclass(frozen=True)
class Sample:
    """One sampled completion as rewards see it. `role`: "data" (the stage's data, e.g. the
    forget set of an unlearn stage) or "retain" (its retain / boundary prompts)."""

    completion: str
    row: dict[str, Any]
    task: str | None = None
    role: str = "data"
    num_tokens: int | None = None

    @property
    def row_task(self) -> str | None:
        return self.row.get("task") or self.task


class Scored(NamedTuple):
    """A composite reward's value and its named parts (reported as "<reward>.<part>")."""

    value: float
    parts: dict[str, float]


def reward_spec(spec: Any) -> RewardSpec:
    """The one typed form of a reward spec, from the forms one arrives in: a stage's
    `RewardSpec`, a dict (an objective's default rewards, a gated reward's levels, whose
    `gate` is not the spec's) or an OmegaConf node."""
    if is_dataclass(spec):
        return RewardSpec(spec.name, float(spec.weight), dict(spec.params or {}))
    spec = dict(spec)
    return RewardSpec(spec["name"], float(spec.get("weight", 1.0)), dict(spec.get("params") or {}))


def resolve_params(name: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The reward's declared defaults updated by `params` (unknown names raise ValueError)."""
    entry = REWARDS[name]
    unknown = sorted(set(params or {}) - set(entry.params))
    if unknown:
        raise ValueError(f"reward '{name}' has no parameter {', '.join(unknown)}")
    return {**entry.params, **(params or {})}


def reward_range(name: str, params: dict[str, Any] | None = None) -> Range:
    """(low, high) of reward `name` with `params`."""
    declared = REWARDS[name].range
    return declared(resolve_params(name, params)) if callable(declared) else tuple(declared)


def weighted_range(specs: Sequence[Any]) -> Range:
    """Range of sum_i w_i r_i."""
    low = high = 0.0
    for spec in map(reward_spec, specs):
        a, b = (spec.weight * v for v in reward_range(spec.name, spec.params))
        low, high = low + min(a, b), high + max(a, b)
    return low, high


def scored(spec: Any, x: Sample) -> Scored:
    """The unweighted value of one reward spec on `x`, with its parts (none for most rewards)."""
    spec = reward_spec(spec)
    value = REWARDS[spec.name].fn(x, **resolve_params(spec.name, spec.params))
    return value if isinstance(value, Scored) else Scored(float(value), {})


def score(spec: Any, x: Sample) -> float:
    """The unweighted value of one reward spec on `x`."""
    return scored(spec, x).value


def prepare(spec: Any, rows: Sequence[dict]) -> RewardSpec:
    """The spec with its parameters resolved, those derived from the stage's rows filled in."""
    spec = reward_spec(spec)
    params = resolve_params(spec.name, spec.params)
    hook = REWARDS[spec.name].prepare
    return RewardSpec(spec.name, spec.weight, hook(params, rows) if hook else params)


class StageReward:
    """R = sum_i weight_i * r_i over a stage's reward specs; also each term, for metrics."""

    def __init__(self, specs: Sequence[Any], rows: Sequence[dict] = ()):
        if not specs:
            raise ValueError("an RL stage needs at least one reward")
        self.specs = [prepare(s, rows) for s in specs]
        self.range = weighted_range(self.specs)
        names = [s.name for s in self.specs]
        self.names = [n if names.count(n) == 1 else f"{n}{i}" for i, n in enumerate(names)]

    def __call__(self, x: Sample) -> tuple[float, dict[str, float]]:
        """(R, {reward name: unweighted value}); a composite reward also reports its parts as
        "<name>.<part>" (e.g. a gated reward's outcome accuracy, ungated)."""
        total, terms = 0.0, {}
        for n, s in zip(self.names, self.specs):
            value, parts = scored(s, x)
            total += s.weight * value
            terms[n] = value
            terms.update({f"{n}.{part}": v for part, v in parts.items()})
        return total, terms


# ----- the rewards ------------------------------------------------------------------------------
@REWARDS.register("math_correct", range=(0.0, 1.0))
def math_correct(x: Sample, strict: bool = False) -> float:
    """r = 1[extract_answer(y) == target] (`math_number`: a row without a target reads the
    integer of its answer); a task's row without a target: the task's rule. `strict`: only an
    answer stated as "The answer is N." counts (r = 0 without one), not the last number."""
    if strict and re.search(FINAL_ANSWER, x.completion) is None:
        return 0.0
    if "target" not in x.row and x.row_task is not None:
        return float(check_answer(x.row_task, x.row, x.completion))
    return float(math_number(x.row, x.completion))


def _pattern_problem(params: dict[str, Any]) -> tuple[str, str] | None:
    try:
        re.compile(params["pattern"])
    except (re.error, TypeError) as err:
        return "pattern", f"'{params['pattern']}' is not a regular expression ({err})"
    return None


@REWARDS.register("format", range=(0.0, 1.0), check=_pattern_problem)
def answer_format(x: Sample, pattern: str = FINAL_ANSWER) -> float:
    """r = 1[the completion contains a match of `pattern`] (default: "The answer is N.")."""
    return float(re.search(pattern, x.completion) is not None)


@REWARDS.register("steps", range=lambda p: (0.0, abs(p["cap"])), check=_pattern_problem)
def worked_steps(
    x: Sample, pattern: str = STATEMENT, coef: float = 0.25, cap: float = 1.0
) -> float:
    """A step-count shaping term: r = min(cap, coef * the number of matches of `pattern`
    (default: a worked step "a op b = c", right or wrong). A policy can earn it without solving
    the task (more statements, the answer crowded out): the kind of term G-RA gates."""
    return min(abs(cap), coef * len(re.findall(pattern, x.completion)))


@REWARDS.register("length", range=lambda p: (-abs(p["cap"]), 0.0))
def length(x: Sample, free_tokens: int = 24, coef: float = 0.02, cap: float = 1.0) -> float:
    """r = -min(cap, coef * max(0, |y| - free_tokens)), |y| in tokens (characters when unknown)."""
    size = x.num_tokens if x.num_tokens is not None else len(x.completion)
    return -min(abs(cap), coef * max(0, size - free_tokens))


def forget_terms(rows: Sequence[dict]) -> list[str]:
    """A forget vocabulary from the forget rows: each row's `value` when it has one (facts),
    else the answer's words of 4+ letters that are not in its prompt nor common words."""
    terms: dict[str, None] = {}
    for row in rows:
        if row.get("value"):
            terms[str(row["value"]).lower()] = None
            continue
        prompt = set(re.findall(r"[a-z]+", row.get("prompt", "").lower()))
        for word in re.findall(r"[a-z]+", row.get("answer", "").lower()):
            if len(word) >= 4 and word not in prompt and word not in STOPWORDS:
                terms[word] = None
    return list(terms)


def _terms_pattern(terms: Sequence[str]) -> re.Pattern[str]:
    return re.compile(r"\b(?:" + "|".join(re.escape(t) for t in terms) + r")\b", re.IGNORECASE)


def _with_forget_terms(params: dict[str, Any], rows: Sequence[dict]) -> dict[str, Any]:
    terms = list(params["terms"] or forget_terms(rows))
    if not terms:
        raise ValueError("no_forbidden_terms: no terms given and none could be derived from rows")
    return {**params, "terms": terms}


@REWARDS.register("no_forbidden_terms", range=(0.0, 1.0), prepare=_with_forget_terms)
def no_forbidden_terms(x: Sample, terms: Sequence[str] | None = None) -> float:
    """PURGE: r = 1 if the completion contains no term of the forget vocabulary (whole words,
    any case), else 0. `terms` null: derived from the forget rows (`forget_terms`)."""
    if not terms:
        raise ValueError("no_forbidden_terms needs terms (set them or let the stage derive them)")
    return float(_terms_pattern(terms).search(x.completion) is None)


def contains_forbidden(text: str, terms: Sequence[str]) -> bool:
    """Whether `text` contains a term of `terms` (the complement of `no_forbidden_terms`)."""
    return _terms_pattern(terms).search(text) is not None


def answer_correct(x: Sample) -> bool:
    """The row's checker: its data set's `check`, else its task's rule, else `exact`."""
    return check_answer(x.row_task, x.row, x.completion)


@REWARDS.register("refusal_boundary", range=(0.0, 1.0))
def refusal_boundary(x: Sample, answer_weight: float = 0.5) -> float:
    """RULE: forget queries (role data) r = 1[refusal]; retain / boundary queries (role retain)
    r = (1 - answer_weight) * 1[not refusal] + answer_weight * 1[correct] (0.5 + 0.5)."""
    refused = is_refusal(x.completion)
    if x.role != "retain":
        return float(refused)
    if refused:
        return 0.0
    return (1.0 - answer_weight) + answer_weight * float(answer_correct(x))


# ----- gated rewards (G-RA) ---------------------------------------------------------------------
@dataclass(frozen=True)
class GatedLevel:
    """One priority level of a gated reward: its reward, and the value it must reach for the
    levels after it to count (`gate`; None: it always passes)."""

    reward: RewardSpec
    gate: float | None = None


def gated_levels(params: dict[str, Any]) -> list[GatedLevel]:
    """The priority-ranked levels of a gated reward's params (as written, or as `prepare` made
    them).

    The G-RA form {outcome, steps, threshold} is the levels [outcome (gate = threshold),
    step_1, ..., step_n] (steps have no gate of their own).
    """
    if params.get("levels"):
        return [
            level
            if isinstance(level, GatedLevel)
            else GatedLevel(level_spec(level), level.get("gate"))
            for level in params["levels"]
        ]
    if not params.get("outcome"):
        return []
    return [GatedLevel(reward_spec(params["outcome"]), params["threshold"])] + [
        GatedLevel(reward_spec(step)) for step in params.get("steps") or []
    ]


def reward_names(specs: Sequence[Any]) -> list[str]:
    """The names of a stage's rewards, a gated reward's levels included."""
    names = []
    for spec in map(reward_spec, specs):
        names.append(spec.name)
        if spec.name == "gated":
            names += [level.reward.name for level in gated_levels(spec.params)]
    return names


def level_spec(level: Any, typed: bool = True) -> Any:
    """A gated reward level's reward spec (its `gate` left out), typed unless `typed` is False
    (validation reads the raw keys)."""
    spec = {k: level[k] for k in SPEC_KEYS if k in level}
    return reward_spec(spec) if typed else spec


def _gated_range(params: dict[str, Any]) -> Range:
    low = high = 0.0
    for i, level in enumerate(gated_levels(params)):
        a, b = weighted_range([level.reward])
        low, high = low + (a if i == 0 else min(0.0, a)), high + (b if i == 0 else max(0.0, b))
    return low, high


def _gated_prepare(params: dict[str, Any], rows: Sequence[dict]) -> dict[str, Any]:
    levels = [GatedLevel(prepare(lv.reward, rows), lv.gate) for lv in gated_levels(params)]
    return {"outcome": None, "steps": [], "threshold": params["threshold"], "levels": levels}


def _gated_problem(params: dict[str, Any]) -> tuple[str, str] | None:
    if (params.get("levels") is None) == (params.get("outcome") is None):
        return "params", "expected either 'outcome' (with 'steps' and 'threshold') or 'levels'"
    if params.get("levels") is not None and not params["levels"]:
        return "levels", "expected at least one level {name, weight, params, gate}"
    if params.get("levels"):
        allowed = (*SPEC_KEYS, "gate")
        items = [(f"levels[{i}]", lv) for i, lv in enumerate(params["levels"])]
    else:
        allowed = SPEC_KEYS
        items = [("outcome", params["outcome"])]
        items += [(f"steps[{i}]", st) for i, st in enumerate(params.get("steps") or [])]
    for key, item in items:
        if not hasattr(item, "keys"):
            return key, "expected a reward {name, weight, params}"
        extra = sorted(set(item.keys()) - set(allowed))
        if extra:
            return f"{key}.{extra[0]}", f"unknown key; expected {', '.join(allowed)}"
        problem = spec_problem(level_spec(item, typed=False))
        if problem:
            return f"{key}.{problem[0]}" if problem[0] else key, problem[1]
    for i, level in enumerate(gated_levels(params)):
        gate, name = level.gate, level.reward.name
        if gate is None:
            continue
        low, high = reward_range(name, level.reward.params)
        if isinstance(gate, bool) or not isinstance(gate, (int, float)) or not low <= gate <= high:
            grra = not params.get("levels")
            return ("threshold" if grra else f"levels[{i}].gate"), (
                f"gate threshold {gate} is outside the range [{low:g}, {high:g}] of the gated "
                f"{'outcome reward' if grra else 'reward'} '{name}'; "
                f"expected a value in [{low:g}, {high:g}]"
            )
    return None


@REWARDS.register(
    "gated",
    range=_gated_range,
    prepare=_gated_prepare,
    check=_gated_problem,
)
def gated(
    x: Sample,
    outcome: Any = None,
    steps: Sequence[Any] = (),
    threshold: float = 1.0,
    levels: Sequence[Any] | None = None,
) -> Scored:
    """G-RA: R = r_outcome + 1[r_outcome >= threshold] * sum_t w_t r_step_t (weights apply).

    Priority-ranked form (`levels`, highest priority first, each {name, weight, params, gate}):
    R = sum_k w_k r_k * prod_{j<k} 1[r_j >= gate_j]; a level without a gate always passes.
    Its parts are every level's ungated value, named after the level's reward.
    """
    params = {"outcome": outcome, "steps": steps, "threshold": threshold, "levels": levels}
    total, open_, parts = 0.0, True, {}
    chosen = gated_levels(params)
    names = [level.reward.name for level in chosen]
    for i, level in enumerate(chosen):
        name = level.reward.name
        value = score(level.reward, x)
        parts[name if names.count(name) == 1 else f"{name}{i}"] = value
        if open_:
            total += level.reward.weight * value
        open_ = open_ and (level.gate is None or value >= level.gate)
    return Scored(total, parts)


# ----- validation -------------------------------------------------------------------------------
def spec_problem(spec: Any) -> tuple[str, str] | None:
    """(key relative to the spec, problem) for the first thing wrong with one reward spec."""
    if not is_dataclass(spec):
        if not hasattr(spec, "keys"):
            return "", "expected a reward {name, weight, params}"
        extra = sorted(set(spec.keys()) - set(SPEC_KEYS))
        if extra:
            return extra[0], f"unknown key; expected {', '.join(SPEC_KEYS)}"
        if "name" not in spec:
            return "name", "a reward needs a name; " + REWARDS.expected()
    typed = reward_spec(spec)
    name, params = typed.name, typed.params
    if name not in REWARDS:
        return "name", f"unknown reward '{name}'; {REWARDS.expected(name)}"
    unknown = REWARDS.unknown_param(name, params)
    if unknown:
        return f"params.{unknown[0]}", unknown[1]
    check = REWARDS[name].check
    problem = check(resolve_params(name, params)) if check else None
    if problem:
        return f"params.{problem[0]}" if problem[0] != "params" else "params", problem[1]
    return None


def check_rewards(specs: Sequence[Any]) -> None:
    """Raise StudyError("rewards[i]...", problem) for the first bad spec of a stage."""
    for i, spec in enumerate(specs):
        problem = spec_problem(spec)
        if problem:
            key = f"rewards[{i}]" + (f".{problem[0]}" if problem[0] else "")
            raise StudyError("", key, problem[1])
