"""cluster.yaml is a valid Ray cluster-launcher config (Ray's own schema)."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_cluster_yaml_matches_rays_schema():
    config = yaml.safe_load(CLUSTER.read_text())
    assert config["provider"]["type"] == "local"
    validate_config(prepare_config(copy.deepcopy(config)))
    assert any("make setup" in c for c in config["setup_commands"])
    assert all(
        "--dashboard-host=127.0.0.1" in c
        for c in config["head_start_ray_commands"]
        if "--head" in c
    )
    starts = [c for k in ("head", "worker") for c in config[f"{k}_start_ray_commands"]]
    # a submitted job runs `python` from the PATH Ray started with: stageflow's environment
    assert all(
        c.startswith("export PATH=$HOME/stageflow/.venv/bin:$PATH && ")
        for c in starts
        if "ray start" in c
    )


def test_schema_rejects_a_typo():
    config = yaml.safe_load(CLUSTER.read_text())
    config["max_workerz"] = 2
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))
