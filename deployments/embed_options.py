"""How a request's texts are embedded, resolved once per request from what it asks and its model's
config. The same frozen object is the coalescer's key, part of the cache key and the model call's
argument, so an option added here reaches every layer without being renamed on the way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from deployments.errors import ClientError

if TYPE_CHECKING:
    from deployments.config import ModelEntry


@dataclass(frozen=True)
class EmbedOptions:
    prompt: str = ""  # the instruction's text, prepended to every input
    normalize: bool = True  # L2-normalise the vectors
    truncate: bool = True  # cut inputs past max_seq_length (False: refuse them with a 400)


def resolve_options(
    entry: ModelEntry, prompt_name: str | None = None, normalize: bool | None = None, truncate: bool = True
) -> EmbedOptions:
    """A request's options: its own values, else the model's defaults (``default_prompt``, ``normalize``).
    An unknown ``prompt_name`` is a 400 listing the model's prompts."""
    if prompt_name is not None and prompt_name not in entry.prompts:
        raise ClientError(
            f"prompt_name {prompt_name!r} is not defined for model {entry.name!r}; "
            f"defined: {', '.join(sorted(entry.prompts)) or 'none'}",
            "prompt_not_found",
            "prompt_name",
        )
    return EmbedOptions(
        prompt=entry.prompt_text(prompt_name),
        normalize=entry.normalize if normalize is None else normalize,
        truncate=truncate,
    )
