"""studies/reward_shaping.yaml, reduced: every reward term is logged per RL step (MLflow and the
prefix cache), the completion rate at the path's end, and the report's reward-design section
with its hacking signature; the signature's arithmetic on known curves."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from stageflow.platform.commands.cli import main
from stageflow.platform.engine.tracking import default_tracking_uri
from stageflow.platform.results.reward_report import signature, term_value
from tests.platform.test_study import runs_by_kind

STUDY = Path(__file__).resolve().parents[2] / "studies" / "reward_shaping.yaml"


def test_the_hacking_signature_of_known_curves():
    """Shaping rising while the outcome falls over the last half: correlation -1."""
    steps = [
        {"reward/math_correct": 0.5, "reward/steps": 0.25},
        {"reward/math_correct": 0.5, "reward/steps": 0.25},
        {"reward/math_correct": 0.4, "reward/steps": 0.5},
        {"reward/math_correct": 0.3, "reward/steps": 0.75},
        {"reward/math_correct": 0.2, "reward/steps": 1.0},
        {"reward/math_correct": 0.1, "reward/steps": 1.0 + 0.25},
    ]
    found = signature(steps, "math_correct", ["steps"])
    assert found["hacking_corr"] == pytest.approx(-1.0)
    assert found["outcome_final"] == pytest.approx(0.1) and found["shaping_final"] == 1.25
    gated = {"reward/gated": 1.5, "reward/gated.math_correct": 1.0, "reward/gated.steps": 0.5}
    assert term_value(gated, ["steps"]) == 0.5 and term_value(gated, ["math_correct"]) == 1.0
    assert math.isnan(signature(steps[:2], "math_correct", ["steps"])["hacking_corr"])


@pytest.mark.slow
def test_reward_shaping_study_logs_every_term_and_reports_the_designs(tmp_path, capsys):
    spec = yaml.safe_load(STUDY.read_text())
    spec["storage_dir"] = str(tmp_path / "study")
    spec["seeds"] = [0]
    spec["orderings"] = {"explicit": ["inst>math>ungated", "inst>math>gra"]}
    spec["model"]["tiny"] = {"hidden_size": 64, "num_layers": 2, "num_heads": 2}
    for name in ("inst", "math"):
        spec["stages"][name].update(steps=3, batch_size=8)
    for name in ("ungated", "gra", "ranked", "outcome"):
        spec["stages"][name].update(steps=3, batch_size=4)
        spec["stages"][name]["params"].update(group_size=4)
    spec["evaluation"]["sets"]["math"].update(max_examples=4, samples=2)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["run", str(path)]) == 0, capsys.readouterr()
    storage = tmp_path / "study"

    runs = runs_by_kind(storage, "reward_shaping")
    client = MlflowClient(default_tracking_uri(storage))
    rl_runs = {r.data.tags["stageflow.stage"]: r for r in runs["stage"]}
    expected = {
        "ungated": {"reward/math_correct", "reward/steps", "reward/format"},
        "gra": {"reward/gated", "reward/gated.math_correct", "reward/gated.steps", "reward/format"},
    }
    for stage, terms in expected.items():
        run_id = rl_runs[stage].info.run_id
        for term in terms:  # a per-step curve of each term
            assert len(client.get_metric_history(run_id, term)) == 3, (stage, term)
    records = [json.loads(p.read_text()) for p in (storage / "trials").glob("*.json")]
    assert len(records) == 2
    for record in records:
        assert 0.0 <= record["metrics"]["math/completion_rate"] <= 1.0
    report = (storage / "report" / "report.md").read_text()
    section = report.split("## Reward designs: outcome, shaping and hacking")[1].split("\n## ")[0]
    assert "hacking corr (last half)" in section and "math/completion_rate" in section
    assert "RL samples/s (median)" in section
    assert "| ungated " in section and "| gra " in section
    capsys.readouterr()
    assert main(["report", str(storage)]) == 0  # a study without unlearning has its report too
    assert "## Reward designs: outcome, shaping and hacking" in capsys.readouterr().out
    for figure in ("rewards_outcome", "rewards_shaping"):
        assert (storage / "report" / "figures" / f"{figure}.png").is_file()
