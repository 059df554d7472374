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
def test_quickstart_shows_a_significant_ordering_effect(tmp_path):
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
