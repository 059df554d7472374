"""Faults of the study engine: the driver killed and resumed, a learner killed mid-stage, and
a study submitted as a Ray job to a real head with token auth (helpers from test_study.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from stageflow.core.prefix_cache import PrefixCache
from stageflow.platform.commands.cli import main
from stageflow.platform.engine.tracking import free_port
from tests.platform.test_study import (
    ONE_STEP,
    kill_after_records,
    run_cli,
    runs_by_kind,
    short_study,
)


@pytest.mark.slow
def test_resume_after_the_driver_is_killed(tmp_path, ray_cluster):
    """A sampled study (2 of the 6 orderings of a, b, c; enumerated like any study)."""
    extra = {"seeds": [0, 1], "unlearning": ["forget"]}
    stages = ["a", "b", "c"]

    def study(name):
        path = short_study(tmp_path, name, stages, **extra)
        spec = yaml.safe_load(path.read_text())
        spec["orderings"] = {"sample": {"stages": stages, "n": 2, "seed": 0}}
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
    kill_after_records(killed, storage, 2)
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
                        killed.append(time.time())
                        return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_learner_during_stage_b)
    killer.start()
    assert main(["run", str(path)]) == 0
    killer.join()
    assert killed, "the learner was never seen alive during stage b"
    cache = PrefixCache(tmp_path / "fault" / "prefixes")
    trained = {m["stage"]: m["key"] for m in cache.trained()}
    assert sorted(trained) == ["a", "b"]  # a was not trained again
    b_done = (cache.entry(trained["b"]) / "meta.json").stat().st_mtime
    assert b_done > killed[0]  # b finished after its learner died: the trial was retried
    runs = runs_by_kind(tmp_path / "fault", "fault")
    assert len(runs["trial"]) == 1 and runs["trial"][0].info.status == "FINISHED"
    assert len(runs["stage"]) == 2


@pytest.mark.slow
def test_submit_runs_the_study_as_a_ray_job(tmp_path):
    """A real multi-node cluster on loopback (a head with its job server and no CPUs, two
    worker nodes started by `ray start`); a per_trial study runs on it as a Ray job, each
    trial with its own vLLM engine on a worker node."""
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="sfray")  # short: Ray's unix socket paths must fit 107 bytes
    import secrets

    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    # a job's `python` is the first on the head's PATH: this environment's, as cluster.yaml does
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PATH": path, **auth}
    ray_bin = str(Path(sys.executable).parent / "ray")

    gcs, dashboard = free_port(), free_port()

    def agent_ports(*names: str) -> list[str]:
        # every fixed default port gets a free one: the session's own Ray already holds them
        names = names + (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
        )
        return [f"--{name}={free_port()}" for name in names]

    def start(name: str, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [ray_bin, "start", "--block", "--node-ip-address=127.0.0.1", *args],
            env=env,
            stdout=(tmp_path / f"{name}.log").open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    head = start(
        "head",
        "--head",
        f"--port={gcs}",
        f"--dashboard-port={dashboard}",
        "--dashboard-host=127.0.0.1",
        "--num-cpus=0",
        "--include-dashboard=true",
        *agent_ports("ray-client-server-port"),
    )
    nodes = []
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
        for i in range(2):  # two worker nodes with room for one per_trial trial each
            # each node its own temp dir, as on separate machines: nodes sharing one would
            # share (and delete) each other's copies of the job's working directory
            own_tmp = f"--temp-dir={tempfile.mkdtemp(prefix='sfray')}"
            join = f"--address=127.0.0.1:{gcs}"
            nodes.append(start(f"node{i}", join, "--num-cpus=3", own_tmp, *agent_ports()))
        joined = [ray_bin, "status", f"--address=127.0.0.1:{gcs}"]
        deadline = time.time() + 180
        while time.time() < deadline:  # both worker nodes are in the cluster
            if "/6.0 CPU" in subprocess.run(joined, env=env, capture_output=True, text=True).stdout:
                break
            time.sleep(2)
        cli = [
            sys.executable,
            "-m",
            "stageflow.platform.commands.cli",
            "submit",
            "study.yaml",
            f"storage_dir={storage}",
            "rollout.placement=per_trial",
            "rollout.kv_cache_gib=0.1",
            "rollout.max_model_len=128",
            "evaluation.sets.inst.metrics=[avg_loglik,accuracy]",
            "evaluation.sets.inst.max_new_tokens=8",
            "--address",
            address,
        ]
        no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH_")}
        refused = subprocess.run(
            cli, cwd=job_dir, env=no_token, capture_output=True, text=True, timeout=300
        )
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "RAY_AUTH_MODE=token" in refused.stderr and not storage.exists()
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
        records = [json.loads(p.read_text()) for p in (storage / "trials").glob("*.json")]
        assert len(records) == 2
        # each trial started its own engine (the head has no CPU: on the worker nodes)
        assert all(r["timing"]["time/engine_start_s"] > 0 for r in records)
    finally:
        for process in [*nodes, head]:  # these nodes only: never `ray stop`, which ends every Ray
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)
