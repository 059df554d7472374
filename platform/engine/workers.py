"""A trial's actors: its learner group and its rollout engines, created on first need.

The trial's placement group (`trial_bundles`) holds the trial itself (bundle 0), one bundle
per learner rank, with `rollout.placement: per_trial` one per engine and, on CUDA, with
`evaluation.placement: evaluators` one for the trial's evaluator (on CPU it shares the trial's
own bundle). The learner is
kept across the trial's stages and holds one prefix's weights at a time (`learner_at` loads
another checkpoint only when asked for a prefix it does not hold). The rollout engines are
the trial's own (per_trial, colocated: reused across its stages, ended with it) or the
study's shared pool; either way the engines are handed `Weights` and load them themselves:
the learner's weights in memory (`WeightSync`), or a checkpoint directory. The evaluator,
like the learner, is created on first need, holds one checkpoint at a time and is kept for the
next trial the same Tune actor runs.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from stageflow.actors.group import Placement
from stageflow.actors.rollout import RolloutGroup
from stageflow.actors.rollout_pool import SharedRollout
from stageflow.actors.weight_sync import Weights, WeightSync
from stageflow.core.config import StudySpec
from stageflow.platform.engine.trial_plan import needs_rollout


def evaluator_bundle(spec: StudySpec) -> bool:
    """Whether the trial's evaluator has a bundle of its own (the last): on CUDA, with a GPU;
    on CPU it shares the trial's bundle."""
    return spec.evaluation.placement == "evaluators" and spec.resources.device == "cuda"


def trial_bundles(spec: StudySpec) -> list[dict[str, float]]:
    """The trial's placement group: the trial, one bundle per learner rank, its own engines
    (when the study samples at all)."""
    cpus, gpu = spec.resources.cpus_per_actor, spec.resources.device == "cuda"
    rank = {"CPU": cpus, **({"GPU": 1.0} if gpu else {})}
    bundles = [{"CPU": cpus}] + [dict(rank) for _ in range(spec.learner.ranks)]
    if needs_rollout(spec) and spec.rollout.placement == "per_trial":
        bundles += [dict(rank) for _ in range(spec.rollout.workers)]
    elif needs_rollout(spec) and spec.rollout.placement == "colocated":  # a rank's bundle
        for bundle in bundles[1 : 1 + spec.rollout.workers]:
            bundle["CPU"] += cpus
    if evaluator_bundle(spec):
        bundles.append(dict(rank))
    return bundles


class Stopwatch:
    """Seconds spent per phase of a trial (learner start, optimizer steps, evaluation ...).

    A phase timed on another thread than the trial's own (the evaluations that run beside the
    training, `evaluation.placement: evaluators`) is `bg_<phase>`: it overlaps the others, so
    it is not counted against the wall time; nor is `in_<phase>`, a part of another phase."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.start = time.perf_counter()
        self.thread = threading.get_ident()
        self.lock = threading.Lock()

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - start)

    def add(self, phase: str, seconds: float) -> None:
        if threading.get_ident() != self.thread:
            phase = f"bg_{phase}"
        with self.lock:
            self.totals[phase] += seconds

    def breakdown(self) -> dict[str, float]:
        """`time/<phase>_s` for every phase, plus the trial's wall time and what is left."""
        wall = time.perf_counter() - self.start
        out = {f"time/{k}_s": v for k, v in sorted(self.totals.items())}
        counted = sum(v for k, v in self.totals.items() if not k.startswith(("in_", "bg_")))
        out.update({"time/wall_s": wall, "time/other_s": max(0.0, wall - counted)})
        return out


