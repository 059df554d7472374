"""`stageflow submit`: a study as a Ray job on a cluster, this directory as its working dir."""

from __future__ import annotations

import shlex
import time
from pathlib import Path

from stageflow.core.config import StudyError, StudySpec

# lazy: Ray's job client only when a study is submitted

AGENT_RETRIES = 24  # 5 s apart: a head that just started has no job agent for a while
EXCLUDES = [".venv", "runs", ".git", "**/__pycache__", "*.egg-info", "build", "dist"]


def submit_study(address: str, study: str, overrides: list[str], spec: StudySpec) -> str:
    """Submit `stageflow run STUDY [overrides]` as a Ray job; returns the job id."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    study_path = Path(study).absolute()
    if not study_path.is_relative_to(Path.cwd()):
        raise StudyError(
            study,
            "study",
            "expected a study file inside the current directory (it becomes the job's working dir)",
        )
    if not spec.storage_dir or not Path(spec.storage_dir).is_absolute():
        raise StudyError(
            study,
            "storage_dir",
            "a study run on a cluster needs an absolute storage_dir on a filesystem every node shares (e.g. storage_dir=/shared/runs/NAME)",
        )
    try:
        client = JobSubmissionClient(address)
    except AuthenticationError:
        raise StudyError(
            "--address",
            address,
            "the cluster asks for a Ray auth token; expected RAY_AUTH_MODE=token with the cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token",
        ) from None
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise StudyError(
            "--address",
            address,
            f"no Ray job server answers there ({str(err).splitlines()[0]}); expected http://HEAD:8265 of a running cluster",
        ) from None
    relative = str(study_path.relative_to(Path.cwd()))
    entrypoint = shlex.join(
        ["python", "-m", "stageflow.platform.commands.cli", "run", relative, *overrides]
    )
    runtime_env = {"working_dir": ".", "excludes": EXCLUDES}
    for _ in range(AGENT_RETRIES - 1):
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as err:  # a head that just started has no job agent yet
            if "No available agent" not in str(err):
                raise
            time.sleep(5)
    return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
