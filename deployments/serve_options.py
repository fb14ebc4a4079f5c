"""What Ray Serve's ``Deployment.options`` gets for each deployment of the app, built from the models
config: the plain dicts the app builder (``deployments/app.py``) hands to Serve. Kept beside the app
builder, out of the config module, so the config knows nothing of Ray; no Ray import here either, so these
are tested as plain functions.
"""

from __future__ import annotations

from typing import Any

from deployments.config import ModelEntry, ModelsConfig


def ray_actor_options(config: ModelsConfig, entry: ModelEntry) -> dict[str, Any]:
    """The ``ray_actor_options`` of an entry's deployment, from its placement class."""
    placement = config.placements[entry.placement]
    options: dict[str, Any] = {"num_gpus": placement.num_gpus}
    if placement.num_cpus is not None:
        options["num_cpus"] = placement.num_cpus
    if placement.memory_gb is not None:
        options["memory"] = int(placement.memory_gb * 1e9)
    if placement.resources:
        options["resources"] = dict(placement.resources)
    if placement.accelerator_type:
        options["accelerator_type"] = placement.accelerator_type
    if placement.label_selector:
        options["label_selector"] = dict(placement.label_selector)
    return options


# Calls a router replica takes beyond its own admission limits: refusals on their way out, health checks,
# /v1/models, Python-handle calls.
ROUTER_HEADROOM = 64


def router_options(config: ModelsConfig) -> dict[str, Any]:
    """``Deployment.options`` of the ingress. The router admits HTTP requests itself (``Admission``: its
    503 is JSON), so Serve lets more in (by ``ROUTER_HEADROOM``) and never refuses: Serve's refusal is
    plain text, and its queue (the callers' line for a replica, which every request passes while Serve
    picks one) only holds requests on their way to a quick answer. With ``router.in_process_model`` its
    resources, replicas and autoscaling are that model's."""
    router = config.router
    options: dict[str, Any] = {
        "num_replicas": router.num_replicas,
        "ray_actor_options": {"num_cpus": router.num_cpus},
        "max_ongoing_requests": router.max_ongoing_requests + router.max_queued_requests + ROUTER_HEADROOM,
        "max_queued_requests": -1,
        "logging_config": {"enable_access_log": router.access_log},
    }
    entry = config.in_process_entry
    if entry is not None:
        model = deployment_options(config, entry)
        options["ray_actor_options"] = model["ray_actor_options"]
        options.pop("num_replicas")
        for key in ("num_replicas", "autoscaling_config"):
            if key in model:
                options[key] = model[key]
    return options


def deployment_options(config: ModelsConfig, entry: ModelEntry) -> dict[str, Any]:
    """Everything ``Deployment.options`` needs for an entry."""
    options: dict[str, Any] = {
        "name": entry.name,
        "ray_actor_options": ray_actor_options(config, entry),
        "max_ongoing_requests": entry.max_ongoing_requests,
        "max_queued_requests": entry.max_queued_requests,
        "logging_config": {"enable_access_log": config.router.access_log},
    }
    if entry.autoscaling is not None:
        options["autoscaling_config"] = entry.autoscaling.model_dump(exclude_none=True)
    else:
        options["num_replicas"] = entry.num_replicas
    return options
