"""An ordering search (`orderings: {search: ...}`) on Ray Tune.

`OrderingSearcher` is a Tune `Searcher`: it asks core/ordering_search.py for the next path and
hands Tune that path's trials (its seeds and grid points, and its oracle) one by one; when the
last of them finishes it scores the path from the trial records (the analysis's score, or a
metric at the path's end) and tells the search. `PrefixStopper` is a Tune `Stopper`: after each
stage a trial reports, it stops the trial when no completion of its prefix can beat the best
score seen (only scores that finished meanwhile can change that: with one trial at a time it
never fires). The search's state is saved to `<study dir>/search.json` after each step; a
resumed study starts a new Tune experiment whose searcher goes on from it (finished trials
report their records at once, finished prefixes are cache hits); an edited `orderings.search`
starts a new search.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import deque
from collections.abc import Callable
from typing import Any

from ray.tune.search import Searcher
from ray.tune.stopper import Stopper

from stageflow.actors.dispatch import call_actor
from stageflow.core.config import StudySpec
from stageflow.core.expand import Trial, expand, grid_points, oracle_path
from stageflow.core.files import read_json, write_json
from stageflow.core.ordering_search import OrderingSearch, replay
from stageflow.core.study_dir import StudyDir
from stageflow.platform.engine.tracking import Tracker
from stageflow.platform.results.analysis import Analysis
from stageflow.platform.results.tables import format_table

Path_ = tuple[str, ...]


def new_search(spec: StudySpec, method: str | None = None) -> OrderingSearch:
    """The search a spec declares (its costs counted per seed and grid point); `method`:
    another method than the spec's."""
    s = spec.orderings.search
    runs = len(spec.seeds) * len(grid_points(spec.grid))
    oracle_of = functools.partial(oracle_path, spec) if spec.oracle else None
    evals = frozenset(n for n in s.stages if spec.stages[n].kind == "eval")
    return OrderingSearch(
        list(s.stages), s.goal, s.budget, s.seed, method or s.method, runs, len(spec.unlearning),
        oracle_of, evals,
    )  # fmt: skip


def budget_paths(spec: StudySpec) -> list[Path_]:
    """Paths that spend a search's budget as it may (orderings drawn at random until the next
    does not fit): what `stageflow plan` sizes before the search has chosen any."""
    return replay(new_search(spec, "random"), lambda path: 0.0).asked


