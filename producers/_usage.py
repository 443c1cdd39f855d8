"""Token counts from the usage objects LLM SDKs return, without importing any SDK.

Duck typing on attribute (or dict key) names keeps the producer free of the ``openai``,
``anthropic`` and ``langchain`` packages, and keeps working when their classes change but the
field names do not. The beat carries the protocol's token classes (PROTOCOL.md): ``tokens_in``
counts *every* input token, ``tokens_cache_read``/``tokens_cache_write`` are the shares of it
read from and written to a prompt cache; ``tokens_out`` counts every output token,
``tokens_reasoning`` the share spent reasoning. Shapes understood:

* OpenAI Chat Completions: ``prompt_tokens`` (cache included), ``completion_tokens`` (reasoning
  included), ``total_tokens``, ``prompt_tokens_details.cached_tokens`` / ``.cache_write_tokens``,
  ``completion_tokens_details.reasoning_tokens``.
* OpenAI Responses: ``input_tokens``, ``output_tokens``, ``total_tokens``,
  ``input_tokens_details.cached_tokens`` / ``.cache_write_tokens``,
  ``output_tokens_details.reasoning_tokens`` (same inclusion as Chat).
* Anthropic Messages: ``input_tokens``, ``output_tokens``, ``cache_read_input_tokens``,
  ``cache_creation_input_tokens``, ``output_tokens_details.thinking_tokens``. Cache tokens are
  *not* included in ``input_tokens`` here, so they are added.
* LiteLLM: OpenAI's shape (``prompt_tokens`` already includes the cache) that also carries
  Anthropic's ``cache_read_input_tokens``/``cache_creation_input_tokens``: those are shares of
  ``prompt_tokens``, not added to it (adding them counted the cache twice).
* LangChain ``usage_metadata`` (a dict, or an ``AIMessage`` carrying it): ``input_tokens``
  (cache included), ``output_tokens``, ``total_tokens``, ``input_token_details.cache_read`` /
  ``.cache_creation``, ``output_token_details.reasoning``.
* Google Gemini ``usage_metadata``: ``prompt_token_count`` (cache included),
  ``candidates_token_count`` (thoughts *not* included: added), ``thoughts_token_count``,
  ``cached_content_token_count``, ``total_token_count``.

A whole response object is accepted too: its ``.usage`` (or ``.usage_metadata``) is used.
"""

from __future__ import annotations

from typing import Final

from agentwatch.codec import MAX_COUNT, TOKEN_CLASSES
from producers._guard import warn_once

CACHE_READ, CACHE_WRITE, REASONING = TOKEN_CLASSES

_KNOWN: Final = (
    "input_tokens",
    "prompt_tokens",
    "output_tokens",
    "completion_tokens",
    "total_tokens",
    "prompt_token_count",
    "candidates_token_count",
)
_INNER: Final = ("usage", "usage_metadata")


def usage_fields(usage: object) -> dict[str, int]:
    """``tokens_in``, ``tokens_out``, ``tokens`` and the token classes found in ``usage``."""
    source = usage
    if not any(_count(source, key) is not None for key in _KNOWN):
        inner = next((found for key in _INNER if (found := _get(source, key)) is not None), None)
        if inner is not None:
            source = inner
    if any(_count(source, key) is not None for key in ("prompt_token_count", "candidates_token_count")):
        fields = _gemini(source)
    else:
        fields = _openai_anthropic_langchain(source)
    for key in [key for key, value in fields.items() if value > MAX_COUNT]:  # sums of the above
        del fields[key]
        warn_once(f"usage:{key}:cap", "agentwatch: usage gives %s over 2**53 - 1, the largest "
                  "count the pipeline holds exactly; ignored", key)  # fmt: skip
    _drop_inconsistent(fields)
    if not fields:
        warn_once(
            f"usage:{type(usage).__name__}",
            "agentwatch: usage=%s object has no token counts (expected OpenAI, Anthropic, LangChain "
            "or Gemini usage fields); ignored",
            type(usage).__name__,
        )
    return fields


