"""MLflow tracking: study run → trial runs → stage runs, written through one place.

The `Tracker` is the only writer of a study's store. It runs as a single Ray actor
(`max_concurrency=1`), so trials on many workers never write one SQLite file at once. It is
restartable (a lost node restarts it elsewhere and Ray retries the calls in flight), so every
call is safe to repeat: runs are found by their key before one is created, metric points
carry the caller's timestamp, and points a run already holds are not logged again.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import webbrowser
from pathlib import Path
from typing import Any

from stageflow.core.study_dir import StudyDir

# lazy: MLflow loads in the tracker actor and to find a study's experiment, Ray where the
# tracker starts (neither for the commands that only import this module)

MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_LENGTH = 6000
TRACKER_NAME = "stageflow-tracker"
NAMESPACE = "stageflow"  # shared actors are named in it, so trials find them from any job
# MLflow's UI opens an experiment of this kind on its training runs (not its GenAI view).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def default_tracking_uri(storage_dir: str | Path) -> str:
    """The default MLflow store of the study stored in `storage_dir`."""
    return StudyDir(Path(storage_dir).absolute()).tracking_uri


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}, 'c': [1, 2]} → {'a.b': 1, 'c': '[1, 2]'} (lists stay whole)."""
    if isinstance(data, dict):
        items: dict[str, Any] = {}
        for key, value in data.items():
            items.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return items
    if isinstance(data, (list, tuple)):
        return {prefix: json.dumps(data, default=str)}
    return {prefix: data}


class Tracker:
    """Creates nested runs and logs params, metrics, tags and artifacts in batches."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_dir: str | None = None):
        from mlflow.tracking import MlflowClient  # here: a trial process imports no mlflow

        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = tracking_uri
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            location = Path(artifact_dir).absolute().as_uri() if artifact_dir else None
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=location, tags=EXPERIMENT_KIND
            )
        self.created: set[str] = set()  # runs this incarnation created: nothing logged before

    def start_run(
        self,
        name: str,
        key: str | None = None,
        parent_id: str | None = None,
        tags: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        description: str | None = None,
    ) -> str:
        """The run whose `stageflow.key` is `key` (a child of `parent_id` when given), created
        when there is none yet (always, without a key); returns its run id."""
        found = self.find_run(key=key) if key else None
        if found:
            return found
        all_tags = {
            "mlflow.runName": name,
            **({"stageflow.key": key} if key else {}),
            **(tags or {}),
        }
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id
        if description:
            all_tags["mlflow.note.content"] = description
        run = self.client.create_run(
            self.experiment_id, run_name=name, tags={k: str(v) for k, v in all_tags.items()}
        )
        self.created.add(run.info.run_id)
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    def find_run(self, **tags: str) -> str | None:
        """The id of a run with all the given `stageflow.*` tags, if one exists (for resume)."""
        query = " and ".join(f"tags.`stageflow.{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([self.experiment_id], filter_string=query, max_results=1)
        return runs[0].info.run_id if runs else None

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in flatten(params).items()]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=items[start : start + MAX_PARAMS_PER_BATCH])

    def log_metrics(
        self, run_id: str, metrics: dict[str, float], step: int = 0, timestamp_ms: int = 0
    ) -> None:
        self.log_metric_series(run_id, [(step, metrics)], timestamp_ms)

    def log_metric_series(
        self, run_id: str, series: list[tuple[int, dict[str, float]]], timestamp_ms: int = 0
    ) -> None:
        """Many steps of metrics in as few calls as the batch limit allows; `timestamp_ms` is
        the caller's (a repeated call logs the same points), and (key, step) points the run
        already holds from an earlier attempt are skipped."""
        from mlflow.entities import Metric

        now = timestamp_ms or now_ms()
        items = [
            Metric(_metric_key(k), float(v), now, step)
            for step, metrics in series
            for k, v in metrics.items()
            if v is not None
        ]
        if run_id not in self.created:
            logged = {
                (m.key, m.step)
                for key in {m.key for m in items}
                for m in self.client.get_metric_history(run_id, key)
            }
            items = [m for m in items if (m.key, m.step) not in logged]
        for start in range(0, len(items), MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=items[start : start + MAX_METRICS_PER_BATCH])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def adopt(self, study_run: str, trial_runs: list[str], storage_dir: str) -> None:
        """Make `study_run` (this configuration's) the parent of the finished trials it reuses,
        and tag the study's earlier study runs `stageflow.superseded_by` it: the runs of
        trials that changed or no longer exist stay under those, as history."""
        for run_id in trial_runs:
            self.set_tags(run_id, {"mlflow.parentRunId": study_run})
        query = (
            f"tags.`stageflow.kind` = 'study' and tags.`stageflow.storage_dir` = '{storage_dir}'"
        )
        for run in self.client.search_runs([self.experiment_id], filter_string=query):
            if run.info.run_id != study_run and "stageflow.superseded_by" not in run.data.tags:
                self.set_tags(run.info.run_id, {"stageflow.superseded_by": study_run})

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, local_path, artifact_path)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)


def now_ms() -> int:
    return int(time.time() * 1000)


def _metric_key(key: str) -> str:
    """MLflow keys allow letters, digits, _ - . / and spaces; anything else becomes '_'."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def start_tracker(
    tracking_uri: str,
    experiment: str,
    artifact_dir: str | None,
    name: str,
    resources: dict[str, float] | None = None,
):
    """The study's single tracker as the restartable Ray actor `name` (every trial logs through
    it); `resources`: custom Ray resources that pin it to service nodes."""
    import ray

    actor = ray.remote(num_cpus=0, max_concurrency=1, max_restarts=-1, max_task_retries=-1)(Tracker)
    return actor.options(
        name=name, namespace=NAMESPACE, get_if_exists=True, resources=resources or None
    ).remote(tracking_uri, experiment, artifact_dir)


