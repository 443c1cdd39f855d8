"""The brake, pipeline side: halts in Redis, and the alerts that record who stopped what and why.

A halt names an agent or a glob (``scraper-*``) and holds until it is resumed or, with ``--for``,
until it expires. The producers of matching agents read it (producers/_halts.py) and from then
on every ``heartbeat()`` raises ``producers.Halted``. A halt stays in Redis with the rest of the
pipeline's state, so it survives worker restarts, and Redis restarts with persistence.

Storage: one hash per event stream (``Keys.halts``), all holding the same entries, each in its
stream's Cluster slot (see keys.py). Every change goes through one script per copy that also
replaces the ``#epoch`` token producers poll. Copy 0 is the record this module reads.

History: every halt fires an incident (detector ``halt``, severity ``info``, the pattern as its
agent) through :class:`~agentwatch.alerts.Incidents`, and every resume or expiry resolves it,
so ``agentwatch alerts`` and every notifier that matches ``halt`` see who halted what, why and
for how long. Halting a pattern again replaces the halt: the old incident resolves, a new one
fires.

Expiry: a halt given ``--for`` lapses at its end by itself on the agent's side (the producer
compares with the Redis clock); detector workers delete it and resolve its incident within a
second (:class:`HaltExpiry`), as do ``halt``, ``resume`` and ``halts`` when they read the hash.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Final

from agentwatch.alerts import PIPELINE_AGENT, Incidents
from agentwatch.codec import MAX_TEXT_CHARS
from agentwatch.config import format_duration
from agentwatch.handler import Handler
from agentwatch.keys import HALT_EPOCH_FIELD, Keys
from agentwatch.redisconn import Client, server_time_ms

DETECTOR: Final = "halt"
"""The ``detector`` of halt alerts."""
PATTERN_RE: Final = re.compile(r"[A-Za-z0-9._:@/*?\[\]!-]{1,128}")
"""An agent name, or a glob over agent names (``*``, ``?``, ``[...]``, ``[!...]``)."""
MAX_REASON_CHARS: Final = 500
_EXPIRE_EVERY_MS: Final = 1000

# KEYS[1]: one copy of the halts hash. ARGV[1], ARGV[2]: the epoch field and its new token;
# then triples of field, expected value ('*': whatever is there) and new value ('': delete).
# Returns how many entries changed.
_CHANGE: Final = """
local changed = 0
for i = 3, #ARGV, 3 do
  local current = redis.call('HGET', KEYS[1], ARGV[i])
  if ARGV[i + 1] == '*' or current == ARGV[i + 1] then
    if ARGV[i + 2] == '' then
      changed = changed + redis.call('HDEL', KEYS[1], ARGV[i])
    else
      redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
      changed = changed + 1
    end
  end
end
if changed > 0 then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return changed
"""


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot name agents, or None (agent names are 1-128 chars of
    ``A-Za-z0-9._:@/-``; globs add ``*?[]!``)."""
    if PATTERN_RE.fullmatch(pattern) is None:
        return (f"{pattern[:60]!r} is not an agent name or glob: 1-128 characters of A-Za-z0-9._:@/- "
                "and the glob characters * ? [ ] !")  # fmt: skip
    return None


def reason_problem(reason: str) -> str | None:
    """Reasons reach terminals, alerts and agents' logs: printable text only, bounded."""
    if len(reason) > MAX_REASON_CHARS:
        return f"at most {MAX_REASON_CHARS} characters, got {len(reason)}"
    if not reason.isprintable():
        return "printable text only (no control characters or line breaks)"
    return None


def is_glob(pattern: str) -> bool:
    return any(char in pattern for char in "*?[")


@dataclass(frozen=True)
class Halt:
    """One halt: agents matching ``pattern`` stop, from ``at_ms`` until ``until_ms`` (None: resumed)."""

    pattern: str
    reason: str
    by: str
    at_ms: int
    until_ms: int | None = None

    def covers(self, agent: str, now_ms: int) -> bool:
        return self.live(now_ms) and fnmatch.fnmatchcase(agent, self.pattern)

    def live(self, now_ms: int) -> bool:
        return self.until_ms is None or now_ms < self.until_ms

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Halt | None:
        try:
            data = json.loads(raw)
            until = data.get("until_ms")
            return cls(str(data["pattern"]), str(data["reason"]), str(data.get("by", "")),
                       int(data["at_ms"]), None if until is None else int(until))  # fmt: skip
        except (ValueError, TypeError, KeyError):
            return None  # hand-edited: ignored here, and by producers


