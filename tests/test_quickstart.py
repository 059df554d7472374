"""The quickstart, run as `make demo` runs it (`stageflow run studies/quickstart.yaml`, its own
process and embedded Ray; only the storage directory differs): its ordering effect on the
primary score must come out significant, so a change that loses the showcase's point fails."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quickstart_shows_a_significant_ordering_effect(tmp_path, capsys):
    storage = tmp_path / "quickstart"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "stageflow.platform.commands.cli",
            "run",
            "studies/quickstart.yaml",
            f"storage_dir={storage}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    print(done.stdout[-6000:], done.stderr[-3000:])
    assert done.returncode == 0
    verdict = re.search(r"\*\*Primary score, forget_score:\*\* (.+)", done.stdout)
    assert verdict, "the run printed no verdict on its primary score"
    assert verdict.group(1).startswith(
        "Reproduces here: the ordering changes forget_score for every method"
    )
    report = (storage / "report" / "report.md").read_text()
    assert "Does the ordering change the outcome?" in report and "How this study ran" in report
    check_export_matches_the_report(storage)
    check_exported_model_reproduces_its_evaluation(storage, tmp_path)
    check_plan_announced_the_run(storage, tmp_path, capsys)


def check_plan_announced_the_run(storage: Path, tmp_path: Path, capsys) -> None:
    """`stageflow plan` counted the checkpoints and evaluations the run wrote and their disk;
    with the run as a pilot it says how many seeds detect its effect; a pilot of one seed is
    refused."""
    import json
    import shutil

    from stageflow.core.footprint import checkpoint_bytes
    from stageflow.core.study_dir import tree_bytes
    from stageflow.core.study_file import load_study
    from stageflow.platform.commands.cli import main
    from stageflow.platform.engine.study_plan import planned_work

    spec = load_study(ROOT / "studies" / "quickstart.yaml")
    work = planned_work(spec)
    written = list((storage / "prefixes").glob("*/meta.json"))
    assert (len(work.trials), len(work.trainings)) == (12, len(written))
    assert len(work.evaluations) == len(list((storage / "prefixes").glob("*.eval.json")))
    disk = sum(tree_bytes(meta.parent) for meta in written)
    assert abs(len(written) * checkpoint_bytes(spec) - disk) / disk < 0.02
    study = str(ROOT / "studies" / "quickstart.yaml")
    capsys.readouterr()
    assert main(["plan", study, "--time", "none", "--pilot", str(storage)]) == 0
    table = capsys.readouterr().out.split("seeds for 80% power")[1]
    assert "| ga " in table and "| npo " in table
    pilot = tmp_path / "one-seed"
    (pilot / "trials").mkdir(parents=True)
    shutil.copy(storage / "study.yaml", pilot)
    for record in (storage / "trials").glob("*.json"):
        if json.loads(record.read_text())["trial"]["seed"] == 0:
            shutil.copy(record, pilot / "trials")
    assert main(["plan", study, "--time", "none", "--pilot", str(pilot)]) == 2
    assert "expected a pilot with at least 2 seeds" in capsys.readouterr().err


def check_export_matches_the_report(storage: Path) -> None:
    """`stageflow export` writes every trial's final metrics as the report reads them."""
    import pandas as pd

    from stageflow.core.expand import expand
    from stageflow.core.study_dir import StudyDir
    from stageflow.core.study_file import load_study
    from stageflow.platform.commands.cli import main
    from stageflow.platform.results.report import read_results

    assert main(["export", str(storage)]) == 0
    table = pd.read_parquet(storage / "export" / "results.parquet")
    csv = pd.read_csv(storage / "export" / "results.csv")
    for column in ("trial_id", "stage_index", "metric", "value"):
        assert csv[column].tolist() == table[column].tolist()
    study = StudyDir(storage)
    finals = read_results(study, expand(load_study(study.spec_file)), None)
    assert len(finals) == 12
    for trial, metrics in finals:
        rows = table[table.trial_id == trial.trial_id]
        for name, value in metrics.items():
            method, _, metric = name.partition("/")
            if method in trial.unlearning:
                row = rows[(rows.method == method) & (rows.metric == metric)]
            else:
                last = len(trial.path)  # the path's end; stage 0 is the base model
                row = rows[(rows.method == "") & (rows.stage_index == last) & (rows.metric == name)]
            assert row.value.tolist() == [value], (trial.trial_id, name)


def check_exported_model_reproduces_its_evaluation(storage: Path, tmp_path: Path) -> None:
    """`stageflow export-model` writes a directory transformers loads, whose log-likelihoods of
    the facts set are the ones the study recorded for that checkpoint."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stageflow.actors.rendering import encode_row, render_row
    from stageflow.core.data_files import spec_rows
    from stageflow.core.study_dir import StudyDir
    from stageflow.core.study_file import load_study
    from stageflow.platform.commands.cli import main

    study = StudyDir(storage)
    record_path = sorted(study.trials.glob("*.json"))[0]
    record = json.loads(record_path.read_text())
    out = tmp_path / "exported"
    assert main(["export-model", str(storage), "--trial", record_path.stem, "--stage", "ga",
                 "--out", str(out)]) == 0  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    facts = load_study(study.spec_file).evaluation.sets["facts"]
    means = []
    for row in spec_rows(facts.data)[: facts.max_examples]:
        ids, n_prompt = encode_row(tokenizer, render_row(row, False, facts.data.system), 1 << 30)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
        logprobs = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])
        means.append(float(logprobs[n_prompt - 1 :].mean()))
    recorded = record["metrics"]["ga/facts/avg_loglik"]
    print(f"exported model: avg_loglik {sum(means) / len(means):.8f}, recorded {recorded:.8f}")
    assert abs(sum(means) / len(means) - recorded) < 1e-4