class SearchState:
    """The search, the trials it has handed out and their paths; shared by the searcher and
    the stopper in the driver."""

    def __init__(
        self,
        spec: StudySpec,
        study: StudyDir,
        fingerprint: Callable[[Trial], str],
        tracker: Any = None,
    ):
        """`fingerprint`: a trial's plan fingerprint (a record of another plan is no result)."""
        self.spec, self.study, self.tracker = spec, study, tracker
        self.fingerprint = fingerprint
        self.search = new_search(spec)
        self.declared = dataclasses.asdict(spec.orderings.search)
        self.branch = spec.orderings.search.branch or (spec.unlearning or [""])[0]
        saved = read_json(study.search_log)
        if saved and (saved.get("search") != self.declared or not self.still_scored(saved)):
            saved = None  # another search, or scores of another configuration: start afresh
        if saved:
            self.search.restore(saved)
        self.queue: deque[Trial] = deque()
        self.running: dict[str, Trial] = {}  # Tune trial id -> trial
        self.seen_at: dict[str, int] = {}  # Tune trial id -> scores seen when it started
        self.owners: dict[str, set[Path_]] = {}  # trial id -> the asked paths it serves
        self.handed: set[str] = set()  # trial ids handed to Tune by this driver
        self.pruned: set[Path_] = {tuple(p) for p in (saved or {}).get("pruned", [])}
        for path in self.search.pending():  # asked before an interruption: run them first
            self.enqueue(path)

    def still_scored(self, saved: dict) -> bool:
        """Whether every score a saved search saw is what the current records give (a changed
        study, data, model or code makes them stale: their trials run again)."""
        return all(
            self.score(tuple(path), self.trials_of(tuple(path))) == value
            for path, value in saved["scores"]
            if value is not None
        )

    def trials_of(self, path: Path_) -> list[Trial]:
        return expand(self.spec, [path])

    def enqueue(self, path: Path_) -> None:
        """Queue a path's trials (an oracle shared with an earlier path runs once)."""
        for trial in self.trials_of(path):
            self.owners.setdefault(trial.trial_id, set()).add(path)
            if trial.trial_id not in self.handed:
                self.handed.add(trial.trial_id)
                self.queue.append(trial)

    def save(self) -> None:
        write_json(
            self.study.search_log,
            {
                "search": self.declared,
                **self.search.state(),
                "pruned": [list(p) for p in sorted(self.pruned)],
            },
        )

    def next_trial(self, tune_id: str) -> Trial | None:
        """The next trial to run; None when the search has nothing more."""
        if not self.queue:
            path = self.search.propose()
            if path is None:
                return None
            self.save()
            self.enqueue(path)
            if not self.queue:  # every trial of it ran already: score it now
                self.finish_path(path)
                return self.next_trial(tune_id)
        trial = self.queue.popleft()
        self.running[tune_id] = trial
        self.seen_at[tune_id] = len(self.search.observed())
        return trial

    def waiting(self) -> bool:
        return bool(self.running) or bool(self.queue)

    def complete(self, tune_id: str) -> None:
        """A trial ended (finished, failed or stopped): score its path once all its trials
        have ended."""
        trial = self.running.pop(tune_id, None)
        if trial is None:
            return
        if self.record(trial) is None and self.tracker is not None:
            run = call_actor(
                self.tracker, Tracker.find_run, **{"stageflow.trial_id": trial.trial_id}
            )
            if run:  # a stopped trial's run ends with it
                call_actor(self.tracker, Tracker.end_run, run, "KILLED")
        for path in sorted(self.owners.get(trial.trial_id, ())):
            self.finish_path(path)

    def finish_path(self, path: Path_) -> None:
        trials = self.trials_of(path)
        busy = {t.trial_id for t in self.running.values()} | {t.trial_id for t in self.queue}
        if path not in self.search.pending() or any(t.trial_id in busy for t in trials):
            return
        self.search.observe(path, self.score(path, trials))
        self.save()

    def record(self, trial: Trial) -> dict | None:
        """The trial's record, if its current plan made it."""
        record = self.study.read_record(trial.trial_id)
        if record is None or record.get("fingerprint") != self.fingerprint(trial):
            return None
        return record

    def score(self, path: Path_, trials: list[Trial]) -> float | None:
        """The path's mean score over its trials; None when one did not finish."""
        records = [(t, self.record(t)) for t in trials]
        if any(r is None for _, r in records):
            return None
        s = self.spec.orderings.search
        values = Analysis(self.spec, self.study, records).ordering_values(s.score, self.branch)
        found = [v for v in values.get(">".join(path), []) if not math.isnan(v)]
        return sum(found) / len(found) if found else None

    def stop(self, tune_id: str, result: dict) -> bool:
        """Whether to stop a trial after the stage it reported: scores that finished since it
        started say its prefix cannot win (without new scores, the search chose it knowing
        what it knows now)."""
        trial = self.running.get(tune_id)
        index = result.get("stage_index", 0)
        if trial is None or trial.oracle or not 0 < index < len(trial.path):
            return False
        if len(self.search.observed()) == self.seen_at.get(tune_id):
            return False
        prefix = trial.path[:index]
        if self.search.can_win(prefix):
            return False
        self.pruned.add(trial.path)
        self.save()
        return True


def log_prefixes(
    study: StudyDir, records: list[tuple[Trial, dict]], tracker: Any, study_run: str
) -> None:
    """The prefixes the search expanded (and the unlearning branches it ran), each with its
    checkpoint key and the MLflow stage run that trained it, as `search/prefixes.md` on the
    study run."""
    rows, seen = [], set()
    for trial, record in records:
        for entry in record["history"]:
            if entry["index"] == 0 or entry["key"] in seen:
                continue
            seen.add(entry["key"])
            prefix = ">".join(trial.path[: entry["index"]])
            if entry.get("branch"):
                prefix = f"{'>'.join(trial.path)} +{entry['stage']}"
            run = call_actor(tracker, Tracker.find_run, prefix_key=entry["key"], kind="stage")
            run = run or "(trained before this study)"
            label = ("oracle " if trial.oracle else "") + prefix
            rows.append([label, entry["index"], trial.seed, entry["key"], run])
    table = format_table(["prefix", "depth", "seed", "checkpoint key", "stage run"], rows)
    call_actor(tracker, Tracker.log_text, study_run, table + "\n", "search/prefixes.md")


class OrderingSearcher(Searcher):
    """Tune's searcher for an ordering search (the state is the study's search.json, not
    Tune's experiment checkpoint: save and restore are the search state's)."""

    def __init__(self, state: SearchState):
        super().__init__()
        self.state = state

    def suggest(self, trial_id: str) -> dict | str | None:
        trial = self.state.next_trial(trial_id)
        if trial is not None:
            return {"trial": trial.to_dict()}
        return None if self.state.waiting() else Searcher.FINISHED

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        self.state.complete(trial_id)

    def save(self, checkpoint_path: str) -> None:
        self.state.save()

    def restore(self, checkpoint_path: str) -> None:
        pass

    def save_to_dir(self, checkpoint_dir: str, session_str: str = "default") -> None:
        self.state.save()

    def restore_from_dir(self, checkpoint_dir: str) -> None:
        pass


class PrefixStopper(Stopper):
    """Tune's stopper: a trial whose prefix cannot win ends after the stage it reported."""

    def __init__(self, state: SearchState):
        self.state = state

    def __call__(self, trial_id: str, result: dict) -> bool:
        return self.state.stop(trial_id, result)

    def stop_all(self) -> bool:
        return False
