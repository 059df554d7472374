"""`storage.max_gb`: a study that prunes its prefix cache as it goes (a Ray Tune callback in
the driver).

A trial still needs the checkpoint each of its unfinished stages starts from (its plan's
parents); every other intermediate checkpoint has served its purpose once the trials that
pass through it are past it. When the study's checkpoints take more than the cap, those are
removed; the path ends and the unlearning branches stay (what `stageflow prune --keep final`
keeps). Progress comes from the trials' results, which lag behind them: a checkpoint is
removed late, never early. A trial that fails and runs again trains what it lost again.
"""

from __future__ import annotations

from ray.tune import Callback

from stageflow.core.expand import Trial
from stageflow.core.footprint import size_text
from stageflow.core.study_dir import StudyDir, tree_bytes
from stageflow.platform.engine.trial_plan import TrialPlan


def kept_keys(plans: list[TrialPlan]) -> set[str]:
    """The checkpoints a study keeps: each trial's path end and unlearning branches."""
    keys = set()
    for plan in plans:
        path = [s for s in plan.trained if not s.branch]
        keys |= {s.key for s in plan.trained if s.branch}
        keys |= {path[-1].key} if path else set()
    return keys


class StorageCap(Callback):
    """Removes checkpoints no unfinished trial needs while the study's exceed `max_bytes`."""

    def __init__(self, study: StudyDir, plans: dict[str, TrialPlan], max_bytes: float):
        self.study, self.plans, self.max_bytes = study, plans, max_bytes
        self.kept = kept_keys(list(plans.values()))
        self.passed = {trial_id: 0 for trial_id in plans}  # the last stage index reported
        self.finished: set[str] = set()
        self.sizes: dict[str, int] = {}  # checkpoint key -> bytes (a committed one never changes)
        self.warned = False

    def needed(self) -> set[str]:
        """The checkpoints the unfinished trials' remaining stages start from."""
        return {
            step.parent
            for trial_id, plan in self.plans.items()
            if trial_id not in self.finished
            for step in plan.steps
            if step.index > self.passed[trial_id]
        }

    def enforce(self) -> None:
        cache = self.study.cache()
        sizes = {
            key: self.sizes.get(key) or tree_bytes(cache.entry(key)) for key in cache.checkpoints()
        }
        self.sizes = sizes
        total = sum(sizes.values())
        if total <= self.max_bytes:
            return
        spare = sorted(set(sizes) - self.kept - self.needed())
        for key in spare:
            cache.remove(key)
        freed = sum(sizes[key] for key in spare)
        if spare:
            print(
                f"storage.max_gb: removed {len(spare)} intermediate checkpoints no trial needs "
                f"any more ({size_text(freed)}); checkpoints now {size_text(total - freed)}",
                flush=True,
            )
        if total - freed > self.max_bytes and not self.warned:
            self.warned = True
            print(
                f"storage.max_gb: the checkpoints still needed or kept (path ends, unlearning "
                f"branches) take {size_text(total - freed)}, more than the cap of "
                f"{size_text(self.max_bytes)}",
                flush=True,
            )

    def _id(self, trial) -> str:
        return Trial.from_dict(trial.config["trial"]).trial_id

    def on_trial_result(self, iteration, trials, trial, result, **info):
        trial_id = self._id(trial)
        if "stage_index" in result:
            self.passed[trial_id] = max(self.passed[trial_id], result["stage_index"])
        else:  # a trial that finished before this run
            self.finished.add(trial_id)
        self.enforce()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finished.add(self._id(trial))
        self.enforce()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.passed[self._id(trial)] = 0  # it runs again from its first stage
