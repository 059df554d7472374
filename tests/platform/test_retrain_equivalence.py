"""The Retrain Equivalence study: its scale-up path, and a reduced version end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from stageflow.core.expand import expand, trial_spec
from stageflow.platform.commands.cli import main
from stageflow.platform.commands.validate import load_and_validate
from stageflow.platform.engine.tracking import default_tracking_uri

STUDY = Path(__file__).resolve().parents[2] / "studies" / "retrain_equivalence.yaml"


def test_design_of_the_paper():
    spec = load_and_validate(STUDY)
    trials = expand(spec)
    paths = {t.path for t in trials if not t.oracle}
    assert paths == {
        ("pretrain", "refusal", "inst", "facts", "math"),
        ("pretrain", "inst", "refusal", "facts", "math"),
        ("pretrain", "inst", "facts", "refusal", "math"),
        ("pretrain", "inst", "facts", "math", "refusal"),
    }
    # each ordering's oracle trains its refusal stage on the harmless rows alone (the retain
    # split: the stage's rows minus the forget set), at the same position
    assert {t.path for t in trials if t.oracle} == paths
    oracle = next(t for t in trials if t.oracle)
    assert trial_spec(spec, oracle).stages["refusal"].data.split == "retain"
    assert all(t.unlearning == ("ga", "npo", "simnpo") for t in trials if not t.oracle)
    assert len(spec.seeds) >= 3 and spec.learner.reset_optimizer_per_stage


def test_scale_up_expands_into_the_same_trials(tiny_model_dir):
    gpu = [
        "model.path=" + str(tiny_model_dir),
        "resources.device=cuda",
        "learner.ranks=4",
        "learner.zero_stage=3",
        "learner.dtype=bfloat16",
        "rollout.dtype=bfloat16",
    ]
    local, scaled = expand(load_and_validate(STUDY)), expand(load_and_validate(STUDY, gpu))
    assert [t.trial_id for t in scaled] == [t.trial_id for t in local]


REDUCED = [
    "seeds=[0]",
    "orderings.insert.positions=[2,5]",
    "stages.pretrain.steps=4",
    *[f"stages.{s}.steps=2" for s in ("inst", "facts", "math", "refusal")],
    *[f"stages.{s}.data.size=16" for s in ("ga", "npo", "simnpo", "refusal")],
    "stages.pretrain.data.size=64",
    "evaluation.sets.refusal.max_examples=4",
    "evaluation.sets.facts.max_examples=8",
    "evaluation.sets.math.max_examples=4",
    "evaluation.sets.math.samples=2",
    "evaluation.sets.math.max_new_tokens=8",
    "evaluation.sets.benign.max_examples=4",
    "evaluation.sets.benign.samples=2",
]


@pytest.mark.slow
def test_reduced_study_end_to_end(tmp_path, ray_cluster, capsys):
    storage = tmp_path / "re"
    utility = "evaluation.model_utility=[facts/truth_ratio,math/accuracy]"
    assert main(["run", str(STUDY), f"storage_dir={storage}", *REDUCED, utility]) == 0
    report = (storage / "report" / "report.md").read_text()
    for title in (
        "Finding 1: the forget score depends on the path",
        "Finding 2: math_utility after unlearning depends on the path",
        "Finding 3: where the probability mass goes depends on the path",
        "Finding 4: no over-refusal before unlearning",
        "Does the ordering change the outcome?",
        "forget_score by ordering",
        "facts_utility by ordering",
        "math_utility by ordering",
        "forget_quality by ordering",
        "Runs these numbers come from",
    ):
        assert title in report
    for method in ("ga", "npo", "simnpo"):
        assert re.search(rf"\| forget_score +\| {method} +\|", report)
    # one seed: no seed spread, so no finding is called either way
    assert "Not measurable here: the forget score" in report
    assert re.search(r"\| pretrain>inst>facts>math>refusal +\| [0-9.]+ +\| [0-9.]+ +\|", report)
    # the unlearning evaluation: forget quality and model utility per ordering and method
    section = report.split("## Unlearning evaluation")[1].split("\n## ")[0]
    assert re.search(r"\| ordering +\| method +\| forget_quality +\| model_utility +\|", section)
    assert re.search(r"\| pretrain>inst>facts>math>refusal +\| npo +\| [0-9.e-]+", section)
    figures = sorted(p.name for p in (storage / "report" / "figures").glob("*.png"))
    assert "tradeoff_forget_quality_utility.png" in figures
    assert "heatmap_forget_score.png" in figures and "unlearning_npo.png" in figures
    assert {"mass_ga.png", "heatmap_mass_shift.png", "heatmap_mass_answer.png"} <= set(figures)
    assert any(name.startswith("stages_") for name in figures)

    # every trial run the report names exists in MLflow, and its numbers come from those runs
    client = MlflowClient(default_tracking_uri(storage))
    run_ids = re.findall(r"\| ([0-9a-f]{32}) +\|", report)
    assert len(run_ids) == 4  # two orderings and their oracles
    runs = {rid: client.get_run(rid) for rid in run_ids}
    forget_table = report.split("## forget_score by ordering")[1].split("##")[0]
    for run in runs.values():
        if run.data.tags["stageflow.oracle"] == "True":
            continue
        ordering = run.data.tags["stageflow.ordering"]
        end = len(ordering.split(">"))
        before = next(
            m.value
            for m in client.get_metric_history(run.info.run_id, "refusal/paraphrase_loglik")
            if m.step == end
        )
        after = client.get_metric_history(run.info.run_id, "ga/refusal/paraphrase_loglik")[-1].value
        row = next(line for line in forget_table.splitlines() if line.startswith(f"| {ordering} "))
        assert row.split("|")[2].strip() == f"{before - after:.4g}"
    study_run = client.search_runs(
        [client.get_experiment_by_name("retrain_equivalence").experiment_id],
        "tags.`stageflow.kind` = 'study'",
    )[0]
    artifacts = {a.path for a in client.list_artifacts(study_run.info.run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/figures"} <= artifacts
    assert any(k.startswith("forget_score/ga/spread") for k in study_run.data.metrics)
    assert main(["report", str(storage)]) == 0
    assert "Does the ordering change the outcome?" in capsys.readouterr().out


METHODS_STUDY = STUDY.with_name("unlearning_methods.yaml")
METHODS = (
    "ga", "graddiff", "npo", "simnpo", "wga", "satimp", "ceu", "undial", "dpo", "idkdpo",
    "altpo", "pdu", "rmu", "salun", "wagle", "abl", "uld",
)  # fmt: skip


@pytest.mark.slow
def test_every_unlearning_method_on_a_path_end_to_end(tmp_path, ray_cluster, capsys):
    """studies/unlearning_methods.yaml reduced to one path and its oracle: every method runs as a
    branch from the same model, and the report scores each (the forget score is the drop of the
    refusal paraphrases' log-likelihood, so a method that unlearns makes it positive)."""
    spec = load_and_validate(METHODS_STUDY)
    assert tuple(spec.unlearning) == METHODS
    assert {t.path for t in expand(spec)} == {
        ("pretrain", *order)
        for order in [
            ("refusal", "inst", "facts", "math"),
            ("inst", "refusal", "facts", "math"),
            ("inst", "facts", "refusal", "math"),
            ("inst", "facts", "math", "refusal"),
        ]
    }  # fmt: skip (the oracles: the same paths, refusal on its harmless rows)
    storage = tmp_path / "methods"
    reduced = [
        *(r for r in REDUCED if "positions" not in r and "stages.ga" not in r),
        "orderings.insert.positions=[5]",
        *[f"stages.{m}.data.size=16" for m in METHODS],
        *[
            f"stages.{m}.retain.size=16"
            for m in (
                "graddiff",
                "wga",
                "satimp",
                "dpo",
                "idkdpo",
                "altpo",
                "pdu",
                "rmu",
                "wagle",
                "uld",
            )  # fmt: skip
        ],
    ]
    assert main(["run", str(METHODS_STUDY), f"storage_dir={storage}", *reduced]) == 0
    report = (storage / "report" / "report.md").read_text()
    table = report.split("## Finding 1")[1].split("##")[0]
    compared = report.split("## Methods compared")[1].split("\n## ")[0]  # one row per method
    scores = {}
    for method in METHODS:
        row = re.search(rf"^\| {method} +\| (-?[0-9.e+-]+)", table, re.MULTILINE)
        assert row, method
        scores[method] = float(row.group(1))
        # one ordering: its mean, lowest and highest are the Finding's value (3 digits)
        row = re.search(rf"^\| {method} +\| (\S+) \[(\S+), (\S+)\] +\|", compared, re.MULTILINE)
        assert row, (method, compared)
        assert all(float(v) == pytest.approx(scores[method], rel=6e-3) for v in row.groups())
    assert scores["ga"] > 0 and scores["npo"] > 0, scores
    metas = [json.loads(m.read_text()) for m in (storage / "prefixes").glob("*/meta.json")]
    [abl] = [m for m in metas if m["stage"] == "abl"]  # one path, one seed: one ABL branch
    isolated = abl["isolated"]  # the rows ABL ascended on, with their losses and prompts
    assert len(isolated["rows"]) == len(isolated["losses"]) == len(isolated["prompts"]) == 8
    [altpo] = [m for m in metas if m["stage"] == "altpo"]  # its answers sampled first
    assert 0 <= altpo["step_metrics"][0]["alternatives/like_answer"] < 1
    [uld] = [m for m in metas if m["stage"] == "uld"]  # the base plus the assistant's adapter
    assert (storage / "prefixes" / uld["key"] / "model" / "assistant" / "uld.json").is_file()
