"""Wire protocol v1: one msgpack map per stream entry, in the field ``d``.

This module is imported by the producer inside the agent's process, so it depends on nothing but
the standard library and msgpack (no pydantic, no numpy). It is also the worker hot path: every
event any detector sees went through :func:`decode`, so validation is written as a flat series
of cheap checks, with a cache of agent names already known to be valid.

PROTOCOL.md is the user-facing description of the same rules; keep the two in step.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, Final

import msgpack

from agentwatch.errors import InvalidEntry

VERSION: Final = 1
FIELD: Final = b"d"
"""The one field of every stream entry; its value is the msgpack map."""

KINDS: Final = frozenset({"start", "beat", "pulse", "exit"})
EXIT_REASONS: Final = frozenset({"exit", "exception", "signal", "shutdown"})

MAX_ENTRY_BYTES: Final = 8192
"""Size cap of one encoded event. A pulse with a trimmed stack fits comfortably."""
MAX_DEPTH: Final = 4
"""Nesting cap for meta values (maps and lists inside the event map)."""
MAX_AGENT_LEN: Final = 128
AGENT_RE: Final = re.compile(r"[A-Za-z0-9._:@/-]{1,128}")
"""The agent name charset. A name must also pass :func:`name_problem` (no leading ``-``, no
``.`` or ``..`` path segment), so it can never be read as an option or climb out of a path."""
_NAME_CHARS: Final = re.compile(r"[A-Za-z0-9._:@/-]+")
MAX_STACK_CHARS: Final = 4096
MAX_TEXT_CHARS: Final = 1024
"""Cap for free-text fields other than the stack (``error``, ``model``, ``fp``, ``run``...)."""

MAX_COUNT: Final = 2**53 - 1
"""Cap of every count (``tokens``, ``rss``, ``seq``, ``pid``, ...): the largest integer a double
holds exactly, so detectors' Lua scripts (numbers are doubles) and JavaScript readers see the
value that was sent. No real count comes near it; 2**63 from a buggy producer is refused."""
MAX_COST: Final = 1_000_000.0
"""Cap of ``cost`` (USD, one beat). No unit of work costs a million dollars: a bigger value is a
bug (tokens passed as cost), and would swamp every total and budget it is added to."""
MAX_SPAN_S: Final = 31_536_000.0
"""Cap of ``interval`` and ``extend`` in seconds (365 days): anything longer is a bug in the
producer (milliseconds sent as seconds), and would park an agent's timers for ever."""

Event = dict[str, Any]

# Keys with a fixed meaning and the checks they get; everything else is meta (size/depth only).
TOKEN_CLASSES: Final = ("tokens_cache_read", "tokens_cache_write", "tokens_reasoning")
"""Shares of ``tokens_in`` (cache reads and writes) and ``tokens_out`` (reasoning), priced at
their own rates (PROTOCOL.md)."""
_COUNTS: Final = ("tokens", "tokens_in", "tokens_out", *TOKEN_CLASSES, "rss", "seq", "pid", "pid_start")
_SPANS: Final = ("interval", "extend")
_TEXTS: Final = ("model", "fp", "error", "host", "version")

_valid_agents: set[str] = set()
_VALID_AGENTS_MAX: Final = 200_000


def encode(event: Event) -> bytes:
    """Pack an event map. The producer sanitises before calling; workers never re-encode."""
    packed: bytes = msgpack.packb(event, use_bin_type=True)
    return packed


def encoder() -> Callable[[Event], bytes]:
    """:func:`encode` for a caller that packs many events from one thread at a time (a writer
    under its lock): one packer reused, a third cheaper per event than a packer per call."""
    pack: Callable[[Event], bytes] = msgpack.Packer(use_bin_type=True).pack
    return pack


def decode(raw: bytes) -> Event:
    """Unpack and validate one entry's ``d`` field, or raise :class:`InvalidEntry` with a reason.

    Unknown keys are kept (forward compatibility: a newer producer may send more), but they are
    still bounded in size and depth so that a hostile entry cannot cost a worker more than
    ``MAX_ENTRY_BYTES`` of work.
    """
    if len(raw) > MAX_ENTRY_BYTES:
        raise InvalidEntry(f"entry is {len(raw)} bytes, over the {MAX_ENTRY_BYTES}-byte cap")
    try:
        # Defaults are raw=False, strict_map_key=True; passing them as kwargs costs ~15%.
        event = msgpack.unpackb(raw)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise InvalidEntry(f"not msgpack ({detail})") from None
    if event.__class__ is not dict:
        raise InvalidEntry(f"not a msgpack map but {type(event).__name__}")
    validate(event)
    return event


