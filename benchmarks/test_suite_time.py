"""The test suite's wall time on this machine, kept as a file the README quotes.

Command (repo root, the venv active; `make test-timed` runs it):

    python benchmarks/test_suite_time.py

Runs `python -m pytest --durations=0` (what `make test` runs, plus every test's time) and
writes docs/test_suite.md: the commit, the machine's cores and load, pytest's summary line, the
failed tests, the wall time and the slowest tests; pytest's whole output goes to
build/test_suite.log. Exits with pytest's exit code.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "test_suite.md"
LOG = ROOT / "build" / "test_suite.log"  # not committed (build/ is ignored)


def clock(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def main() -> None:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--durations=0", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    LOG.parent.mkdir(exist_ok=True)
    LOG.write_text(done.stdout + done.stderr)  # the whole output, for a failure's traceback
    lines = done.stdout.splitlines()
    summary = next(
        (line.strip("= ") for line in reversed(lines) if " in " in line and "passed" in line),
        "no summary",
    )
    slowest = [line for line in lines if line.split("s ")[0].replace(".", "").isdigit()][:15]
    failed = [line for line in lines if line.startswith(("FAILED ", "ERROR "))]
    page = [
        "# The test suite's time",
        "",
        "Command: `python benchmarks/test_suite_time.py` (`make test-timed`)",
        "",
        f"Commit {commit}; {os.cpu_count()} CPU cores; 1-min load average {load:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end.",
        "",
        f"pytest: {summary}",
        "",
        f"Wall time: {clock(wall)}",
        "",
        *([*failed, ""] if failed else []),
        "Slowest tests:",
        "",
        "```",
        *slowest,
        "```",
    ]
    OUT.write_text("\n".join(page) + "\n")
    print(OUT.read_text())
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
