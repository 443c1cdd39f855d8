"""OTLP ``AnyValue`` -> the few Python values the receiver uses, refusing what a count cannot be.

Every value here came from whoever holds the ingest token: a token count may be negative, a
float, a string, 2**63 or NaN. A count that is not a whole number from 0 to the configured cap is
*dropped* (the caller counts it) rather than clamped or rounded: a wrong number would page people
or hide a runaway; a missing one only leaves that call's usage out.
"""

from __future__ import annotations

import math
from typing import Any, Final

from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from agentwatch.codec import MAX_COST

MAX_TEXT: Final = 1024
"""Longest model, provider or tool name kept (the protocol's text cap); longer is cut."""
MAX_COST_USD: Final = MAX_COST
"""A single call or data point claiming more is garbage, not a bill: the codec's cap of a beat."""


class Bad:
    """A value that is present but unusable; :data:`BAD` is its only instance."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "BAD"


BAD: Final = Bad()


def text(value: AnyValue) -> str | None:
    """A string attribute's value (cut to :data:`MAX_TEXT`), or None for any other type or ''."""
    if value.WhichOneof("value") != "string_value":
        return None
    found: str = value.string_value
    return found[:MAX_TEXT] or None


def count(value: AnyValue, cap: int) -> int | Bad:
    """A whole number from 0 to ``cap``; a float is accepted only when it is whole (JavaScript
    SDKs may send any number as a double)."""
    kind = value.WhichOneof("value")
    number: Any
    if kind == "int_value":
        number = value.int_value
    elif kind == "double_value" and value.double_value.is_integer():
        number = int(value.double_value)
    else:
        return BAD  # non-integer: a fraction, NaN, infinity, a string, a list...
    return number if 0 <= number <= cap else BAD


def amount(value: AnyValue) -> float | Bad:
    """A cost in USD: a finite number from 0 to :data:`MAX_COST_USD`."""
    kind = value.WhichOneof("value")
    if kind == "double_value":
        number = value.double_value
    elif kind == "int_value":
        number = float(value.int_value)
    else:
        return BAD
    return number if math.isfinite(number) and 0 <= number <= MAX_COST_USD else BAD


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