def validate(event: Event) -> None:
    """Check one decoded event against protocol v1; raise :class:`InvalidEntry` on the first fault."""
    try:
        version, agent, kind = event["v"], event["agent"], event["kind"]
        ts, run, seq = event["ts"], event["run"], event["seq"]
    except KeyError as missing:
        raise InvalidEntry(f"missing key {missing.args[0]!r}") from None
    if version != VERSION or version.__class__ is not int:
        raise InvalidEntry(f"unsupported protocol version {_short(version)} (expected {VERSION})")
    if agent.__class__ is not str or agent not in _valid_agents:
        check_agent(agent)
        if len(_valid_agents) >= _VALID_AGENTS_MAX:
            _valid_agents.clear()
        _valid_agents.add(agent)
    if kind.__class__ is not str or kind not in KINDS:
        raise InvalidEntry(f"unknown kind {_short(kind)} (expected one of {sorted(KINDS)})")
    # One chained comparison per number: it refuses NaN too (every comparison with NaN is
    # false) and costs less than a math.isfinite call.
    if (ts.__class__ is not float and ts.__class__ is not int) or not 0 <= ts < math.inf:
        raise InvalidEntry(f"'ts' must be a finite number >= 0, got {_short(ts)}")
    if run.__class__ is not str or not 0 < len(run) <= 64:
        raise InvalidEntry(f"'run' must be a string of 1-64 chars, got {_short(run)}")
    if seq.__class__ is not int or not 0 <= seq <= MAX_COUNT:
        _check_count("seq", seq)
    if kind == "exit":
        reason = event.get("reason")
        if reason.__class__ is not str or reason not in EXIT_REASONS:
            raise InvalidEntry(f"exit 'reason' must be one of {sorted(EXIT_REASONS)}, got {_short(reason)}")
    size = len(event)
    if size == _REQUIRED_COUNT:
        return
    # This function is the workers' hot path: the keys of a typical beat are checked inline
    # (a Python function call costs as much as the check), everything else in _check_rest.
    seen = _REQUIRED_COUNT
    tokens = event.get("tokens")
    if tokens is not None:
        seen += 1
        if tokens.__class__ is not int or not 0 <= tokens <= MAX_COUNT:
            _check_count("tokens", tokens)
    cost = event.get("cost")
    if cost is not None:
        seen += 1
        if (cost.__class__ is not float and cost.__class__ is not int) or not 0 <= cost <= MAX_COST:
            _check_cost("cost", cost)
    model = event.get("model")
    if model is not None:
        seen += 1
        if model.__class__ is not str or len(model) > MAX_TEXT_CHARS:
            _check_text("model", model)
    fp = event.get("fp")
    if fp is not None:
        seen += 1
        if fp.__class__ is not str or len(fp) > MAX_TEXT_CHARS:
            _check_text("fp", fp)
    if size > seen:
        _check_rest(event)


def check_agent(agent: object) -> str:
    """Return ``agent`` if it is a valid agent name, else raise :class:`InvalidEntry`.

    The rules (:func:`name_problem`) keep names safe to put in Redis keys, file names, shell argv
    elements and PagerDuty sources without quoting: a restart command's ``{agent}`` can be
    neither an option (``-oProxyCommand=...``) nor a path out of its directory (``../evil``).
    """
    if agent.__class__ is not str:
        raise InvalidEntry(f"'agent' must be a string, got {_short(agent)}")
    assert isinstance(agent, str)
    problem = name_problem(agent)
    if problem is not None:
        raise InvalidEntry(f"'agent' {problem}")
    return agent


def name_problem(name: str, max_len: int = MAX_AGENT_LEN) -> str | None:
    """What makes ``name`` unsafe as an agent name (or as a value the restart notifier puts into
    a command: ``{host}``, ``{run}``), or ``None``. PROTOCOL.md states the same rules."""
    if not 0 < len(name) <= max_len:
        return f"must be 1-{max_len} chars, got {len(name)}"
    if _NAME_CHARS.fullmatch(name) is None:
        return f"{_short(name)} has characters outside A-Za-z0-9._:@/-"
    if name[0] == "-":
        return f"{_short(name)} starts with '-' (it could be read as an option)"
    if "." in name and any(segment in (".", "..") for segment in name.split("/")):
        return f"{_short(name)} has a '.' or '..' path segment"
    return None


def entry_key(entry_id: bytes | str) -> tuple[int, int]:
    """A stream entry id ("<ms>-<seq>") as a pair that sorts as Redis orders entries."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def entry_ms(entry_id: bytes | str) -> int:
    """Redis server time (ms) at which an auto-id entry was added: detectors' only clock."""
    if isinstance(entry_id, bytes):
        return int(entry_id[: entry_id.index(b"-")])
    return int(entry_id[: entry_id.index("-")])


