"""Bad input: one sentence naming the file, the key and what was expected; exit code 2; nothing written."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from stageflow.platform.commands.cli import main

VALID = {
    "name": "bad-input",
    "stages": {
        "inst": {"kind": "sft", "data": {"task": "inst", "size": 8}, "steps": 2},
        "facts": {"kind": "sft", "data": {"task": "facts", "size": 4}, "steps": 2},
        "check": {"kind": "eval"},
    },
    "orderings": {"permutations": ["inst", "facts"]},
    "seeds": [0],
    "evaluation": {
        "sets": {"facts": {"data": {"task": "facts", "split": "eval"}, "metrics": ["avg_loglik"]}}
    },
}


def write_study(tmp_path: Path, change=None, text: str | None = None) -> Path:
    study = copy.deepcopy(VALID)
    study["storage_dir"] = str(tmp_path / "storage")
    if change:
        change(study)
    path = tmp_path / "study.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(study))
    return path


def validate(path: Path, *overrides: str, capsys) -> tuple[int, str]:
    code = main(["validate", str(path), *overrides])
    return code, capsys.readouterr().err.strip()


def test_valid_study_passes(tmp_path, capsys):
    code = main(["validate", str(write_study(tmp_path))])
    assert code == 0, capsys.readouterr().err
    assert "2 orderings, 2 trials" in capsys.readouterr().out


def set_key(path: str, value):
    def change(study):
        node, keys = study, path.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value

    return change


def drop_key(path: str):
    def change(study):
        node, keys = study, path.split(".")
        for key in keys[:-1]:
            node = node[key]
        del node[keys[-1]]

    return change


def unlearn_stage(objective: str, **params):
    """A change adding the unlearning branch `forget` (facts' forget split) with `objective`."""

    def change(study):
        set_key(
            "stages.forget",
            {
                "kind": "unlearn",
                "objective": objective,
                "params": params,
                "data": {"task": "facts", "split": "forget"},
            },
        )(study)
        set_key("unlearning", ["forget"])(study)

    return change


def uld_branch(params: dict, unlearning: bool = True, **sets):
    """A ULD stage (a branch unless `unlearning` is False) with `params`, and eval `sets`."""

    def change(study):
        study["stages"]["uld"] = {
            "kind": "unlearn",
            "objective": "uld",
            "data": {"task": "facts", "split": "forget"},
            "retain": {"task": "facts"},
            "params": params,
        }
        if unlearning:
            study["unlearning"] = ["uld"]
        study["evaluation"]["sets"].update(sets)

    return change


MATH_ACCURACY = {"data": {"task": "math", "split": "eval"}, "metrics": ["accuracy"]}

CASES = [
    ("unknown top-level key", set_key("seedz", [1]), "seedz: unknown key; did you mean 'seeds'?"),
    (
        "unknown stage key",
        set_key("stages.inst.lrr", 0.1),
        "stages.inst.lrr: unknown key; did you mean 'lr'?",
    ),
    ("wrong type", set_key("stages.inst.lr", "fast"), "stages.inst.lr: wrong type"),
    ("missing name", drop_key("name"), "name: a value is required here"),
    (
        "unknown stage kind",
        set_key("stages.inst.kind", "sftt"),
        "stages.inst.kind: unknown stage kind 'sftt'; did you mean 'sft'?",
    ),
    (
        "unknown objective",
        set_key("stages.inst.objective", "nop"),
        "stages.inst.objective: unknown objective 'nop'",
    ),
    (
        "objective of another kind",
        set_key("stages.inst.objective", "npo"),
        "objective 'npo' does not run in a sft stage",
    ),
    (
        "unknown objective parameter",
        lambda s: s["stages"].update(
            forget={
                "kind": "unlearn",
                "objective": "npo",
                "data": {"task": "facts", "split": "forget"},
                "params": {"betta": 0.1},
            }
        ),
        "stages.forget.params.betta: unknown parameter; did you mean 'beta'?",
    ),
    (
        "unlearn stage without method",
        lambda s: s["stages"].update(forget={"kind": "unlearn", "data": {"task": "facts"}}),
        "stages.forget.objective: a unlearn stage needs an objective",
    ),
    (
        "unknown task",
        set_key("stages.inst.data.task", "mathh"),
        "stages.inst.data.task: unknown task 'mathh'; did you mean 'math'?",
    ),
    (
        "unknown split",
        set_key("stages.inst.data.split", "forget"),
        "stages.inst.data.split: task 'inst' has no split 'forget'",
    ),
    (
        "bad task parameter value",
        set_key("stages.inst.data.params", {"rules": ["shout"]}),
        "stages.inst.data.params: unknown inst rule 'shout'",
    ),
    (
        "unknown metric",
        set_key("evaluation.sets.facts.metrics", ["avg_logliq"]),
        "evaluation.sets.facts.metrics[0]: unknown metric 'avg_logliq'; did you mean 'avg_loglik'?",
    ),
    (
        "ordering names unknown stage",
        set_key("orderings.permutations", ["inst", "fact"]),
        "orderings.permutations[1]: unknown stage 'fact'; did you mean 'facts'?",
    ),
    (
        "two ordering forms",
        set_key("orderings.explicit", ["inst>facts"]),
        "orderings: expected exactly one of permutations, insert, explicit, sample or search",
    ),
    (
        "insertion position out of range",
        set_key("orderings", {"insert": {"stage": "facts", "into": ["inst"], "positions": [1, 3]}}),
        "orderings.insert.positions[1]: position 3 is out of range; expected 1 to 2",
    ),
    (
        "explicit path with unknown stage",
        set_key("orderings", {"explicit": ["inst>math"]}),
        "orderings.explicit[0]: unknown stage 'math'",
    ),
    (
        "sample of more orderings than there are",
        set_key("orderings", {"sample": {"stages": ["inst", "facts", "check"], "n": 7}}),
        "orderings.sample.n: expected 2 to 6 orderings (the 3 stages have 6), got 7",
    ),
    (
        "sample of two stages",
        set_key("orderings", {"sample": {"stages": ["inst", "facts"], "n": 2}}),
        "orderings.sample.stages: expected at least 3 distinct stage names",
    ),
    (
        "sample of an unknown stage",
        set_key("orderings", {"sample": {"stages": ["inst", "facts", "chek"], "n": 2}}),
        "orderings.sample.stages[2]: unknown stage 'chek'; did you mean 'check'?",
    ),
    (
        "search over two stages",
        set_key(
            "orderings",
            {"search": {"stages": ["inst", "facts"], "score": "facts/avg_loglik", "budget": 9}},
        ),
        "orderings.search.stages: expected at least 3 distinct stage names",
    ),
    (
        "search budget below one full path",
        set_key(
            "orderings",
            {
                "search": {
                    "stages": ["inst", "facts", "check"],
                    "score": "facts/avg_loglik",
                    "budget": 1,
                }
            },
        ),
        "orderings.search.budget: 1 stage trainings cannot run one full path, which takes 2 (its 3 stages",
    ),
    (
        "search for a score the study does not define",
        set_key(
            "orderings",
            {
                "search": {
                    "stages": ["inst", "facts", "check"],
                    "score": "forget_score",
                    "budget": 9,
                }
            },
        ),
        "orderings.search.score: 'forget_score' is not a score of this study; expected one of facts/avg_loglik",
    ),
    (
        "search with an unknown goal",
        set_key(
            "orderings",
            {
                "search": {
                    "stages": ["inst", "facts", "check"],
                    "score": "facts/avg_loglik",
                    "budget": 9,
                    "goal": "best",
                }
            },
        ),
        "orderings.search.goal: expected one of max, min, got 'best'",
    ),
    (
        "unlearning names a non-unlearn stage",
        set_key("unlearning", ["facts"]),
        "unlearning[0]: stage 'facts' is of kind 'sft', expected an unlearn stage",
    ),
    (
        "steps and epochs",
        set_key("stages.inst.epochs", 1),
        "stages.inst.steps: give either steps or epochs, not both",
    ),
    (
        "negative learning rate",
        set_key("stages.inst.lr", -1.0),
        "stages.inst.lr: expected a positive number",
    ),
    (
        "unknown schedule",
        set_key("stages.inst.schedule", "cosin"),
        "stages.inst.schedule: unknown schedule 'cosin'",
    ),
    (
        "zero stage out of range",
        set_key("learner.zero_stage", 4),
        "learner.zero_stage: ZeRO stage 4 is out of range; expected 0, 1, 2 or 3",
    ),
    (
        "chat template the tiny model lacks",
        set_key("stages.inst.data.template", "chat"),
        "stages.inst.data.template: the model's tokenizer has no chat template; expected auto or plain",
    ),
    (
        "unknown rollout backend",
        set_key("rollout.backend", "vlm"),
        "rollout.backend: unknown value 'vlm'; expected one of vllm, hf",
    ),
    (
        "grid over an unknown key",
        set_key("grid", {"stages.inst.lrr": [0.1]}),
        "grid.stages.inst.lrr",
    ),
    (
        "grid over orderings",
        set_key("grid", {"orderings.permutations": [["inst"]]}),
        "grid.orderings.permutations: 'orderings.permutations' cannot be swept",
    ),
    ("duplicate seeds", set_key("seeds", [1, 1]), "seeds: expected distinct seeds"),
    (
        "missing model directory",
        set_key("model.path", "/nonexistent/model"),
        "model.path: /nonexistent/model: expected an existing local model directory",
    ),
    (
        "unreachable tracking server",
        set_key("tracking.uri", "http://127.0.0.1:9"),
        "tracking.uri: MLflow server http://127.0.0.1:9 is unreachable",
    ),
    (
        "unsupported tracking uri",
        set_key("tracking.uri", "ftp://x"),
        "tracking.uri: unsupported tracking URI 'ftp://x'",
    ),
    (
        "tiny model vLLM cannot serve",
        set_key("model.tiny", {"hidden_size": 64, "num_heads": 4}),
        "model.tiny: expected a head size hidden_size/num_heads in 32, 64",
    ),
    (
        "retain weight without a retain set",
        lambda s: (
            set_key(
                "stages.forget",
                {
                    "kind": "unlearn",
                    "objective": "graddiff",
                    "data": {"task": "facts", "split": "forget"},
                },
            )(s),
            set_key("unlearning", ["forget"])(s),
        ),
        "stages.forget.retain: objective 'graddiff' weights a retain set (alpha > 0)",
    ),
    (
        "batch smaller than the learner's ranks",
        lambda s: (
            set_key("stages.inst.batch_size", 1)(s),
            set_key("learner.ranks", 2)(s),
        ),
        "stages.inst.batch_size: 1 rows cannot be split over learner.ranks=2",
    ),
    (
        "a loss parameter of the wrong type",
        lambda s: (
            set_key(
                "stages.forget",
                {
                    "kind": "unlearn",
                    "objective": "npo",
                    "params": {"beta": "high"},
                    "data": {"task": "facts", "split": "forget"},
                },
            )(s),
            set_key("unlearning", ["forget"])(s),
        ),
        "stages.forget.params.beta: expected a number, got 'high'",
    ),
    (
        "a DPO stage without an alternative",
        unlearn_stage("dpo", alpha=0),
        "stages.forget.params.alternative: objective 'dpo' prefers another answer to each forget answer; expected 'idk'",
    ),
    (
        "a DPO alternative column the data lacks",
        unlearn_stage("dpo", alpha=0, alternative="chosen"),
        "stages.forget.params.alternative: row 1 of the stage's data has no 'chosen' answer",
    ),
    (
        "a DPO beta of zero",
        unlearn_stage("dpo", alpha=0, alternative="idk", beta=0),
        "stages.forget.params.beta: expected a positive number, got 0.0",
    ),
    (
        "an RMU layer the model does not have",
        unlearn_stage("rmu", alpha=0, layer=4),
        "stages.forget.params.layer: the model has decoder layers 0 to 3; expected layer indexes among them, got 4",
    ),
    (
        "RMU trainable layers the model does not have",
        unlearn_stage("rmu", alpha=0, layer=2, trainable_layers=[1, 9]),
        "stages.forget.params.trainable_layers: the model has decoder layers 0 to 3; expected a list of layer indexes among them, got 9",
    ),
    (
        "RMU trainable layers not a list",
        unlearn_stage("rmu", alpha=0, layer=2, trainable_layers="top"),
        "stages.forget.params.trainable_layers: the model has decoder layers 0 to 3; expected a list of layer indexes among them, got top",
    ),
    (
        "a PDU stage without a retain set",
        unlearn_stage("pdu"),
        "stages.forget.retain: objective 'pdu' constrains the loss on a retain set; expected a retain data set",
    ),
    (
        "an UNDIAL beta of zero",
        unlearn_stage("undial", beta=0),
        "stages.forget.params.beta: expected a positive number, got 0.0",
    ),
    (
        "eval stage with unknown set",
        set_key("stages.check.sets", ["math"]),
        "stages.check.sets[0]: unknown evaluation set 'math'",
    ),
    (
        "learning rate NaN",
        set_key("stages.inst.lr", float("nan")),
        "stages.inst.lr: expected a positive number, got nan",
    ),
    (
        "engine context shorter than the prompts",
        lambda s: (
            set_key("evaluation.sets.facts.metrics", ["accuracy"])(s),
            set_key("rollout.max_model_len", 8)(s),
        ),
        "rollout.max_model_len: 8 is shorter than the longest prompt of evaluation set 'facts'",
    ),
    (
        "storage that cannot be created",
        set_key("storage_dir", "/proc/stageflow-study"),
        "storage_dir: /proc/stageflow-study cannot be created",
    ),
    (
        "unknown rollout placement",
        set_key("rollout.placement", "pertrial"),
        "rollout.placement: unknown value 'pertrial'; expected one of shared, per_trial, colocated",
    ),
    (
        "colocated placement on a CPU study",
        lambda s: (
            set_key("rollout.placement", "colocated")(s),
            set_key("resources.device", "cpu")(s),
        ),
        "rollout.placement: colocated shares a GPU",
    ),
    (
        "more colocated engines than learner ranks",
        lambda s: (
            set_key("rollout.placement", "colocated")(s),
            set_key("rollout.workers", 2)(s),
        ),
        "rollout.workers: colocated puts each engine on a learner rank's GPU",
    ),
    (
        "evaluators beside colocated engines",
        lambda s: (
            set_key("rollout.placement", "colocated")(s),
            set_key("evaluation.placement", "evaluators")(s),
        ),
        "evaluation.placement: evaluators sample from the engines while the learner trains",
    ),
    (
        "unknown evaluation placement",
        set_key("evaluation.placement", "evaluator"),
        "evaluation.placement: unknown value 'evaluator'; expected one of learner, evaluators",
    ),
    (
        "no engine for a generation metric",
        lambda s: (
            set_key("evaluation.sets.facts.metrics", ["accuracy"])(s),
            set_key("rollout.workers", 0)(s),
        ),
        "rollout.workers: the study samples completions",
    ),
    (
        "unknown learner dtype",
        set_key("learner.dtype", "fp16"),
        "learner.dtype: unknown value 'fp16'; expected one of float32, bfloat16",
    ),
    (
        "negative weight decay",
        set_key("stages.inst.weight_decay", -0.1),
        "stages.inst.weight_decay: expected a non-negative number, got -0.1",
    ),
    (
        "membership inference without a holdout set",
        set_key("evaluation.sets.facts.metrics", ["avg_loglik", "mia_min_k"]),
        "evaluation.sets.facts.holdout: 'mia_min_k' scores the set's rows against rows never trained on; expected holdout: <an evaluation set of such rows>",
    ),
    (
        "a holdout set that is not another evaluation set",
        set_key("evaluation.sets.facts.holdout", "facts"),
        "evaluation.sets.facts.holdout: 'facts' is not another evaluation set; expected one of evaluation.sets (none other defined)",
    ),
    (
        "model utility of a metric the study does not compute",
        set_key("evaluation.model_utility", ["facts/probability"]),
        "evaluation.model_utility[0]: 'facts/probability' is not computed; expected '<set>/<metric>' of evaluation.sets",
    ),
    (
        "model utility of a metric outside [0, 1]",
        set_key("evaluation.model_utility", ["facts/avg_loglik"]),
        "evaluation.model_utility[0]: 'avg_loglik' is not a number in [0, 1]",
    ),
    (
        "privacy leakage of a metric that is not an attack",
        set_key("analysis.privleak", "facts/avg_loglik"),
        "analysis.privleak: 'avg_loglik' is not a membership-inference metric; expected one of mia_gradnorm, mia_loss, mia_min_k, mia_min_k_pp, mia_reference, mia_zlib",
    ),
    (
        "privacy leakage of a metric the study does not compute",
        set_key("analysis.privleak", "facts/mia_loss"),
        "analysis.privleak: 'facts/mia_loss' is not computed",
    ),
    (
        "a truth ratio on rows without perturbed answers",
        set_key(
            "evaluation.sets.facts",
            {"data": {"task": "inst", "split": "eval"}, "metrics": ["probability_w_options"]},
        ),
        "evaluation.sets.facts.data: 'probability_w_options' reads every row's perturbed answers; expected rows with a 'perturbed_answers' list (map a file's column with fields.perturbed_answers)",
    ),
    (
        "GradNorm under ZeRO-3",
        lambda s: (
            set_key("evaluation.sets.facts.metrics", ["mia_gradnorm"])(s),
            set_key("evaluation.sets.facts.holdout", "held")(s),
            set_key(
                "evaluation.sets.held",
                {"data": {"task": "facts", "split": "holdout"}, "metrics": ["avg_loglik"]},
            )(s),
            set_key("learner.zero_stage", 3)(s),
        ),
        "evaluation.sets.facts.metrics[0]: mia_gradnorm takes per-row gradients of a rank's full weights; expected learner.zero_stage 0, 1 or 2, got 3",
    ),
    (
        "the oracle as the reference model without oracle trials",
        lambda s: (
            set_key("evaluation.sets.facts.metrics", ["mia_reference"])(s),
            set_key("evaluation.sets.facts.holdout", "held")(s),
            set_key("evaluation.sets.facts.reference", "oracle")(s),
            set_key(
                "evaluation.sets.held",
                {"data": {"task": "facts", "split": "holdout"}, "metrics": ["avg_loglik"]},
            )(s),
        ),
        "evaluation.sets.facts.reference: the oracle as the reference model needs the study's oracle trials; expected oracle: true, or reference: base",
    ),
    (
        "an unknown reference model",
        set_key("evaluation.sets.facts.reference", "teacher"),
        "evaluation.sets.facts.reference: unknown value 'teacher'; expected one of base, oracle",
    ),
    (
        "a weight mask on an sft stage",
        set_key("stages.inst.mask", {"kind": "saliency", "fraction": 0.1}),
        "stages.inst.mask: a weight mask selects what a supervised unlearn stage changes; this is a sft stage",
    ),
    (
        "an unknown mask kind",
        set_key("stages.inst.mask", {"kind": "random"}),
        "stages.inst.mask.kind: unknown value 'random'; expected one of saliency, attribution",
    ),
    (
        "a mask fraction above 1",
        lambda s: (
            set_key(
                "stages.ga",
                {
                    "kind": "unlearn",
                    "objective": "ga",
                    "data": {"task": "facts", "split": "forget"},
                    "mask": {"kind": "saliency", "fraction": 2},
                },
            )(s),
        ),
        "stages.ga.mask.fraction: expected a fraction in (0, 1], got 2",
    ),
    (
        "an attribution mask without retain data",
        set_key(
            "stages.ga",
            {
                "kind": "unlearn",
                "objective": "ga",
                "data": {"task": "facts", "split": "forget"},
                "mask": {"kind": "attribution"},
            },
        ),
        "stages.ga.retain: an attribution mask scores the weights with the retain rows' gradient too; expected a retain data set",
    ),
    (
        "a mask with weight decay",
        set_key(
            "stages.ga",
            {
                "kind": "unlearn",
                "objective": "ga",
                "data": {"task": "facts", "split": "forget"},
                "weight_decay": 0.01,
                "mask": {"kind": "saliency"},
            },
        ),
        "stages.ga.weight_decay: weight decay would move the weights outside the mask; expected 0 with a mask, got 0.01",
    ),
    (
        "an isolated share above 1",
        set_key(
            "stages.abl",
            {
                "kind": "unlearn",
                "objective": "abl",
                "data": {"task": "facts"},
                "params": {"isolate": 1.5},
            },
        ),
        "stages.abl.params.isolate: the share of the stage's rows to isolate; expected a fraction in (0, 1], got 1.5",
    ),
    (
        "a ULD assistant deeper than the model",
        uld_branch({"layers": 5}),
        "stages.uld.params.layers: the assistant is the model's first layers and the model has 4; expected 1 to 4 (0: a quarter of them), got 5",
    ),
    (
        "a ULD stage on a path",
        uld_branch({}, unlearning=False),
        "stages.uld: ULD leaves a combined model that is evaluated, not trained further; expected the stage in `unlearning` only (a branch), not in an ordering",
    ),
    (
        "ULD generation left to the engines",
        uld_branch({}, math=MATH_ACCURACY),
        "stages.uld.params.generation: the vLLM engines cannot serve ULD's combined logits; expected 'hf' (sampled by transformers on the learner), got ''",
    ),
    (
        "a ULD filter share of 1",
        uld_branch({"relative_top": 1.0}),
        "stages.uld.params.relative_top: the share of the top log-prob below which tokens are filtered; expected a value in [0, 1), got 1.0",
    ),
    (
        "a Min-K fraction above 1",
        set_key("evaluation.sets.facts.min_k", 1.5),
        "evaluation.sets.facts.min_k: expected a fraction in (0, 1], got 1.5",
    ),
    (
        "negative sampling temperature",
        set_key("evaluation.sets.facts.temperature", -1.0),
        "evaluation.sets.facts.temperature: expected a non-negative number",
    ),
    (
        "zero CPUs per actor",
        set_key("resources.cpus_per_actor", 0),
        "resources.cpus_per_actor: expected a positive number, got 0",
    ),
    (
        "no threads per actor",
        set_key("resources.threads_per_actor", 0),
        "resources.threads_per_actor: expected a positive number, got 0",
    ),
    (
        "zero evaluation examples",
        set_key("evaluation.sets.facts.max_examples", 0),
        "evaluation.sets.facts.max_examples: expected a positive number, got 0",
    ),
    (
        "a GPU memory share above 1",
        set_key("rollout.gpu_memory_utilization", 1.5),
        "rollout.gpu_memory_utilization: expected a fraction in (0, 1]",
    ),
    (
        "data with both task and file",
        set_key("stages.inst.data.file", "x.jsonl"),
        "stages.inst.data: expected exactly one of 'task' (a synthetic task) or 'file'",
    ),
    (
        "probability mass of an unknown set",
        set_key("analysis.probability_mass", "refusals"),
        "analysis.probability_mass: 'refusals' is not an evaluation set; expected one of facts",
    ),
    (
        "over-refusal metric not computed",
        set_key("analysis.over_refusal", ["facts/refusal_rate"]),
        "analysis.over_refusal[0]: 'facts/refusal_rate' is not computed",
    ),
    (
        "a storage cap below one checkpoint",
        set_key("storage.max_gb", 0.001),
        "storage.max_gb: 0.001 GB is less than one checkpoint of this model (3.53 MB); expected at least that",
    ),
    (
        "a negative storage cap",
        set_key("storage.max_gb", -1),
        "storage.max_gb: expected a positive number, got -1",
    ),
    (
        "benign share of every row",
        set_key("stages.inst.data", {"task": "refusal", "params": {"benign": 1.0}}),
        "stages.inst.data.params: benign is the share of answered training rows; expected [0, 1), got 1.0",
    ),
]


@pytest.mark.parametrize("change,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_study(tmp_path, capsys, change, expected):
    path = write_study(tmp_path, change)
    code, err = validate(path, capsys=capsys)
    assert code == 2
    assert err.startswith(f"stageflow: error: {path}: "), err
    assert expected in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "storage").exists()


def test_truncated_model_weights(tmp_path, capsys):
    """A safetensors file cut short (an interrupted copy): refused before any engine starts."""
    from stageflow.core.models import TinyModelSpec, build_tiny_model

    model = build_tiny_model(tmp_path / "model", TinyModelSpec(hidden_size=64, num_heads=2))
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, err = validate(write_study(tmp_path, set_key("model.path", str(model))), capsys=capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert f"model.path: {model}: expected complete safetensors weights" in err
    assert not (tmp_path / "storage").exists()


def test_logit_scaling_model_refused(tmp_path, capsys):
    """A model whose config scales its logits (Granite) would be trained on the wrong log-probs;
    Gemma2's soft-capping is applied by the head (tests/kernels/test_softcap.py)."""
    import json

    from stageflow.core.models import TinyModelSpec, build_tiny_model

    model = build_tiny_model(tmp_path / "model", TinyModelSpec(hidden_size=64, num_heads=2))
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "logits_scaling": 8.0}))
    code, err = validate(write_study(tmp_path, set_key("model.path", str(model))), capsys=capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "its config sets logits_scaling=8.0" in err and "model.path:" in err


def test_run_refuses_bad_input_before_starting_anything(tmp_path, capsys):
    """`run` checks like `validate`: an uncreatable storage dir is one sentence, exit 2, at once."""
    import time

    path = write_study(tmp_path, set_key("storage_dir", "/proc/stageflow-study"))
    start = time.monotonic()
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot be created" in err
    assert time.monotonic() - start < 30


def test_missing_file(tmp_path, capsys):
    code, err = validate(tmp_path / "nope.yaml", capsys=capsys)
    assert code == 2 and "nope.yaml: no such study file" in err


def test_malformed_yaml(tmp_path, capsys):
    code, err = validate(write_study(tmp_path, text="name: x\nstages: [unclosed\n"), capsys=capsys)
    assert code == 2 and "line 3" in err and "expected valid YAML" in err


def test_duplicate_stage_names(tmp_path, capsys):
    text = "name: x\nstages:\n  inst: {kind: sft}\n  inst: {kind: eval}\n"
    code, err = validate(write_study(tmp_path, text=text), capsys=capsys)
    assert code == 2 and "duplicate key 'inst' (first given on line 3)" in err


@pytest.mark.parametrize(
    "content,expected",
    [
        ("", "at least one example (the file is empty)"),
        (
            '{"prompt": "a", "answer": "b"}\n{"prompt": "c", "answer": \n',
            "valid JSON on every line (line 2",
        ),
        (
            '{"prompt": "a", "answer": "b"}\n{"prompt": "c"}\n',
            "a string field 'answer' on every line (line 2 has none)",
        ),
    ],
    ids=["empty", "malformed", "missing field"],
)
def test_bad_jsonl(tmp_path, capsys, content, expected):
    data = tmp_path / "mine.jsonl"
    data.write_text(content)
    path = write_study(tmp_path, set_key("stages.inst.data", {"file": str(data)}))
    code, err = validate(path, capsys=capsys)
    assert code == 2 and f"stages.inst.data.file: {data}: expected {expected}" in err


def test_user_jsonl_is_accepted(tmp_path, capsys):
    data = tmp_path / "mine.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(3))
    )
    assert (
        main(
            [
                "validate",
                str(write_study(tmp_path, set_key("stages.inst.data", {"file": str(data)}))),
            ]
        )
        == 0
    )


