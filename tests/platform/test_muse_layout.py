"""studies/muse_layout.yaml on files in MUSE's layout made here (nothing is downloaded): raw
text rows trained and scored as a whole, verbatim and knowledge memorisation, privacy leakage
against the oracle, end to end, reduced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stageflow.platform.commands.cli import main

STUDY = Path(__file__).resolve().parents[2] / "studies" / "muse_layout.yaml"


def news(i: int) -> str:
    return f"Report {i}: the council of town {i} met on day {i % 7} and voted on bridge {i}."


def write_muse(folder: Path) -> Path:
    """MUSE's configs at toy size: 6 retain and 4 forget articles, 4 held out."""
    files = {
        "raw/retain1.json": [{"text": news(i)} for i in range(6)],
        "raw/forget.json": [{"text": news(i)} for i in range(10, 14)],
        "verbmem/forget.json": [
            {"prompt": news(i)[:20], "gt": news(i)[20:]} for i in range(10, 14)
        ],
        "knowmem/forget_qa.json": [
            {"question": f"Which bridge did town {i} vote on?", "answer": f"bridge {i}"}
            for i in range(10, 14)
        ],
        "knowmem/retain_qa.json": [
            {"question": f"Which bridge did town {i} vote on?", "answer": f"bridge {i}"}
            for i in range(3)
        ],
        "privleak/forget.json": [{"text": news(i)} for i in range(10, 14)],
        "privleak/holdout.json": [{"text": news(i)} for i in range(20, 24)],
    }
    for name, rows in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_the_muse_study_validates(tmp_path, capsys):
    muse = write_muse(tmp_path / "MUSE")
    storage = f"storage_dir={tmp_path / 'runs'}"
    assert main(["validate", str(STUDY), f"vars.muse_dir={muse}", storage]) == 0
    (muse / "privleak" / "holdout.json").write_text(json.dumps({"article": "x"}) + "\n")
    assert main(["validate", str(STUDY), f"vars.muse_dir={muse}", storage]) == 2
    err = capsys.readouterr().err
    assert "evaluation.sets.privleak_holdout.data" in err and "a 'text' column" in err


@pytest.mark.slow
def test_the_muse_study_runs_on_raw_text(tmp_path, ray_cluster):
    muse = write_muse(tmp_path / "MUSE")
    storage = tmp_path / "runs"
    reduced = [
        f"vars.muse_dir={muse}",
        f"storage_dir={storage}",
        "seeds=[0]",
        "unlearning=[ga]",
        "rollout.max_model_len=256",
        *[f"stages.{s}.{k}" for s in ("retain", "forget", "ga") for k in ("max_len=64", "lr=1.0e-3")],
        *[f"evaluation.sets.{s}.max_new_tokens=8" for s in ("verbmem", "knowmem_forget", "knowmem_retain")],
    ]  # fmt: skip
    assert main(["run", str(STUDY), *reduced]) == 0
    records = [json.loads(p.read_text()) for p in (storage / "trials").glob("*.json")]
    assert len(records) == 3  # two orderings and the oracle (the retain news alone)
    for record in records:
        history = record["history"]
        # reading the forget news makes it likelier, and the attack sees it
        if any(h["stage"] == "forget" for h in history):
            after = next(h for h in history if h["stage"] == "forget")["metrics"]
            assert after["privleak/avg_loglik"] > history[0]["metrics"]["privleak/avg_loglik"]
        assert 0 <= record["metrics"]["verbmem/rouge_l"] <= 1
    report = (storage / "report" / "report.md").read_text()
    section = report.split("## Unlearning evaluation")[1].split("\n## ")[0]
    assert "privleak/mia_reference" in section, section  # against the oracle, in the analysis
    row = next(line for line in section.splitlines() if line.startswith("| forget>retain"))
    assert "nan" not in row, section
