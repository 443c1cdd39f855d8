"""Turn whatever the agent passed to ``heartbeat()`` into fields the codec will accept.

Every event this producer writes must pass :func:`agentwatch.codec.decode`: a field the pipeline
would reject (``tokens=-5``) would send the whole beat to the dead-letter stream, and a lost beat
looks exactly like a stalled agent. So a bad field is dropped (or trimmed) here, the beat itself
always goes out, and the agent's author gets one warning per kind of mistake.

This runs on the caller's thread, but only for arguments actually given: a bare ``heartbeat()``
never enters this module.
"""

from __future__ import annotations

import hashlib
import math
import operator
from typing import Any, Final

from agentwatch.codec import MAX_DEPTH, MAX_TEXT_CHARS
from producers._guard import warn_once
from producers._usage import usage_fields

RESERVED: Final = frozenset(
    {
        "v", "agent", "kind", "ts", "run", "seq", "interval", "pid", "host", "version",
        "tokens", "tokens_in", "tokens_out", "cost", "model", "fp", "rss", "stack",
        "extend", "dropped", "code", "reason", "error", "traceback",
    }
)  # fmt: skip
"""Protocol keys: never accepted as meta, whatever their value, so meta cannot forge them."""

MAX_COUNT: Final = 2**63
MAX_ITEMS: Final = 256
"""Items kept per meta list or map; an event is capped at 8 KB anyway."""
MAX_KEY_CHARS: Final = 128
_DROP: Final = object()


def add_work_fields(
    event: dict[str, Any],
    *,
    tokens: Any,
    tokens_in: Any,
    tokens_out: Any,
    cost: Any,
    model: Any,
    fp: Any,
    usage: Any,
) -> None:
    """Validate the named ``heartbeat()`` arguments into ``event`` (explicit beats ``usage``)."""
    if usage is not None:
        event.update(usage_fields(usage))
    if tokens is not None:
        _put(event, "tokens", count("tokens", tokens))
    if tokens_in is not None:
        _put(event, "tokens_in", count("tokens_in", tokens_in))
    if tokens_out is not None:
        _put(event, "tokens_out", count("tokens_out", tokens_out))
    if "tokens" not in event and ("tokens_in" in event or "tokens_out" in event):
        event["tokens"] = event.get("tokens_in", 0) + event.get("tokens_out", 0)
    if cost is not None:
        _put(event, "cost", amount("cost", cost))
    if model is not None:
        _put(event, "model", _model(model))
    if fp is not None:
        event["fp"] = fingerprint(fp)


def count(name: str, value: Any) -> int | None:
    """``value`` as an int >= 0, or ``None`` (with a warning) when it is not one."""
    number: int | None = None
    if value.__class__ is int:
        number = value
    elif isinstance(value, float):
        number = int(value) if value.is_integer() else None
    elif not isinstance(value, (bool, str, bytes)):
        try:
            number = operator.index(value)  # numpy integers and friends
        except TypeError:
            number = None
    if number is None:
        warn_once(f"arg:{name}:type", "agentwatch: heartbeat(%s=%s) is not an integer; field "
                  "dropped", name, _short(value))  # fmt: skip
        return None
    if not 0 <= number < MAX_COUNT:
        warn_once(f"arg:{name}:range", "agentwatch: heartbeat(%s=%s) is negative or too large; "
                  "field dropped", name, _short(value))  # fmt: skip
        return None
    return number


def amount(name: str, value: Any) -> float | None:
    """``value`` as a finite float >= 0, or ``None`` (with a warning)."""
    number = math.nan
    if not isinstance(value, (bool, str, bytes)):
        try:
            number = float(value)  # int, float, Decimal, Fraction, numpy floats
        except (TypeError, ValueError, OverflowError):
            number = math.nan
    if 0 <= number < math.inf:
        return number
    warn_once(f"arg:{name}", "agentwatch: %s=%s is not a finite number >= 0; field dropped",
              name, _short(value))  # fmt: skip
    return None


def fingerprint(value: Any) -> str:
    """A work-item fingerprint as text; long ones are hashed so distinct items stay distinct."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) > MAX_TEXT_CHARS:
        return "sha256:" + hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()
    return text


def clean_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """Meta keyword arguments reduced to what msgpack, the codec and a JSON alert can carry."""
    cleaned: dict[str, Any] = {}
    for key, value in meta.items():
        if key in RESERVED:
            warn_once(f"meta:reserved:{key}", "agentwatch: %r is a protocol key and cannot be "
                      "used as meta; dropped", key)  # fmt: skip
            continue
        if len(key) > MAX_KEY_CHARS:
            warn_once("meta:key", "agentwatch: a meta key over %d chars was dropped",
                      MAX_KEY_CHARS)  # fmt: skip
            continue
        kept = _clean(value, 1)
        if kept is not _DROP:
            cleaned[key] = kept
    return cleaned


def _clean(value: Any, depth: int) -> Any:
    cls = value.__class__
    if value is None or cls is bool or (cls is str and len(value) <= MAX_TEXT_CHARS):
        return value
    if cls is int:
        if -MAX_COUNT <= value < 2 * MAX_COUNT:
            return value
        return _dropped("meta:int", "agentwatch: a meta integer outside 64 bits was dropped")
    if cls is float:
        if math.isfinite(value):
            return value
        return _dropped("meta:float", "agentwatch: a NaN or infinite meta value was dropped")
    if isinstance(value, str):
        warn_once("meta:str", "agentwatch: a meta string over %d chars was truncated",
                  MAX_TEXT_CHARS)  # fmt: skip
        return str(value[:MAX_TEXT_CHARS])
    if isinstance(value, (list, tuple, dict)):
        if depth > MAX_DEPTH:
            return _dropped("meta:depth", f"agentwatch: meta nested deeper than {MAX_DEPTH} "
                            "levels was dropped")  # fmt: skip
        if len(value) > MAX_ITEMS:
            warn_once("meta:items", "agentwatch: a meta list or map over %d items was cut",
                      MAX_ITEMS)  # fmt: skip
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            for key, item in list(value.items())[:MAX_ITEMS]:
                kept = _clean(item, depth + 1)
                if isinstance(key, str) and kept is not _DROP:
                    out[key[:MAX_KEY_CHARS]] = kept
            return out
        items = (_clean(item, depth + 1) for item in list(value)[:MAX_ITEMS])
        return [item for item in items if item is not _DROP]
    if isinstance(value, (int, float)):  # subclasses: IntEnum, numpy float64...
        return _clean(int(value) if isinstance(value, int) else float(value), depth)
    return _dropped(f"meta:type:{cls.__name__}", f"agentwatch: a meta value of type "
                    f"{cls.__name__} cannot be serialised and was dropped")  # fmt: skip


def _dropped(kind: str, message: str) -> object:
    warn_once(kind, message)
    return _DROP


def _model(value: Any) -> str | None:
    if not isinstance(value, str):
        warn_once("arg:model", "agentwatch: model=%s is not a string; field dropped",
                  _short(value))  # fmt: skip
        return None
    return value[:MAX_TEXT_CHARS]


def _put(event: dict[str, Any], key: str, value: object) -> None:
    if value is not None:
        event[key] = value


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."
