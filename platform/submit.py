"""`stageflow submit`: a study as a Ray job on a cluster, this directory as its working dir."""

from __future__ import annotations

import shlex
from pathlib import Path

from stageflow.platform.study_file import StudyError

EXCLUDES = [".venv", "runs", ".git", "**/__pycache__", "*.egg-info", "build", "dist"]


def submit_study(address: str, study: str, overrides: list[str]) -> str:
    """Submit `stageflow run STUDY [overrides]`; returns the Ray job id."""
    from ray.job_submission import JobSubmissionClient

    study_path = Path(study).absolute()
    if not study_path.is_relative_to(Path.cwd()):
        raise StudyError(
            study,
            "study",
            "expected a study file inside the current directory (it is the job's working dir)",
        )
    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise StudyError(
            "--address",
            address,
            f"no Ray job server answers there ({str(err).splitlines()[0]}); expected http://HEAD:8265 of a running cluster",
        ) from None
    entrypoint = shlex.join(
        ["stageflow", "run", str(study_path.relative_to(Path.cwd())), *overrides]
    )
    return client.submit_job(
        entrypoint=entrypoint, runtime_env={"working_dir": ".", "excludes": EXCLUDES}
    )
