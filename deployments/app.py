"""``build_app``: the models config turned into bound Ray Serve deployments.

``serve run configs/local.yaml`` calls it with the ``args`` of the Serve config. The config is parsed
and validated here, before anything is deployed, so a bad config never starts a half-working app.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from ray.serve import Application

from deployments.config import (
    ConfigError,
    load_models_config,
    resolve_config_path,
)
from deployments.engine.backends import check_backends
from deployments.engine.model_server import ModelDeployment
from deployments.engine.sizing import check_cpu_memory, check_gpu_packing
from deployments.ingress.router import EmbeddingRouter
from deployments.serve_options import deployment_options, router_options


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Path of the models YAML: absolute, or relative to the working directory or the repository root.
    models_config: str


def build_app(args: AppArgs | dict) -> Application:
    if isinstance(args, dict):
        args = AppArgs.model_validate(args)
    path = resolve_config_path(args.models_config)
    config = load_models_config(path)
    memory = check_gpu_packing(config, path.parent) + check_cpu_memory(config, path.parent)
    if memory:
        raise ConfigError(memory, str(path))
    check_backends(config, path.parent)
    local = config.in_process_entry
    embedders = {
        entry.name: ModelDeployment.options(**deployment_options(config, entry)).bind(
            entry.model_dump(), str(path.parent)
        )
        for entry in config.models
        if entry is not local
    }
    return EmbeddingRouter.options(**router_options(config)).bind(
        config.model_dump(exclude_unset=True), embedders, str(path.parent)
    )
