"""Study expansion: orderings × hyper-parameter grid × seeds → trials with content-hash ids."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import random
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf

from stageflow.core.config import DataSpec, OrderingSpec, SampleSpec, StageSpec, StudySpec
from stageflow.core.registry import TASKS

PATH_SEPARATOR = ">"


@dataclass(frozen=True)
class Trial:
    """One path × hyper-parameter point × seed; `trial_id` is a hash of exactly that content."""

    path: tuple[str, ...]
    seed: int
    hparams: dict[str, Any] = field(default_factory=dict)
    unlearning: tuple[str, ...] = ()
    oracle: bool = False

    @property
    def ordering(self) -> str:
        return PATH_SEPARATOR.join(self.path)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": list(self.path),
            "seed": self.seed,
            "hparams": dict(self.hparams),
            "unlearning": list(self.unlearning),
            "oracle": self.oracle,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trial:
        return cls(
            tuple(data["path"]),
            int(data["seed"]),
            dict(data["hparams"]),
            tuple(data["unlearning"]),
            bool(data["oracle"]),
        )

    @property
    def display(self) -> str:
        """The path as people read it: 'a>b>c', or 'oracle a>c' for an oracle."""
        return ("oracle " if self.oracle else "") + self.ordering

    @property
    def label(self) -> str:
        """A readable run name: '[oracle ]a>b>c key=value ... seed=N'."""
        parts = [self.display]
        parts += [f"{k}={v}" for k, v in sorted(self.hparams.items())] + [f"seed={self.seed}"]
        return " ".join(parts)

    @property
    def description(self) -> str:
        """The trial run's description: its path, then what it is compared with."""
        then = f"; then unlearning by {', '.join(self.unlearning)}" if self.unlearning else ""
        kind = "Oracle (the path without the forget data)" if self.oracle else "Trial"
        return f"{kind} of path {' > '.join(self.path)}, seed {self.seed}{then}."

    @property
    def trial_id(self) -> str:
        content = json.dumps(
            [self.path, self.seed, sorted(self.hparams.items()), self.unlearning, self.oracle],
            default=str,
        )
        return hashlib.sha256(content.encode()).hexdigest()[:10]


def parse_path(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(PATH_SEPARATOR))


def ordering_paths(
    orderings: OrderingSpec, searched: list[tuple[str, ...]] | None = None
) -> list[tuple[str, ...]]:
    """The stage paths an ordering spec describes, in a stable order; for a search, the paths
    it has asked for so far (`searched`, from its log in the study directory)."""
    if orderings.permutations is not None:
        return list(itertools.permutations(orderings.permutations))
    if orderings.insert is not None:
        ins = orderings.insert
        positions = ins.positions or list(range(1, len(ins.into) + 2))
        return [
            tuple(ins.into[: p - 1]) + (ins.stage,) + tuple(ins.into[p - 1 :]) for p in positions
        ]
    if orderings.sample is not None:
        return sampled_orderings(orderings.sample)
    if orderings.search is not None:
        return list(searched or [])
    return [parse_path(text) for text in orderings.explicit or []]


def sampled_orderings(sample: SampleSpec) -> list[tuple[str, ...]]:
    """`sample.n` distinct permutations of `sample.stages`, each set of n equally likely (ranks
    drawn without replacement from the k! permutations, then unranked), listed in
    lexicographic order: the draw decides which orderings run, the order only lets trials
    that share a prefix follow each other."""
    k = len(sample.stages)
    ranks = random.Random(sample.seed).sample(range(math.factorial(k)), sample.n)
    return [nth_permutation(sample.stages, rank) for rank in sorted(ranks)]


def nth_permutation(items: list[str], rank: int) -> tuple[str, ...]:
    """The permutation of `items` at `rank` in itertools.permutations' order (Lehmer code)."""
    left, out = list(items), []
    for i in range(len(items), 0, -1):
        index, rank = divmod(rank, math.factorial(i - 1))
        out.append(left.pop(index))
    return tuple(out)


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, as {dotted key: value}."""
    keys = sorted(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def apply_hparams(spec: StudySpec, hparams: dict[str, Any]) -> StudySpec:
    """The spec with a grid point's dotted keys set (type-checked by the schema)."""
    if not hparams:
        return spec
    update: dict[str, Any] = {}
    for key, value in hparams.items():
        node = update
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(spec), update))


def forget_sets(spec: StudySpec) -> list[DataSpec]:
    """The data the study's unlearning stages forget."""
    return [spec.stages[name].data for name in spec.unlearning]


def without_forget(stage: StageSpec, forget: list[DataSpec]) -> StageSpec | None:
    """The oracle's version of a stage: its data minus the forget set (None: nothing is left).
    A task's training rows minus its `forget` split are its `retain` split (facts: the other
    entities; refusal: the answered harmless requests)."""
    data = stage.data
    for f in forget:
        same_source = (data.file is not None and data.file == f.file) or (
            data.task is not None
            and (data.task, data.seed, data.size, data.params) == (f.task, f.seed, f.size, f.params)
        )
        if not same_source:
            continue
        if (
            data.task
            and data.split == "train"
            and f.split == "forget"
            and "retain" in TASKS[data.task].splits
        ):
            rows = TASKS[data.task].rows(data.seed, data.size, data.params)["retain"]
            if rows:
                return dataclasses.replace(stage, data=dataclasses.replace(data, split="retain"))
        return None
    return stage


def trial_spec(spec: StudySpec, trial: Trial) -> StudySpec:
    """The spec a trial runs: its grid point applied, and for an oracle the forget data removed."""
    spec = apply_hparams(spec, trial.hparams)
    if not trial.oracle:
        return spec
    forget = forget_sets(spec)
    stages = {name: without_forget(stage, forget) or stage for name, stage in spec.stages.items()}
    return dataclasses.replace(spec, stages=stages)


def oracle_path(spec: StudySpec, path: tuple[str, ...]) -> tuple[str, ...]:
    forget = forget_sets(spec)
    return tuple(name for name in path if without_forget(spec.stages[name], forget) is not None)


def trial_count(spec: StudySpec) -> int:
    """len(expand(spec)), counted without making the trials (a grid of a million points is
    counted at once). Oracle paths depend on the grid only through the stages' data; a grid
    that sweeps stage data is expanded."""
    points = math.prod(len(values) for values in spec.grid.values())
    paths = set(ordering_paths(spec.orderings))
    count = len(paths) * points * len(spec.seeds)
    if not spec.oracle:
        return count
    if any(".data" in key or ".retain" in key for key in spec.grid):
        return len(expand(spec))
    oracles = {oracle_path(spec, path) for path in paths}
    return count + len(oracles) * points * len(spec.seeds)


def expand(spec: StudySpec, searched: list[tuple[str, ...]] | None = None) -> list[Trial]:
    """All trials: ordering paths × grid points × seeds, plus one oracle per distinct oracle
    path. A search's trials are those of the paths it has asked for (`searched`:
    StudyDir.searched_paths())."""
    trials: dict[str, Trial] = {}
    for path in ordering_paths(spec.orderings, searched):
        for point in grid_points(spec.grid):
            for seed in spec.seeds:
                trial = Trial(
                    path=path, seed=seed, hparams=point, unlearning=tuple(spec.unlearning)
                )
                trials.setdefault(trial.trial_id, trial)
    if spec.oracle:
        for trial in list(trials.values()):
            path = oracle_path(apply_hparams(spec, trial.hparams), trial.path)
            oracle = Trial(path=path, seed=trial.seed, hparams=trial.hparams, oracle=True)
            trials.setdefault(oracle.trial_id, oracle)
    return list(trials.values())
