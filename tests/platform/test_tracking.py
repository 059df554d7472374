from __future__ import annotations

from mlflow.tracking import MlflowClient

from stageflow.platform.engine.tracking import (
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


def test_calls_are_safe_to_repeat(tmp_path):
    """A restarted tracker gets retried calls: runs are found by key, points are not doubled."""
    uri = default_tracking_uri(tmp_path)
    first = Tracker(uri, "exp")
    run = first.start_run("trial", key="trial:abc", tags={"stageflow.kind": "trial"})
    assert first.start_run("trial", key="trial:abc") == run  # found, not created again
    first.log_metric_series(run, [(0, {"loss": 1.0}), (1, {"loss": 0.5})], 1000)
    first.log_metric_series(run, [(0, {"loss": 1.0}), (1, {"loss": 0.5})], 1000)  # a retry
    restarted = Tracker(uri, "exp")  # a new incarnation: an earlier attempt's points are known
    restarted.log_metric_series(run, [(0, {"loss": 1.0}), (1, {"loss": 0.5}), (2, {"loss": 0.2})])
    history = MlflowClient(uri).get_metric_history(run, "loss")
    assert sorted(m.step for m in history) == [0, 1, 2]
    assert restarted.start_run("trial", key="trial:abc") == run
    tags = MlflowClient(uri).get_experiment(first.experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
