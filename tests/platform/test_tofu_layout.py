"""studies/tofu_layout.yaml on files in TOFU's layout made here (nothing is downloaded): the
standard unlearning evaluation end to end, reduced; and its bad inputs, one sentence each."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from stageflow.platform.commands.cli import main

STUDY = Path(__file__).resolve().parents[2] / "studies" / "tofu_layout.yaml"


def qa(author: int, question: int, perturbed: bool) -> dict:
    city = f"City{author}{question}"
    row = {
        "question": f"Q{question}: where did author {author} live?",
        "answer": f"Author {author} lived in {city}.",
    }
    if perturbed:
        row["paraphrased_answer"] = f"{city} was the home of author {author}."
        row["perturbed_answer"] = [f"Author {author} lived in Town{j}." for j in range(3)]
    return row


def fact(topic: int) -> dict:
    """A real-authors / world-facts row: a question, its answer and wrong options."""
    return {
        "question": f"Which river runs through city {topic}?",
        "answer": f"River {topic}",
        "perturbed_answer": [f"River {topic + j}" for j in range(1, 4)],
    }


def write_tofu(folder: Path) -> Path:
    """TOFU's files at toy size: 6 retain authors, 2 forget, 2 holdout, 2 questions each;
    3 real-authors and 3 world-facts questions."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, topics in (("real_authors", range(3)), ("world_facts", range(10, 13))):
        rows = [fact(t) for t in topics]
        (folder / f"{name}_perturbed.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    subsets = {
        "retain90": (range(6), False),
        "forget10": (range(6, 8), False),
        "holdout10": (range(8, 10), False),
        "forget10_perturbed": (range(6, 8), True),
        "retain_perturbed": (range(3), True),
    }
    for name, (authors, perturbed) in subsets.items():
        rows = [qa(a, q, perturbed) for a in authors for q in range(2)]
        (folder / f"{name}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_the_tofu_study_validates_and_says_what_is_missing(tmp_path, capsys):
    tofu = write_tofu(tmp_path / "TOFU")
    storage = f"storage_dir={tmp_path / 'runs'}"
    assert main(["validate", str(STUDY), f"vars.tofu_dir={tofu}", storage]) == 0
    assert main(["validate", str(STUDY), storage]) == 2
    assert "vars.tofu_dir: a value is required here" in capsys.readouterr().err
    (tofu / "holdout10.json").unlink()
    assert main(["validate", str(STUDY), f"vars.tofu_dir={tofu}", storage]) == 2
    err = capsys.readouterr().err
    assert "evaluation.sets.holdout.data.file" in err and "holdout10.json" in err


@pytest.mark.slow
def test_the_tofu_study_runs_the_unlearning_evaluation(tmp_path, ray_cluster):
    tofu = write_tofu(tmp_path / "TOFU")
    storage = tmp_path / "runs"
    reduced = [
        f"vars.tofu_dir={tofu}",
        f"storage_dir={storage}",
        "seeds=[0]",
        "unlearning=[ga,npo]",
        *[f"stages.{s}.epochs=2" for s in ("retain", "forget", "ga", "npo")],
        *[f"stages.{s}.lr=1.0e-3" for s in ("retain", "forget", "ga", "npo")],
        *[
            f"evaluation.sets.{s}.max_new_tokens=8"
            for s in ("forget", "retain", "real_authors", "world_facts")
        ],
    ]
    assert main(["run", str(STUDY), *reduced]) == 0
    records = [json.loads(p.read_text()) for p in (storage / "trials").glob("*.json")]
    assert len(records) == 3  # two orderings and the oracle (the retain authors alone)
    for record in records:
        metrics = record["metrics"]
        attacks = ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_pp", "mia_gradnorm")
        assert all(0 <= metrics[f"forget/{m}"] <= 1 for m in (*attacks, "mia_reference"))
        assert 0 <= metrics["model_utility"] <= 1
        assert 0 <= metrics["world_facts/probability_w_options"] <= 1
        base = record["history"][0]["metrics"]
        assert base["forget/mia_reference"] == 0.5  # the base against itself: every score ties
    report = (storage / "report" / "report.md").read_text()
    section = report.split("## Unlearning evaluation")[1].split("\n## ")[0]
    header = r"\| ordering +\| method +\| forget_quality +\| privleak +\| model_utility +\|"
    assert re.search(header + r" forget/mia_loss", section), section
    assert re.search(r"\| retain>forget +\| npo +\| [0-9.e-]+", section)
    figures = {p.name for p in (storage / "report" / "figures").glob("*.png")}
    assert "tradeoff_forget_quality_utility.png" in figures