class TrialWorkers:
    """The learner group and rollout engines of one trial, and the weights between them."""

    def __init__(
        self, spec: StudySpec, base_model: Path, seed: int, owner: str, pool: Any, clock: Stopwatch
    ):
        self.spec, self.base_model, self.seed, self.owner = spec, base_model, seed, owner
        self.pool, self.clock = pool, clock
        # colocated: a learner rank and an engine share one GPU (vLLM sleeps while it trains)
        self.gpu_share = 0.5 if spec.rollout.placement == "colocated" else 1.0
        self.learner: Any = None
        self.learner_key: str | None = None  # the prefix whose weights the learner holds
        self._rollout: Any = None
        self._rollout_lock = threading.Lock()  # the evaluations' thread may start the engines
        self._sync: WeightSync | None = None
        self._published: dict[str, Weights] = {}
        self.evaluator: Any = None
        self.evaluator_key: str | None = None
        self._kept_as = self._evaluator_kept_as = ""  # their keys in KEPT_LEARNERS

    def placement(self, bundles: list[int]) -> Placement:
        """Ranks in these bundles of the trial's placement group."""
        resources = self.spec.resources
        return Placement(
            resources.device,
            resources.cpus_per_actor,
            self.gpu_share,
            bundles=bundles,
            threads=resources.threads_per_actor,
        )

    # ----- the learner -------------------------------------------------------------------------
    def learner_at(self, key: str, model_dir: Path) -> Any:
        """The learner, holding the weights of prefix `key` (loaded from `model_dir` if needed)."""
        # lazy: torch and DeepSpeed load where a learner starts
        from stageflow.actors.learner import LearnerGroup

        if self.learner is None:
            with self.clock("learner_start"):
                bundles = list(range(1, 1 + self.spec.learner.ranks))
                placement = self.placement(bundles)
                self._kept_as = repr((str(self.base_model), self.spec.learner, placement))
                self.learner = take_kept(self._kept_as, model_dir, self.seed)
                if self.learner is None:
                    self.learner = LearnerGroup(model_dir, self.spec.learner, placement, self.seed)
        elif self.learner_key != key:
            with self.clock("checkpoint_load"):
                self.learner.load(model_dir)
        self.holds(key)
        return self.learner

    def holds(self, key: str) -> None:
        """The learner's weights are now those of prefix `key` (after loading or training)."""
        if self.learner_key != key:
            self._published.clear()
        self.learner_key = key

    # ----- the evaluator -----------------------------------------------------------------------
    def evaluator_placement(self) -> Placement:
        """On CUDA the last bundle of the trial's placement group (a GPU of its own); on CPU
        the trial's own bundle, whose process mostly waits on its actors, with no CPU reserved
        (and a learner rank's threads)."""
        resources = self.spec.resources
        if evaluator_bundle(self.spec):
            return self.placement([len(trial_bundles(self.spec)) - 1])
        threads = resources.threads_per_actor or max(1, int(resources.cpus_per_actor))
        return Placement(resources.device, 0.0, bundles=[0], threads=threads)

    def evaluator_at(self, key: str, model_dir: Path) -> Any:
        """The trial's evaluator (evaluation.placement: evaluators), holding the checkpoint of
        prefix `key` from `model_dir` (a committed prefix cache directory)."""
        # lazy: torch loads where an evaluator starts
        from stageflow.actors.evaluator import EvaluatorGroup

        if self.evaluator is None:
            with self.clock("evaluator_start"):
                placement = self.evaluator_placement()
                self._evaluator_kept_as = repr(
                    ("evaluator", str(self.base_model), self.spec.learner, placement)
                )
                self.evaluator = take_kept(self._evaluator_kept_as, model_dir, self.seed)
                if self.evaluator is None:
                    self.evaluator = EvaluatorGroup(
                        model_dir, self.spec.learner, placement, self.seed
                    )
        elif self.evaluator_key != key:
            with self.clock("checkpoint_load"):
                self.evaluator.load(model_dir)
        self.evaluator_key = key
        return self.evaluator

    # ----- the rollout engines -----------------------------------------------------------------
    @property
    def rollout(self) -> Any:
        """The trial's own engines (created now, in its placement group) or the shared pool."""
        with self._rollout_lock:
            if self._rollout is None:
                if self.spec.rollout.placement == "shared":
                    if self.pool is None:
                        raise RuntimeError("the study's rollout pool is not running")
                    self._rollout = SharedRollout(self.pool)
                else:
                    self._rollout = self._own_engines()
        return self._rollout

    def _own_engines(self) -> Any:
        ranks, workers = self.spec.learner.ranks, self.spec.rollout.workers
        colocated = self.spec.rollout.placement == "colocated"
        first = 1 if colocated else 1 + ranks
        placement = self.placement(list(range(first, first + workers)))
        with self.clock("engine_start"):
            return RolloutGroup(self.base_model, self.spec.rollout, placement, self.seed)

    @property
    def sync(self) -> WeightSync:
        if self._sync is None:
            self._sync = WeightSync(
                self.learner, self.rollout, self.spec.rollout.weight_sync, owner=self.owner
            )
        return self._sync

    def weights(self, key: str, model_dir: Path) -> Weights:
        """Prefix `key`'s weights for the engines: published from the learner when it holds
        them (in memory), else its checkpoint directory."""
        if self.learner_key != key:
            return Weights.of_dir(model_dir, tag=key)
        if key not in self._published:
            sync = self.sync  # the engines start here when they are the trial's own
            with self.clock("weight_sync"):
                self._published = {key: sync.publish(tag=key)}
        return self._published[key]

    def generate(self, prompts: list[str], weights: Weights, **sampling: Any) -> dict:
        rollout = self.rollout
        with self.clock("eval_generation"):
            return rollout.generate(prompts, weights, **sampling)

    @contextmanager
    def training(self) -> Iterator[None]:
        """While the learner trains: a colocated engine hands its accelerator memory back."""
        colocated = self.spec.rollout.placement == "colocated" and self._rollout is not None
        if colocated:
            self._rollout.sleep()
        try:
            yield
        finally:
            if colocated:
                self._rollout.wake()

    def close(self, keep_learner: bool = False) -> None:
        """End the trial's own actors (the shared pool lives on); `keep_learner`: keep the
        learner and the evaluator for the next trial this process runs (after a trial that
        finished)."""
        if self._sync is not None:
            self._sync.close()
        if self._rollout is not None and hasattr(self._rollout, "shutdown"):
            self._rollout.shutdown()
        for group, kept_as in (
            (self.learner, self._kept_as),
            (self.evaluator, self._evaluator_kept_as),
        ):
            if group is not None and keep_learner:
                KEPT_LEARNERS[kept_as] = group
            elif group is not None:
                group.shutdown()
        self._rollout = self._sync = self.learner = self.evaluator = None


# Learners (and evaluators) kept warm across the trials one Tune actor runs (Tune reuses a trial's actor and its
# placement group for the next trial of the same shape, so a learner in the group's bundles
# outlives the trial that started it): a trial then pays a checkpoint load, not a learner start
# (new processes importing torch, transformers and DeepSpeed). Keyed by base model, learner
# settings and placement; a learner that died meanwhile is not handed out.
KEPT_LEARNERS: dict[str, Any] = {}


def take_kept(key: str, model_dir: Path, seed: int) -> Any:
    """The learner kept under `key`, loaded from `model_dir` and reseeded as a new learner of
    `seed` would be; None when there is none or it is gone."""
    learner = KEPT_LEARNERS.pop(key, None)
    if learner is None:
        return None
    try:
        learner.load(model_dir)
        learner.reseed(seed)
    except Exception:  # its placement group or node went away: start a new one
        learner.shutdown()
        return None
    return learner
