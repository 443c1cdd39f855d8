"""The brake, agent side: learn on the sender thread that this agent is halted; raise in the loop.

``agentwatch halt "scraper-*" --reason ...`` writes the halt into a small hash in Redis (see
``agentwatch/halts.py``), one copy per event stream, kept in that stream's Cluster slot so the
sender reads it on the connection it already has. The hash carries an *epoch* field that every
change replaces with a new random token, so the sender's check costs one ``HGET`` of a few bytes:

* it rides at the end of every batch the sender delivers anyway (no extra round trip while the
  agent beats), and
* while the agent is idle (no batch for ``halt_interval``, 1 s), it goes alone: one small read
  per second, and the sender's only wake-up between pulses.

Only when the epoch differs from the one last seen does the sender read the whole hash (with
``TIME``, so a halt's expiry is judged on the Redis clock, never the host's), match each pattern
against its agent name, and hand the halts that cover it to the producer. ``heartbeat()`` then
raises :class:`Halted` after queueing the beat (its spending is still reported), until every
halt covering the agent is lifted or has expired.
"""

from __future__ import annotations

import fnmatch
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from redis.exceptions import ResponseError

from agentwatch.keys import HALT_EPOCH_FIELD as EPOCH_FIELD
from producers._guard import warn_once


class Halted(Exception):
    """This agent was halted (``agentwatch halt``, or a budget): finish the current item, save
    what must be saved, and stop. Raised by every ``heartbeat()`` until the halt is lifted."""

    def __init__(self, reason: str, pattern: str = "") -> None:
        super().__init__(reason or "halted")
        self.reason = reason
        """Why, as the operator (or the budget) put it."""
        self.pattern = pattern
        """The agent name or glob the halt was given for."""


@dataclass(frozen=True, slots=True)
class Halt:
    """One halt covering this agent, as the producer holds it."""

    reason: str
    pattern: str
    created_ms: int
    until: float
    """``time.monotonic()`` at which it expires (``inf``: only a resume lifts it)."""


def _command(*parts: str) -> bytes:
    encoded = [part.encode() for part in parts]
    return b"*%d\r\n" % len(encoded) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in encoded)


class HaltWatch:
    """The sender's view of the halts hash of one agent (see the module docstring)."""

    def __init__(
        self, agent: str, key: str, interval: float, publish: Callable[[tuple[Halt, ...]], None]
    ) -> None:
        self.agent = agent
        self.interval = interval
        self.poll = _command("HGET", key, EPOCH_FIELD)
        """The one small read, packed: appended to batches, or sent alone when idle."""
        self.read_all = [_command("HGETALL", key), _command("TIME")]
        self._publish = publish
        self._epoch: object = _UNREAD
        self.next_poll = 0.0
        """``time.monotonic()`` after which the idle sender polls by itself."""

    def polled(self, reply: Any, now: float) -> bool:
        """Note a poll's reply; True when the whole hash must be read (:meth:`read`)."""
        self.next_poll = now + self.interval
        if isinstance(reply, BaseException):
            if not isinstance(reply, ResponseError):
                return False  # a transport error: the batches' own path reports the outage
            warn_once("halts:read", "agentwatch: cannot read the halts in Redis (%s); this agent "
                      "cannot be halted until it can (an ACL without read access to "
                      "<prefix>:halt:*?)", reply)  # fmt: skip
            return False
        if reply == self._epoch:
            return False
        if reply is None:  # no hash: nothing halted (and nothing to read)
            self._epoch = None
            self._publish(())
            return False
        return True

    def read(self, replies: list[Any] | BaseException, now: float) -> None:
        """Apply the replies of :attr:`read_all` (HGETALL, TIME), read at ``now`` (monotonic)."""
        if isinstance(replies, BaseException):  # Redis went away: try again at the next poll
            return
        entries, clock = replies
        if isinstance(entries, BaseException) or isinstance(clock, BaseException):
            self.polled(entries if isinstance(entries, BaseException) else clock, now)
            return
        if isinstance(entries, dict):  # RESP3
            pairs: Any = entries.items()
        else:
            pairs = zip(entries[::2], entries[1::2], strict=True)
        server_ms = int(clock[0]) * 1000 + int(clock[1]) // 1000
        found: list[Halt] = []
        epoch: object = None
        for raw_field, raw_value in pairs:
            field = raw_field.decode() if isinstance(raw_field, bytes) else str(raw_field)
            if field == EPOCH_FIELD:
                epoch = raw_value
                continue
            if not fnmatch.fnmatchcase(self.agent, field):
                continue
            halt = _parse(field, raw_value, server_ms, now)
            if halt is not None:
                found.append(halt)
        self._epoch = epoch
        found.sort(key=lambda halt: halt.created_ms)
        self._publish(tuple(found))


def _parse(pattern: str, raw: Any, server_ms: int, now: float) -> Halt | None:
    """One entry of the hash, or None when it is malformed (hand-edited) or already expired."""
    try:
        data = json.loads(raw)
        reason = str(data.get("reason") or "")
        created = int(data.get("at_ms") or 0)
        until_ms = data.get("until_ms")
        until = math.inf if until_ms is None else now + (int(until_ms) - server_ms) / 1000
    except (ValueError, TypeError, AttributeError):
        warn_once("halts:entry", "agentwatch: a halt entry for %r is not valid JSON; ignored", pattern)
        return None
    return Halt(reason, pattern, created, until) if until > now else None


def current(halts: tuple[Halt, ...]) -> Halt | None:
    """The newest halt still in force, or None (expired ones lapse here, on the agent's clock)."""
    now = time.monotonic()
    live = [halt for halt in halts if halt.until > now]
    return live[-1] if live else None


_UNREAD: Final = object()