def runs_view(tracking_uri: str, experiment: str, address: str) -> str:
    """The address of the UI page listing the study's runs (the experiment's own page may
    open on another tab); the UI's root when the store has no such experiment."""
    from mlflow.tracking import MlflowClient

    found = MlflowClient(tracking_uri).get_experiment_by_name(experiment)
    return f"{address}/#/experiments/{found.experiment_id}/runs" if found else address


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at `host` now (the system's pick)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def wait_for_port(host: str, port: int, server: subprocess.Popen, timeout: float = 120) -> bool:
    """Whether the server at host:port answers (False when it ended or took too long)."""
    deadline = time.time() + timeout
    while time.time() < deadline and server.poll() is None:
        with socket.socket() as probe:
            if probe.connect_ex((host, port)) == 0:
                return True
        time.sleep(0.5)
    return False


def start_ui_server(
    tracking_uri: str, host: str, port: int, quiet: bool = False
) -> subprocess.Popen:
    """`mlflow server` on the study's store, in a process group of its own (`stop_ui_server`);
    `quiet`: its log lines go nowhere."""
    command = [
        sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
        "--host", host, "--port", str(port),
    ]  # fmt: skip
    out = subprocess.DEVNULL if quiet else None
    return subprocess.Popen(command, start_new_session=True, stdout=out, stderr=out)


def stop_ui_server(server: subprocess.Popen, signum: int = signal.SIGKILL) -> None:
    """End the server's process group (the server and the workers it started)."""
    try:
        os.killpg(server.pid, signum)
    except ProcessLookupError:  # already gone
        pass


def serve_ui(
    tracking_uri: str,
    experiment: str,
    host: str = "127.0.0.1",
    port: int = 5000,
    open_browser: bool = False,
) -> int:
    """Run `mlflow server` on the study's store (loopback only unless `host` says otherwise),
    print the address of the study's runs and, with `open_browser`, open it where a browser
    exists.

    The server and its workers run in their own process group, which SIGTERM or SIGINT of
    this process ends as a whole (a process manager's stop leaves nothing holding the port).
    """
    url = runs_view(tracking_uri, experiment, f"http://{host}:{port}")
    print(f"MLflow UI on http://{host}:{port} (store {tracking_uri}); Ctrl-C to stop", flush=True)
    print(f"the study's runs: {url}", flush=True)
    server = start_ui_server(tracking_uri, host, port)
    if open_browser and wait_for_port(host, port, server):
        webbrowser.open(url)  # a no-op where no browser is found
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, _frame: stop_ui_server(server, signal.SIGTERM))
    code = server.wait()
    stop_ui_server(server)  # the workers the server started, should any outlive it
    return 0 if code in (0, -signal.SIGTERM) else code