def drop_repeats(messages: list[tuple[bytes, Event]]) -> tuple[list[tuple[bytes, Event]], dict[str, int]]:
    """The batch without copies of an event read earlier in it (same agent, run and seq), and
    how many were dropped per agent.

    A producer that retries an XADD whose reply it never got, or a shell loop that repeats one
    event, writes copies with the same ``run`` and ``seq``: the redelivery rule (PROTOCOL.md)
    says they count once. Across batches the detectors' per-run high-water mark drops them;
    copies read in the *same* batch would be folded together before that mark is consulted, so
    they are dropped here, before any handler (detectors, the spend ledger, plugins) sees them.
    Exact copies only: a lower ``seq`` after a higher one is not a copy (another worker's
    reclaim may bring it) and is left to the high-water rule."""
    seen = {(ev["agent"], ev["run"], ev["seq"]) for _, ev in messages}
    if len(seen) == len(messages):  # the common case: nothing repeated, nothing to do
        return messages, {}
    kept: list[tuple[bytes, Event]] = []
    dropped: dict[str, int] = {}
    first: set[tuple[str, str, int]] = set()
    for message in messages:
        ev = message[1]
        key = (ev["agent"], ev["run"], ev["seq"])
        if key in first:
            dropped[key[0]] = dropped.get(key[0], 0) + 1
            continue
        first.add(key)
        kept.append(message)
    return kept, dropped


def _check_count(key: str, value: Any) -> None:
    if value.__class__ is not int or value < 0:
        raise InvalidEntry(f"'{key}' must be an integer >= 0, got {_short(value)}")
    if value > MAX_COUNT:
        raise InvalidEntry(f"'{key}' must be at most 2**53-1 ({MAX_COUNT}), got {_short(value)}")


def _check_amount(key: str, value: Any) -> None:
    if (value.__class__ is not float and value.__class__ is not int) or not (0 <= value < math.inf):
        raise InvalidEntry(f"'{key}' must be a finite number >= 0, got {_short(value)}")


def _check_cost(key: str, value: Any) -> None:
    _check_amount(key, value)
    if value > MAX_COST:
        raise InvalidEntry(f"'{key}' must be at most {MAX_COST:,.0f} (USD, one beat), got {_short(value)}")


def _check_span(key: str, value: Any) -> None:
    _check_amount(key, value)
    if value > MAX_SPAN_S:
        raise InvalidEntry(
            f"'{key}' must be at most {MAX_SPAN_S:.0f} seconds (365 days), got {_short(value)}"
        )


def _check_text(key: str, value: Any) -> None:
    if value.__class__ is not str or len(value) > MAX_TEXT_CHARS:
        raise InvalidEntry(f"'{key}' must be a string of at most {MAX_TEXT_CHARS} chars")


def _check_stack(key: str, value: Any) -> None:
    if value.__class__ is not str or len(value) > MAX_STACK_CHARS:
        raise InvalidEntry(f"'{key}' must be a string of at most {MAX_STACK_CHARS} chars")


def _check_code(key: str, value: Any) -> None:
    if value.__class__ is not int or not -MAX_COUNT <= value <= MAX_COUNT:
        raise InvalidEntry(f"'{key}' must be an integer within +-(2**53-1), got {_short(value)}")


def _check_reason(key: str, value: Any) -> None:
    if value.__class__ is not str:
        raise InvalidEntry(f"'{key}' must be a string, got {_short(value)}")


def _check_dropped(key: str, value: Any) -> None:
    if value.__class__ is not dict or not all(
        k.__class__ is str and v.__class__ is int and 0 <= v <= MAX_COUNT for k, v in value.items()
    ):
        raise InvalidEntry(f"'{key}' must map reason strings to counts from 0 to 2**53-1")


_CHECKS: Final = {
    **dict.fromkeys(_COUNTS, _check_count),
    "cost": _check_cost,
    **dict.fromkeys(_SPANS, _check_span),
    **dict.fromkeys(_TEXTS, _check_text),
    "stack": _check_stack,
    "traceback": _check_stack,
    "code": _check_code,
    "reason": _check_reason,
    "dropped": _check_dropped,
}
_REQUIRED: Final = frozenset({"v", "agent", "kind", "ts", "run", "seq"})
_REQUIRED_COUNT: Final = len(_REQUIRED)
_INLINE: Final = frozenset({"tokens", "cost", "model", "fp"})
"""Checked inline in :func:`validate`; :func:`_check_rest` skips them."""


def _check_rest(event: Event) -> None:
    """Every key but the required and inline ones: known keys by type, meta by depth."""
    for key, value in event.items():
        if key in _REQUIRED or key in _INLINE:
            continue
        check = _CHECKS.get(key)
        if check is not None:
            check(key, value)
        elif value.__class__ is dict or value.__class__ is list:
            _check_depth(key, value, 1)


def _check_depth(key: str, value: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise InvalidEntry(f"'{key}' is nested deeper than {MAX_DEPTH} levels")
    children = value.values() if value.__class__ is dict else value
    for child in children:
        if child.__class__ is dict or child.__class__ is list:
            _check_depth(key, child, depth + 1)


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
