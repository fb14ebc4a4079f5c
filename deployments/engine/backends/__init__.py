"""Model families, one module each; ``registry.LOADERS`` loads them and ``load_backend`` builds the one a
models-config entry names."""

from deployments.engine.backends.registry import LOADERS, check_backends, load_backend

__all__ = ["LOADERS", "check_backends", "load_backend"]