class Halts:
    """The halts of one deployment, and their alerts."""

    def __init__(
        self, client: Client, keys: Keys, incidents: Incidents | None = None, *, secret: str | None = None
    ) -> None:
        self.client: Any = client
        self.keys = keys
        self.incidents = incidents or Incidents(client, keys, secret=secret)  # [security] secret: signs
        self._change = self.client.register_script(_CHANGE)

    def add(
        self, pattern: str, reason: str, *, by: str, for_s: float | None = None
    ) -> tuple[Halt, Halt | None]:
        """Halt agents matching ``pattern``; returns the halt and the one it replaced, if any.
        ``reason`` may be empty: the agents then read "halted by <by>"."""
        now = server_time_ms(self.client)
        told = reason or f"halted by {by or 'an operator'}"
        halt = Halt(pattern, told, by, now, None if for_s is None else now + round(for_s * 1000))
        previous = self._read().get(pattern)
        self._apply([(pattern, "*", halt.to_json())])
        if previous is not None:
            self._resolve(previous, now, f"{pattern}: halt replaced by a new one from {by or 'someone'}")
        until = "" if halt.until_ms is None else f" for {format_duration((halt.until_ms - now) / 1000)}"
        summary = f"{pattern}: halted{until} by {by or 'someone'}" + (f": {reason}" if reason else "")
        details = {"pattern": pattern, "reason": reason, "by": by, "until_ms": halt.until_ms}
        self.incidents.fire(pattern, DETECTOR, severity="info", summary=summary, at_ms=now, details=details)
        return halt, previous

    def remove(self, pattern: str, *, by: str) -> list[Halt]:
        """Lift the halts ``pattern`` names: the one given for exactly ``pattern``, and every one
        whose own pattern ``pattern`` matches as text (``resume "scraper-*"`` lifts the halts of
        ``scraper-1`` too; ``resume "*"`` lifts every halt)."""
        now = server_time_ms(self.client)
        gone = [
            h
            for h in self._read().values()
            if h.pattern == pattern or fnmatch.fnmatchcase(h.pattern, pattern)
        ]
        if gone:
            self._apply([(halt.pattern, "*", "") for halt in gone])
        for halt in gone:
            self._resolve(halt, now, f"{halt.pattern}: resumed by {by or 'someone'}")
        return gone

    def active(self, now_ms: int | None = None) -> list[Halt]:
        """The halts in force, oldest first; expired ones are deleted and resolved on the way."""
        now = server_time_ms(self.client) if now_ms is None else now_ms
        halts = self._read()
        self.expire(now, halts)
        return sorted((h for h in halts.values() if h.live(now)), key=lambda h: h.at_ms)

    def in_force(self, now_ms: int) -> list[Halt]:
        """The halts in force, read only (for views run with the read-only operator role)."""
        return sorted((h for h in self._read().values() if h.live(now_ms)), key=lambda h: h.at_ms)

    def halting(self, agent: str, now_ms: int | None = None) -> list[Halt]:
        """The halts in force that cover ``agent``."""
        return [halt for halt in self.active(now_ms) if fnmatch.fnmatchcase(agent, halt.pattern)]

    def expire(self, now_ms: int, halts: dict[str, Halt] | None = None) -> list[Halt]:
        """Delete the halts whose time is up and resolve their incidents (one winner per halt,
        however many workers race: the delete compares the exact entry it read)."""
        current = self._read() if halts is None else halts
        done = []
        for halt in current.values():
            if not halt.live(now_ms) and self._apply([(halt.pattern, halt.to_json(), "")]):
                self._resolve(halt, now_ms, f"{halt.pattern}: halt expired")
                done.append(halt)
        return done

    def _read(self) -> dict[str, Halt]:
        out = {}
        for field, raw in self.client.hgetall(self.keys.halts(0)).items():
            name = field.decode() if isinstance(field, bytes) else field
            halt = Halt.from_json(raw) if name != HALT_EPOCH_FIELD else None
            if halt is not None:
                out[name] = halt
        return out

    def _apply(self, changes: Iterable[tuple[str, str, str]]) -> int:
        """Run one change on every copy (same epoch token); how many entries copy 0 changed."""
        args = [HALT_EPOCH_FIELD, os.urandom(8).hex()] + [part for change in changes for part in change]
        changed = [int(self._change(keys=[key], args=args)) for key in self.keys.all_halts()]
        return changed[0]

    def _resolve(self, halt: Halt, now_ms: int, summary: str) -> None:
        details = {"pattern": halt.pattern, "reason": halt.reason, "by": halt.by}
        self.incidents.resolve(
            halt.pattern, DETECTOR, summary=summary[:MAX_TEXT_CHARS], at_ms=now_ms, details=details
        )


class HaltExpiry(Handler[Any]):
    """Detector-worker handler: expires halts given ``--for`` once a second (see module doc)."""

    name = "halts"

    def __init__(self, halts: Halts) -> None:
        self.halts = halts
        self._next_ms = 0

    def on_tick(self, now_ms: int) -> None:
        if now_ms < self._next_ms:
            return
        self._next_ms = now_ms + _EXPIRE_EVERY_MS
        self.halts.expire(now_ms)


def known_agents(client: Client, keys: Keys) -> list[str]:
    """Every agent the detectors keep state for (their checkpoints, detectors/checkpoint.py), sorted."""
    redis: Any = client
    names: set[str] = set()
    for shard in range(max(keys.shards, 1)):
        names.update(n.decode() if isinstance(n, bytes) else n for n in redis.hkeys(keys.states(shard)))
    names.discard(PIPELINE_AGENT)
    return sorted(names)
