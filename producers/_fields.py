"""Turn whatever the agent passed to ``heartbeat()`` into fields the codec will accept.

Every event this producer writes must pass :func:`agentwatch.codec.decode`: a field the pipeline
would reject (``tokens=-5``) would send the whole beat to the dead-letter stream, and a lost beat
looks exactly like a stalled agent. So a bad field is dropped (or trimmed) here, the beat itself
always goes out, and the agent's author gets one warning per kind of mistake.

This runs on the caller's thread, but only for arguments actually given: a bare ``heartbeat()``
never enters this module. Its cost is bounded whatever the caller passes: meta is walked under a
per-call budget (:data:`META_ITEMS` values, about :data:`META_BYTES` encoded bytes), and a value
that does not fit is dropped as soon as the walk runs past the budget, so a parsed 400 KB API
response passed as meta costs tens of microseconds, not a copy of the response.
"""

from __future__ import annotations

import hashlib
import math
import operator
from itertools import islice
from typing import Any, Final

from agentwatch.codec import MAX_COST, MAX_COUNT, MAX_DEPTH, MAX_ENTRY_BYTES, MAX_TEXT_CHARS, TOKEN_CLASSES
from producers._guard import warn_once
from producers._usage import usage_fields

RESERVED: Final = frozenset(
    {
        "v", "agent", "kind", "ts", "run", "seq", "interval", "pid", "host", "version",
        "tokens", "tokens_in", "tokens_out", "cost", "model", "fp", "rss", "stack",
        "extend", "dropped", "code", "reason", "error", "traceback", "labels", "parent",
        *TOKEN_CLASSES,
    }
)  # fmt: skip
"""Protocol keys: never accepted as meta, whatever their value, so meta cannot forge them (the
token classes, ``heartbeat(tokens_cache_read=...)``, are taken as counts instead)."""

META_INT_MIN: Final = -(2**63)
META_INT_END: Final = 2**64
"""Meta integers must fit msgpack's 64 bits, signed or unsigned: from META_INT_MIN up to here."""
MAX_ITEMS: Final = 256
"""Items kept per meta list or map."""
MAX_KEY_CHARS: Final = 128
META_BYTES: Final = MAX_ENTRY_BYTES - 1024
"""Approximate encoded bytes of meta one beat may carry: what is left of the 8 KiB event cap
after the envelope and the work fields."""
META_ITEMS: Final = 512
"""Values (scalars and containers, at any depth) of meta one beat may carry."""
WORK_FACTOR: Final = 1
"""Once a call has walked this many budgets' worth of values (counting those of values it had
to drop), meta containers left are dropped unread (plain values still go in if they fit): at
most about twice the budget is ever walked."""
_DROP: Final = object()


class _OverBudget(Exception):
    """The value being walked does not fit what is left of this call's budget."""


class _Budget:
    """What this call may still keep: values and approximate encoded bytes."""

    __slots__ = ("bytes", "items")

    def __init__(self) -> None:
        self.bytes = META_BYTES
        self.items = META_ITEMS


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
) -> int:
    """Validate the named ``heartbeat()`` arguments into ``event`` (explicit beats ``usage``).

    Returns the approximate encoded size of the text fields it added (``model``, ``fp``).
    """
    if usage is not None:
        event.update(usage_fields(usage))
    total_given = False
    split_given = False
    if tokens is not None:
        total_given = _put(event, "tokens", count("tokens", tokens))
    if tokens_in is not None:
        split_given = _put(event, "tokens_in", count("tokens_in", tokens_in))
    if tokens_out is not None:
        split_given = _put(event, "tokens_out", count("tokens_out", tokens_out)) or split_given
    derive = split_given or "tokens" not in event
    if not total_given and derive and ("tokens_in" in event or "tokens_out" in event):
        # The total follows the split, also when an explicit tokens_in/out overrides what
        # `usage` said: {usage: 5+6, tokens_out=60} is 65 tokens, not usage's 11.
        total = event.get("tokens_in", 0) + event.get("tokens_out", 0)
        if total <= MAX_COUNT:
            event["tokens"] = total
        else:
            event.pop("tokens", None)
            _too_large("tokens", total)
    size = 0
    if cost is not None:
        _put(event, "cost", amount("cost", cost, MAX_COST))
    if model is not None and _put(event, "model", _model(model)):
        size += len(event["model"])
    if fp is not None and _put(event, "fp", fingerprint(fp)):
        size += len(event["fp"])
    return size


def count(name: str, value: Any) -> int | None:
    """``value`` as an int from 0 to 2**53 - 1, or ``None`` (with a warning) when it is not one."""
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
    if number < 0:
        warn_once(f"arg:{name}:range", "agentwatch: heartbeat(%s=%s) is negative; field dropped",
                  name, _short(value))  # fmt: skip
        return None
    if number > MAX_COUNT:
        _too_large(name, value)
        return None
    return number


