"""An ordering search run as a study: Tune's searcher proposes paths within the budget, the
report and MLflow show what it explored, and a killed driver resumes to the same search."""

from __future__ import annotations

import json

import pytest
import yaml
from mlflow.tracking import MlflowClient

from stageflow.core.ordering_search import exhaustive_trainings
from stageflow.core.prefix_cache import PrefixCache
from stageflow.platform.engine.tracking import default_tracking_uri
from tests.platform.test_study import (
    ONE_STEP,
    kill_after_records,
    run_cli,
    runs_by_kind,
    short_study,
)

STAGES = ["a", "b", "c"]
BUDGET = 14  # of the 21 trainings of every ordering: 15 prefixes and 6 unlearning branches


def search_study(tmp_path, name: str):
    path = short_study(tmp_path, name, STAGES, unlearning=["forget"])
    spec = yaml.safe_load(path.read_text())
    spec["stages"]["forget"] = {
        "kind": "unlearn",
        "objective": "ga",
        "data": {"task": "refusal", "size": 8, "seed": 1},
        **ONE_STEP,
    }
    spec["analysis"] = {"forget_score": "inst/avg_loglik"}
    spec["orderings"] = {
        "search": {"stages": STAGES, "score": "forget_score", "goal": "max", "budget": BUDGET}
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def search_log(storage) -> dict:
    return json.loads((storage / "search.json").read_text())


@pytest.mark.slow
def test_a_search_runs_within_its_budget_reports_and_resumes_after_a_killed_driver(
    tmp_path, ray_cluster
):
    assert exhaustive_trainings(STAGES, 1, 1) == 21
    whole = run_cli("run", str(search_study(tmp_path, "whole")))
    out, _ = whole.communicate(timeout=900)
    assert whole.returncode == 0, out
    storage = tmp_path / "whole"
    log = search_log(storage)
    assert 2 <= len(log["asked"]) <= 4 and log["spent_after"][-1] <= BUDGET
    assert all(score is not None for _, score in log["scores"])
    trained = PrefixCache(storage / "prefixes").trained()
    assert len(trained) == log["spent_after"][-1]  # a fresh study trains what the search asks

    report = (storage / "report" / "report.md").read_text()
    assert "## Ordering search: the max of forget_score" in report
    assert f"{len(log['asked'])} of the 6 orderings run for {log['spent_after'][-1]}" in report
    best = max(log["scores"], key=lambda kv: kv[1])
    assert f"| {'>'.join(best[0])} " in report.split("Best found:")[1].split("\n\n")[1]
    for figure in ("search_progress", "search_tree"):
        assert (storage / "report" / "figures" / f"{figure}.png").stat().st_size > 1000

    runs = runs_by_kind(storage, "whole")
    assert len(runs["trial"]) == len(log["asked"]) and len(runs["stage"]) == len(trained)
    client = MlflowClient(default_tracking_uri(storage))
    study_run = runs["study"][0].info.run_id
    table = client.download_artifacts(study_run, "search/prefixes.md", str(tmp_path))
    rows = open(table).read().splitlines()[2:]
    prefixes = [r for r in rows if "oracle" not in r]
    stage_runs = {r.info.run_id for r in runs["stage"]}
    assert {r.split("|")[5].strip() for r in prefixes} == stage_runs  # each linked to its run

    killed = run_cli("run", str(search_study(tmp_path, "killed")))
    storage = tmp_path / "killed"
    kill_after_records(killed, storage, 1)
    before = {p.parent.name: p.read_text() for p in (storage / "prefixes").glob("*/meta.json")}
    assert len(search_log(storage)["asked"]) < len(log["asked"]) or len(
        list((storage / "trials").glob("*.json"))
    ) < len(log["asked"])

    resumed = run_cli("resume", str(storage))
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out
    again = search_log(storage)
    assert again["asked"] == log["asked"] and again["spent_after"] == log["spent_after"]
    assert again["scores"] == log["scores"]  # the same scores: the same choices
    after = {p.parent.name: p.read_text() for p in (storage / "prefixes").glob("*/meta.json")}
    assert all(after[k] == v for k, v in before.items())  # nothing finished was trained again
    assert len(after) == len(trained)
    assert len(runs_by_kind(storage, "killed")["trial"]) == len(log["asked"])
