"""Progress lines while a study runs (a Ray Tune callback in the driver)."""

from __future__ import annotations

import time

from ray.tune import Callback

SHOWN_METRICS = 3


class ProgressPrinter(Callback):
    """Prints one line per finished stage and per finished trial."""

    def __init__(self, total_trials: int):
        self.total, self.finished, self.start = total_trials, 0, time.time()

    def _prefix(self, trial) -> str:
        path = ">".join(trial.config["trial"]["path"])
        seed = trial.config["trial"]["seed"]
        oracle = "oracle " if trial.config["trial"]["oracle"] else ""
        return f"[{time.time() - self.start:6.0f}s {self.finished}/{self.total}] {oracle}{path} seed={seed}"

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "stage" not in result:
            return
        shown = [f"{k}={v:.3g}" for k, v in result.items() if "/" in k and isinstance(v, float)][
            :SHOWN_METRICS
        ]
        print(
            f"{self._prefix(trial)}  stage {result['stage_index']} {result['stage']}  {'  '.join(shown)}",
            flush=True,
        )

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finished += 1
        print(f"{self._prefix(trial)}  done", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(
            f"{self._prefix(trial)}  FAILED (see the trial's error file under the study's tune/ folder)",
            flush=True,
        )
