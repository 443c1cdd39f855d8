"""Token counts from the usage objects LLM SDKs return, without importing any SDK.

Duck typing on attribute (or dict key) names keeps the producer free of the ``openai`` and
``anthropic`` packages, and keeps working when their classes change but the field names do not:

* OpenAI Chat Completions: ``prompt_tokens``, ``completion_tokens``, ``total_tokens``,
  ``prompt_tokens_details.cached_tokens`` (cached tokens are *included* in ``prompt_tokens``).
* OpenAI Responses: ``input_tokens``, ``output_tokens``, ``total_tokens``,
  ``input_tokens_details.cached_tokens`` (likewise included).
* Anthropic Messages: ``input_tokens``, ``output_tokens``, ``cache_creation_input_tokens``,
  ``cache_read_input_tokens`` (cache tokens are *not* included in ``input_tokens``, so they are
  added: every input token the model processed counts towards ``tokens_in``).

A whole response object is accepted too: its ``.usage`` is used.
"""

from __future__ import annotations

from typing import Final

from agentwatch.codec import MAX_COUNT
from producers._guard import warn_once

CACHE_READ: Final = "tokens_cache_read"
CACHE_WRITE: Final = "tokens_cache_write"
"""Meta keys for the cache share of ``tokens_in`` (cache reads are billed at a fraction)."""

_KNOWN: Final = (
    "input_tokens",
    "prompt_tokens",
    "output_tokens",
    "completion_tokens",
    "total_tokens",
)


def usage_fields(usage: object) -> dict[str, int]:
    """``tokens_in``, ``tokens_out``, ``tokens`` and the cache counts found in ``usage``."""
    source = usage
    if not any(_count(source, key) is not None for key in _KNOWN):
        inner = _get(source, "usage")
        if inner is not None:
            source = inner
    tokens_in = _first(source, "input_tokens", "prompt_tokens")
    tokens_out = _first(source, "output_tokens", "completion_tokens")
    total = _count(source, "total_tokens")
    cache_write = _count(source, "cache_creation_input_tokens")
    cache_read = _count(source, "cache_read_input_tokens")
    fields: dict[str, int] = {}
    if cache_write is not None or cache_read is not None:
        # Anthropic reports cache tokens beside input_tokens, not inside it.
        tokens_in = (tokens_in or 0) + (cache_write or 0) + (cache_read or 0)
    else:
        details = _get(source, "prompt_tokens_details") or _get(source, "input_tokens_details")
        cache_read = _count(details, "cached_tokens") if details is not None else None
    if tokens_in is not None:
        fields["tokens_in"] = tokens_in
    if tokens_out is not None:
        fields["tokens_out"] = tokens_out
    if total is not None:
        fields["tokens"] = total
    elif tokens_in is not None or tokens_out is not None:
        fields["tokens"] = (tokens_in or 0) + (tokens_out or 0)
    if cache_read:
        fields[CACHE_READ] = cache_read
    if cache_write:
        fields[CACHE_WRITE] = cache_write
    for key in [key for key, value in fields.items() if value > MAX_COUNT]:  # sums of the above
        del fields[key]
        warn_once(f"usage:{key}:cap", "agentwatch: usage gives %s over 2**53 - 1, the largest "
                  "count the pipeline holds exactly; ignored", key)  # fmt: skip
    if not fields:
        warn_once(
            f"usage:{type(usage).__name__}",
            "agentwatch: usage=%s object has no token counts (expected OpenAI or Anthropic "
            "usage fields); ignored",
            type(usage).__name__,
        )
    return fields


def _get(source: object, name: str) -> object:
    if isinstance(source, dict):
        return source.get(name)
    try:
        return getattr(source, name, None)
    except Exception:  # a property that raises: treat as absent
        return None


def _count(source: object, name: str) -> int | None:
    value = _get(source, name)
    if isinstance(value, int) and value.__class__ is not bool and value >= 0:
        if value <= MAX_COUNT:
            return int(value)
        warn_once(f"usage:{name}:cap", "agentwatch: usage %s=%d is over 2**53 - 1, the largest "
                  "count the pipeline holds exactly; ignored", name, value)  # fmt: skip
    return None


def _first(source: object, *names: str) -> int | None:
    for name in names:
        value = _count(source, name)
        if value is not None:
            return value
    return None
