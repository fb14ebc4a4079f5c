"""GPU memory estimates and the packing check: fractions that cannot fit are refused before deploying."""

from __future__ import annotations

import copy
from pathlib import Path

from deployments.config import (
    load_models_config,
    parse_models_config,
)
from deployments.engine.sizing import (
    Machine,
    check_cpu_memory,
    check_gpu_packing,
    check_one_machine,
    model_size,
    replica_cpu_memory,
    replica_gpu_memory_gb,
)
from deployments.serve_options import ROUTER_HEADROOM, deployment_options, router_options
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
    # fp16 served, but the load's fidelity gate runs the float32 weights first: 1.5 GB + activations
    assert 2.5 <= needs["bge-large-en-v1.5"] <= 4.0


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
    assert check_gpu_packing(parse_models_config(data)) == []  # b x2 (10 GB) + a x1 (3.6 GB) = 23.6 GB fits
    data["models"][1]["gpu_memory_gb"] = 12
    problems = check_gpu_packing(parse_models_config(data))
    assert problems and "b x2 (12.0 GB each) + a x1 (3.6 GB each) = 27.6 GB > 24 GB" in problems[0]


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


# ------------------------------------------------------------------------------- host memory, one machine

NVEMBED_FIXTURE = REPO / "tests" / "fixtures" / "nvembed-tiny"
GB_LAPTOP = Machine(cpus=2, gpus=0, memory_gb=20.0)


def cpu_config(memory_gb=None, source=None, **model):
    placement = {"num_cpus": 2, **({"memory_gb": memory_gb} if memory_gb is not None else {})}
    entry = {
        "name": "nv",
        "source": source or str(NVEMBED_FIXTURE),
        "backend": "nvembed",
        "dtype": "bfloat16",
        "max_seq_length": 4096,
        "placement": "cpu",
        "batching": {"max_batch_tokens": 4096},
        **model,
    }
    return parse_models_config({"default_model": "nv", "placements": {"cpu": placement}, "models": [entry]})


def test_sizes_come_from_safetensors_headers(tmp_path):
    """Counted from the headers (every float tensor), not guessed from file sizes and a dtype."""
    from safetensors.torch import load_file

    expected = sum(t.numel() for t in load_file(NVEMBED_FIXTURE / "model.safetensors").values())
    size = model_size(cpu_config().models[0])
    assert size is not None and round(size.params_billion * 1e9) == expected and size.hidden_size == 64


def test_full_size_nvembed_on_cpu_is_sized_in_bf16():
    """The published NV-Embed-v2 on a CPU replica: bf16 weights (15.7 GB), never a float32 copy."""
    config = cpu_config(source="nvidia/NV-Embed-v2")
    need = replica_cpu_memory(config.models[0])
    assert need is not None and need.dtype == "bfloat16"
    assert 15.6 < need.weights < 15.8 and need.total == 17.5  # + 0.8 GB activations at 4096 tokens + 1 GB


def test_an_openvino_replica_is_sized_with_the_graphs_own_copy_of_the_weights():
    """Measured (docs/operations.md, `benchmarks/soak.py --shape bge-large`): a bge-large shape on
    OpenVINO bf16 held 2.94 GB from a start that converted it and 2.40 GB from a cached graph (1.37 GB
    of it the float32 weights mapped from the entry, 0.67 GB OpenVINO's bf16 copy). The estimate counts
    both copies; torch's runtime holds only the float32 weights."""
    entry = {
        "source": "BAAI/bge-large-en-v1.5", "backend": "sentence-transformers", "max_seq_length": 512,
        "dtype": "bfloat16",
    }  # fmt: skip
    openvino = replica_cpu_memory(cpu_config(**entry, runtime="openvino").models[0])
    torch_runtime = replica_cpu_memory(cpu_config(**entry, runtime="torch").models[0])
    assert openvino is not None and torch_runtime is not None
    assert openvino.total == 3.4 and torch_runtime.total == 2.7
    assert openvino.total >= 2.94  # the most a replica of that shape was measured to hold
    assert openvino.describe() == (
        "weights 1.3 GB in float32 + OpenVINO's copy 0.7 GB in bfloat16 + activations 0.4 GB at "
        "max_batch_tokens + 1 GB runtime"
    )
    problems = check_cpu_memory(cpu_config(memory_gb=3, **entry, runtime="openvino"))
    assert problems and "needs about 3.4 GB" in problems[0]


