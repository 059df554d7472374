"""The folders are subpackages stageflow.<folder>; the repo-root `platform/` never shadows stdlib."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STDLIB = sysconfig.get_paths()["stdlib"]
CHECK = (
    "import platform, importlib.util, stageflow.core.files as r; "
    "print(platform.__file__); print(r.__file__); "
    "print(importlib.util.find_spec('stageflow.platform.commands.cli').origin); "
    "print(platform.python_version())"
)


def run_python(*args: str, cwd: Path, env: dict | None = None) -> list[str]:
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_editable_install_from_repo_root():
    stdlib_platform, registry, cli, _ = run_python("-c", CHECK, cwd=ROOT)
    assert stdlib_platform.startswith(STDLIB)
    assert Path(registry) == ROOT / "core" / "files.py"
    assert Path(cli) == ROOT / "platform" / "commands" / "cli.py"
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_built_wheel(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("stageflow-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "stageflow/platform/commands/cli.py" in names and "stageflow/core/tasks/math.py" in names
    assert "stageflow/studies/quickstart.yaml" in names
    assert not any(n.startswith(("platform/", "actors/", "kernels/", "core/")) for n in names)
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    # -S: no site-packages, so neither the editable finder nor the repo can answer the import
    stdlib_platform, registry, cli, _ = run_python(
        "-S", "-c", f"import sys; sys.path.insert(0, {str(unpacked)!r}); {CHECK}", cwd=ROOT
    )
    assert stdlib_platform.startswith(STDLIB)
    assert Path(registry) == unpacked / "stageflow" / "core" / "files.py"
    assert Path(cli) == unpacked / "stageflow" / "platform" / "commands" / "cli.py"
