"""The study engine: Tune trials, the prefix cache, nested MLflow runs, resume and faults."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from stageflow.platform.cli import main
from stageflow.platform.prefix_cache import PrefixCache
from stageflow.platform.tracking import default_tracking_uri

TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128}
ONE_STEP = {"steps": 1, "batch_size": 4, "lr": 1e-3}
TASK_OF = {"a": "inst", "b": "refusal", "c": "math", "d": "inst"}


def short_study(tmp_path: Path, name: str, stages: list[str], **extra) -> Path:
    study = {
        "name": name,
        "storage_dir": str(tmp_path / name),
        "model": {"tiny": TINY},
        "stages": {
            s: {"kind": "sft", "data": {"task": TASK_OF[s], "size": 8, "seed": i}, **ONE_STEP}
            for i, s in enumerate(stages)
        },
        "orderings": {"permutations": stages},
        "evaluation": {
            "sets": {
                "inst": {
                    "data": {"task": "inst", "split": "eval", "size": 8},
                    "metrics": ["avg_loglik"],
                    "max_examples": 2,
                }
            }
        },
        **extra,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def runs_by_kind(storage: Path, experiment: str) -> dict[str, list]:
    client = MlflowClient(default_tracking_uri(storage))
    runs = client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id], max_results=1000
    )
    out: dict[str, list] = {}
    for run in runs:
        out.setdefault(run.data.tags.get("stageflow.kind"), []).append(run)
    return out


def check_prefix_counts(tmp_path, name, stages, trials, trainings, capsys):
    assert main(["run", str(short_study(tmp_path, name, stages))]) == 0
    storage = tmp_path / name
    trained = PrefixCache(storage / "prefixes").trained()
    assert len(trained) == trainings
    assert len({m["key"] for m in trained}) == trainings
    runs = runs_by_kind(storage, name)
    assert len(runs["study"]) == 1 and len(runs["trial"]) == trials
    assert len(runs["stage"]) == trainings  # a reused prefix gets a tag, not a second stage run
    assert sum(r.data.metrics["stages_trained"] for r in runs["trial"]) == trainings
    reuse_tags = [
        k for r in runs["trial"] for k in r.data.tags if k.startswith("stageflow.reused.")
    ]
    assert len(reuse_tags) == trials * len(stages) - trainings
    stage_ids = {r.info.run_id for r in runs["stage"]}
    assert all(
        r.data.tags[k] in stage_ids
        for r in runs["trial"]
        for k in r.data.tags
        if k.startswith("stageflow.reused.")
    )
    assert f"{trials} of {trials}" not in capsys.readouterr().out  # nothing reported unfinished


def test_three_stage_permutations_train_15_prefixes_not_18(tmp_path, ray_cluster, capsys):
    check_prefix_counts(tmp_path, "perm3", ["a", "b", "c"], trials=6, trainings=15, capsys=capsys)
    out = capsys.readouterr()
    storage = tmp_path / "perm3"
    assert main(["status", str(storage)]) == 0
    assert "6 of 6 trials done" in capsys.readouterr().out
    assert main(["report", str(storage)]) == 0
    assert "| a>b>c" in capsys.readouterr().out
    del out


@pytest.mark.slow
def test_four_stage_permutations_train_64_prefixes_not_96(tmp_path, ray_cluster, capsys):
    check_prefix_counts(
        tmp_path, "perm4", ["a", "b", "c", "d"], trials=24, trainings=64, capsys=capsys
    )


def run_cli(*args: str, env=None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "stageflow.platform.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
        **kwargs,
    )


@pytest.mark.slow
def test_resume_after_the_driver_is_killed(tmp_path, ray_cluster):
    extra = {"seeds": [0, 1], "unlearning": ["forget"]}
    stages = ["a", "b"]

    def study(name):
        path = short_study(tmp_path, name, stages, **extra)
        spec = yaml.safe_load(path.read_text())
        spec["stages"]["forget"] = {
            "kind": "unlearn",
            "objective": "ga",
            "data": {"task": "refusal", "size": 8, "seed": 1},
            **ONE_STEP,
        }
        path.write_text(yaml.safe_dump(spec))
        return path

    whole = run_cli("run", str(study("whole")))
    assert whole.wait(timeout=900) == 0, whole.stdout.read()

    killed = run_cli("run", str(study("killed")))
    storage = tmp_path / "killed"
    deadline = time.time() + 600
    while (
        len(list((storage / "trials").glob("*.json"))) < 2
        and time.time() < deadline
        and killed.poll() is None
    ):
        time.sleep(0.5)
    assert killed.poll() is None, (
        f"the study ended before it could be killed: {killed.stdout.read()}"
    )
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    finished = {p.parent.name: p.read_text() for p in (storage / "prefixes").glob("*/meta.json")}
    finished_trials = {p.name for p in (storage / "trials").glob("*.json")}
    assert 2 <= len(finished_trials) < 4

    resumed = run_cli("resume", str(storage))
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out

    def finals(root: Path) -> dict[str, dict]:
        return {
            p.name: json.loads(p.read_text())["metrics"] for p in (root / "trials").glob("*.json")
        }

    assert finals(storage) == finals(tmp_path / "whole")
    after = {p.parent.name: p.read_text() for p in (storage / "prefixes").glob("*/meta.json")}
    assert len(finished) >= 3 and len(after) == len(PrefixCache(storage / "prefixes").trained())
    assert all(after[k] == v for k, v in finished.items())  # nothing finished was trained again
    runs = runs_by_kind(storage, "killed")
    assert len(runs["study"]) == 1 and len(runs["trial"]) == 4
    assert len(runs["stage"]) == len(after)
    assert len({r.data.tags["stageflow.prefix_key"] for r in runs["stage"]}) == len(runs["stage"])


@pytest.mark.slow
def test_a_trial_whose_learner_dies_is_retried_from_its_last_checkpoint(
    tmp_path, ray_cluster, capsys
):
    import threading

    from ray._private.state import actors

    path = short_study(tmp_path, "fault", ["a", "b"])
    spec = yaml.safe_load(path.read_text())
    spec["orderings"] = {"explicit": ["a>b"]}
    for name in ("a", "b"):
        spec["stages"][name]["steps"] = 40
    path.write_text(yaml.safe_dump(spec))
    killed = []

    def kill_learner_during_stage_b():
        deadline = time.time() + 600
        while time.time() < deadline and not killed:
            if list((tmp_path / "fault" / "prefixes").glob("*/meta.json")):  # stage a is finished
                for info in actors().values():
                    if info["ActorClassName"] == "LearnerWorker" and info["State"] == "ALIVE":
                        os.kill(info["Pid"], signal.SIGKILL)  # the learner's process dies mid-stage
                        killed.append(info["Pid"])
                        return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_learner_during_stage_b)
    killer.start()
    assert main(["run", str(path)]) == 0
    killer.join()
    assert killed, "the learner was never seen alive during stage b"
    trained = PrefixCache(tmp_path / "fault" / "prefixes").trained()
    assert sorted(m["stage"] for m in trained) == ["a", "b"]  # a was not trained again
    runs = runs_by_kind(tmp_path / "fault", "fault")
    assert len(runs["trial"]) == 1 and runs["trial"][0].info.status == "FINISHED"
    assert len(runs["stage"]) == 2


def test_resume_unknown_dir(tmp_path, capsys):
    assert main(["resume", str(tmp_path / "none")]) == 2
    assert "no study.yaml here" in capsys.readouterr().err


def test_unreachable_ray_address(tmp_path, capsys, monkeypatch):
    import ray

    if ray.is_initialized():  # the check runs before connecting; keep the session cluster
        monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    path = short_study(tmp_path, "noray", ["a"])
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "RAY_ADDRESS: 127.0.0.1:9: cannot connect to a Ray cluster there" in err
    assert not (tmp_path / "noray").exists()


def test_resources_that_cannot_fit(tmp_path, ray_cluster, capsys):
    path = short_study(tmp_path, "toobig", ["a"], learner={"ranks": 16})
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert (
        "resources: one trial needs 17 CPUs" in err
        and "expected fewer ranks or a larger cluster" in err
    )
    assert not (tmp_path / "toobig").exists()


@pytest.mark.slow
def test_submit_runs_the_study_as_a_ray_job(tmp_path):
    """A real Ray head with its job server on loopback; the study runs as a Ray job."""
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="sfray")  # short: Ray's unix socket paths must fit 107 bytes
    import secrets

    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, **auth}
    ray_bin = str(Path(sys.executable).parent / "ray")

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    gcs, dashboard = free_port(), free_port()
    head = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            f"--dashboard-port={dashboard}",
            "--dashboard-host=127.0.0.1",
            "--num-cpus=4",
            "--include-dashboard=true",
        ],
        env=env,
        stdout=(tmp_path / "head.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        job_dir = tmp_path / "job"
        storage = tmp_path / "submitted"
        short_study(job_dir.parent, "job_study", ["a", "b"])
        job_dir.mkdir()
        (tmp_path / "job_study.yaml").rename(job_dir / "study.yaml")
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 180
        while time.time() < deadline:  # the job server answers (401 without a token) once it is up
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=3)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                time.sleep(2)
        cli = [
            sys.executable,
            "-m",
            "stageflow.platform.cli",
            "submit",
            "study.yaml",
            f"storage_dir={storage}",
            "--address",
            address,
        ]
        done = subprocess.run(
            cli, cwd=job_dir, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout + done.stderr
        job_id = done.stdout.split("Ray job ")[1].split()[0]
        status = [ray_bin, "job", "status", "--address", address, job_id]
        deadline = time.time() + 600
        while time.time() < deadline:  # the job's own CLI view, in the cluster's auth mode
            state = subprocess.run(status, env=env, capture_output=True, text=True).stdout.lower()
            if any(
                f"job '{job_id.lower()}' {word}" in state
                for word in ("succeeded", "failed", "stopped")
            ):
                break
            time.sleep(3)
        assert f"job '{job_id.lower()}' succeeded" in state, state
        assert len(list((storage / "trials").glob("*.json"))) == 2
    finally:
        os.killpg(
            head.pid, signal.SIGTERM
        )  # this head only: never `ray stop`, which ends every Ray
        head.wait(timeout=60)


def test_submit_needs_an_absolute_storage_dir(capsys):
    assert main(["submit", "studies/quickstart.yaml", "--address", "http://127.0.0.1:9"]) == 2
    assert (
        "storage_dir: a study run on a cluster needs an absolute storage_dir"
        in capsys.readouterr().err
    )
