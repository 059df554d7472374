"""Name → implementation registries for the parts people extend from YAML.

A new unlearning method, reward, metric or task is one function plus one decorator;
the study validator looks names up here, so a registered name is valid everywhere.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Entry:
    """One registered implementation with its metadata (declared parameters, allowed kinds...)."""

    name: str
    fn: Any
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def params(self) -> dict[str, Any]:
        """Hyper-parameters the implementation accepts, with their defaults."""
        return self.meta.get("params", {})


class Registry:
    """A named collection of implementations, filled by the `register` decorator."""

    def __init__(self, what: str):
        self.what = what
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, **meta: Any) -> Callable[[Any], Any]:
        def add(fn: Any) -> Any:
            if name in self._entries:
                raise ValueError(f"{self.what} '{name}' is registered twice")
            self._entries[name] = Entry(name, fn, meta)
            return fn

        return add

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> Entry:
        if name not in self._entries:
            raise KeyError(f"unknown {self.what} '{name}'; {self.expected()}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def expected(self, name: str | None = None) -> str:
        """'expected one of a, b, c' plus a close match for `name` when there is one."""
        text = "expected one of " + ", ".join(self.names())
        hint = closest(name, self.names()) if name else None
        return f"did you mean '{hint}'? ({text})" if hint else text

    def unknown_param(self, name: str, params: Iterable[str]) -> tuple[str, str] | None:
        """(param, problem) for the first of `params` that entry `name` does not take, or None."""
        declared = list(self[name].params)
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


STAGE_KINDS = Registry("stage kind")
OBJECTIVES = Registry("objective")
REWARDS = Registry("reward")
METRICS = Registry("metric")
TASKS = Registry("task")

# The four stage kinds of a path and the objective each uses when a stage names none.
for _kind, _default, _doc in [
    ("sft", "sft", "supervised training on prompt/answer pairs"),
    ("grpo", "grpo", "reinforcement learning from rewards on sampled completions"),
    ("unlearn", None, "an unlearning method applied to a forget set"),
    ("eval", None, "evaluation only; trains nothing"),
]:
    STAGE_KINDS.register(_kind, default_objective=_default, doc=_doc)(_kind)

# Modules whose import registers tasks, metrics, objectives and rewards.
PLUGIN_MODULES = [
    "stageflow.platform.tasks",
    "stageflow.actors.metrics",
    "stageflow.actors.objectives",
    "stageflow.actors.rewards",
]


def load_plugins() -> None:
    """Import every module that registers implementations, so all names are known."""
    import importlib

    for module in PLUGIN_MODULES:
        importlib.import_module(module)
