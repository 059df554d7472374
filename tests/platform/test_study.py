"""The study engine: Tune trials, the prefix cache, nested MLflow runs, resume and faults."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from stageflow.core.prefix_cache import PrefixCache
from stageflow.core.study_dir import StudyDir
from stageflow.platform.commands.cli import main
from stageflow.platform.engine.runner import POOL_NAME, shared_actor_suffix
from stageflow.platform.engine.tracking import NAMESPACE, TRACKER_NAME, default_tracking_uri

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


def wait_until_gone(ray, actor_name: str, timeout: float = 30.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            ray.get_actor(actor_name, namespace=NAMESPACE)
        except ValueError:
            return True
        time.sleep(0.5)
    return False


def test_three_stage_permutations_train_15_prefixes_not_18(tmp_path, ray_cluster, capsys):
    check_prefix_counts(tmp_path, "perm3", ["a", "b", "c"], trials=6, trainings=15, capsys=capsys)
    suffix = shared_actor_suffix("perm3", tmp_path / "perm3")
    assert suffix != shared_actor_suffix("perm3", tmp_path / "elsewhere")
    for name in (TRACKER_NAME, POOL_NAME):  # the study's shared actors ended with it
        assert wait_until_gone(ray_cluster, f"{name}-{suffix}")
    capsys.readouterr()
    storage = tmp_path / "perm3"
    assert main(["status", str(storage)]) == 0
    assert "6 of 6 trials done" in capsys.readouterr().out
    assert main(["report", str(storage)]) == 0
    assert "| a>b>c" in capsys.readouterr().out
    check_plan_against_the_run(tmp_path / "perm3.yaml", storage, capsys)


def test_sampled_orderings_run_the_draw_and_report_all_orderings(tmp_path, ray_cluster, capsys):
    """`orderings: {sample: ...}`: the trials walk exactly the drawn orderings (3 of the 24 of
    four stages, two seeds), and the report estimates each score over all 24."""
    from stageflow.core.config import SampleSpec
    from stageflow.core.expand import sampled_orderings

    sample = {"stages": ["a", "b", "c", "d"], "n": 3, "seed": 5}
    stages = ["a", "b", "c", "d"]
    path = short_study(tmp_path, "sample4", stages, seeds=[0, 1], orderings={"sample": sample})
    assert main(["run", str(path)]) == 0
    storage = tmp_path / "sample4"
    records = [json.loads(p.read_text()) for p in (storage / "trials").glob("*.json")]
    drawn = {">".join(p) for p in sampled_orderings(SampleSpec(**sample))}
    assert {">".join(r["trial"]["path"]) for r in records} == drawn and len(records) == 6
    report = (storage / "report" / "report.md").read_text()
    assert "## All 24 orderings, estimated from 3" in report
    row = next(line for line in report.splitlines() if line.startswith("| inst/avg_loglik"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:3] == ["path end", "3 of 24"], row
    mean, sd = (float(c.split(" [")[0]) for c in cells[3:5])
    values = {}  # the report's mean and sd are those of the drawn orderings' seed means
    for r in records:
        values.setdefault(">".join(r["trial"]["path"]), []).append(r["metrics"]["inst/avg_loglik"])
    seed_means = [sum(v) / len(v) for v in values.values()]
    assert mean == pytest.approx(statistics.fmean(seed_means), abs=1e-3)
    assert sd == pytest.approx(statistics.stdev(seed_means), rel=1e-3)


def check_plan_against_the_run(path: Path, storage: Path, capsys) -> None:
    """`stageflow plan` announced the checkpoints and evaluations the run wrote, and estimates
    a study from the timings its storage holds (no calibration run)."""
    from stageflow.core.study_file import load_study
    from stageflow.platform.engine.study_plan import measured_costs, planned_work

    work = planned_work(load_study(path))
    assert len(work.trainings) == len(list((storage / "prefixes").glob("*/meta.json")))
    assert len(work.evaluations) == len(list((storage / "prefixes").glob("*.eval.json")))
    costs = measured_costs(storage)
    assert costs is not None and costs.missing(work) is None
    estimate = costs.estimate(work, 1)
    assert estimate.training_s > 0 and estimate.evaluation_s > 0 and estimate.fixed_s > 0
    assert main(["plan", str(path), "seeds=[0,1]"]) == 0
    out = capsys.readouterr().out
    assert "calibrating" not in out and f"from the timings of the study in {storage}" in out
    assert "trials            12 (6 orderings, 2 seeds)" in out


def run_cli(*args: str, env=None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "stageflow.platform.commands.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
        **kwargs,
    )


def kill_after_records(process: subprocess.Popen, storage: Path, count: int) -> None:
    """SIGKILL a study's driver (and its process group) once `count` trials have finished."""
    deadline = time.time() + 600
    while (
        len(list((storage / "trials").glob("*.json"))) < count
        and time.time() < deadline
        and process.poll() is None
    ):
        time.sleep(0.2)
    assert process.poll() is None, (
        f"the study ended before it could be killed: {process.stdout.read()}"
    )
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


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
    study = yaml.safe_load(path.read_text())
    study["stages"]["a"]["batch_size"] = 16  # a batch the 16 ranks can share
    path.write_text(yaml.safe_dump(study))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert (
        "resources: one trial needs 17 CPUs" in err
        and "expected fewer ranks or a larger cluster" in err
    )
    assert not (tmp_path / "toobig").exists()


