"""Run every benchmark script in benchmarks/, one after another (`make bench`).

Command (repo root, the venv active):

    python benchmarks/run_all.py                  # every benchmark, full runs (tens of minutes)
    python benchmarks/run_all.py --quick          # smoke runs, for the scripts that take --quick
    python benchmarks/run_all.py weight_sync ...  # only the named benchmarks, in that order

A benchmark script is a .py file in this folder with a `__main__` block (not this runner, not
the `results_io` helper, not vs_script's baseline `hand_written`). They run sequentially, never in parallel: each one measures time
and load on a shared machine. `--quick` is passed to the scripts that define that flag. The
first script that fails stops the run, and this runner exits with that script's exit code.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NOT_BENCHMARKS = {"run_all", "results_io", "hand_written", "test_suite_time", "gpu_check"}
# hand_written: vs_script's baseline; test_suite_time: `make test-timed`; gpu_check: `make gpu-check`


def benchmarks() -> dict[str, Path]:
    """{name: script} of the benchmark scripts in this folder, sorted by name."""
    return {
        path.stem: path
        for path in sorted(HERE.glob("*.py"))
        if path.stem not in NOT_BENCHMARKS and 'if __name__ == "__main__":' in path.read_text()
    }


def accepts_quick(script: Path) -> bool:
    """Whether the script declares a `--quick` option (read from its source, not by running it)."""
    return '"--quick"' in script.read_text()


def main() -> int:
    found = benchmarks()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to the scripts")
    parser.add_argument("names", nargs="*", metavar="name", help=f"of {', '.join(found)}")
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in found]
    if unknown:
        parser.error(f"no benchmark {', '.join(unknown)}; expected one of {', '.join(found)}")
    names = args.names or list(found)
    for i, name in enumerate(names, start=1):
        script = found[name]
        cmd = [sys.executable, str(script.relative_to(ROOT))]
        if args.quick and accepts_quick(script):
            cmd.append("--quick")
        print(f"[{i}/{len(names)}] {' '.join(['python', *cmd[1:]])}", flush=True)
        start = time.perf_counter()
        code = subprocess.run(cmd, cwd=ROOT, check=False).returncode
        elapsed = time.perf_counter() - start
        if code != 0:
            print(f"{name} failed (exit code {code}) after {elapsed:.0f} s; stopping", flush=True)
            return code if code > 0 else 1  # a negative code: killed by a signal
        print(f"{name} done in {elapsed:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
