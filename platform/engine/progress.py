"""Progress lines while a study runs (a Ray Tune callback in the driver).

Each line starts with the elapsed time, the trials done out of all, and an estimate of the time
left: the elapsed time per finished unit of work (a stage or unlearning branch of a trial)
times the units left. Trials that finished before (a resume) count as done at once.
"""

from __future__ import annotations

import time

from ray.tune import Callback

from stageflow.core.expand import Trial

SHOWN_METRICS = 3


def clock(seconds: float) -> str:
    """'45s', '3m05s', '1h02m'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressPrinter(Callback):
    """Prints one line per finished stage and per finished trial, with an ETA."""

    def __init__(self, trials: list[Trial], search: bool = False):
        """`search`: the trials are a search's, not known before it ends (no total, no ETA)."""
        self.total = None if search else len(trials)
        self.finished, self.start = 0, time.time()
        self.units = {t.trial_id: len(t.path) + len(t.unlearning) for t in trials}
        self.done: dict[str, int] = {}

    def _prefix(self, trial) -> str:
        t = Trial.from_dict(trial.config["trial"])
        elapsed = time.time() - self.start
        if self.total is None:
            return f"[{clock(elapsed):>6} {self.finished} trials] {t.display} seed={t.seed}"
        done, total = sum(self.done.values()), sum(self.units.values())
        eta = f"eta {clock(elapsed / done * (total - done))}" if done else "eta ?"
        return f"[{clock(elapsed):>6} {self.finished}/{self.total} trials, {eta}] {t.display} seed={t.seed}"

    def on_trial_result(self, iteration, trials, trial, result, **info):
        trial_id = Trial.from_dict(trial.config["trial"]).trial_id
        if "stage" not in result:  # a trial finished before this run: all its work is done
            self.done[trial_id] = self.units.get(trial_id, 0)
            return
        self.done[trial_id] = min(self.units.get(trial_id, 0), self.done.get(trial_id, 0) + 1)
        shown = [f"{k}={v:.3g}" for k, v in result.items() if "/" in k and isinstance(v, float)][
            :SHOWN_METRICS
        ]
        print(
            f"{self._prefix(trial)}  stage {result['stage_index']} {result['stage']}  {'  '.join(shown)}",
            flush=True,
        )

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finished += 1
        trial_id = Trial.from_dict(trial.config["trial"]).trial_id
        self.done[trial_id] = self.units.get(trial_id, 0)
        print(f"{self._prefix(trial)}  done", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(
            f"{self._prefix(trial)}  FAILED (see the trial's error file under the study's tune/ folder)",
            flush=True,
        )
