"""Semantic checks of a study, all before any work starts.

`validate_study` raises the first `StudyError` it finds: unknown names (looked up in the
registries), impossible orderings, bad data files, a missing model, an unwritable
storage dir or an unreachable tracking server. Nothing is written.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from stageflow.actors.rewards import RewardConfigError, check_rewards
from stageflow.platform.config import DataSpec, StageSpec, StudySpec
from stageflow.platform.expand import apply_hparams, grid_points, parse_path
from stageflow.platform.models import check_model_dir
from stageflow.platform.registry import (
    METRICS,
    OBJECTIVES,
    REWARDS,
    STAGE_KINDS,
    TASKS,
    Entry,
    Registry,
    closest,
    load_plugins,
)
from stageflow.platform.study_file import StudyError, load_study
from stageflow.platform.tasks import check_jsonl, generate

CHOICES = {
    "learner.dtype": ("float32", "bfloat16"),
    "learner.kernels": ("fused", "naive"),
    "rollout.backend": ("vllm", "hf"),
    "rollout.dtype": ("float32", "bfloat16"),
    "resources.device": ("auto", "cpu", "cuda"),
    "model.dtype": ("float32", "bfloat16"),
}
SCHEDULES = ("constant", "linear", "cosine")
GRID_FORBIDDEN = ("name", "storage_dir", "orderings", "grid", "seeds", "tracking")


def default_storage_dir(spec: StudySpec) -> Path:
    return Path(spec.storage_dir or f"runs/{spec.name}")


def load_and_validate(path: str | Path, overrides: list[str] | None = None) -> StudySpec:
    """Load a study file, apply overrides and check everything; raises StudyError."""
    spec = load_study(path, overrides)
    validate_study(spec, str(path))
    return spec


def validate_study(spec: StudySpec, source: str) -> None:
    load_plugins()
    v = _Validator(spec, source)
    v.check_all()


class _Validator:
    def __init__(self, spec: StudySpec, source: str):
        self.spec, self.source = spec, source

    def fail(self, key: str, problem: str) -> None:
        raise StudyError(self.source, key, problem)

    def name_in(self, registry: Registry, name: str | None, key: str) -> None:
        if name not in registry:
            self.fail(key, f"unknown {registry.what} '{name}'; {registry.expected(name)}")

    def positive(self, key: str, value: float | None, allow_zero: bool = False) -> None:
        if value is not None and (value < 0 or (value == 0 and not allow_zero)):
            self.fail(
                key,
                f"expected a {'non-negative' if allow_zero else 'positive'} number, got {value}",
            )

    def check_all(self) -> None:
        spec = self.spec
        if not spec.name or not all(c.isalnum() or c in "-_." for c in spec.name):
            self.fail("name", "expected a study name of letters, digits, '-', '_' or '.'")
        if not spec.stages:
            self.fail("stages", "expected at least one stage")
        for name, stage in spec.stages.items():
            self.check_stage(f"stages.{name}", stage)
        self.check_orderings()
        for index, name in enumerate(spec.unlearning):
            key = f"unlearning[{index}]"
            self.known_stage(key, name)
            if spec.stages[name].kind != "unlearn":
                self.fail(
                    key,
                    f"stage '{name}' is of kind '{spec.stages[name].kind}', expected an unlearn stage",
                )
        if not spec.seeds:
            self.fail("seeds", "expected at least one seed")
        if len(set(spec.seeds)) != len(spec.seeds):
            self.fail("seeds", "expected distinct seeds")
        self.check_grid()
        for name, eval_set in spec.evaluation.sets.items():
            key = f"evaluation.sets.{name}"
            self.check_data(f"{key}.data", eval_set.data)
            for i, metric in enumerate(eval_set.metrics):
                self.name_in(METRICS, metric, f"{key}.metrics[{i}]")
            self.positive(f"{key}.samples", eval_set.samples)
            self.positive(f"{key}.max_new_tokens", eval_set.max_new_tokens)
        self.check_analysis()
        self.check_engines()
        self.check_model()
        self.check_storage()
        self.check_tracking()

    def check_stage(self, key: str, stage: StageSpec) -> None:
        self.name_in(STAGE_KINDS, stage.kind, f"{key}.kind")
        if stage.kind == "eval":
            for i, name in enumerate(stage.sets):
                if name not in self.spec.evaluation.sets:
                    self.fail(
                        f"{key}.sets[{i}]",
                        f"unknown evaluation set '{name}'; expected one of evaluation.sets: {', '.join(self.spec.evaluation.sets) or '(none defined)'}",
                    )
            return
        objective = stage.objective or STAGE_KINDS[stage.kind].meta["default_objective"]
        if objective is None:
            self.fail(
                f"{key}.objective",
                f"a {stage.kind} stage needs an objective; {OBJECTIVES.expected()}",
            )
        self.name_in(OBJECTIVES, objective, f"{key}.objective")
        entry = OBJECTIVES[objective]
        if stage.kind not in entry.meta.get("kinds", ()):
            self.fail(
                f"{key}.objective",
                f"objective '{objective}' does not run in a {stage.kind} stage (it runs in: {', '.join(entry.meta.get('kinds', ()))})",
            )
        unknown = OBJECTIVES.unknown_param(objective, stage.params)
        if unknown:
            self.fail(f"{key}.params.{unknown[0]}", unknown[1])
        self.check_rl(key, stage, objective, entry)
        self.check_data(f"{key}.data", stage.data)
        if stage.retain is not None:
            self.check_data(f"{key}.retain", stage.retain)
        if stage.steps is not None and stage.epochs is not None:
            self.fail(f"{key}.steps", "give either steps or epochs, not both")
        self.positive(f"{key}.steps", stage.steps)
        self.positive(f"{key}.epochs", stage.epochs)
        self.positive(f"{key}.lr", stage.lr)
        self.positive(f"{key}.batch_size", stage.batch_size)
        self.positive(f"{key}.max_len", stage.max_len)
        self.positive(f"{key}.warmup_steps", stage.warmup_steps, allow_zero=True)
        if stage.schedule not in SCHEDULES:
            self.fail(
                f"{key}.schedule",
                f"unknown schedule '{stage.schedule}'; expected one of {', '.join(SCHEDULES)}",
            )

    def check_rl(self, key: str, stage: StageSpec, objective: str, entry: Entry) -> None:
        """An RL stage's rewards (parameters, gate thresholds) and its loop settings."""
        try:
            check_rewards(stage.rewards)
        except RewardConfigError as err:
            self.fail(f"{key}.{err.key}", err.problem)
        if not entry.meta.get("rl_loop"):
            if stage.rewards:
                self.fail(
                    f"{key}.rewards",
                    f"objective '{objective}' does not use rewards; expected none (rewards drive RL objectives: {', '.join(n for n in OBJECTIVES.names() if OBJECTIVES[n].meta.get('rl_loop'))})",
                )
            return
        if not stage.rewards and "default_rewards" not in entry.meta:
            self.fail(
                f"{key}.rewards",
                f"a {stage.kind} stage needs at least one reward; expected a list of {{name, weight, params}} naming {', '.join(REWARDS.names())}",
            )
        params = {**entry.params, **stage.params}
        group = params["group_size"]
        if isinstance(group, bool) or not isinstance(group, int) or group < 2:
            self.fail(
                f"{key}.params.group_size",
                f"GRPO compares completions of one prompt with each other; expected a group size of at least 2, got {group}",
            )
        for name in ("max_new_tokens", "updates_per_batch", "prompts_per_step", "temperature"):
            self.positive(f"{key}.params.{name}", params[name])
        for name in ("beta", "eps_low", "eps_high", "entropy_coef"):
            self.positive(f"{key}.params.{name}", params[name], allow_zero=True)
        if entry.meta.get("retain_prompts") and stage.retain is None:
            self.fail(
                f"{key}.retain",
                f"objective '{objective}' also rewards answers on retain (boundary) prompts; expected a retain data set",
            )

    def check_data(self, key: str, data: DataSpec) -> None:
        if (data.task is None) == (data.file is None):
            self.fail(
                key, "expected exactly one of 'task' (a synthetic task) or 'file' (a JSONL file)"
            )
        if data.file is not None:
            problem = check_jsonl(data.file)
            if problem:
                self.fail(f"{key}.file", f"{data.file}: expected {problem}")
            return
        self.name_in(TASKS, data.task, f"{key}.task")
        entry = TASKS[data.task]
        if data.split not in entry.meta["splits"]:
            self.fail(
                f"{key}.split",
                f"task '{data.task}' has no split '{data.split}'; expected one of {', '.join(entry.meta['splits'])}",
            )
        for param in data.params:
            if param not in entry.params:
                self.fail(
                    f"{key}.params.{param}",
                    f"unknown parameter of task '{data.task}'; expected one of {', '.join(entry.params) or '(none)'}",
                )
        self.positive(f"{key}.size", data.size)
        try:
            generate(data.task, data.seed, min(data.size, 4), dict(data.params))
        except ValueError as err:
            self.fail(f"{key}.params", f"{err}")

    def known_stage(self, key: str, name: str) -> None:
        if name not in self.spec.stages:
            hint = closest(name, list(self.spec.stages))
            expected = (
                f"did you mean '{hint}'?"
                if hint
                else f"expected one of {', '.join(self.spec.stages)}"
            )
            self.fail(key, f"unknown stage '{name}'; {expected}")

    def check_orderings(self) -> None:
        o = self.spec.orderings
        given = [n for n in ("permutations", "insert", "explicit") if getattr(o, n) is not None]
        if len(given) != 1:
            self.fail(
                "orderings",
                f"expected exactly one of permutations, insert or explicit, got {', '.join(given) or 'none'}",
            )
        if o.permutations is not None:
            for i, name in enumerate(o.permutations):
                self.known_stage(f"orderings.permutations[{i}]", name)
            if not o.permutations or len(set(o.permutations)) != len(o.permutations):
                self.fail(
                    "orderings.permutations", "expected a non-empty list of distinct stage names"
                )
        if o.insert is not None:
            self.known_stage("orderings.insert.stage", o.insert.stage)
            for i, name in enumerate(o.insert.into):
                self.known_stage(f"orderings.insert.into[{i}]", name)
            top = len(o.insert.into) + 1
            for i, position in enumerate(o.insert.positions or []):
                if not 1 <= position <= top:
                    self.fail(
                        f"orderings.insert.positions[{i}]",
                        f"position {position} is out of range; expected 1 to {top} for a sequence of {top - 1} stages",
                    )
        for i, text in enumerate(o.explicit or []):
            for name in parse_path(text):
                self.known_stage(f"orderings.explicit[{i}]", name)
        if o.explicit is not None and not o.explicit:
            self.fail("orderings.explicit", "expected at least one path like 'a>b>c'")

    def check_grid(self) -> None:
        for key, values in self.spec.grid.items():
            if key.split(".")[0] in GRID_FORBIDDEN:
                self.fail(
                    f"grid.{key}",
                    f"'{key}' cannot be swept; expected a stage, learner, rollout or evaluation setting",
                )
            if not values:
                self.fail(f"grid.{key}", "expected a non-empty list of values")
        for point in grid_points(self.spec.grid):
            try:
                swept = apply_hparams(self.spec, point)
            except Exception as err:  # OmegaConf key or type error, named by the key
                key = next(iter(point))
                self.fail(
                    f"grid.{getattr(err, 'full_key', key) or key}",
                    f"not a setting of the study or a value of the wrong type ({str(err).splitlines()[0]})",
                )
            if swept is not self.spec:
                for name, stage in swept.stages.items():
                    self.check_stage(f"stages.{name}", stage)

    def check_analysis(self) -> None:
        analysis, sets = self.spec.analysis, self.spec.evaluation.sets
        named = {
            "forget_score": analysis.forget_score,
            **{f"utilities.{k}": v for k, v in analysis.utilities.items()},
        }
        for key, metric in named.items():
            if metric is None:
                continue
            set_name, _, metric_name = metric.partition("/")
            if set_name not in sets or metric_name not in sets[set_name].metrics:
                self.fail(
                    f"analysis.{key}",
                    f"'{metric}' is not computed; expected '<set>/<metric>' of evaluation.sets",
                )
        if analysis.forget_quality is not None:
            chosen = sets.get(analysis.forget_quality)
            if chosen is None or "truth_ratio" not in chosen.metrics:
                self.fail(
                    "analysis.forget_quality",
                    f"expected an evaluation set with the truth_ratio metric, got '{analysis.forget_quality}'",
                )
            if not self.spec.oracle:
                self.fail(
                    "analysis.forget_quality",
                    "forget quality compares with the oracle; expected oracle: true",
                )

    def check_engines(self) -> None:
        spec = self.spec
        for key, allowed in CHOICES.items():
            section, field = key.split(".")
            value = getattr(getattr(spec, section), field)
            if value not in allowed:
                self.fail(key, f"unknown value '{value}'; expected one of {', '.join(allowed)}")
        if not 0 <= spec.learner.zero_stage <= 3:
            self.fail(
                "learner.zero_stage",
                f"ZeRO stage {spec.learner.zero_stage} is out of range; expected 0, 1, 2 or 3",
            )
        self.positive("learner.ranks", spec.learner.ranks)
        self.positive("rollout.workers", spec.rollout.workers, allow_zero=True)
        if not 0 < spec.rollout.gpu_memory_utilization <= 1:
            self.fail("rollout.gpu_memory_utilization", "expected a fraction in (0, 1]")

    def check_model(self) -> None:
        problem = self.spec.model.tiny.problem()
        if self.spec.model.path is None and problem:
            self.fail("model.tiny", f"expected {problem}")
        if self.spec.model.path is not None:
            problem = check_model_dir(self.spec.model.path)
            if problem:
                self.fail("model.path", f"{self.spec.model.path}: expected {problem}")

    def check_storage(self) -> None:
        path = default_storage_dir(self.spec).absolute()
        if path.exists() and not path.is_dir():
            self.fail("storage_dir", f"{path} is a file; expected a directory")
        existing = next(p for p in [path, *path.parents] if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            self.fail("storage_dir", f"{existing} is not writable; expected a writable directory")

    def check_tracking(self) -> None:
        uri = self.spec.tracking.uri
        if uri is None:
            return
        if uri.startswith("sqlite:///"):
            folder = Path(uri[len("sqlite:///") :]).absolute().parent
            existing = next(p for p in [folder, *folder.parents] if p.exists())
            if not os.access(existing, os.W_OK):
                self.fail(
                    "tracking.uri",
                    f"{existing} is not writable; expected a writable place for the SQLite store",
                )
        elif uri.startswith(("http://", "https://")):
            try:
                urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=3).close()
            except (urllib.error.URLError, OSError) as err:
                reason = getattr(err, "reason", err)
                self.fail(
                    "tracking.uri",
                    f"MLflow server {uri} is unreachable ({reason}); expected a running server (`mlflow server`)",
                )
        else:
            self.fail(
                "tracking.uri",
                f"unsupported tracking URI '{uri}'; expected sqlite:///PATH or http(s)://HOST:PORT",
            )
