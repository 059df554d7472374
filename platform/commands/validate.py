"""Semantic checks of a study, all before any work starts.

`validate_study` raises the first `StudyError` it finds: each spec's own invariants
(`Spec.problems`: choices, ranges), then what needs more than one spec: unknown names (looked
up in the registries), impossible orderings, bad data files, a missing model, an unwritable
storage dir or an unreachable tracking server. Nothing is written.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from stageflow.actors.rendering import (
    encode_prompt,
    encode_row,
    render_row,
    renders_chat,
    row_prompt,
)
from stageflow.actors.rewards import check_rewards, reward_names
from stageflow.core.alternatives import GENERATED, IDK, alternative_problem
from stageflow.core.config import (
    SEARCH_METHODS,
    DataSpec,
    EvalSetSpec,
    RewardAnalysisSpec,
    RLLoopParams,
    SampleSpec,
    SearchSpec,
    StageSpec,
    StudyError,
    StudySpec,
    positive,
)
from stageflow.core.data_files import is_plain, spec_rows
from stageflow.core.expand import grid_points, oracle_path, parse_path
from stageflow.core.footprint import checkpoint_bytes, size_text
from stageflow.core.model_checks import load_tokenizer, model_dir_problem
from stageflow.core.models import (
    char_tokenizer,
    check_model_dir,
    has_chat_template,
    logit_transform,
    read_config,
)
from stageflow.core.ordering_search import path_nodes
from stageflow.core.registry import (
    CHECKS,
    METRICS,
    OBJECTIVES,
    REWARDS,
    STAGE_KINDS,
    TASKS,
    LayerStates,
    Objective,
    ObjectiveParams,
    Registry,
    closest,
    load_plugins,
    runs_rl_loop,
    samples_alternatives,
    stage_objective,
)
from stageflow.core.serving import serving_problem
from stageflow.core.study_dir import StudyDir
from stageflow.core.study_file import load_study
from stageflow.core.tasks import check_jsonl, generate
from stageflow.platform.engine.trial_plan import evaluates_generation, needs_rollout
from stageflow.platform.results.analysis import search_scores

# lazy: transformers only to read a user model's tokenizer

# Settings made once per study (its model, its trials' shape, its shared actors, its analysis):
# a grid over them could not be applied to one trial, so it is refused.
GRID_FORBIDDEN = (
    "name", "storage_dir", "model", "orderings", "unlearning", "oracle", "grid", "seeds",
    "resources", "tracking", "analysis",
)  # fmt: skip
GRID_PLACEMENT = ("learner.ranks", "rollout.placement", "rollout.workers")  # a trial's bundles


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
        self._rows: dict[str, list[dict]] = {}
        self._tokenizer = None

    def rows(self, key: str, data: DataSpec) -> list[dict]:
        """The rows of a data spec (loaded once, written nowhere); a bad file fails at `key`."""
        text = repr(data)
        if text not in self._rows:
            try:
                self._rows[text] = spec_rows(data)
            except StudyError as err:
                raise err.within(self.source, key) from None
        return self._rows[text]

    def fail(self, key: str, problem: str) -> None:
        raise StudyError(self.source, key, problem)

    def name_in(self, registry: Registry, name: str | None, key: str) -> None:
        if name not in registry:
            self.fail(key, f"unknown {registry.what} '{name}'; {registry.expected(name)}")

    def check_all(self) -> None:
        spec = self.spec
        for key, problem in spec.problems():
            self.fail(key, problem)
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
        self.check_grid()
        for name, eval_set in spec.evaluation.sets.items():
            key = f"evaluation.sets.{name}"
            self.check_data(f"{key}.data", eval_set.data)
            for i, metric in enumerate(eval_set.metrics):
                self.name_in(METRICS, metric, f"{key}.metrics[{i}]")
            self.check_holdout(key, name, eval_set)
            self.check_attacks(key, eval_set)
            self.check_answers_read(key, eval_set)
        self.check_model_utility()
        self.check_analysis()
        self.check_engines()
        self.check_model()
        self.check_lora()
        self.check_prompt_lengths()
        self.check_storage()
        self.check_tracking()

    def check_answers_read(self, key: str, eval_set: EvalSetSpec) -> None:
        """The set's rows have the paraphrased and perturbed answers its metrics read."""
        # lazy: the evaluation module, with its metrics, only for a study that has eval sets
        from stageflow.platform.engine.evaluation import row_answers

        rows = self.rows(f"{key}.data", eval_set.data)
        for metric in eval_set.metrics:
            for kind in (k for k in METRICS[metric].reads if k != "answer"):
                if rows and not all(row_answers(row)[kind] for row in rows):
                    column = f"{kind}_answers"
                    self.fail(
                        f"{key}.data",
                        f"'{metric}' reads every row's {kind} answers; expected rows with a '{column}' list (map a file's column with fields.{column})",
                    )

    def check_holdout(self, key: str, name: str, eval_set: EvalSetSpec) -> None:
        """Membership-inference metrics name a holdout set: another evaluation set."""
        sets = self.spec.evaluation.sets
        attacks = [m for m in eval_set.metrics if m in METRICS and METRICS[m].membership]
        if eval_set.holdout is None and attacks:
            self.fail(
                f"{key}.holdout",
                f"'{attacks[0]}' scores the set's rows against rows never trained on; expected holdout: <an evaluation set of such rows>",
            )
        elif eval_set.holdout is not None and (
            eval_set.holdout == name or eval_set.holdout not in sets
        ):
            others = [s for s in sets if s != name]
            self.fail(
                f"{key}.holdout",
                f"'{eval_set.holdout}' is not another evaluation set; expected one of {', '.join(others) or 'evaluation.sets (none other defined)'}",
            )

    def check_attacks(self, key: str, eval_set: EvalSetSpec) -> None:
        """GradNorm needs a rank's full weights; the oracle as a reference needs oracle trials."""
        for i, metric in enumerate(eval_set.metrics):
            entry = METRICS[metric] if metric in METRICS else None
            if entry and entry.grad_norm and self.spec.learner.zero_stage == 3:
                self.fail(
                    f"{key}.metrics[{i}]",
                    f"{metric} takes per-row gradients of a rank's full weights; expected learner.zero_stage 0, 1 or 2, got 3",
                )
            if (
                entry
                and entry.reference
                and eval_set.reference == "oracle"
                and not self.spec.oracle
            ):
                self.fail(
                    f"{key}.reference",
                    "the oracle as the reference model needs the study's oracle trials; expected oracle: true, or reference: base",
                )

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
        objective = stage.objective or STAGE_KINDS[stage.kind].default_objective
        if objective is None:
            self.fail(
                f"{key}.objective",
                f"a {stage.kind} stage needs an objective; {OBJECTIVES.expected()}",
            )
        self.name_in(OBJECTIVES, objective, f"{key}.objective")
        entry = OBJECTIVES[objective]
        if stage.kind not in entry.kinds:
            self.fail(
                f"{key}.objective",
                f"objective '{objective}' does not run in a {stage.kind} stage (it runs in: {', '.join(entry.kinds)})",
            )
        for param, problem in entry.problems(dict(stage.params)):  # names and types
            self.fail(f"{key}.params.{param}", problem)
        typed = entry.typed(stage.params)
        if entry.uses_retain(typed) and stage.retain is None:
            self.fail(
                f"{key}.retain",
                f"objective '{objective}' constrains the loss on a retain set; expected a retain data set"
                if entry.needs_retain
                else f"objective '{objective}' weights a retain set ({entry.retain_weight} > 0); expected a retain data set or {entry.retain_weight}: 0",
            )
        if entry.layer_states is not None:
            self.check_layers(key, entry.states(typed))
        if entry.assistant is not None:
            self.check_assistant(key, typed)
        ranks = self.spec.learner.ranks
        if not entry.rl_loop and stage.batch_size < ranks:
            self.fail(
                f"{key}.batch_size",
                f"{stage.batch_size} rows cannot be split over learner.ranks={ranks}; expected at least {ranks}",
            )
        self.check_rl(key, stage, objective, entry, typed)
        if stage.mask is not None:
            self.check_mask(key, stage, entry)
        fraction = entry.isolated_share(typed)
        if fraction is not None:
            if not 0 < fraction <= 1:
                self.fail(
                    f"{key}.params.{entry.isolate}",
                    f"the share of the stage's rows to isolate; expected a fraction in (0, 1], got {fraction}",
                )
        self.check_data(f"{key}.data", stage.data)
        if entry.alternative is not None:  # reads the rows check_data has just checked
            self.check_alternative(key, stage, objective, entry, typed)
        if stage.retain is not None:
            self.check_data(f"{key}.retain", stage.retain)
        for sub_key, problem in stage.problems():
            self.fail(f"{key}.{sub_key}", problem)

    def check_mask(self, key: str, stage: StageSpec, entry: Objective) -> None:
        """A weight mask: on a supervised unlearn stage, with what keeps the rest unchanged."""
        if stage.kind != "unlearn" or entry.rl_loop:
            self.fail(
                f"{key}.mask",
                f"a weight mask selects what a supervised unlearn stage changes; this is a {stage.kind} stage{' trained by RL' if entry.rl_loop else ''}",
            )
        elif stage.mask.kind == "attribution" and stage.retain is None:
            self.fail(
                f"{key}.retain",
                "an attribution mask scores the weights with the retain rows' gradient too; expected a retain data set",
            )
        elif stage.weight_decay:
            self.fail(
                f"{key}.weight_decay",
                f"weight decay would move the weights outside the mask; expected 0 with a mask, got {stage.weight_decay}",
            )

    def check_alternative(
        self, key: str, stage: StageSpec, objective: str, entry: Objective, typed: ObjectiveParams
    ) -> None:
        """A preference objective's chosen answers: `idk` or a column every forget row has."""
        source = entry.alternatives(typed)
        if not isinstance(source, str):
            self.fail(
                f"{key}.params.alternative",
                f"objective '{objective}' prefers another answer to each forget answer; expected '{IDK}' (built-in \"I don't know\" answers) or the name of a column of the stage's data",
            )
        problem = alternative_problem(self.rows(f"{key}.data", stage.data), source)
        if problem:
            self.fail(f"{key}.params.alternative", problem)
        if source == GENERATED:  # sampled by the engines: how many, how long
            extra = typed.extra
            for name in ("samples", "max_new_tokens"):
                if getattr(extra, name) < 1:
                    self.fail(
                        f"{key}.params.{name}",
                        f"expected a positive whole number, got {getattr(extra, name)!r}",
                    )

    def model_layers(self) -> int | None:
        """The study model's number of decoder layers (None: check_model names what is wrong)."""
        model = self.spec.model
        if model.path is None:
            return model.tiny.num_layers
        if check_model_dir(model.path):
            return None
        count = read_config(model.path).get("num_hidden_layers")
        return count if isinstance(count, int) else None

    def check_assistant(self, key: str, typed: ObjectiveParams) -> None:
        """ULD: an assistant no deeper than the model, a terminal branch, generation by hf."""
        name = key.split(".", 1)[1]
        layers, count = typed.get("layers"), self.model_layers()
        if count is not None and not 0 <= layers <= count:
            self.fail(
                f"{key}.params.layers",
                f"the assistant is the model's first layers and the model has {count}; expected 1 to {count} (0: a quarter of them), got {layers}",
            )
        if not 0 <= typed.get("relative_top") < 1:
            self.fail(
                f"{key}.params.relative_top",
                f"the share of the top log-prob below which tokens are filtered; expected a value in [0, 1), got {typed.get('relative_top')}",
            )
        for param in ("weight", "rank", "alpha"):
            for _, problem in positive(param, typed.get(param)):
                self.fail(f"{key}.params.{param}", problem)
        if name not in self.spec.unlearning or name in self.ordered_stages():
            self.fail(
                key,
                "ULD leaves a combined model that is evaluated, not trained further; expected the stage in `unlearning` only (a branch), not in an ordering",
            )
        sets = self.spec.evaluation.sets
        # an unknown metric is named by check_all
        known = all(m in METRICS for s in sets.values() for m in s.metrics)
        generates = known and evaluates_generation(self.spec)
        if typed.get("generation") not in ("", "hf") or (
            generates and typed.get("generation") != "hf"
        ):
            self.fail(
                f"{key}.params.generation",
                f"the vLLM engines cannot serve ULD's combined logits; expected 'hf' (sampled by transformers on the learner), got '{typed.get('generation')}'",
            )
        if any("mia_gradnorm" in s.metrics for s in sets.values()):
            self.fail(
                f"{key}.objective",
                "mia_gradnorm takes gradients of one model's weights and ULD's model is two; expected no mia_gradnorm with a ULD branch",
            )

    def ordered_stages(self) -> set[str]:
        """Every stage an ordering places on a path."""
        o = self.spec.orderings
        names = set(o.permutations or ())
        if o.insert is not None:
            names |= {o.insert.stage, *o.insert.into}
        for text in o.explicit or []:
            names |= set(parse_path(text))
        for drawn in (o.sample, o.search):
            names |= set(drawn.stages if drawn is not None else ())
        return names

    def check_layers(self, key: str, states: LayerStates) -> None:
        """A representation objective's layers exist in the study's model."""
        count = self.model_layers()
        if count is None:
            return
        for sub_key, layers in (("layer", [states.layer]), ("trainable_layers", states.trainable)):
            bad = [i for i in layers or () if not (isinstance(i, int) and 0 <= i < count)]
            if bad or (sub_key == "trainable_layers" and not layers):
                self.fail(
                    f"{key}.params.{sub_key}",
                    f"the model has decoder layers 0 to {count - 1}; expected {'a list of ' if sub_key != 'layer' else ''}layer indexes among them, got {bad[0] if bad else '[]'}",
                )

    def check_rl(
        self, key: str, stage: StageSpec, objective: str, entry: Objective, typed: ObjectiveParams
    ) -> None:
        """An RL stage's rewards (parameters, gate thresholds) and its loop settings."""
        try:
            check_rewards(stage.rewards)
        except StudyError as err:
            raise err.within(self.source, key) from None
        if not entry.rl_loop:
            if stage.rewards:
                self.fail(
                    f"{key}.rewards",
                    f"objective '{objective}' does not use rewards; expected none (rewards drive RL objectives: {', '.join(n for n in OBJECTIVES.names() if OBJECTIVES[n].rl_loop)})",
                )
            return
        if not stage.rewards and entry.default_rewards is None:
            self.fail(
                f"{key}.rewards",
                f"a {stage.kind} stage needs at least one reward; expected a list of {{name, weight, params}} naming {', '.join(REWARDS.names())}",
            )
        loop = typed.loop  # its own problems: entry.problems
        self.check_staleness(f"{key}.params.max_staleness", loop)
        if entry.retain_prompts and stage.retain is None:
            self.fail(
                f"{key}.retain",
                f"objective '{objective}' also rewards answers on retain (boundary) prompts; expected a retain data set",
            )

    def check_staleness(self, key: str, loop: RLLoopParams) -> None:
        """Asynchronous RL (max_staleness >= 1) needs engines that sample while the learner
        trains, weights they can load meanwhile, and pi_old from their log-probs at T = 1."""
        k, rollout = loop.max_staleness, self.spec.rollout
        if not k:
            return
        if rollout.placement == "colocated":
            self.fail(
                key,
                f"{k} overlaps sampling with training, which colocated engines cannot (they sleep while the learner trains); expected 0 or rollout.placement shared or per_trial",
            )
        if rollout.weight_sync == "nccl":
            self.fail(
                key,
                f"{k} loads weights while the engines sample, which an NCCL push cannot; expected 0 or rollout.weight_sync shm, object_store or auto",
            )
        if loop.temperature != 1.0 and rollout.logprobs_mode != "raw_logprobs":
            self.fail(
                key,
                f"{k} takes pi_old from the engines' log-probs, which at temperature {loop.temperature} are not the policy's; expected rollout.logprobs_mode raw_logprobs or temperature 1.0",
            )

    def check_data(self, key: str, data: DataSpec) -> None:
        for sub_key, problem in data.problems():
            self.fail(f"{key}.{sub_key}".rstrip("."), problem)
        if data.check is not None:
            self.name_in(CHECKS, data.check, f"{key}.check")
        if data.file is not None:
            problem = check_jsonl(data.file) if is_plain(data) else None
            if problem:
                self.fail(f"{key}.file", f"{data.file}: expected {problem}")
            self.rows(key, data)
            return
        self.name_in(TASKS, data.task, f"{key}.task")
        entry = TASKS[data.task]
        if data.split not in entry.splits:
            self.fail(
                f"{key}.split",
                f"task '{data.task}' has no split '{data.split}'; expected one of {', '.join(entry.splits)}",
            )
        for param in data.params:
            if param not in entry.params:
                self.fail(
                    f"{key}.params.{param}",
                    f"unknown parameter of task '{data.task}'; expected one of {', '.join(entry.params) or '(none)'}",
                )
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
        kinds = ("permutations", "insert", "explicit", "sample", "search")
        given = [n for n in kinds if getattr(o, n) is not None]
        if len(given) != 1:
            self.fail(
                "orderings",
                f"expected exactly one of permutations, insert, explicit, sample or search, got {', '.join(given) or 'none'}",
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
        if o.sample is not None:
            self.check_sample(o.sample)
        if o.search is not None:
            self.check_search(o.search)

    def check_reordered(self, key: str, stages: list[str]) -> None:
        """The stages a sample or search reorders: known, distinct, at least three."""
        for i, name in enumerate(stages):
            self.known_stage(f"{key}[{i}]", name)
        if len(set(stages)) != len(stages) or len(stages) < 3:
            self.fail(
                key,
                "expected at least 3 distinct stage names (fewer have at most 2 orderings: "
                "use permutations)",
            )

    def check_sample(self, sample: SampleSpec) -> None:
        self.check_reordered("orderings.sample.stages", sample.stages)
        total = math.factorial(len(sample.stages))
        if not 2 <= sample.n <= total:
            self.fail(
                "orderings.sample.n",
                f"expected 2 to {total} orderings (the {len(sample.stages)} stages have {total}), "
                f"got {sample.n}",
            )

    def check_search(self, search: SearchSpec) -> None:
        key = "orderings.search"
        self.check_reordered(f"{key}.stages", search.stages)
        for name, value, allowed in (
            ("goal", search.goal, ("max", "min")),
            ("method", search.method, SEARCH_METHODS),
        ):
            if value not in allowed:
                self.fail(f"{key}.{name}", f"expected one of {', '.join(allowed)}, got '{value}'")
        if search.branch is not None and search.branch not in self.spec.unlearning:
            self.fail(
                f"{key}.branch",
                f"'{search.branch}' is not an unlearning branch of the study; expected one of {', '.join(self.spec.unlearning) or 'unlearning (none declared)'}",
            )
        scores = search_scores(self.spec)
        if search.score not in scores:
            self.fail(
                f"{key}.score",
                f"'{search.score}' is not a score of this study; expected one of {', '.join(scores)}",
            )
        runs = len(self.spec.seeds) * len(grid_points(self.spec.grid))
        oracle = oracle_path(self.spec, tuple(search.stages)) if self.spec.oracle else None
        evals = frozenset(n for n in search.stages if self.spec.stages[n].kind == "eval")
        one = len(path_nodes(tuple(search.stages), len(self.spec.unlearning), oracle, evals)) * runs
        if search.budget < one:
            self.fail(
                f"{key}.budget",
                f"{search.budget} stage trainings cannot run one full path, which takes {one} (its {len(search.stages)} stages, {len(self.spec.unlearning)} unlearning branches{' and oracle' if oracle else ''}, x {runs} seeds and grid points); expected at least {one}",
            )
        if self.spec.storage.max_gb is not None:
            self.fail(
                "storage.max_gb",
                "the storage cap keeps what the study's trials still need, which a search does not know before it runs; expected no cap with orderings.search",
            )

    def check_grid(self) -> None:
        """Every swept setting is applied to each trial, or refused here."""
        for key, values in self.spec.grid.items():
            if key.split(".")[0] in GRID_FORBIDDEN:
                self.fail(
                    f"grid.{key}",
                    f"'{key}' cannot be swept (it is set once per study); expected a stage, learner, rollout or evaluation setting",
                )
            if key in GRID_PLACEMENT:
                self.fail(
                    f"grid.{key}",
                    f"'{key}' sizes every trial's placement group, which is made once per study; expected one value (run one study per value)",
                )
            shared = self.spec.rollout.placement == "shared"
            if shared and key.startswith("rollout.") and key != "rollout.weight_sync":
                self.fail(
                    f"grid.{key}",
                    f"the shared engine pool is started once for the study with one value of '{key}'; expected rollout.placement: per_trial (each trial's own engines get its value) or no sweep of it",
                )
            if not values:
                self.fail(f"grid.{key}", "expected a non-empty list of values")
        for section, keys in grid_sections(self.spec.grid).items():
            for values in itertools.product(*(self.spec.grid[k] for k in keys)):
                self.check_swept(section, dict(zip(keys, values)))

    def check_swept(self, section: str, point: dict[str, Any]) -> None:
        """One combination of the values swept in one section of the spec (a stage, an eval
        set, the learner, ...): applied to that section alone and checked with the rest of the
        spec. Sections are independent, so a grid costs the sum of its sections' combinations,
        not their product (a million grid points of three sections: three hundred checks)."""
        try:
            swept = apply_to_section(self.spec, section, point)
        except Exception as err:  # OmegaConf key or type error, named by the key
            inner = getattr(err, "full_key", None)
            key = f"{section}.{inner}" if inner else next(iter(point))
            self.fail(
                f"grid.{key}",
                f"not a setting of the study or a value of the wrong type ({str(err).splitlines()[0]})",
            )
        for key, problem in swept.problems():
            self.fail(f"grid.{key}", f"{problem} (with {point_text(point)})")
        checker = _Validator(swept, self.source)
        checker._rows = self._rows
        names = [section.split(".")[1]] if section.startswith("stages.") else list(swept.stages)
        for name in names:
            checker.check_stage(f"stages.{name}", swept.stages[name])

    def check_model_utility(self) -> None:
        """Model utility averages metrics in [0, 1] that the study computes."""
        sets = self.spec.evaluation.sets
        for i, name in enumerate(self.spec.evaluation.model_utility):
            set_name, _, metric = name.partition("/")
            if set_name not in sets or metric not in sets[set_name].metrics:
                self.fail(
                    f"evaluation.model_utility[{i}]",
                    f"'{name}' is not computed; expected '<set>/<metric>' of evaluation.sets",
                )
            elif metric in METRICS and not METRICS[metric].unit:
                self.fail(
                    f"evaluation.model_utility[{i}]",
                    f"'{metric}' is not a number in [0, 1]; expected metrics such as probability, truth_ratio_true_better, rouge_l",
                )

    def check_analysis(self) -> None:
        analysis, sets = self.spec.analysis, self.spec.evaluation.sets
        named = {
            "forget_score": analysis.forget_score,
            **{f"utilities.{k}": v for k, v in analysis.utilities.items()},
            **{f"over_refusal[{i}]": v for i, v in enumerate(analysis.over_refusal)},
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
        if analysis.privleak is not None:
            set_name, _, metric = analysis.privleak.partition("/")
            if set_name not in sets or metric not in sets[set_name].metrics:
                self.fail(
                    "analysis.privleak",
                    f"'{analysis.privleak}' is not computed; expected '<set>/<metric>' of evaluation.sets",
                )
            elif not METRICS[metric].membership:
                self.fail(
                    "analysis.privleak",
                    f"'{metric}' is not a membership-inference metric; expected one of {', '.join(m for m in METRICS.names() if METRICS[m].membership)}",
                )
            elif not self.spec.oracle:
                self.fail(
                    "analysis.privleak",
                    "privacy leakage compares with the oracle; expected oracle: true",
                )
            elif metric == "mia_reference" and sets[set_name].reference == "oracle":
                self.fail(
                    "analysis.privleak",
                    f"'{analysis.privleak}' against the oracle is itself a comparison with the oracle; expected another attack, or reference: base",
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
        if analysis.primary is not None and analysis.primary not in analysis.declared_scores:
            self.fail(
                "analysis.primary",
                f"'{analysis.primary}' is not a score of this study; expected one of {', '.join(analysis.declared_scores) or 'forget_score or a utility (none declared)'}",
            )
        if analysis.rewards is not None:
            self.check_reward_terms(analysis.rewards)
        if analysis.probability_mass is not None and analysis.probability_mass not in sets:
            self.fail(
                "analysis.probability_mass",
                f"'{analysis.probability_mass}' is not an evaluation set; expected one of {', '.join(sets) or 'evaluation.sets (none defined)'}",
            )

    def check_reward_terms(self, terms: RewardAnalysisSpec) -> None:
        """The outcome and shaping terms name rewards an RL stage of the study uses."""
        used = {
            name
            for stage in self.spec.stages.values()
            if stage.kind != "eval" and runs_rl_loop(stage)
            for name in reward_names(stage.rewards)
        }
        named = [("outcome", terms.outcome)]
        named += [(f"shaping[{i}]", name) for i, name in enumerate(terms.shaping)]
        for key, name in named:
            if name not in used:
                self.fail(
                    f"analysis.rewards.{key}",
                    f"'{name}' is not a reward of the study's RL stages; expected one of {', '.join(sorted(used)) or 'their rewards (the study has no RL stage)'}",
                )

    def check_engines(self) -> None:
        """The rollout engines a study needs exist and fit the placement."""
        rollout = self.spec.rollout
        if rollout.workers == 0 and needs_rollout(self.spec):
            self.fail(
                "rollout.workers",
                "the study samples completions (an RL stage or a generation metric); expected at least 1 engine",
            )
        if rollout.placement == "colocated" and rollout.workers > self.spec.learner.ranks:
            self.fail(
                "rollout.workers",
                f"colocated puts each engine on a learner rank's GPU; expected at most learner.ranks={self.spec.learner.ranks} engines",
            )
        if rollout.placement == "colocated" and self.spec.evaluation.placement == "evaluators":
            self.fail(
                "evaluation.placement",
                "evaluators sample from the engines while the learner trains, which colocated engines cannot (they sleep meanwhile); expected learner or rollout.placement shared or per_trial",
            )
        path = self.spec.model.path
        if rollout.workers and needs_rollout(self.spec) and path and check_model_dir(path) is None:
            device = engine_device(self.spec.resources.device)
            problem = serving_problem(path, rollout.backend, device, rollout.max_model_len)
            if problem:
                self.fail(
                    problem[0] if problem[0].startswith("rollout.") else "model.path",
                    f"expected {problem[1]}",
                )

    def check_prompt_lengths(self) -> None:
        """Every prompt the engines sample from, plus its new tokens, fits rollout.max_model_len."""
        needs: list[tuple[str, list[DataSpec], int, int | None]] = [
            (f"evaluation set '{name}'", [s.data], s.max_new_tokens, s.max_examples)
            for name, s in self.spec.evaluation.sets.items()
            if any(METRICS[m].needs == "generation" for m in s.metrics)
        ]
        for name, stage in self.spec.stages.items():
            if stage.kind != "eval" and runs_rl_loop(stage):
                loop = stage_objective(stage).loop
                data = [stage.data] + ([stage.retain] if stage.retain else [])
                needs.append((f"stage '{name}'", data, loop.max_new_tokens, None))
            elif stage.kind != "eval" and samples_alternatives(stage):
                tokens = stage_objective(stage).extra.max_new_tokens
                needs.append((f"stage '{name}'", [stage.data], tokens, None))
        if not needs:
            return
        tokenizer, limit = self.tokenizer(), self.spec.rollout.max_model_len
        has_template = self.spec.model.path is not None and has_chat_template(self.spec.model.path)
        for what, datas, new_tokens, first in needs:
            prompts = [
                row_prompt(render_row(r, renders_chat(data.template, has_template), data.system))
                for data in datas
                for r in self.rows("", data)[:first]
            ]
            longest = max((len(encode_prompt(tokenizer, p)) for p in prompts), default=0)
            if longest + new_tokens > limit:
                self.fail(
                    "rollout.max_model_len",
                    f"{limit} is shorter than the longest prompt of {what} ({longest} tokens) plus its {new_tokens} new tokens; expected at least {longest + new_tokens}",
                )

    def tokenizer(self):
        """The study model's tokenizer (the tiny model's is built, not loaded), loaded once."""
        if self._tokenizer is None:
            path = self.spec.model.path
            self._tokenizer = char_tokenizer() if path is None else load_tokenizer(Path(path))
        return self._tokenizer

    def check_model(self) -> None:
        path = self.spec.model.path
        if path is not None:
            problem = check_model_dir(path) or model_dir_problem(path) or logit_transform(path)
            if problem:
                self.fail("model.path", f"{path}: expected {problem}")
        if path is None or not has_chat_template(path):
            for key, data in self.data_specs():
                if data.template == "chat":
                    self.fail(
                        f"{key}.template",
                        "the model's tokenizer has no chat template; expected auto or plain",
                    )
            return
        self.check_chat_template(path)

    def check_chat_template(self, path: str) -> None:
        """The model's chat template renders the first row of every data set that uses it."""
        for key, data in self.data_specs():
            rows = self.rows(key, data)[:1]
            if not rows or not renders_chat(data.template, True):
                continue
            row, tokenizer = render_row(rows[0], True, data.system), self.tokenizer()
            try:
                if "answer" in row:
                    encode_row(tokenizer, row, max_len=1 << 30)
                else:
                    encode_prompt(tokenizer, row_prompt(row))
            except Exception as err:  # noqa: BLE001 - a template raises what its Jinja code does
                reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
                jinja = Path(path) / "chat_template.jinja"
                where = jinja if jinja.is_file() else Path(path) / "tokenizer_config.json"
                self.fail(
                    key,
                    f"{where}: expected a chat template that renders this data's rows (its "
                    f"first row raised: {reason})",
                )

    def data_specs(self) -> list[tuple[str, DataSpec]]:
        """Every data spec of the study, with its key."""
        out = [(f"evaluation.sets.{n}.data", s.data) for n, s in self.spec.evaluation.sets.items()]
        for name, stage in self.spec.stages.items():
            if stage.kind != "eval":
                out.append((f"stages.{name}.data", stage.data))
                if stage.retain is not None:
                    out.append((f"stages.{name}.retain", stage.retain))
        return out

    def check_lora(self) -> None:
        """learner.lora.target_modules name layers of the model (else peft fails in a trial)."""
        lora = self.spec.learner.lora
        if lora is None or not lora.target_modules:
            return
        # lazy: torch, for a study with LoRA target modules only
        from stageflow.actors.lora import linear_layers, unknown_target

        layers = linear_layers(self.spec.model.path)
        target = unknown_target(lora.target_modules, layers)
        if target is not None:
            names = sorted({name.rsplit(".", 1)[-1] for name in layers})
            self.fail(
                "learner.lora.target_modules",
                f"'{target}' names no linear layer of the model; expected some of {', '.join(names)}",
            )

    def check_storage(self) -> None:
        path = StudyDir.of(self.spec).root
        if path.exists() and not path.is_dir():
            self.fail("storage_dir", f"{path} is a file; expected a directory")
        existing = next(p for p in [path, *path.parents] if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            self.fail("storage_dir", f"{existing} is not writable; expected a writable directory")
        try:  # permissions can say yes where the filesystem says no (/proc, read-only mounts)
            os.rmdir(tempfile.mkdtemp(prefix=".stageflow-probe-", dir=existing))
        except OSError as err:
            self.fail(
                "storage_dir",
                f"{path} cannot be created ({err.strerror} in {existing}); expected a writable directory",
            )
        cap = self.spec.storage.max_gb
        one = checkpoint_bytes(self.spec) if cap is not None else 0
        if cap is not None and cap * 1e9 < one:
            self.fail(
                "storage.max_gb",
                f"{cap:g} GB is less than one checkpoint of this model ({size_text(one)}); expected at least that",
            )

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


def grid_sections(grid: dict[str, list[Any]]) -> dict[str, list[str]]:
    """The swept keys grouped by the section of the spec they change: `stages.<name>`,
    `evaluation.sets.<name>`, else their first part (`learner`, `rollout`, ...)."""
    sections: dict[str, list[str]] = {}
    for key in sorted(grid):
        parts = key.split(".")
        depth = 2 if parts[0] == "stages" else 3 if parts[:2] == ["evaluation", "sets"] else 1
        sections.setdefault(".".join(parts[:depth]), []).append(key)
    return sections


def apply_to_section(spec: StudySpec, section: str, point: dict[str, Any]) -> StudySpec:
    """The spec with the dotted keys of `point` (all within `section`) set, type-checked by the
    schema of that section alone (what apply_hparams does to the whole spec, without
    rebuilding it); a KeyError for a stage or set the study does not have."""
    parts = section.split(".")
    if parts[0] == "stages":
        owner = spec.stages[parts[1]]
    elif parts[0] == "evaluation" and len(parts) == 3:
        owner = spec.evaluation.sets[parts[2]]
    else:
        owner = getattr(spec, parts[0])
    update: dict[str, Any] = {}
    for key, value in point.items():
        node, (*inner, leaf) = update, key[len(section) + 1 :].split(".")
        for part in inner:
            node = node.setdefault(part, {})
        node[leaf] = value
    new = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(owner), update))
    if parts[0] == "stages":
        return dataclasses.replace(spec, stages={**spec.stages, parts[1]: new})
    if parts[0] == "evaluation" and len(parts) == 3:
        sets = {**spec.evaluation.sets, parts[2]: new}
        return dataclasses.replace(spec, evaluation=dataclasses.replace(spec.evaluation, sets=sets))
    return dataclasses.replace(spec, **{parts[0]: new})


def point_text(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items())


def engine_device(device: str) -> str:
    """The device the study's engines will use as far as this machine can tell: `auto` is cuda
    where a CUDA device is visible, `unknown` on a cluster named by RAY_ADDRESS (its engines
    check again when they start), else cpu."""
    if device != "auto":
        return device
    if os.environ.get("RAY_ADDRESS"):
        return "unknown"
    return "cuda" if Path("/dev/nvidiactl").exists() else "cpu"
