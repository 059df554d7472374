"""Study expansion: orderings × hyper-parameter grid × seeds → trials with content-hash ids."""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf

from stageflow.platform.config import OrderingSpec, StudySpec

PATH_SEPARATOR = ">"


@dataclass(frozen=True)
class Trial:
    """One path × hyper-parameter point × seed; `trial_id` is a hash of exactly that content."""

    path: tuple[str, ...]
    seed: int
    hparams: dict[str, Any] = field(default_factory=dict)
    unlearning: tuple[str, ...] = ()

    @property
    def ordering(self) -> str:
        return PATH_SEPARATOR.join(self.path)

    @property
    def trial_id(self) -> str:
        content = json.dumps(
            [self.path, self.seed, sorted(self.hparams.items()), self.unlearning], default=str
        )
        return hashlib.sha256(content.encode()).hexdigest()[:10]


def parse_path(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(PATH_SEPARATOR))


def ordering_paths(orderings: OrderingSpec) -> list[tuple[str, ...]]:
    """The stage paths an ordering spec describes, in a stable order."""
    if orderings.permutations is not None:
        return list(itertools.permutations(orderings.permutations))
    if orderings.insert is not None:
        ins = orderings.insert
        positions = ins.positions or list(range(1, len(ins.into) + 2))
        return [
            tuple(ins.into[: p - 1]) + (ins.stage,) + tuple(ins.into[p - 1 :]) for p in positions
        ]
    return [parse_path(text) for text in orderings.explicit or []]


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, as {dotted key: value}."""
    keys = sorted(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def apply_hparams(spec: StudySpec, hparams: dict[str, Any]) -> StudySpec:
    """The spec with a grid point's dotted keys set (type-checked by the schema)."""
    if not hparams:
        return spec
    merged = OmegaConf.structured(spec)
    for key, value in hparams.items():
        OmegaConf.update(merged, key, value, merge=True)
    return OmegaConf.to_object(merged)


def expand(spec: StudySpec) -> list[Trial]:
    """All trials of a study: ordering paths × grid points × seeds."""
    return [
        Trial(path=path, seed=seed, hparams=point, unlearning=tuple(spec.unlearning))
        for path in ordering_paths(spec.orderings)
        for point in grid_points(spec.grid)
        for seed in spec.seeds
    ]
