"""`stageflow run` through the real path: config → Ray actors → MLflow runs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from stageflow.platform.commands.cli import main
from stageflow.platform.commands.ui_page import VIEWPORT, UiPage, missing_browser
from stageflow.platform.engine.tracking import default_tracking_uri, free_port


def test_help_reads_well():
    done = subprocess.run(
        [sys.executable, "-m", "stageflow.platform.commands.cli", "--help"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0
    for word in ("validate", "run", "ui", "examples:"):
        assert word in done.stdout


def test_quickstart_validates(capsys):
    assert main(["validate", "studies/quickstart.yaml"]) == 0


def test_ui_needs_a_study_dir(tmp_path, capsys):
    assert main(["ui", str(tmp_path)]) == 2
    assert "no mlflow.db here" in capsys.readouterr().err


@pytest.fixture(scope="module")
def eval_study(tmp_path_factory, tiny_model_dir, ray_cluster):
    """An eval-only study run once: (its storage dir, the `run` output)."""
    tmp_path = tmp_path_factory.mktemp("evalonly")
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
    done = subprocess.run(
        [sys.executable, "-m", "stageflow.platform.commands.cli", "run", str(path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return tmp_path / "study", done.stdout + done.stderr


def test_run_eval_study_logs_nested_runs(eval_study):
    tmp_path = eval_study[0].parent
    out = eval_study[1]
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
    # where the driver's time went: in the study directory and on the study run
    timing = json.loads((tmp_path / "study" / "timing.json").read_text())
    assert 0 < timing["time/tune_s"] < timing["time/wall_s"]
    assert {"time/ray_start_s", "time/shared_actors_s", "time/report_s"} <= set(timing)
    assert by_kind["study"][0].data.metrics["time/tune_s"] > 0


def test_quiet_output_has_stageflow_lines_only(eval_study):
    out = eval_study[1]
    for noise in (
        "Configuration for experiment",
        "View detailed results",
        "TensorBoard",
        "Writing",
    ):
        assert noise not in out
    progress = [line for line in out.splitlines() if line.startswith("[")]
    assert progress and all(" trials, eta " in line for line in progress), progress


def test_resume_of_a_finished_study_starts_nothing(eval_study, capsys):
    start = time.monotonic()
    assert main(["resume", str(eval_study[0])]) == 0
    out = capsys.readouterr().out
    assert "all 2 trials of evalonly are finished; nothing to run" in out and "| probe>all" in out
    assert time.monotonic() - start < 20


def api(port: int, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/2.0/mlflow/{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.loads(reply.read())


def test_ui_opens_on_the_runs_and_ends_whole_on_sigterm(eval_study):
    """`stageflow ui` serves the study's store on 127.0.0.1 and prints the address of the
    study's runs view: the experiment opens on its runs (its kind), the study run's description
    holds the table, each trial's names its path; loaded in headless Chromium the page lists
    the study run, unfolds it to its trials, and a trial's page draws its metric charts; a
    SIGTERM ends the server and every worker it started, and frees the port."""
    assert missing_browser() is None, f"the UI test needs {missing_browser()}"
    port = free_port()
    ui = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stageflow.platform.commands.cli",
            "ui",
            str(eval_study[0]),
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 180
        while True:
            try:
                found = api(port, "experiments/get-by-name?experiment_name=evalonly")
                break
            except OSError:
                assert time.time() < deadline and ui.poll() is None, "the UI never answered"
                time.sleep(1)
        experiment = found["experiment"]
        printed = [ui.stdout.readline() for _ in range(2)]  # printed before the server starts
        runs_view = f"http://127.0.0.1:{port}/#/experiments/{experiment['experiment_id']}/runs"
        assert printed[1].strip() == f"the study's runs: {runs_view}", printed
        tags = {t["key"]: t["value"] for t in experiment.get("tags", [])}
        assert tags["mlflow.experimentKind"] == "custom_model_development"
        runs = api(port, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
        notes = {}
        for run in runs:
            run_tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
            notes.setdefault(run_tags["stageflow.kind"], []).append(run_tags["mlflow.note.content"])
        assert "| probe>all" in notes["study"][0] and "| all>probe" in notes["study"][0]
        assert sorted(n.split(",")[0] for n in notes["trial"]) == [
            "Trial of path all > probe",
            "Trial of path probe > all",
        ]
        server = psutil.Process(ui.pid).children(recursive=True)
        assert server, "the UI started no server process"
        # what a person sees: the printed address in headless Chromium, the study run unfolded
        # to its trials, and a trial's metric charts drawn
        with UiPage() as page:
            assert page.open_runs(runs_view) == ["evalonly"]
            listed = page.expand("evalonly")
            assert sorted(listed) == ["all>probe seed=0", "evalonly", "probe>all seed=0"], listed
            charts = page.open_charts(page.run_link("probe>all seed=0") + "/model-metrics")
            assert "facts/avg_loglik" in charts, charts
    finally:
        ui.send_signal(signal.SIGTERM)
        ui.wait(timeout=60)
    deadline = time.time() + 30
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in server):
        assert time.time() < deadline, "server processes outlived the UI"
        time.sleep(0.5)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # nothing holds the port


def test_embedded_ray_binds_loopback(tmp_path):
    code = (
        "import ray\n"
        "from stageflow.core.config import StudySpec\n"
        "from stageflow.platform.engine.runner import init_ray\n"
        "init_ray(StudySpec(name='x'))\n"
        "print(ray.nodes()[0]['NodeManagerAddress'], ray.get_runtime_context().gcs_address)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    node, gcs = done.stdout.split()[-2:]
    assert node == "127.0.0.1" and gcs.startswith("127.0.0.1:"), done.stdout + done.stderr


def test_ui_screenshot(eval_study, tmp_path, capsys):
    """`stageflow ui --screenshot DIR`: the runs view and a trial's charts as PNGs of the
    browser's window size, from a server it starts on a free port and ends."""
    import struct

    out = tmp_path / "shots"
    assert main(["ui", str(eval_study[0]), "--screenshot", str(out)]) == 0
    assert capsys.readouterr().out.split() == [
        "wrote",
        str(out / "runs.png"),
        "wrote",
        str(out / "trial.png"),
    ]
    for name in ("runs.png", "trial.png"):
        head = (out / name).read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        assert struct.unpack(">II", head[16:24]) == (VIEWPORT["width"], VIEWPORT["height"])


def test_ui_screenshot_without_a_browser_is_one_sentence(eval_study, tmp_path, capsys, monkeypatch):
    from stageflow.platform.commands import ui_page

    monkeypatch.setattr(ui_page, "find_browser", lambda: None)
    out = tmp_path / "shots"
    assert main(["ui", str(eval_study[0]), "--screenshot", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--screenshot: expected Chromium on the PATH" in err and len(err.splitlines()) == 1
    assert not out.exists()
