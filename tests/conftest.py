"""Session-wide fixtures: one Ray cluster and one tiny model for the whole test run."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The default tiny model, built once per test session (a small size keeps tests quick)."""
    from stageflow.platform.models import TinyModelSpec, build_tiny_model

    spec = TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=192, seed=0)
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", spec)


@pytest.fixture(scope="session")
def ray_cluster():
    """An embedded local Ray shared by every test that needs one (starts in about 3 s)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()
