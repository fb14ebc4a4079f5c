"""Model families, one module each; ``registry.BACKENDS`` names them and ``load_backend`` builds the one a
models-config entry names."""

from deployments.backends.registry import BACKENDS, check_backends, load_backend

__all__ = ["BACKENDS", "check_backends", "load_backend"]
