"""The configuration reference (docs/config.md) documents every key of the models-config schema, and only
keys that exist: the schema in deployments/config.py is the truth, the table is what users read."""

from __future__ import annotations

import json
import re
import types
import typing

from pydantic import BaseModel

from deployments.config import ModelsConfig
from tests.conftest import REPO


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds, through Optional / unions."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    return []


def schema_keys(model: type[BaseModel] = ModelsConfig, prefix: str = "") -> tuple[set[str], set[str]]:
    """(every key that holds a value, every key that holds a section), as the reference spells them:
    ``models[].batching.max_batch_size``, ``placements.<class>.num_gpus``; ``models[].batching``."""
    keys: set[str] = set()
    sections: set[str] = set()
    for name, field in model.model_fields.items():
        key, annotation = prefix + name, field.annotation
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin is list and args and _models_in(args[0]):
            inner, below = _models_in(args[0])[0], f"{key}[]."
        elif origin is dict and len(args) == 2 and _models_in(args[1]):
            inner, below = _models_in(args[1])[0], f"{key}.<class>."
        elif _models_in(annotation):
            inner, below = _models_in(annotation)[0], f"{key}."
        else:
            keys.add(key)
            continue
        sections.add(key)
        inner_keys, inner_sections = schema_keys(inner, below)
        keys |= inner_keys
        sections |= inner_sections
    return keys, sections


def documented_keys() -> set[str]:
    """The keys named in the first column of docs/config.md's tables (a cell may name several, `a` / `b`)."""
    text = (REPO / "docs" / "config.md").read_text()
    keys = set()
    for line in text.splitlines():
        match = re.match(r"^\| ((?:`[^`]+`(?: / )?)+) \|", line)
        if match:
            keys |= set(re.findall(r"`([^`]+)`", match.group(1)))
    return keys


def test_the_reference_lists_every_key_of_the_schema_and_no_other():
    (keys, sections), documented = schema_keys(), documented_keys()
    assert len(keys) > 40 and "models[].batching.max_batch_size" in keys  # the walk reached nested sections
    missing, unknown = keys - documented, documented - keys - sections
    assert not missing, f"keys of the schema missing from docs/config.md: {sorted(missing)}"
    assert not unknown, f"docs/config.md documents keys the schema lacks: {sorted(unknown)}"


def test_the_api_reference_lists_every_error_code_with_its_status():
    """docs/api.md's error table is ``deployments.protocol.errors.ERRORS``, row for row."""
    from deployments.protocol.errors import ERRORS

    text = (REPO / "docs" / "api.md").read_text()
    rows = {
        m.group(1): (int(m.group(2)), m.group(3), m.group(4) == "yes")
        for m in re.finditer(r"^\| `([a-z_]+)` \| (\d+) \| (\w+) \| (yes|no) \|", text, re.MULTILINE)
    }
    assert rows == {code: (k.status, k.type, k.retry) for code, k in ERRORS.items()}


def registered_metrics() -> set[str]:
    """The names of every metric the service registers: the metric objects its classes create (Ray's
    metrics are made without a running Ray; they record only inside one)."""
    from ray.util.metrics import Metric

    from deployments.metrics import CacheMetrics, ModelMetrics, RouterMetrics

    holders = [ModelMetrics("m"), CacheMetrics("m"), CacheMetrics("m", layer="disk"), RouterMetrics()]
    return {v._name for holder in holders for v in vars(holder).values() if isinstance(v, Metric)}


def test_the_grafana_dashboard_charts_exactly_the_metrics_the_service_registers():
    exported = registered_metrics()
    assert {"embeddings_requests", "embeddings_inputs", "embeddings_cache_lookups"} <= exported
    dashboard = json.loads((REPO / "configs" / "grafana" / "embeddings-dashboard.json").read_text())
    queried = {
        re.sub(r"_(total|bucket|sum|count)$", "", name)
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"ray_(embeddings_[a-z_]+)", target["expr"])
    }
    assert queried and queried <= exported, queried - exported
    assert exported - queried == set(), exported - queried  # every registered metric has a panel
