"""Studies on a real multi-node Ray cluster started on this machine (`ray.cluster_utils.Cluster`:
a head and three worker nodes with their own CPUs, all on 127.0.0.1).

With `rollout.placement: per_trial` the trials spread over the nodes and their RL stages run
at the same time; a worker node removed mid-study costs only the work in flight on it (the
final metrics equal an undisturbed run, no prefix is trained twice, no MLflow run is
duplicated); removing the node that holds the study's shared actors (the MLflow tracker, the
shared rollout pool) does not stop the study and loses nothing it logged. The study drivers
run as `stageflow run` subprocesses connected through RAY_ADDRESS; this process only owns the
cluster and reads Ray's actor table (GCS) to see where each trial's actors run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from stageflow.core.prefix_cache import PrefixCache
from tests.platform.test_study import runs_by_kind

pytestmark = pytest.mark.slow

NODE_CPUS = 3  # one per_trial trial per node: the trial, its learner rank, its engine
TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128}
ENGINE = {"max_model_len": 128, "kv_cache_gib": 0.1, "gpu_memory_utilization": 0.15}


@pytest.fixture(scope="module")
def cluster():
    """A head without CPUs (only drivers run there) and three worker nodes; nodes 0 and 1
    carry the custom resource `svc` for the study's shared actors."""
    from ray.cluster_utils import Cluster

    local = {"node_ip_address": "127.0.0.1", "include_dashboard": False}
    head = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, **local})
    for i in range(3):
        add_node(head, svc=i < 2)
    yield head
    head.shutdown()


def add_node(cluster, svc: bool) -> None:
    """A worker node of NODE_CPUS CPUs, with the `svc` resource when `svc`."""
    extra = {"resources": {"svc": 1}} if svc else {}
    node = cluster.add_node(num_cpus=NODE_CPUS, node_ip_address="127.0.0.1", **extra)
    cluster.wait_for_nodes()
    if svc:
        cluster.svc_nodes = getattr(cluster, "svc_nodes", set()) | {node.node_id}


