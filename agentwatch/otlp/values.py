"""OTLP ``AnyValue`` -> the few Python values the receiver uses, refusing what a count cannot be.

Every value here came from whoever holds the ingest token: a token count may be negative, a
float, a string, 2**63 or NaN. A count that is not a whole number from 0 to the configured cap is
*dropped* (the caller counts it) rather than clamped or rounded: a wrong number would page people
or hide a runaway; a missing one only leaves that call's usage out.

Values come two ways: as decoded ``AnyValue`` messages (resources, metric points), or still
encoded (span attributes: wire.py keeps them as bytes so that the attributes nobody reads cost
nothing). An encoding is decoded by the official class when read, once per distinct encoding:
the model name, provider and operation of every call of an export are the same few bytes, and
so are most token counts. Both ways go through the same checks (:func:`_text`, :func:`_count`,
:func:`_amount`).
"""

from __future__ import annotations

import math
from typing import Any, Final

from google.protobuf.message import DecodeError
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from agentwatch.codec import MAX_COST
from agentwatch.errors import OtlpRejected

MAX_TEXT: Final = 1024
"""Longest model, provider or tool name kept (the protocol's text cap); longer is cut."""
MAX_COST_USD: Final = MAX_COST
"""A single call or data point claiming more is garbage, not a bill: the codec's cap of a beat."""
MAX_CACHED: Final = 8192
"""Encodings remembered with their value; the cache starts over when full."""
MAX_CACHED_BYTES: Final = 64
"""Longer encodings (tool arguments, prompts) are decoded every time rather than remembered."""


class Bad:
    """A value that is present but unusable; :data:`BAD` is its only instance."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "BAD"


BAD: Final = Bad()

Parts = tuple[str | None, Any]
"""An ``AnyValue`` as (which field is set, its Python value)."""


def parts(value: AnyValue) -> Parts:
    kind = value.WhichOneof("value")
    return kind, getattr(value, kind) if kind is not None else None


_seen: dict[bytes, Parts] = {}
_texts: dict[bytes, str | None] = {}
_whole: dict[bytes, int | Bad] = {}
MAX_WHOLE: Final = 2**63
"""Above any cap :func:`count_of` is asked for: the cap is applied after the cache."""


def parts_of(raw: bytes) -> Parts:
    """The parts of the ``AnyValue`` encoded as ``raw``. Raises OtlpRejected (400) for bytes that
    are not one, as decoding the whole request would have."""
    found = _seen.get(raw)
    if found is None:
        found = _remember(_seen, raw, parts(_decode(raw)))
    return found


def text(value: AnyValue) -> str | None:
    """A string attribute's value (cut to :data:`MAX_TEXT`), or None for any other type or ''."""
    return _text(parts(value))


def text_of(raw: bytes) -> str | None:
    """:func:`text` of an encoded value."""
    found = _texts.get(raw, BAD)
    if found is BAD:
        found = _remember(_texts, raw, _text(parts_of(raw)))
    return found  # type: ignore[return-value]


def count(value: AnyValue, cap: int) -> int | Bad:
    """A whole number from 0 to ``cap``; a float is accepted only when it is whole (JavaScript
    SDKs may send any number as a double)."""
    return _count(parts(value), cap)


def count_of(raw: bytes, cap: int) -> int | Bad:
    """:func:`count` of an encoded value."""
    number = _whole.get(raw)
    if number is None:
        number = _remember(_whole, raw, _count(parts_of(raw), MAX_WHOLE))
    return number if isinstance(number, int) and number <= cap else BAD


def amount(value: AnyValue) -> float | Bad:
    """A cost in USD: a finite number from 0 to :data:`MAX_COST_USD`."""
    return _amount(parts(value))


def amount_of(raw: bytes) -> float | Bad:
    """:func:`amount` of an encoded value."""
    return _amount(parts_of(raw))


def plain(value: AnyValue) -> str:
    """Any value as stable text, for hashing (tool arguments may be a string, a map, a list...)."""
    kind = value.WhichOneof("value")
    if kind is None:
        return ""
    if kind == "string_value":
        return str(value.string_value)
    if kind == "bytes_value":
        return bytes(value.bytes_value).hex()
    if kind == "array_value":
        return "[" + ",".join(plain(item) for item in value.array_value.values) + "]"
    if kind == "kvlist_value":
        pairs = sorted((kv.key, plain(kv.value)) for kv in value.kvlist_value.values)
        return "{" + ",".join(f"{key}={item}" for key, item in pairs) + "}"
    return repr(getattr(value, kind))


def plain_of(raw: bytes) -> str:
    """:func:`plain` of an encoded value."""
    return plain(_decode(raw))


def _decode(raw: bytes) -> AnyValue:
    try:
        return AnyValue.FromString(raw)
    except DecodeError as exc:
        raise OtlpRejected(400, f"an attribute value is not valid protobuf ({exc or 'malformed'})") from None


def _remember(cache: dict[bytes, Any], raw: bytes, value: Any) -> Any:
    if len(raw) <= MAX_CACHED_BYTES:
        if len(cache) >= MAX_CACHED:
            cache.clear()
        cache[raw] = value
    return value


def _text(found: Parts) -> str | None:
    kind, value = found
    if kind != "string_value":
        return None
    return value[:MAX_TEXT] or None


def _count(found: Parts, cap: int) -> int | Bad:
    kind, number = found
    if kind == "double_value" and number.is_integer():
        number = int(number)
    elif kind != "int_value":
        return BAD  # non-integer: a fraction, NaN, infinity, a string, a list...
    return number if 0 <= number <= cap else BAD


def _amount(found: Parts) -> float | Bad:
    kind, number = found
    if kind == "int_value":
        number = float(number)
    elif kind != "double_value":
        return BAD
    return number if math.isfinite(number) and 0 <= number <= MAX_COST_USD else BAD
