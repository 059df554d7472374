"""One trial's pipeline: its stages in order through the prefix cache, evaluation after
each, the unlearning branches at the end, everything logged to MLflow.

A stage whose prefix is already finished (by this or another trial) is not trained
again: its checkpoint and evaluation are reused and the trial run links the stage run
that trained it with a tag.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stageflow.actors.evaluator import EvalJob
from stageflow.platform.config import StageSpec, StudySpec
from stageflow.platform.expand import Trial, trial_spec
from stageflow.platform.prefix_cache import PrefixCache, digest
from stageflow.platform.rl import rl_summary as summarize_rl
from stageflow.platform.rl import run_rl_stage, runs_rl_loop, stage_reward_range
from stageflow.platform.tasks import materialize, read_jsonl


@dataclass
class TrialContext:
    """What every trial of a study shares: its spec, files and the shared actors it calls."""

    spec: StudySpec
    storage: Path
    base_model: Path
    base_key: str
    tracker: Any
    study_run_id: str
    evaluator: Any
    rollout: Any = None
    _rows: dict[Path, list[dict]] = field(default_factory=dict)

    @property
    def cache(self) -> PrefixCache:
        return PrefixCache(self.storage / "prefixes")

    def rows(self, data) -> list[dict]:
        path = materialize(data, self.storage / "data")
        if path not in self._rows:
            self._rows[path] = read_jsonl(path)
        return self._rows[path]

    def eval_jobs(
        self, spec: StudySpec, names: list[str] | None = None, seed: int = 0
    ) -> list[EvalJob]:
        return [
            EvalJob(
                name=name,
                rows=self.rows(s.data)[: s.max_examples],
                metrics=list(s.metrics),
                task=s.data.task,
                samples=s.samples,
                max_new_tokens=s.max_new_tokens,
                temperature=s.temperature,
                options={"seed": seed},
            )
            for name, s in spec.evaluation.sets.items()
            if names is None or name in names
        ]


def child_key(parent: str, stage: StageSpec, spec: StudySpec) -> str:
    """The prefix key after `stage`: everything that can change the trained weights."""
    return digest(parent, asdict(stage), asdict(spec.learner), spec.model.dtype)


def stage_seed(key: str) -> int:
    return int(key[:8], 16) % (2**31)


class TrialRunner:
    """Runs one trial; holds its learner group (created on first need) and its MLflow run."""

    def __init__(
        self, ctx: TrialContext, trial: Trial, report: Callable[[dict], None] | None = None
    ):
        self.ctx, self.trial = ctx, trial
        self.spec = trial_spec(ctx.spec, trial)
        self.cache = ctx.cache
        self.report = report or (lambda metrics: None)
        self.learner: Any = None
        self.learner_key: str | None = None
        self.trained = 0
        self.history: list[dict[str, Any]] = []  # per stage: index, stage, prefix key, metrics

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        import ray

        return ray.get(getattr(self.ctx.tracker, method).remote(*args, **kwargs))

    def run(self) -> dict[str, float]:
        trial, ctx = self.trial, self.ctx
        self.run_id = self.call("find_run", trial_id=trial.trial_id, kind="trial") or self.call(
            "start_run",
            trial.label,
            parent_id=ctx.study_run_id,
            tags={
                "stageflow.kind": "trial",
                "stageflow.trial_id": trial.trial_id,
                "stageflow.ordering": trial.ordering,
                "stageflow.oracle": trial.oracle,
            },
            params={
                "path": trial.ordering,
                "seed": trial.seed,
                "oracle": trial.oracle,
                "unlearning": ",".join(trial.unlearning),
                **trial.hparams,
            },
        )
        try:
            final = self._run_path()
        except BaseException:
            self.call("end_run", self.run_id, "FAILED")
            raise
        finally:
            if self.learner is not None:
                self.learner.shutdown()
        self.call("log_metrics", self.run_id, {"stages_trained": self.trained}, len(trial.path) + 1)
        self.call("end_run", self.run_id)
        return final

    def _run_path(self) -> dict[str, float]:
        ctx, trial = self.ctx, self.trial
        key, model_dir = digest(ctx.base_key, trial.seed), ctx.base_model
        final = self._evaluate_once(key, model_dir)
        self.call("log_metrics", self.run_id, final, 0)
        self.history.append({"index": 0, "stage": "base", "key": key, "metrics": final})
        for index, name in enumerate(trial.path, start=1):
            key, model_dir, metrics = self._stage(index, name, key, model_dir)
            final = {**final, **metrics}
            self.report({"stage_index": index, "stage": name, **metrics})
        for branch in trial.unlearning:
            _, _, metrics = self._stage(len(trial.path) + 1, branch, key, model_dir, branch=True)
            unlearned = {f"{branch}/{k}": v for k, v in metrics.items()}
            final.update(unlearned)
            self.report({"stage_index": len(trial.path) + 1, "stage": branch, **unlearned})
        return final

    def _evaluate_once(
        self, key: str, model_dir: Path, names: list[str] | None = None
    ) -> dict[str, float]:
        """Evaluation of a finished checkpoint, computed once per study and kept beside it
        (with per-example values such as truth ratios, for the analysis)."""
        import ray

        record = self.cache.root / f"{key}.eval.json"
        if not record.is_file():
            jobs = self.ctx.eval_jobs(self.spec, names, seed=stage_seed(key))
            result = {"metrics": {}, "examples": {}}
            if jobs:
                call = self.ctx.evaluator.evaluate_detailed.remote(
                    str(model_dir), jobs, self.ctx.rollout
                )
                result = ray.get(call)
            tmp = record.with_suffix(f".{self.trial.trial_id}.tmp")
            tmp.write_text(json.dumps(result, sort_keys=True))
            tmp.replace(record)
        return json.loads(record.read_text())["metrics"]

    def _stage(
        self, index: int, name: str, parent: str, parent_dir: Path, branch: bool = False
    ) -> tuple[str, Path, dict]:
        stage = self.spec.stages[name]
        if stage.kind == "eval":
            metrics = self._evaluate_once(
                f"{parent}-eval-{digest(stage.sets)}", parent_dir, list(stage.sets) or None
            )
            self.call("log_metrics", self.run_id, metrics, index)
            self.history.append({"index": index, "stage": name, "key": parent, "metrics": metrics})
            return parent, parent_dir, metrics
        key = child_key(parent, stage, self.spec)
        claim = self.cache.acquire(key, owner=self.trial.trial_id)
        if claim is None:
            meta = self.cache.meta(key)
            self.call(
                "set_tags", self.run_id, {f"stageflow.reused.{index}.{name}": meta["stage_run_id"]}
            )
        else:
            try:
                meta = self._train(index, name, stage, parent, parent_dir, key, claim)
            except BaseException:
                self.cache.release(claim)
                raise
        model_dir = self.cache.model_dir(key)
        metrics = (
            self._evaluate_once(key, model_dir) if self.spec.evaluation.after_every_stage else {}
        )
        metrics.update(meta.get("rl_summary") or {})  # an RL stage's stability, "rl/..."
        if claim is not None:
            self.call("log_metrics", meta["stage_run_id"], metrics, index)
            self.call("end_run", meta["stage_run_id"])
        logged = {f"{name}/{k}": v for k, v in metrics.items()} if branch else metrics
        self.call("log_metrics", self.run_id, logged, index)
        self.history.append(
            {"index": index, "stage": name, "key": key, "branch": branch, "metrics": metrics}
        )
        return key, model_dir, metrics

    def _train(self, index, name, stage, parent, parent_dir, key, claim) -> dict:
        from stageflow.actors.learner import LearnerGroup

        ctx = self.ctx
        run_id = self.call("find_run", prefix_key=key) or self.call(
            "start_run",
            f"{index}:{name}",
            parent_id=self.run_id,
            tags={
                "stageflow.kind": "stage",
                "stageflow.stage": name,
                "stageflow.prefix_key": key,
                "stageflow.trial_id": self.trial.trial_id,
            },
            params={
                "kind": stage.kind,
                "index": index,
                "objective": stage.objective or stage.kind,
                "lr": stage.lr,
                "batch_size": stage.batch_size,
                "steps": stage.steps,
                "epochs": stage.epochs,
                **{f"params.{k}": v for k, v in stage.params.items()},
            },
        )
        if self.learner is None:
            self.learner = LearnerGroup(
                parent_dir,
                ctx.spec.learner,
                device=ctx.spec.resources.device,
                cpus_per_actor=ctx.spec.resources.cpus_per_actor,
                seed=self.trial.seed,
            )
            self.learner_key = parent
        if self.learner_key != parent:
            self.learner.load(parent_dir)
        rows = ctx.rows(stage.data)
        retain = ctx.rows(stage.retain) if stage.retain is not None else None
        rl_summary = None
        if runs_rl_loop(stage):  # GRPO and RL unlearning: sampled through the rollout service
            steps = run_rl_stage(
                self.learner,
                ctx.rollout,
                stage,
                rows,
                retain,
                seed=stage_seed(key),
                owner=self.trial.trial_id,
            )
            rl_summary = summarize_rl(steps, stage_reward_range(stage))
        else:
            steps = self.learner.train_stage(stage, rows, retain, seed=stage_seed(key))
        self.learner_key = key
        staging = self.cache.staging_dir(claim)
        self.learner.save(staging / "model")
        self.call("log_metric_series", run_id, list(enumerate(steps)))
        self.trained += 1
        meta = {
            "key": key,
            "parent": parent,
            "stage": name,
            "trial_id": self.trial.trial_id,
            "stage_run_id": run_id,
            "step_metrics": steps,
        }
        if rl_summary is not None:
            meta["rl_summary"] = rl_summary
        self.cache.commit(claim, staging, meta)
        return meta


def run_trial(
    ctx: TrialContext, trial: Trial, report: Callable[[dict], None] | None = None
) -> dict[str, Any]:
    """Run a trial's path and unlearning branches; returns the trial's record: final
    metrics, per-stage history (prefix keys, metrics) and its MLflow run id."""
    runner = TrialRunner(ctx, trial, report)
    final = runner.run()
    return {
        "trial": trial.to_dict(),
        "metrics": final,
        "history": runner.history,
        "run_id": runner.run_id,
    }
