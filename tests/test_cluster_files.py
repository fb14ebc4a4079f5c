"""ray_cluster.yaml and k8s/rayservice.yaml, validated offline with Ray's own schemas, and checked to
provide every placement class that configs/models.yaml uses."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from deployments.config import load_models_config
from tests.conftest import REPO

MODELS = load_models_config(REPO / "configs" / "models.yaml")
USED_CLASSES = {e.placement for e in MODELS.models}


def provides(resources: dict[str, float], placement_name: str) -> bool:
    placement = MODELS.placements[placement_name]
    if placement.num_gpus and resources.get("GPU", 0) < placement.num_gpus:
        return False
    if (placement.num_cpus or 0) > resources.get("CPU", float("inf")):
        return False
    return all(resources.get(k, 0) >= v for k, v in placement.resources.items())


def test_ray_cluster_yaml_is_valid_for_the_launcher():
    raw = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["small_gpu"]["resources"]["small_gpu"] = "four"
    with pytest.raises(Exception):  # noqa: B017 - the schema refuses it, whatever its error type
        validate_config(prepare_config(broken))


def test_ray_cluster_yaml_has_a_node_type_for_every_placement_class():
    raw = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    node_types = raw["available_node_types"]
    for name in USED_CLASSES:
        assert any(provides(t["resources"], name) for t in node_types.values()), name
    # GPU classes are pinned by custom resources, which the autoscaler scales on.
    assert node_types["large_gpu"]["resources"]["large_gpu"] == node_types["large_gpu"]["resources"]["GPU"]
    assert node_types["small_gpu"]["resources"]["small_gpu"] == node_types["small_gpu"]["resources"]["GPU"]
    assert any("serve deploy configs/serve.yaml" in c for c in raw["head_start_ray_commands"])
    assert any("torch==2.13.0" in c for c in raw["setup_commands"])


def test_rayservice_manifest_carries_the_same_application_and_gpu_groups():
    manifest = yaml.safe_load((REPO / "k8s" / "rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService"
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    local = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "configs" / "serve.yaml").read_text()))
    assert [a.model_dump() for a in serve_config.applications] == [a.model_dump() for a in local.applications]
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    groups = {}
    for group in cluster["workerGroupSpecs"]:
        custom = json.loads(json.loads(group["rayStartParams"]["resources"]))
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        groups[group["groupName"]] = {
            **custom,
            "GPU": int(limits.get("nvidia.com/gpu", 0)),
            "CPU": float(limits["cpu"]),
        }
        assert group["minReplicas"] <= group["maxReplicas"]
    for name in USED_CLASSES - {"cpu"}:
        assert any(provides(g, name) for g in groups.values()), name
