"""Where a study's numbers were made: stageflow's version and commit, library versions, the
CPU, threads and the code digest its keys descend from (written to `<study dir>/
provenance.json` and the study's MLflow run). Torch-free."""

from __future__ import annotations

import platform as stdlib_platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from stageflow.core.keys import code_version, cpu_threads, library_versions, package_dirs


def git_commit(folders: list[Path]) -> dict[str, Any] | None:
    """The commit of the checkout stageflow runs from (editable install), and whether its
    source folders differ from it (docs do not count); None outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "-C", str(folders[0]), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(folders[0]), "status", "--porcelain", "--", *map(str, folders)],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head.stdout.strip(), "modified": bool(dirty.stdout.strip())}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return stdlib_platform.processor() or stdlib_platform.machine()


def provenance(threads_per_actor: int | None = None) -> dict[str, Any]:
    """The record of what made a study's numbers."""
    try:
        version = metadata.version("stageflow")
    except metadata.PackageNotFoundError:
        version = "unknown"
    folders = package_dirs()
    return {
        "stageflow": version,
        "git": git_commit(folders) if folders else None,
        "code_version": code_version(),
        "libraries": library_versions(),
        "python": sys.version.split()[0],
        "cpu": cpu_model(),
        "machine": stdlib_platform.machine(),
        "cpu_threads": cpu_threads(),
        "threads_per_actor": threads_per_actor,
    }
