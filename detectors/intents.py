"""From a decision in Lua to an alert on the stream: exactly once per transition, in order.

Detectors decide inside Lua scripts (the batch update, the timer checks), because only there
can "is the agent's silence incident open?" and "open it" be one atomic step across workers.
But an alert is published by :class:`agentwatch.alerts.Incidents` from Python. Between the two a
worker can die, and two workers can hold decisions about the same incident (one fired, the other
saw the agent come back and resolved). So decisions are not published directly:

1. The deciding script appends each decision ("op") to the shard's ``intents`` hash under
   ``<agent>/<detector>``, in decision order, and takes a lease on that entry for its worker if
   nobody holds one.
2. The lease holder publishes the ops in order through ``Incidents`` (rendering each op's facts
   into a summary), marks each one done as it goes, and deletes the entry when none is left.
   Ops appended meanwhile by another worker are picked up before the lease is released.
3. A worker that dies leaves its entry leased; once the lease expires any worker's sweep takes
   it over and carries on from the first op not marked done.

So every transition is published once and fire/resolve never swap. The one remaining duplicate is
a worker frozen for longer than the lease in the middle of publishing, whose op is then
published by the sweep as well; ``Incidents`` ignores a second firing of an open incident, so
only a fire re-published after its own resolve would show twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, Final

from agentwatch.alerts import Incidents
from agentwatch.keys import Keys
from agentwatch.redisconn import RECOVERABLE

log = logging.getLogger("agentwatch.detectors.intents")

LEASE_MS: Final = 10_000
"""How long a worker may take to publish what it decided before another worker takes over (at
most; see :func:`lease_for`)."""


def lease_for(claim_idle_s: float) -> int:
    """The lease in ms for a pipeline whose workers count as dead after ``[worker] claim_idle``:
    never longer than that (a dead worker's decisions are not held back longer than its
    entries), never shorter than a second (a busy worker keeps what it decided)."""
    return min(LEASE_MS, max(1000, int(claim_idle_s * 1000)))


Render = Callable[[str, str, dict[str, Any]], tuple[str, str, dict[str, Any]]]
"""(agent, detector, op) -> (severity, summary, details) for one op."""

# Included in every deciding script. ``emit`` collects ops while the script decides; the
# script calls ``flush_ops`` last, so a script that fails half-way writes no op at all.
LUA_EMIT: Final = """
local OPS, OPS_ORDER = {}, {}
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function emit(agent, det, o, at, facts)
  local k = agent .. '/' .. det
  local list = OPS[k]
  if not list then list = {}; OPS[k] = list; OPS_ORDER[#OPS_ORDER + 1] = k end
  list[#list + 1] = {o = o, at = at, f = facts}
end
local function flush_ops(intents_key, owner, lease)
  local owned = {}
  if #OPS_ORDER == 0 then return owned end
  local now = now_ms()
  for _, k in ipairs(OPS_ORDER) do
    local raw = redis.call('HGET', intents_key, k)
    local doc
    if raw then doc = cjson.decode(raw) else doc = {ops = {}, done = 0, owner = '', ['until'] = 0} end
    for _, op in ipairs(OPS[k]) do doc.ops[#doc.ops + 1] = op end
    if doc.owner == '' or doc['until'] < now or doc.owner == owner then
      doc.owner = owner
      doc['until'] = now + lease
      owned[#owned + 1] = k
    end
    redis.call('HSET', intents_key, k, cjson.encode(doc))
  end
  return owned
end
"""

_HEAD: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return -1 end
local doc = cjson.decode(raw)
"""
# ARGV: key, owner, done count, lease. 1 = recorded; 0 = the lease was lost.
_PROGRESS: Final = (
    _HEAD
    + """
if doc.owner ~= ARGV[2] then return 0 end
doc.done = tonumber(ARGV[3])
doc['until'] = now + tonumber(ARGV[4])
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(doc))
return 1
"""
)
# ARGV: key, owner. 1 = all published and deleted; 0 = more ops arrived (still ours).
_RELEASE: Final = (
    _HEAD
    + """
if doc.owner ~= ARGV[2] then return -1 end
if doc.done >= #doc.ops then redis.call('HDEL', KEYS[1], ARGV[1]); return 1 end
return 0
"""
)
# ARGV: key, owner, lease. Take over an entry whose lease expired: 1 = taken.
_TAKE: Final = (
    _HEAD
    + """
if doc.owner ~= '' and doc['until'] >= now and doc.owner ~= ARGV[2] then return 0 end
doc.owner = ARGV[2]
doc['until'] = now + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(doc))
return 1
"""
)


class Publisher:
    """Publishes the ops of intents entries this worker holds (or takes over) via Incidents."""

    def __init__(  # noqa: PLR0917 - the worker's parts
        self,
        client: Any,
        keys: Keys,
        incidents: Incidents,
        owner: str,
        render: Render,
        lease_ms: int = LEASE_MS,
        on_error: Callable[[], None] = lambda: None,
        quiet: Callable[[str, str], bool] = lambda agent, detector: False,
    ) -> None:
        self.client = client
        self.keys = keys
        self.incidents = incidents
        self.owner = owner
        self.render = render
        self.lease_ms = lease_ms
        self.on_error = on_error
        self.quiet = quiet
        """(agent, detector) -> True: that incident's firing is not published (a halted agent)."""
        self.published = 0
        self.failed = 0
        """Entries whose publishing failed (each is retried after its lease)."""
        self._progress = client.register_script(_PROGRESS)
        self._release = client.register_script(_RELEASE)
        self._take = client.register_script(_TAKE)

    def publish(self, shard: int, owned: list[bytes | str]) -> None:
        """Publish every entry the deciding script leased to us, in the order it decided them."""
        for key in owned:
            self._guarded(shard, key.decode() if isinstance(key, bytes) else key)

    def sweep(self, now_ms: int) -> int:
        """Take over entries whose lease expired (their worker died) and publish them."""
        taken = 0
        pipe = self.client.pipeline(transaction=False)
        for shard in range(self.keys.shards):
            pipe.hlen(self.keys.intents(shard))
        for shard, count in enumerate(pipe.execute()):
            if not count:
                continue
            intents = self.keys.intents(shard)
            for key, raw in self.client.hgetall(intents).items():
                name = key.decode() if isinstance(key, bytes) else key
                try:
                    doc = json.loads(raw)
                    if doc["owner"] and doc["until"] >= now_ms:
                        continue
                except (ValueError, KeyError, TypeError):
                    pass  # unreadable: _take and _drain below say so and count it
                if self._take(keys=[intents], args=[name, self.owner, self.lease_ms]) == 1:
                    log.info("publishing %s decided by a worker that stopped before it could", name)
                    self._guarded(shard, name)
                    taken += 1
        return taken

    def _guarded(self, shard: int, key: str) -> None:
        """:meth:`_drain` one entry; a failure is logged and counted and never stops the others
        (the entry stays, leased: after the lease the sweep tries it again). Lost connections
        go up to the worker runtime, which retries the whole step."""
        try:
            self._drain(shard, key)
        except RECOVERABLE:
            raise
        except Exception:
            self.failed += 1
            self.on_error()
            log.exception("could not publish the decisions of %s; it is retried after the lease", key)

    def _drain(self, shard: int, key: str) -> None:
        intents = self.keys.intents(shard)
        while True:
            raw = self.client.hget(intents, key)
            if raw is None:
                return
            doc = json.loads(raw)
            if doc["owner"] != self.owner:
                return
            ops: list[dict[str, Any]] = doc["ops"]
            for index in range(int(doc["done"]), len(ops)):
                self._apply(key, ops[index])
                if self._progress(keys=[intents], args=[key, self.owner, index + 1, self.lease_ms]) != 1:
                    return  # the lease was lost: the new holder continues from the mark
            if self._release(keys=[intents], args=[key, self.owner]) != 0:
                return

    def _apply(self, key: str, op: dict[str, Any]) -> None:
        agent, _, detector = key.rpartition("/")
        if op["o"] == "f" and self.quiet(agent, detector):
            log.info("%s: not paging %s: the agent is halted", agent, detector)
            return  # its resolve later finds no open incident and publishes nothing either
        severity, summary, details = self.render(agent, detector, op)
        if op["o"] == "f":
            self.incidents.fire(
                agent, detector, severity=severity, summary=summary, at_ms=int(op["at"]), details=details
            )
        else:
            self.incidents.resolve(agent, detector, summary=summary, at_ms=int(op["at"]), details=details)
        self.published += 1