def test_unwritable_storage(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    path = write_study(tmp_path, set_key("storage_dir", str(blocker / "sub")))
    code, err = validate(path, capsys=capsys)
    assert code == 2 and "storage_dir:" in err and "expected a writable directory" in err


def test_bad_override(tmp_path, capsys):
    path = write_study(tmp_path)
    code, err = validate(path, "stages.inst.lr=fast", capsys=capsys)
    assert code == 2 and "override 'stages.inst.lr=fast': stages.inst.lr: wrong type" in err
    code, err = validate(path, "seeds", capsys=capsys)
    assert code == 2 and "expected an override of the form key=value" in err
    code, err = validate(path, "grid={stages.inst.lr:[1,2]}", capsys=capsys)  # no space after ':'
    assert code == 2 and len(err.splitlines()) == 1
    assert "command line: grid: '{stages.inst.lr:[1,2]}' is not a YAML value" in err


def test_a_million_grid_points_validate_at_the_cost_of_their_distinct_settings(tmp_path, capsys):
    """Three sections of 100 values each: 300 settings checked, not 10^6 combinations (the
    combination-by-combination check took 71 ms a point); the count is stated; a bad value
    among them is still found."""
    import time

    values = [round(i * 1e-5, 6) for i in range(1, 101)]
    grid = {"stages.inst.lr": values, "stages.facts.lr": values,
            "evaluation.sets.facts.max_examples": list(range(1, 101))}  # fmt: skip
    path = write_study(tmp_path, set_key("grid", grid))
    start = time.perf_counter()
    assert main(["validate", str(path)]) == 0
    seconds = time.perf_counter() - start
    assert "valid — 2 orderings, 2000000 trials" in capsys.readouterr().out
    assert seconds < 60, seconds  # about 3 s here; the product would take about 20 hours
    grid["stages.facts.lr"] = [*values[:50], -1.0, *values[50:]]
    code, err = validate(write_study(tmp_path, set_key("grid", grid)), capsys=capsys)
    assert code == 2 and "stages.facts.lr: expected a positive number, got -1.0" in err


def test_overrides_apply(tmp_path, capsys):
    path = write_study(tmp_path)
    assert main(["validate", str(path), "seeds=[0,1,2]", "stages.inst.lr=1e-4"]) == 0
    assert "6 trials" in capsys.readouterr().out
