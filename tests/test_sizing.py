"""GPU memory estimates and the packing check: fractions that cannot fit are refused before deploying."""

from __future__ import annotations

import copy

from deployments.config import (
    ROUTER_HEADROOM,
    deployment_options,
    load_models_config,
    parse_models_config,
    router_options,
)
from deployments.sizing import check_gpu_packing, replica_gpu_memory_gb
from tests.conftest import REPO

BASE = {
    "default_model": "a",
    "placements": {"small_gpu": {"num_gpus": 0.25, "resources": {"small_gpu": 0.25}, "gpu_memory_gb": 24}},
    "models": [
        {
            "name": "a",
            "source": "BAAI/bge-large-en-v1.5",
            "backend": "sentence-transformers",
            "dtype": "float16",
            "max_seq_length": 512,
            "placement": "small_gpu",
            "num_replicas": 4,
        }
    ],
}


def config_with(**changes):
    data = copy.deepcopy(BASE)
    data["models"][0].update(changes)
    return parse_models_config(data)


def test_the_production_config_fits_its_gpus():
    config = load_models_config(REPO / "configs" / "models.yaml")
    assert check_gpu_packing(config) == []
    needs = {e.name: replica_gpu_memory_gb(e) for e in config.models}
    assert 15.7 < needs["NV-Embed-v2"] < 40  # bf16 weights 15.7 GB + activations for its budget
    assert needs["bge-large-en-v1.5"] <= 2.5  # "about 2 GB"


def test_four_quarter_gpu_replicas_needing_30_gb_do_not_fit_24_gb():
    problems = check_gpu_packing(config_with(gpu_memory_gb=30))
    assert problems == [
        "placements.small_gpu: up to 4 replica(s) share one 24 GB GPU (num_gpus 0.25): "
        "a x4 (30.0 GB each) = 120.0 GB > 24 GB"
    ]


def test_mixed_models_are_checked_in_their_worst_mix():
    data = copy.deepcopy(BASE)
    data["models"][0]["num_replicas"] = 1
    data["models"].append({**data["models"][0], "name": "b", "gpu_memory_gb": 10, "num_replicas": 2})
    assert check_gpu_packing(parse_models_config(data)) == []  # b x2 (10 GB) + a x1 (2 GB) = 22 GB fits
    data["models"][1]["gpu_memory_gb"] = 12
    problems = check_gpu_packing(parse_models_config(data))
    assert problems and "b x2 (12.0 GB each) + a x1 (2.0 GB each) = 26.0 GB > 24 GB" in problems[0]


def test_unknown_sizes_must_be_stated(tmp_path):
    problems = check_gpu_packing(config_with(source="someone/unknown-model"))
    assert problems == [
        "models[0] (a).gpu_memory_gb: cannot estimate the GPU memory of 'someone/unknown-model'; "
        "set gpu_memory_gb (placement small_gpu is memory-checked)"
    ]
    assert check_gpu_packing(config_with(source="someone/unknown-model", gpu_memory_gb=5)) == []


def test_local_checkpoints_are_sized_from_their_files(tiny_bge_dir):
    need = replica_gpu_memory_gb(config_with(source=tiny_bge_dir).models[0])
    assert need is not None and 0.5 <= need < 1.0  # a 1M-parameter model: context + small activations


def test_ray_options_carry_the_placement_and_backpressure():
    data = copy.deepcopy(BASE)
    data["placements"]["small_gpu"].update(
        accelerator_type="NVIDIA_L4", label_selector={"gpu-class": "small"}
    )
    config = parse_models_config(data)
    options = deployment_options(config, config.models[0])
    assert options["ray_actor_options"] == {
        "num_gpus": 0.25,
        "resources": {"small_gpu": 0.25},
        "accelerator_type": "NVIDIA_L4",
        "label_selector": {"gpu-class": "small"},
    }
    assert options["max_queued_requests"] == 64 and options["max_ongoing_requests"] == 64
    router = router_options(config)
    # The router admits 1024 + 2048 itself (a JSON 503 past that); Serve, whose 503 is plain text, lets
    # more in and never refuses.
    assert router["max_ongoing_requests"] == 1024 + 2048 + ROUTER_HEADROOM
    assert router["max_queued_requests"] == -1 and "backpressure_config" not in router