def amount(name: str, value: Any, cap: float = math.inf) -> float | None:
    """``value`` as a finite float >= 0 (and at most ``cap``), or ``None`` (with a warning)."""
    number = math.nan
    if not isinstance(value, (bool, str, bytes)):
        try:
            number = float(value)  # int, float, Decimal, Fraction, numpy floats
        except (TypeError, ValueError, OverflowError):
            number = math.nan
    if 0 <= number < math.inf:
        if number <= cap:
            return number
        warn_once(f"arg:{name}:cap", "agentwatch: %s=%s is over %s, more than any unit of work "
                  "costs (tokens passed as cost?); field dropped",
                  name, _short(value), f"{cap:,.0f}")  # fmt: skip
        return None
    warn_once(f"arg:{name}", "agentwatch: %s=%s is not a finite number >= 0; field dropped",
              name, _short(value))  # fmt: skip
    return None


def fingerprint(value: Any) -> str | None:
    """A work-item fingerprint as text; long ones are hashed so distinct items stay distinct.

    ``None`` (with a warning) when the object cannot even be shown: its ``repr()`` raised.
    """
    if value.__class__ is str:
        text = value
    else:
        try:
            text = str.__str__(value) if isinstance(value, str) else repr(value)
        except Exception as exc:  # a broken __repr__ must cost the field, never the beat
            warn_once("arg:fp", "agentwatch: heartbeat(fp=<%s>): repr() raised %s; field dropped",
                      type(value).__name__, type(exc).__name__)  # fmt: skip
            return None
    if len(text) > MAX_TEXT_CHARS:
        return "sha256:" + hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()
    return text


def clean_meta(meta: dict[str, Any], into: dict[str, Any]) -> int:
    """Put meta keyword arguments into ``into``, reduced to what msgpack, the codec and a JSON
    alert can carry and cut to this call's budget; returns their approximate encoded size."""
    budget = _Budget()
    walked = 0
    for key, value in meta.items():
        if key in RESERVED:
            if key in TOKEN_CLASSES:  # a share of tokens_in/tokens_out given by hand: a count
                _put(into, key, count(key, value))
                continue
            warn_once(f"meta:reserved:{key}", "agentwatch: %r is a protocol key and cannot be "
                      "used as meta; dropped", key)  # fmt: skip
            continue
        if len(key) > MAX_KEY_CHARS:
            warn_once("meta:key", "agentwatch: a meta key over %d chars was dropped",
                      MAX_KEY_CHARS)  # fmt: skip
            continue
        if walked >= META_ITEMS * WORK_FACTOR and not _scalar_cost(value):
            _over_budget()  # enough walked for one beat: no more containers are looked at
            continue
        kept_bytes, kept_items = budget.bytes, budget.items
        try:
            budget.bytes -= len(key) + 2
            kept = _clean(value, 1, budget)
        except _OverBudget:
            _over_budget()
            kept = _DROP
        except RuntimeError:  # "dictionary changed size during iteration": another thread
            warn_once("meta:changed", "agentwatch: a meta value changed while it was read "
                      "(another thread?) and was dropped")  # fmt: skip
            kept = _DROP
        walked += kept_items - budget.items
        if kept is _DROP:
            budget.bytes, budget.items = kept_bytes, kept_items  # what was walked is not kept
        else:
            into[key] = kept
    return META_BYTES - budget.bytes


