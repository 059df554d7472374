from __future__ import annotations

from mlflow.tracking import MlflowClient

from stageflow.platform.tracking import (
    MAX_METRICS_PER_BATCH,
    Tracker,
    default_tracking_uri,
    flatten,
)


def test_flatten():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {
        "a.b": 1,
        "a.c": "[1, 2]",
        "d": None,
    }


def test_nested_runs_and_batched_metrics(tmp_path):
    uri = default_tracking_uri(tmp_path)
    tracker = Tracker(uri, "exp", str(tmp_path / "artifacts"))
    study = tracker.start_run(
        "study", tags={"stageflow.kind": "study"}, params={"stages": {"a": {"lr": 0.1}}}
    )
    trial = tracker.start_run("trial", parent_id=study, tags={"stageflow.trial_id": "abc"})
    stage = tracker.start_run("stage", parent_id=trial)
    series = [
        (step, {"loss": 1.0 / (step + 1), "bad key!": 2.0}) for step in range(MAX_METRICS_PER_BATCH)
    ]
    tracker.log_metric_series(stage, series)
    tracker.log_text(study, "name: x\n", "study.yaml")
    for run in (stage, trial, study):
        tracker.end_run(run)

    client = MlflowClient(uri)
    assert client.get_run(trial).data.tags["mlflow.parentRunId"] == study
    assert client.get_run(stage).data.tags["mlflow.parentRunId"] == trial
    assert client.get_run(study).data.params["stages.a.lr"] == "0.1"
    history = client.get_metric_history(stage, "loss")
    assert len(history) == MAX_METRICS_PER_BATCH and history[-1].step == MAX_METRICS_PER_BATCH - 1
    assert len(client.get_metric_history(stage, "bad key_")) == MAX_METRICS_PER_BATCH
    assert [a.path for a in client.list_artifacts(study)] == ["study.yaml"]
    assert tracker.find_run(trial_id="abc") == trial and tracker.find_run(trial_id="zzz") is None
    # a second tracker on the same store reuses the experiment
    assert Tracker(uri, "exp").experiment_id == tracker.experiment_id