def test_submit_needs_an_absolute_storage_dir(capsys):
    assert main(["submit", "studies/quickstart.yaml", "--address", "http://127.0.0.1:9"]) == 2
    assert (
        "storage_dir: a study run on a cluster needs an absolute storage_dir"
        in capsys.readouterr().err
    )


def test_per_trial_engines_that_cannot_fit_name_the_placement(tmp_path, ray_cluster, capsys):
    cpus = int(ray_cluster.cluster_resources()["CPU"])
    rollout = {"placement": "per_trial", "workers": cpus - 1}
    path = short_study(tmp_path, "toomany", ["a"], rollout=rollout)
    study = yaml.safe_load(path.read_text())
    study["evaluation"]["sets"]["inst"]["metrics"] = ["accuracy"]  # the trials sample
    path.write_text(yaml.safe_dump(study))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "rollout.placement: one trial needs" in err and "(or rollout.placement: shared)" in err
    assert not (tmp_path / "toomany").exists()


def test_prune_frees_what_it_says_and_a_pruned_study_resumes(tmp_path, ray_cluster, capsys):
    """--dry-run removes nothing; --keep final keeps each trial's last checkpoint; --keep
    reported keeps none; report and export still work; a trial run again after pruning trains
    its prefixes again and ends with the same metrics, bit for bit; a running study is refused."""
    assert main(["run", str(short_study(tmp_path, "prune2", ["a", "b"]))]) == 0
    storage, cache = tmp_path / "prune2", PrefixCache(tmp_path / "prune2" / "prefixes")
    assert len(cache.trained()) == 4
    capsys.readouterr()
    assert main(["prune", str(storage), "--keep", "final", "--dry-run"]) == 0
    assert "2 checkpoints" in capsys.readouterr().out and len(cache.trained()) == 4
    assert main(["prune", str(storage), "--keep", "final"]) == 0
    assert {m["stage"] for m in cache.trained()} == {"a", "b"} and len(cache.trained()) == 2
    assert main(["status", str(storage)]) == 0
    assert "checkpoints" in capsys.readouterr().out.splitlines()[-1]
    record = sorted((storage / "trials").glob("*.json"))[0]
    first = json.loads(record.read_text())["history"][1]["stage"]  # pruned: not a path's end
    model = tmp_path / "model"
    args = ["export-model", str(storage), "--trial", record.stem, "--stage", first]
    assert main([*args, "--out", str(model)]) == 2 and not model.exists()
    assert main(["prune", str(storage), "--keep", "reported"]) == 0
    assert cache.trained() == []
    assert main(["report", str(storage)]) == 0 and main(["export", str(storage)]) == 0
    before = json.loads(record.read_text())["metrics"]
    records = sorted((storage / "trials").glob("*.json"))
    first_run = {r.stem: json.loads(r.read_text()) for r in records}
    record.unlink()  # as if the trial had not finished: running the study again runs it
    assert main(["run", str(tmp_path / "prune2.yaml")]) == 0
    assert json.loads(record.read_text())["metrics"] == before
    assert len(cache.trained()) == 2  # the re-run trial's two prefixes, trained again
    running = StudyDir(storage).mark_running()
    try:
        assert main(["prune", str(storage), "--keep", "final"]) == 2
        assert "a driver is running this study" in capsys.readouterr().err
    finally:
        running.close()
    check_storage_cap(tmp_path, first_run, capsys)


def check_storage_cap(tmp_path: Path, uncapped: dict[str, dict], capsys) -> None:
    """storage.max_gb below two checkpoints: each trial's first stage is removed once both
    trials are past it, the path ends stay, and the trials' metrics are those of the study
    run without a cap."""
    from stageflow.core.footprint import checkpoint_bytes
    from stageflow.core.study_file import load_study

    path = short_study(tmp_path, "capped", ["a", "b"])
    one = checkpoint_bytes(load_study(path))
    capsys.readouterr()
    assert main(["run", str(path), f"storage.max_gb={1.5 * one / 1e9}"]) == 0
    out = capsys.readouterr().out
    assert "storage.max_gb: removed" in out
    cache = PrefixCache(tmp_path / "capped" / "prefixes")
    assert sorted(m["stage"] for m in cache.trained()) == ["a", "b"]  # the two path ends
    for record in sorted((tmp_path / "capped" / "trials").glob("*.json")):
        history = json.loads(record.read_text())["history"]
        assert cache.is_done(history[-1]["key"]) and not cache.is_done(history[1]["key"])
        assert json.loads(record.read_text())["metrics"] == uncapped[record.stem]["metrics"]