def _over_budget() -> None:
    warn_once("meta:budget", "agentwatch: a meta value too large for one beat (over ~%d KiB "
              "encoded or %d values in all) was dropped; pass a summary, not the whole object",
              META_BYTES // 1024, META_ITEMS)  # fmt: skip


def _clean(value: Any, depth: int, budget: _Budget) -> Any:
    """``value`` as plain data, ``_DROP``, or :class:`_OverBudget` once the budget runs out."""
    cost = _scalar_cost(value)
    if cost:
        budget.items -= 1
        budget.bytes -= cost
        if budget.items < 0 or budget.bytes < 0:
            raise _OverBudget
        return value
    cls = value.__class__
    if cls is str:  # over MAX_TEXT_CHARS
        warn_once("meta:str", "agentwatch: a meta string over %d chars was truncated",
                  MAX_TEXT_CHARS)  # fmt: skip
        return _clean(value[:MAX_TEXT_CHARS], depth, budget)
    if cls is int:
        return _dropped("meta:int", "agentwatch: a meta integer outside 64 bits was dropped")
    if cls is float:
        return _dropped("meta:float", "agentwatch: a NaN or infinite meta value was dropped")
    if isinstance(value, (list, tuple, dict)):
        return _container(value, depth, budget)
    if isinstance(value, str):  # str subclasses (StrEnum...): as plain text
        return _clean(str.__str__(value), depth, budget)
    if isinstance(value, float):  # float subclasses: numpy float64...
        return _clean(float(value), depth, budget)
    if not isinstance(value, bool):
        try:
            number = operator.index(value)  # int subclasses (IntEnum), numpy integers
        except TypeError:
            pass
        else:
            return _clean(int(number), depth, budget)
    return _dropped(f"meta:type:{cls.__name__}", f"agentwatch: a meta value of type "
                    f"{cls.__name__} cannot be serialised and was dropped")  # fmt: skip


def _scalar_cost(value: Any) -> int:
    """Approximate encoded bytes of a plain scalar the codec accepts as is; 0 for anything else.

    :func:`_container` spells the same checks out inline: a call per item would double the cost
    of walking a big value up to the budget.
    """
    cls = value.__class__
    if cls is str:
        if len(value) <= MAX_TEXT_CHARS:
            return len(value) + 3 if value.isascii() else 3 * len(value) + 3
        return 0
    if cls is int:
        return 9 if META_INT_MIN <= value < META_INT_END else 0
    if cls is float:
        return 9 if value - value == 0.0 else 0  # finite (inf - inf and nan - nan are nan)
    return 1 if value is None or cls is bool else 0


def _container(value: list[Any] | tuple[Any, ...] | dict[Any, Any], depth: int, budget: _Budget) -> Any:
    if depth > MAX_DEPTH:
        return _dropped("meta:depth", f"agentwatch: meta nested deeper than {MAX_DEPTH} "
                        "levels was dropped")  # fmt: skip
    size = len(value)
    if size > MAX_ITEMS:
        warn_once("meta:items", "agentwatch: a meta list or map over %d items was cut",
                  MAX_ITEMS)  # fmt: skip
        size = MAX_ITEMS
    budget.items -= 1
    budget.bytes -= 3
    if size > budget.items or budget.bytes < 0:
        raise _OverBudget  # every item costs at least one: no need to walk it to know
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        pairs = value.items() if size == len(value) else islice(value.items(), MAX_ITEMS)
        for key, item in pairs:  # never a copy of a huge map
            if key.__class__ is not str:
                if not isinstance(key, str):
                    continue  # JSON and msgpack maps here have text keys
                key = str.__str__(key)  # noqa: PLW2901
            name = key[:MAX_KEY_CHARS]
            cls = item.__class__
            if cls is str and len(item) <= MAX_TEXT_CHARS:
                cost = len(item) + 3 if item.isascii() else 3 * len(item) + 3
            elif (cls is int and META_INT_MIN <= item < META_INT_END) or (
                cls is float and item - item == 0.0
            ):
                cost = 9
            elif item is None or cls is bool:
                cost = 1
            else:
                budget.bytes -= len(name) + 2
                if cls is list or cls is dict or cls is tuple:
                    kept = _container(item, depth + 1, budget)
                else:
                    kept = _clean(item, depth + 1, budget)
                if kept is not _DROP:
                    out[name] = kept
                continue
            budget.items -= 1
            budget.bytes -= cost + len(name) + 2
            if budget.items < 0 or budget.bytes < 0:
                raise _OverBudget
            out[name] = item
        return out
    items: list[Any] = []
    append = items.append
    for item in value if size == len(value) else value[:MAX_ITEMS]:
        cls = item.__class__
        if cls is str and len(item) <= MAX_TEXT_CHARS:
            cost = len(item) + 3 if item.isascii() else 3 * len(item) + 3
        elif (cls is int and META_INT_MIN <= item < META_INT_END) or (cls is float and item - item == 0.0):
            cost = 9
        elif item is None or cls is bool:
            cost = 1
        else:
            if cls is list or cls is dict or cls is tuple:
                kept = _container(item, depth + 1, budget)
            else:
                kept = _clean(item, depth + 1, budget)
            if kept is not _DROP:
                append(kept)
            continue
        budget.items -= 1
        budget.bytes -= cost
        if budget.items < 0 or budget.bytes < 0:
            raise _OverBudget
        append(item)
    return items


def _dropped(kind: str, message: str) -> object:
    warn_once(kind, message)
    return _DROP


def _model(value: Any) -> str | None:
    if not isinstance(value, str):
        warn_once("arg:model", "agentwatch: model=%s is not a string; field dropped",
                  _short(value))  # fmt: skip
        return None
    return value[:MAX_TEXT_CHARS]  # a plain str, also for a str subclass


def _put(event: dict[str, Any], key: str, value: object) -> bool:
    if value is None:
        return False
    event[key] = value
    return True


def _too_large(name: str, value: Any) -> None:
    warn_once(f"arg:{name}:cap", "agentwatch: heartbeat(%s=%s) is over 2**53 - 1, the largest "
              "count the pipeline holds exactly; field dropped", name, _short(value))  # fmt: skip


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."
