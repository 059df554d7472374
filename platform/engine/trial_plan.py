"""A trial's plan: every checkpoint and evaluation it reads or writes, with its key and seed.

The plan is computed before a trial runs, from the study spec, the rows each data set renders
to, the model's content and the code version (core/keys.py). The trial walks it; the
driver compares it with finished trials' records (a record whose plan changed is stale and its
trial runs again); `stageflow status` shows it. Nothing here imports torch or Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stageflow.actors.rendering import render_row, renders_chat
from stageflow.core.config import DataSpec, StageSpec, StudySpec
from stageflow.core.data_files import materialize, spec_rows
from stageflow.core.expand import Trial, trial_spec
from stageflow.core.keys import (
    base_key,
    code_version,
    digest,
    eval_key,
    memo_path,
    model_identity,
    rows_digest,
    stage_key,
    stage_seed,
)
from stageflow.core.models import has_chat_template
from stageflow.core.registry import (
    METRICS,
    runs_rl_loop,
    samples_alternatives,
)
from stageflow.core.tasks import read_jsonl

RowSource = Callable[[DataSpec], list[dict]]  # a data spec's rows as the data set holds them


@dataclass(frozen=True)
class PlannedStep:
    """One stage of a trial's path (or an unlearning branch at its end).

    `key`: the checkpoint after it (an eval stage: its parent's); `seed`: its randomness;
    `evals`: {set name: evaluation key} of the sets evaluated after it.
    """

    index: int
    name: str
    stage: StageSpec
    parent: str
    key: str
    seed: int
    branch: bool = False
    evals: dict[str, str] = field(default_factory=dict)
    eval_seed: int = 0

    @property
    def trains(self) -> bool:
        return self.stage.kind != "eval"


@dataclass(frozen=True)
class TrialPlan:
    trial: Trial
    spec: StudySpec  # the trial's own spec (grid point applied, oracle without forget data)
    base: str
    base_evals: dict[str, str]
    base_eval_seed: int
    steps: list[PlannedStep]

    @property
    def fingerprint(self) -> str:
        """Every key the trial reads or writes: a finished record with another is stale."""
        return digest(self.base, self.base_evals, [(s.key, s.evals) for s in self.steps])

    @property
    def trained(self) -> list[PlannedStep]:
        return [s for s in self.steps if s.trains]


class Planner:
    """Plans the trials of one study; rows and digests of each data set computed once."""

    def __init__(self, spec: StudySpec, rows: RowSource, model: str, code: str, chat: bool):
        self.spec, self.source = spec, rows
        self.model, self.code, self.chat_model = model, code, chat
        self._rows: dict[str, list[dict]] = {}
        self._digests: dict[str, str | None] = {}
        self._specs: dict[str, StudySpec] = {}

    def rows(self, data: DataSpec) -> list[dict]:
        """The data set's rows rendered for the model (chat turns when the template says so)."""
        text = repr(data)
        if text not in self._rows:
            chat = renders_chat(data.template, self.chat_model)
            self._rows[text] = [render_row(r, chat, data.system) for r in self.source(data)]
        return self._rows[text]

    def digest_of(self, data: DataSpec | None, first: int | None = None) -> str | None:
        if data is None:
            return None
        text = f"{data!r}[:{first}]"
        if text not in self._digests:
            self._digests[text] = rows_digest(self.rows(data)[:first])
        return self._digests[text]

    def trial_spec(self, trial: Trial) -> StudySpec:
        text = repr((sorted(trial.hparams.items()), trial.oracle))
        if text not in self._specs:
            self._specs[text] = trial_spec(self.spec, trial)
        return self._specs[text]

    def evals(
        self, spec: StudySpec, checkpoint: str, seed: int, names: list[str] | None
    ) -> dict[str, str]:
        out = {}
        for name, s in spec.evaluation.sets.items():
            if names is not None and name not in names:
                continue
            generates = any(METRICS[m].needs == "generation" for m in s.metrics)
            rows = self.digest_of(s.data, s.max_examples)
            if s.holdout:  # membership metrics score its rows too
                held = spec.evaluation.sets[s.holdout]
                rows = digest(rows, self.digest_of(held.data, held.max_examples))
            truth = name == spec.analysis.forget_quality
            out[name] = eval_key(checkpoint, seed, name, s, spec, rows, truth, generates)
        return out

    def plan(self, trial: Trial) -> TrialPlan:
        spec = self.trial_spec(trial)
        after = None if spec.evaluation.after_every_stage else []
        base = base_key(self.model, trial.seed, self.code)
        base_seed = stage_seed(trial.seed, ["eval"])
        steps, key, trained = [], base, []
        for index, name in enumerate(trial.path, start=1):
            stage = spec.stages[name]
            if stage.kind == "eval":
                seed = stage_seed(trial.seed, [*trained, name])
                names = list(stage.sets) or None
                evals = self.evals(spec, key, seed, names)
                steps.append(PlannedStep(index, name, stage, key, key, seed, False, evals, seed))
                continue
            trained.append(name)
            steps.append(self._train_step(spec, trial, index, name, key, trained, False, after))
            key = steps[-1].key
        for offset, name in enumerate(trial.unlearning, start=1):
            branch = [*trained, name]
            index = len(trial.path) + offset
            steps.append(self._train_step(spec, trial, index, name, key, branch, True, after))
        return TrialPlan(
            trial, spec, base, self.evals(spec, base, base_seed, None), base_seed, steps
        )

    def _train_step(
        self,
        spec: StudySpec,
        trial: Trial,
        index: int,
        name: str,
        parent: str,
        names: list[str],
        branch: bool,
        sets: list[str] | None,
    ) -> PlannedStep:
        stage = spec.stages[name]
        seed = stage_seed(trial.seed, names)
        probe = None
        if branch and spec.analysis.probability_mass is not None:
            probe_set = spec.evaluation.sets[spec.analysis.probability_mass]
            probe = self.digest_of(probe_set.data, probe_set.max_examples)
        data = {
            "data": self.digest_of(stage.data),
            "retain": self.digest_of(stage.retain),
            "probe": probe,
        }
        samples = runs_rl_loop(stage) or samples_alternatives(stage)
        key = stage_key(parent, seed, stage, spec, data, samples)
        eval_seed = stage_seed(trial.seed, [*names, "eval"])
        evals = self.evals(spec, key, eval_seed, sets)
        return PlannedStep(index, name, stage, parent, key, seed, branch, evals, eval_seed)


def materialized_rows(data_dir: Path) -> RowSource:
    """Rows read from the files written under the study's data folder (what trials train on)."""
    return lambda data: read_jsonl(materialize(data, data_dir))


def in_memory_rows(data: DataSpec) -> list[dict]:
    """Rows computed without writing anything (for `stageflow status`)."""
    return spec_rows(data)


def study_planner(
    spec: StudySpec, study: Any, base_model: Path, write: bool = True, identity: dict | None = None
) -> Planner:
    """The planner of a study whose base model is `base_model`; `write`: materialize data under
    the study directory (a run), else read it in memory (status, report). `identity`: the
    model's and the code's digests as the driver computed them (a trial's process uses those)."""
    rows = materialized_rows(study.data) if write else in_memory_rows
    identity = identity or study_identity(study, base_model)
    return Planner(spec, rows, identity["model"], identity["code"], has_chat_template(base_model))


def study_identity(study: Any, base_model: Path) -> dict[str, str]:
    """The digests every key of a study descends from: the base model's content and the code."""
    return {"model": model_identity(base_model, memo_path(study.root)), "code": code_version()}


def base_model_dir(spec: StudySpec, study: Any) -> Path:
    """Where a study's base model is: `model.path`, or the tiny model built in the study dir."""
    if spec.model.path:
        return Path(spec.model.path).absolute()
    return study.models / f"tiny-{spec.model.tiny.digest()}"


def fingerprints(
    spec: StudySpec, study: Any, trials: list[Trial], write: bool = True
) -> dict[str, str]:
    """{trial id: its plan's fingerprint} ({} before the base model exists: nothing ran)."""
    base = base_model_dir(spec, study)
    if not base.is_dir():
        return {}
    planner = study_planner(spec, study, base, write=write)
    return {trial.trial_id: planner.plan(trial).fingerprint for trial in trials}


def needs_rollout(spec: StudySpec) -> bool:
    """Whether any evaluation samples completions, or any stage runs the RL loop or samples
    its preferred answers (AltPO)."""
    stages = [s for s in spec.stages.values() if s.kind != "eval"]
    return evaluates_generation(spec) or any(
        runs_rl_loop(s) or samples_alternatives(s) for s in stages
    )


def evaluates_generation(spec: StudySpec) -> bool:
    """Whether any evaluation set samples completions."""
    return any(
        METRICS[m].needs == "generation" for s in spec.evaluation.sets.values() for m in s.metrics
    )
