"""`stageflow run` through the real path: config → Ray actors → MLflow runs."""

from __future__ import annotations

import subprocess
import sys

import yaml
from mlflow.tracking import MlflowClient

from stageflow.platform.cli import main
from stageflow.platform.tracking import default_tracking_uri


def test_help_reads_well():
    done = subprocess.run(
        [sys.executable, "-m", "stageflow.platform.cli", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0
    for word in ("validate", "run", "ui", "examples:"):
        assert word in done.stdout


def test_quickstart_validates(capsys):
    assert main(["validate", "studies/quickstart.yaml"]) == 0


def test_ui_needs_a_study_dir(tmp_path, capsys):
    assert main(["ui", str(tmp_path)]) == 2
    assert "no mlflow.db here" in capsys.readouterr().err


def test_run_eval_study_logs_nested_runs(tmp_path, tiny_model_dir, ray_cluster, capsys):
    study = {
        "name": "evalonly",
        "storage_dir": str(tmp_path / "study"),
        "model": {"path": str(tiny_model_dir)},
        "stages": {"probe": {"kind": "eval", "sets": ["facts"]}, "all": {"kind": "eval"}},
        "orderings": {"permutations": ["probe", "all"]},
        "evaluation": {
            "sets": {
                "facts": {
                    "data": {"task": "facts", "split": "eval", "size": 4},
                    "metrics": ["avg_loglik", "truth_ratio"],
                },
                "refusal": {
                    "data": {"task": "refusal", "split": "eval", "size": 8},
                    "metrics": ["paraphrase_loglik"],
                },
            }
        },
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| probe>all" in out and "| all>probe" in out and "facts/avg_loglik" in out

    client = MlflowClient(default_tracking_uri(tmp_path / "study"))
    runs = client.search_runs(
        [client.get_experiment_by_name("evalonly").experiment_id], max_results=100
    )
    by_kind: dict[str, list] = {}
    for run in runs:
        by_kind.setdefault(run.data.tags.get("stageflow.kind"), []).append(run)
    assert len(by_kind["study"]) == 1 and len(by_kind["trial"]) == 2
    assert "stage" not in by_kind  # eval stages train nothing: their metrics go on the trial run
    study_id = by_kind["study"][0].info.run_id
    assert all(r.data.tags["mlflow.parentRunId"] == study_id for r in by_kind["trial"])
    trial = by_kind["trial"][0]
    history = client.get_metric_history(trial.info.run_id, "facts/avg_loglik")
    assert [m.step for m in history] == [0, 1, 2]
    assert all(-10 < m.value < 0 for m in history)
    assert (tmp_path / "study" / "study.yaml").is_file()