def _openai_anthropic_langchain(source: object) -> dict[str, int]:
    prompt = _count(source, "prompt_tokens")
    tokens_in = prompt if prompt is not None else _count(source, "input_tokens")
    tokens_out = _first(source, "output_tokens", "completion_tokens")
    total = _count(source, "total_tokens")
    in_details = _first_of(source, "prompt_tokens_details", "input_tokens_details")
    out_details = _first_of(source, "completion_tokens_details", "output_tokens_details")
    langchain_in = _get(source, "input_token_details")
    langchain_out = _get(source, "output_token_details")
    # Anthropic's own names, at the top level: shares of the input for LiteLLM (which keeps
    # OpenAI's inclusive prompt_tokens), extra to it for Anthropic's input_tokens.
    top_read = _count(source, "cache_read_input_tokens")
    top_write = _count(source, "cache_creation_input_tokens")
    read = _pick(top_read, _count(in_details, "cached_tokens"), _count(langchain_in, "cache_read"))
    write = _pick(top_write, _count(in_details, "cache_write_tokens"), _count(langchain_in, "cache_creation"))
    reasoning = _pick(
        _count(out_details, "reasoning_tokens"),
        _count(out_details, "thinking_tokens"),
        _count(langchain_out, "reasoning"),
    )
    anthropic_cache = top_read is not None or top_write is not None
    if anthropic_cache and prompt is None and tokens_in is not None:
        inclusive = total is not None and total == tokens_in + (tokens_out or 0)
        if not inclusive:  # Anthropic: input_tokens excludes the cache; every input token counts
            tokens_in += (top_read or 0) + (top_write or 0)
    return _assemble(tokens_in, tokens_out, total, read, write, reasoning)


def _gemini(source: object) -> dict[str, int]:
    """Gemini bills thoughts as output but leaves them out of ``candidates_token_count``."""
    thoughts = _count(source, "thoughts_token_count")
    candidates = _count(source, "candidates_token_count")
    tokens_out = None if candidates is None and thoughts is None else (candidates or 0) + (thoughts or 0)
    return _assemble(
        _count(source, "prompt_token_count"),
        tokens_out,
        _count(source, "total_token_count"),
        _count(source, "cached_content_token_count"),
        None,
        thoughts,
    )


def _assemble(
    tokens_in: int | None,
    tokens_out: int | None,
    total: int | None,
    *classes: int | None,
) -> dict[str, int]:
    """The fields, from the counts found (``classes``: cache read, cache write, reasoning)."""
    fields: dict[str, int] = {}
    if tokens_in is not None:
        fields["tokens_in"] = tokens_in
    if tokens_out is not None:
        fields["tokens_out"] = tokens_out
    if total is not None:
        fields["tokens"] = total
    elif tokens_in is not None or tokens_out is not None:
        fields["tokens"] = (tokens_in or 0) + (tokens_out or 0)
    for key, value in zip(TOKEN_CLASSES, classes, strict=True):
        if value:
            fields[key] = value
    return fields


def _drop_inconsistent(fields: dict[str, int]) -> None:
    """A class larger than what it is a share of cannot be priced: drop it (warned once), so
    the beat still carries its input and output."""
    tokens_in, tokens_out = fields.get("tokens_in"), fields.get("tokens_out")
    cache = fields.get(CACHE_READ, 0) + fields.get(CACHE_WRITE, 0)
    if cache and (tokens_in is None or cache > tokens_in):
        fields.pop(CACHE_READ, None)
        fields.pop(CACHE_WRITE, None)
        warn_once("usage:cache", "agentwatch: usage reports more cache tokens (%d) than input tokens "
                  "(%s); cache counts ignored", cache, tokens_in)  # fmt: skip
    reasoning = fields.get(REASONING)
    if reasoning and (tokens_out is None or reasoning > tokens_out):
        del fields[REASONING]
        warn_once("usage:reasoning", "agentwatch: usage reports more reasoning tokens (%d) than "
                  "output tokens (%s); reasoning count ignored", reasoning, tokens_out)  # fmt: skip


def _get(source: object, name: str) -> object:
    if source is None:
        return None
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
    return _pick(*(_count(source, name) for name in names))


def _first_of(source: object, *names: str) -> object:
    return next((found for name in names if (found := _get(source, name)) is not None), None)


def _pick(*values: int | None) -> int | None:
    return next((value for value in values if value is not None), None)
