"""cluster.yaml passes Ray's own cluster-config checks (those `ray up` runs before it calls
the cloud) and describes the cluster the README promises: CPU head, GPU workers, the project
installed on every node, token auth, MLflow wired in."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.providers import _NODE_PROVIDERS
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


def ray_up_checks(config: dict) -> dict:
    """What `ray up` does to a config before the provider bootstraps it
    (`ray.autoscaler._private.commands._bootstrap_config`): merge the provider's defaults,
    then validate against ray-schema.json and the cross-field rules."""
    assert config["provider"]["type"] in _NODE_PROVIDERS
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_validation(config):
    prepared = ray_up_checks(config)
    assert set(prepared["available_node_types"]) == {"head", "gpu_worker", "gpu_worker_4x"}


def test_head_is_cpu_only_and_workers_have_gpus(config):
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"]["GPU"] == 0 and head["resources"]["CPU"] > 0
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert workers and all(t["resources"]["GPU"] >= 1 for t in workers.values())
    for t in workers.values():
        assert t["min_workers"] == 0 < t["max_workers"] <= config["max_workers"]
        assert t["node_config"]["InstanceType"].startswith(("g", "p"))  # AWS GPU families


def test_every_node_installs_the_synced_project_with_the_local_ray(config):
    remote = next(r for r, local in config["file_mounts"].items() if local == ".")
    assert any(f"pip install -q -e {remote}" in c for c in config["setup_commands"])
    assert ".gitignore" in config["rsync_filter"] and "work" in config["rsync_exclude"]
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    assert "-v /mnt/shared:/mnt/shared" in config["docker"]["run_options"]


def test_token_auth_and_mlflow_are_wired_on_the_nodes(config):
    assert "~/.ray/auth_token" in config["file_mounts"].values()
    head_start = " ".join(config["head_start_ray_commands"])
    worker_start = " ".join(config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_start and "RAY_AUTH_MODE=token" in worker_start
    assert "mlflow server" in head_start and "export MLFLOW_TRACKING_URI=http://" in head_start
    assert head_start.index("MLFLOW_TRACKING_URI") < head_start.index("ray start --head")


def _broken(config: dict, what: str) -> dict:
    broken = copy.deepcopy(config)
    if what == "unknown key":
        broken["setup_command"] = broken.pop("setup_commands")  # a typo
    elif what == "bad resources":
        broken["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "one"
    elif what == "no such head type":
        broken["head_node_type"] = "cpu_head"
    elif what == "min above max":
        broken["available_node_types"]["gpu_worker"]["min_workers"] = 9
    elif what == "no node config":
        del broken["available_node_types"]["gpu_worker"]["node_config"]
    return broken


@pytest.mark.parametrize(
    "what, message",
    [
        ("unknown key", "'setup_command' was unexpected"),
        ("bad resources", "'one' is not of type 'integer'"),
        ("no such head type", "head_node_type` must be one of"),
        ("min above max", "max_workers` is smaller than the sum of `min_workers"),
        ("no node config", "'node_config' is a required property"),
    ],
)
def test_a_broken_copy_is_rejected(config, what, message):
    with pytest.raises((jsonschema.ValidationError, ValueError), match=message):
        ray_up_checks(_broken(config, what))