def test_a_cpu_placement_too_small_for_its_model_is_refused():
    assert check_cpu_memory(cpu_config(memory_gb=17.5, source="nvidia/NV-Embed-v2")) == []
    problems = check_cpu_memory(cpu_config(memory_gb=16, source="nvidia/NV-Embed-v2"))
    assert problems == [
        "placements.cpu.memory_gb: 16 GB per replica, but models[0] (nv) needs about 17.5 GB (weights "
        "15.7 GB in bfloat16 + activations 0.8 GB at max_batch_tokens + 1 GB runtime); raise memory_gb or "
        "lower the model's batching.max_batch_tokens"
    ]
    # Ray's memory resource carries the reservation.
    config = cpu_config(memory_gb=17.5)
    assert deployment_options(config, config.models[0])["ray_actor_options"]["memory"] == 17_500_000_000


def test_unknown_models_on_a_memory_checked_cpu_placement_must_be_local():
    problems = check_cpu_memory(cpu_config(memory_gb=4, source="someone/unknown-model"))
    assert problems and problems[0].startswith("models[0] (nv).source: cannot size 'someone/unknown-model'")


def test_one_machine_refuses_a_replica_it_cannot_place():
    """The case a user met: a second model with the shipped 2-CPU placement beside the in-process one."""
    config = load_models_config(REPO / "configs" / "models.local.yaml")
    assert check_one_machine(config, GB_LAPTOP) == []
    data = config.model_dump(exclude_unset=True)
    second = {**data["models"][0], "name": "second", "aliases": []}
    data["models"].append(second)
    problems = check_one_machine(parse_models_config(data), GB_LAPTOP)
    assert problems == [
        "placements: the replicas ask for 4 of CPUs in all (models[1] (second) 1 x 2 + router (runs "
        "all-MiniLM-L6-v2) 1 x 2), this machine has 2: some would wait forever; lower num_cpus / "
        "num_replicas or serve on a cluster"
    ]


def test_one_machine_refuses_more_than_it_has_of_anything():
    big = check_one_machine(cpu_config(memory_gb=30), GB_LAPTOP)
    assert big == [
        "placements.cpu.memory_gb: models[0] (nv) asks for 30 GB per replica, Ray offers 20 GB for replicas "
        "on this machine (available memory less the object store's share, "
        "RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION)"
    ]
    cpus = check_one_machine(cpu_config(), Machine(cpus=1, gpus=0, memory_gb=20))
    assert cpus == ["placements.cpu.num_cpus: models[0] (nv) asks for 2 per replica, this machine has 1"]
    production = check_one_machine(load_models_config(REPO / "configs" / "models.yaml"), GB_LAPTOP)
    assert (
        "placements.large_gpu.num_gpus: models[0] (NV-Embed-v2) asks for 1 per replica, this machine has 0"
        in (production)
    )
    assert any(p.startswith("placements.small_gpu.resources.small_gpu:") for p in production)


def test_the_shipped_configs_pass_the_memory_checks():
    for name in ("models.local.yaml", "models.local-exact.yaml", "models.yaml"):
        config = load_models_config(REPO / "configs" / name)
        assert check_cpu_memory(config) == [] and check_gpu_packing(config) == [], name
    for name in ("models.local.yaml", "models.local-exact.yaml"):
        assert check_one_machine(load_models_config(REPO / "configs" / name), GB_LAPTOP) == [], name


def test_weights_a_folder_holds_twice_are_counted_once(tiny_bge_dir):
    """A sentence-transformers folder built from a Hugging Face one keeps both (`hf/` below the top
    level): the top-level weights are the model's."""
    from safetensors.torch import load_file

    top = sum(t.numel() for t in load_file(f"{tiny_bge_dir}/model.safetensors").values())
    assert list(Path(tiny_bge_dir).glob("*/*.safetensors"))  # the second copy is there
    size = model_size(config_with(source=tiny_bge_dir).models[0])
    assert size is not None and round(size.params_billion * 1e9) == top
