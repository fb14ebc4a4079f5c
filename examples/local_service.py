"""A private local service for the examples when ``EMBEDDING_SERVICE`` names none.

Starts Ray under a private temp dir, deploys ``configs/models.local.yaml`` and points ``EMBEDDING_SERVICE`` at
that exact cluster (``ray://<its GCS address>``), so nothing can attach to another Ray on the machine.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def service() -> Iterator[str]:
    """Yields ``EMBEDDING_SERVICE``: the one already set, or a local service started (and stopped) here."""
    if os.environ.get("EMBEDDING_SERVICE"):
        yield os.environ["EMBEDDING_SERVICE"]
        return
    import ray
    from ray import serve

    from deployments.app import AppArgs, build_app

    ray.init(_temp_dir=tempfile.mkdtemp(prefix="ray-example-"), include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 0})
        config = str(REPO / "configs/models.local.yaml")
        serve.run(build_app(AppArgs(models_config=config)), name="embeddings", route_prefix="/")
        os.environ["EMBEDDING_SERVICE"] = f"ray://{ray.get_runtime_context().gcs_address}"
        yield os.environ["EMBEDDING_SERVICE"]
    finally:
        os.environ.pop("EMBEDDING_SERVICE", None)
        serve.shutdown()
        ray.shutdown()