def study_file(tmp_path: Path, name: str, **changes) -> Path:
    study = {
        "name": name,
        "storage_dir": str(tmp_path / name),
        "model": {"tiny": TINY},
        "stages": {
            "a": {"kind": "sft", "data": {"task": "inst", "size": 16}, "steps": 3, "batch_size": 4},
            "rl": {
                "kind": "grpo",
                "data": {"task": "math", "size": 16},
                "steps": 10,  # long enough to overlap across trials that start apart
                "lr": 1e-4,
                "batch_size": 4,
                "params": {"group_size": 4, "max_new_tokens": 8},
                "rewards": [{"name": "math_correct"}],
            },
        },
        "orderings": {"permutations": ["a", "rl"]},
        "seeds": [0, 1],
        "evaluation": {
            "sets": {
                "inst": {
                    "data": {"task": "inst", "split": "eval", "size": 8},
                    "metrics": ["accuracy", "avg_loglik"],
                    "max_examples": 4,
                    "max_new_tokens": 8,
                    "temperature": 0.0,
                }
            }
        },
        "learner": {"ranks": 1, "zero_stage": 0},
        "rollout": {"placement": "per_trial", "workers": 1, **ENGINE},
    }
    for key, value in changes.items():
        node, *path, leaf = [study, *key.split(".")]
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def run_study(cluster, path: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    return subprocess.Popen(
        [sys.executable, "-m", "stageflow.platform.commands.cli", "run", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )


class ActorWatch:
    """Samples the cluster's actor table: where each actor of a class ran, and its owner."""

    def __init__(self, cluster, every_s: float = 0.5):
        self.cluster, self.every_s, self.seen = cluster, every_s, {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stop.is_set():
            try:
                for actor_id, info in self.cluster.global_state.actor_table(None).items():
                    if info["State"] == "ALIVE":  # a restarted actor: one entry per node
                        self.seen[(actor_id, info["Address"]["NodeID"])] = info
            except Exception:  # the GCS answers again in a moment
                pass
            time.sleep(self.every_s)

    def alive(self, cls: str) -> list[dict]:
        table = self.cluster.global_state.actor_table(None)
        return [i for i in table.values() if i["ActorClassName"] == cls and i["State"] == "ALIVE"]

    def of(self, cls: str) -> list[dict]:
        return [i for i in self.seen.values() if i["ActorClassName"] == cls]

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def remove_node_when(cluster, run: subprocess.Popen, pick, timeout_s: float = 900):
    """Remove the worker node `pick()` names, as soon as it names one, while `run` runs."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and run.poll() is None:
        node_id = pick()
        if node_id is not None:
            node = next(n for n in cluster.worker_nodes if n.node_id == node_id)
            cluster.remove_node(node)
            return node
        time.sleep(0.5)
    raise AssertionError("the moment to remove a node never came while the study ran")


def trial_nodes(watch: ActorWatch) -> dict[tuple, set[str]]:
    """{Tune trial actor (its address): nodes of the learner ranks and engines it started}."""
    out: dict[tuple, set[str]] = {}
    for cls in ("LearnerWorker", "RolloutWorker"):
        for info in watch.of(cls):
            owner = (info["OwnerAddress"]["IPAddress"], info["OwnerAddress"]["Port"])
            out.setdefault(owner, set()).add(info["Address"]["NodeID"])
    return out


def finals(storage: Path) -> dict[str, dict]:
    return {
        p.name: json.loads(p.read_text())["metrics"] for p in (storage / "trials").glob("*.json")
    }


def check_records(storage: Path, name: str, trials: int) -> dict:
    """One study run, `trials` finished trial runs, one stage run per trained prefix."""
    trained = PrefixCache(storage / "prefixes").trained()
    runs = runs_by_kind(storage, name)
    assert len(runs["study"]) == 1 and len(runs["trial"]) == trials
    assert all(r.info.status == "FINISHED" for r in runs["trial"])
    stage_keys = [r.data.tags["stageflow.prefix_key"] for r in runs["stage"]]
    assert sorted(stage_keys) == sorted(m["key"] for m in trained)  # once each, none missing
    return {"trained": trained, "runs": runs}


@pytest.fixture(scope="module")
def undisturbed(cluster, tmp_path_factory):
    """The per_trial study run once without faults (the reference of the fault test)."""
    tmp = tmp_path_factory.mktemp("undisturbed")
    watch = ActorWatch(cluster)
    run = run_study(cluster, study_file(tmp, "mn"))
    out, _ = run.communicate(timeout=1500)
    watch.close()
    assert run.returncode == 0, out
    return tmp / "mn", watch


def test_per_trial_engines_spread_trials_and_overlap_rl_stages(undisturbed):
    storage, watch = undisturbed
    records = check_records(storage, "mn", trials=4)
    placed = trial_nodes(watch)  # a Tune actor kept for the next trial runs it on its node
    assert len(placed) >= 2 and all(len(nodes) == 1 for nodes in placed.values())  # one node each
    assert len(set().union(*placed.values())) >= 2  # trials landed on several nodes
    rl = sorted(
        (m["train_start_ms"], m["train_end_ms"]) for m in records["trained"] if m["stage"] == "rl"
    )
    overlaps = sum(a_end > b_start for (_, a_end), (b_start, _) in zip(rl, rl[1:]))
    assert len(rl) == 4 and overlaps >= 1, rl  # RL stages of different trials ran at once


def test_a_lost_worker_node_costs_only_the_work_in_flight(cluster, undisturbed, tmp_path):
    reference, _ = undisturbed
    path = study_file(tmp_path, "mn")
    watch = ActorWatch(cluster)
    run = run_study(cluster, path)
    storage = tmp_path / "mn"

    def learner_mid_path() -> str | None:  # a prefix is finished and two trials run
        learners = watch.alive("LearnerWorker")
        finished = list((storage / "prefixes").glob("*/meta.json"))
        return learners[0]["Address"]["NodeID"] if finished and len(learners) >= 2 else None

    removed = remove_node_when(cluster, run, learner_mid_path)
    out, _ = run.communicate(timeout=1500)
    watch.close()
    try:
        assert run.returncode == 0, out
        assert finals(storage) == finals(reference)  # the same results as without the fault
        ours, theirs = check_records(storage, "mn", 4), check_records(reference, "mn", 4)
        assert len(ours["trained"]) == len(theirs["trained"])  # no prefix trained twice
    finally:  # back to three nodes, as many with `svc` as before
        add_node(cluster, svc=removed.node_id in cluster.svc_nodes)


def test_a_lost_node_holding_the_shared_actors(cluster, tmp_path):
    """The tracker and the shared rollout pool live on `svc` nodes; the one holding the tracker
    is removed mid-study: both are restarted elsewhere and the study completes with every
    run and metric logged."""
    path = study_file(
        tmp_path,
        "mnshared",
        **{
            "rollout.placement": "shared",
            "resources.shared_actor_resources": {"svc": 0.01},
            "resources.max_concurrent_trials": 2,  # room left for the pool's engine to move
        },
    )
    watch = ActorWatch(cluster)
    run = run_study(cluster, path)
    storage = tmp_path / "mnshared"

    def tracker_after_a_prefix() -> str | None:
        trackers = watch.alive("Tracker")
        finished = list((storage / "prefixes").glob("*/meta.json"))
        return trackers[0]["Address"]["NodeID"] if trackers and finished else None

    removed = remove_node_when(cluster, run, tracker_after_a_prefix)
    out, _ = run.communicate(timeout=1500)
    watch.close()
    try:
        assert run.returncode == 0, out
        trackers = {i["Address"]["NodeID"] for i in watch.of("Tracker")}
        assert removed.node_id in trackers and len(trackers) == 2  # restarted on another node
        assert len({i["ActorID"] for i in watch.of("Tracker")}) == 1  # the same actor, restarted
        records = check_records(storage, "mnshared", 4)
        for trial in records["runs"]["trial"]:  # every stage's metrics reached the trial run
            run_id = trial.info.run_id
            client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
            steps = [m.step for m in client.get_metric_history(run_id, "inst/avg_loglik")]
            assert sorted(steps) == [0, 1, 2], steps
            assert "stages_trained" in trial.data.metrics
    finally:
        add_node(cluster, svc=True)
