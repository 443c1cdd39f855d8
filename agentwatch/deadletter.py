"""Dead letters: what is kept of an entry that could not be decoded or processed.

Each one is an entry of ``<prefix>:deadletter`` (PROTOCOL.md lists the fields): the reason, where
the entry was and who gave up on it, its size, and its original bytes up to
``[streams] deadletter_max_bytes`` (with ``truncated`` when cut), so it can be inspected and
replayed once the cause is fixed.
"""

from __future__ import annotations

from typing import Any

from agentwatch.errors import InvalidEntry


def letter(
    stream: str, entry_id: bytes, fields: Any, reason: str, *, group: str, consumer: str, cap: int
) -> dict[str, Any]:
    """The fields of the dead letter for one entry."""
    raw = _original_bytes(fields)
    out: dict[str, Any] = {
        "reason": reason,
        "stream": stream,
        "id": entry_id,
        "group": group,
        "consumer": consumer,
        "size": len(raw),
        "d": raw[:cap],
    }
    if len(raw) > cap:
        out["truncated"] = 1
    return out


def entry_field(fields: Any) -> bytes:
    """The ``d`` field's bytes from a flat [name, value, ...] list or a dict; InvalidEntry if absent."""
    pairs = _pairs(fields)
    value = pairs.get(b"d", pairs.get("d"))
    if value is None:
        names = ", ".join(repr(k.decode(errors="replace") if isinstance(k, bytes) else k) for k in pairs)
        names = names or "none"
        raise InvalidEntry(f"entry has no 'd' field (fields: {names})")
    return value if isinstance(value, bytes) else str(value).encode()


def _original_bytes(fields: Any) -> bytes:
    """What to keep of a dead entry: its ``d`` bytes, or all its fields when it has no ``d``."""
    pairs = _pairs(fields)
    value = pairs.get(b"d", pairs.get("d"))
    if isinstance(value, bytes):
        return value
    return repr(pairs).encode()


def _pairs(fields: Any) -> dict[Any, Any]:
    if isinstance(fields, dict):
        return fields
    if not fields:
        return {}
    it = iter(fields)
    return dict(zip(it, it, strict=False))
