"""Session-wide fixtures: one Ray cluster and one tiny model for the whole test run."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The default tiny model, built once per test session (a small size keeps tests quick)."""
    from stageflow.core.models import TinyModelSpec, build_tiny_model

    spec = TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=192, seed=0)
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", spec)


@pytest.fixture(scope="session")
def ray_cluster():
    """An embedded local Ray shared by every test that needs one (starts in about 3 s)."""
    import ray

    from stageflow.platform.engine.runner import keep_loopback

    if not ray.is_initialized():
        keep_loopback()
        ray.init(
            address="local",  # never another Ray running on this machine
            num_cpus=6,
            include_dashboard=False,
            log_to_driver=False,
            ignore_reinit_error=True,
            _node_ip_address="127.0.0.1",
        )
    yield ray
    ray.shutdown()
