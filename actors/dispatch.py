"""Typed calls across processes: how a call reaches a group's ranks is declared once, on the
worker method (`@dispatch(ALL)`, `@dispatch(SPLIT)`...), and a group exposes that method with
the worker's own signature, so a caller writes `learner.save(out)`, never a method name.

    class LearnerWorker:
        @dispatch(RANK0)
        def save(self, out_dir: str) -> str: ...

    class LearnerGroup(ModelGroup):
        worker = LearnerWorker        # LearnerGroup.save(out_dir) now runs on every rank

A wrong call (a missing or unknown argument) fails in the caller, before anything is sent.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from enum import Enum
from typing import Any


class Mode(Enum):
    """Where a call runs and what comes back."""

    ALL = "every rank, the same arguments; the results in rank order"
    RANK0 = "every rank, the same arguments (a collective); rank 0's result"
    SPLIT = "the first argument split into one chunk per rank; the results concatenated"
    SPLIT_RANK0 = "the first argument split into one chunk per rank; rank 0's result"
    REF0 = "every rank, the same arguments; rank 0's result as an ObjectRef, once all finished"


ALL, RANK0, SPLIT, SPLIT_RANK0, REF0 = Mode


def dispatch(mode: Mode) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare how a group calls this worker method."""

    def mark(method: Callable[..., Any]) -> Callable[..., Any]:
        method.__dispatch__ = mode  # type: ignore[attr-defined]
        return method

    return mark


def mode_of(method: Callable[..., Any]) -> Mode:
    mode = getattr(method, "__dispatch__", None)
    if mode is None:
        raise TypeError(f"{method.__qualname__} is not declared with @dispatch")
    return mode


def check_call(method: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    """Raise TypeError here, in the caller, for arguments the worker method does not take."""
    inspect.signature(method).bind(None, *args, **kwargs)


def bind_worker_methods(group_cls: type, worker_cls: type) -> None:
    """Give `group_cls` every @dispatch method of `worker_cls` it does not define itself: the
    same name, signature and docstring, run on the group's ranks as declared."""
    for name, method in inspect.getmembers(worker_cls, inspect.isfunction):
        if getattr(method, "__dispatch__", None) is None or name in vars(group_cls):
            continue
        setattr(group_cls, name, _group_method(method))


def _group_method(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        return self.group.run(method, *args, **kwargs)

    return call


def call_actor(actor: Any, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`method` (a method of the actor's class) on one actor, waited for; arguments checked."""
    import ray  # lazy: the tracker's callers import this module without a cluster

    check_call(method, args, kwargs)
    return ray.get(getattr(actor, method.__name__).remote(*args, **kwargs))


def rpc_name(method: Callable[..., Any]) -> str:
    """The name vLLM's `collective_rpc` runs in its worker, from the extension's method itself."""
    return method.__name__
