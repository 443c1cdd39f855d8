"""Alert groups (``[grouping]``): one notification for many agents that failed together.

Alertmanager's model. When a host dies, its twenty agents go silent within seconds of each other;
twenty pages say one thing twenty times. With grouping on, a notifier does not queue a firing
alert at once: the alert joins the group of its detector and its ``group_by`` label values
(default: ``host``), and the group waits ``group_wait`` from its first alert. Then:

* one member: its own alert is queued, as without grouping (its resolve follows as usual);
* several: one *grouped* alert is queued ("host worker-3: 12 agents silent since 03:00:04"),
  with the agents in ``details.group``, under one dedup key per group (PagerDuty opens one
  incident); agents that join later are sent as an update at most every ``group_interval``;
  when every member's incident is over, one grouped ``resolved`` follows.

Individual incidents are still on the alerts stream (``agentwatch alerts`` lists them); the
delivery log records each grouped one as ``grouped``. An alert without every ``group_by`` label
(the pipeline's own, say) is never grouped. Groups are per notifier, in the notifier's Redis
keys, decided by Lua scripts so that any number of notifier workers agree; at most
``max_groups`` are open per notifier (a label with unbounded values cannot grow Redis without
end): beyond it, alerts are sent alone and counted (``<notifier>:ungrouped`` in the notifier
stats).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Final, Literal

from agentwatch.alerts import SEVERITIES, Alert, iso_ms
from agentwatch.config import GroupingSection
from agentwatch.keys import Keys
from agentwatch.redisconn import Client

_LIST_CAP: Final = 1000
"""Members whose full alert a waiting group keeps (a group of one sends that alert itself)."""

# KEYS: groups, due, members. ARGV: gid, agent, alert JSON, severity, now, wait ms, max groups, detector,
# labels JSON, cap, interval ms, dedup key. Returns 'new', 'joined', 'dup' or 'full'.
_ADD: Final = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local now = tonumber(ARGV[5])
local g
local result = 'joined'
if raw then
  g = cjson.decode(raw)
else
  if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[7]) then return 'full' end
  g = {det = ARGV[8], by = cjson.decode(ARGV[9]), first_ms = now, state = 'wait', members = {},
       open = {}, n = 0, sent = 0, dirty = 0, last = 0, severity = ARGV[4], order = {}}
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[6]), ARGV[1])
  result = 'new'
end
local agent = ARGV[2]
if g.open[agent] then return 'dup' end
redis.call('HSET', KEYS[3], ARGV[12], ARGV[1])
g.open[agent] = 1
g.n = g.n + 1
if g.members[agent] == nil then g.order[#g.order + 1] = agent end
if g.state == 'wait' and g.n <= tonumber(ARGV[10]) then g.members[agent] = ARGV[3]
else g.members[agent] = 1 end
local rank = {info = 1, warning = 2, error = 3, critical = 4}
if (rank[ARGV[4]] or 0) > (rank[g.severity] or 0) then g.severity = ARGV[4] end
if g.state == 'sent' and g.dirty == 0 then
  g.dirty = 1
  redis.call('ZADD', KEYS[2], math.max(now, g.last + tonumber(ARGV[11])), ARGV[1])
end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(g))
return result
"""

# KEYS: groups, due, members. ARGV: dedup key, agent. Returns 'pass' (not a member: send it as
# usual), 'dropped' (the group never went out), 'held' (others still open) or the group's JSON
# (the last open member: send the group's resolve).
_RESOLVE: Final = """
local gid = redis.call('HGET', KEYS[3], ARGV[1])
if not gid then return 'pass' end
redis.call('HDEL', KEYS[3], ARGV[1])
local raw = redis.call('HGET', KEYS[1], gid)
if not raw then return 'pass' end
local g = cjson.decode(raw)
local agent = ARGV[2]
if not g.open[agent] then return 'pass' end
g.open[agent] = nil
g.n = g.n - 1
if g.state == 'wait' then
  g.members[agent] = nil
  local order = {}
  for _, a in ipairs(g.order) do if a ~= agent then order[#order + 1] = a end end
  g.order = order
end
if g.n <= 0 then
  redis.call('HDEL', KEYS[1], gid)
  redis.call('ZREM', KEYS[2], gid)
  if g.state == 'wait' then return 'dropped' end
  return cjson.encode({gid = gid, group = g})
end
redis.call('HSET', KEYS[1], gid, cjson.encode(g))
if g.state == 'wait' then return 'dropped' end
return 'held'
"""

# KEYS: groups, due. ARGV: now, limit. Returns a flat list: gid, kind ('single' | 'fire'), JSON.
_FLUSH: Final = """
local now = tonumber(ARGV[1])
local out = {}
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, gid in ipairs(ids) do
  redis.call('ZREM', KEYS[2], gid)
  local raw = redis.call('HGET', KEYS[1], gid)
  if raw then
    local g = cjson.decode(raw)
    if g.state == 'wait' and g.n == 1 then
      redis.call('HDEL', KEYS[1], gid)
      out[#out + 1] = gid; out[#out + 1] = 'single'; out[#out + 1] = g.members[g.order[1]]
    elseif g.state == 'wait' or g.dirty == 1 then
      g.state = 'sent'; g.dirty = 0; g.sent = g.sent + 1; g.last = now
      for a, _ in pairs(g.members) do g.members[a] = 1 end
      local encoded = cjson.encode(g)
      redis.call('HSET', KEYS[1], gid, encoded)
      out[#out + 1] = gid; out[#out + 1] = 'fire'; out[#out + 1] = encoded
    end
  end
end
return out
"""

_WORDS: Final = {
    "silence": "silent",
    "stall": "stalled",
    "exit": "exited",
    "memory": "running out of memory",
    "tokens": "over their token baseline",
    "loop": "in a loop",
}

Joined = Literal["grouped", "alone"]


@dataclass(frozen=True)
class Flushed:
    """What a due group sends: its one member's own alert, or a grouped alert."""

    alert: Alert
    grouped: bool


class Grouper:
    """The alert groups of one notifier (see the module docstring)."""

    def __init__(self, client: Client, keys: Keys, notifier: str, config: GroupingSection) -> None:
        self.client: Any = client
        self.config = config
        self.notifier = notifier
        self.keys = [
            keys.notifier_groups(notifier),
            keys.notifier_groups_due(notifier),
            keys.notifier_group_members(notifier),
        ]
        self._add = self.client.register_script(_ADD)
        self._resolve = self.client.register_script(_RESOLVE)
        self._flush = self.client.register_script(_FLUSH)

    def group_of(self, alert: Alert) -> tuple[str, dict[str, str]] | None:
        """(group id, the group's label values) of ``alert``, or None if it does not group."""
        if self.config.detectors and alert.detector not in self.config.detectors:
            return None
        labels = alert.details.get("labels")
        if not isinstance(labels, dict):
            return None
        by: dict[str, str] = {}
        for key in self.config.group_by:
            value = labels.get(key)
            if not isinstance(value, str):
                return None
            by[key] = value
        text = ",".join(f"{key}={value}" for key, value in by.items())
        return f"{alert.detector}|{text}", by

    def add(self, alert: Alert, now_ms: int) -> str | None:
        """Put a firing alert into its group: ``new``/``joined``/``dup`` (do not queue it),
        ``full`` (too many groups: queue it alone) or None (it does not group)."""
        found = self.group_of(alert)
        if found is None:
            return None
        gid, by = found
        result = self._add(
            keys=self.keys,
            args=[gid, alert.agent, alert.to_json(), alert.severity, now_ms,
                  int(self.config.group_wait_s * 1000), self.config.max_groups, alert.detector,
                  json.dumps(by), _LIST_CAP, int(self.config.group_interval_s * 1000), alert.dedup_key],
        )  # fmt: skip
        return _text(result)

    def resolve(self, alert: Alert, now_ms: int) -> tuple[str, Alert | None]:
        """A resolved alert: ``pass`` (not grouped: send it as usual), ``dropped``/``held``
        (send nothing), or ``resolved`` with the group's resolve to send."""
        result = _text(self._resolve(keys=self.keys, args=[alert.dedup_key, alert.agent]))
        if result in ("pass", "dropped", "held"):
            return result, None
        done = json.loads(result)
        return "resolved", self._grouped(str(done["gid"]), done["group"], now_ms, "resolved")

    def due(self, now_ms: int, limit: int = 100) -> list[Flushed]:
        """The notifications of groups whose wait (or interval) is over, each claimed by one
        worker only."""
        reply = self._flush(keys=self.keys, args=[now_ms, limit])
        out: list[Flushed] = []
        for index in range(0, len(reply), 3):
            gid, kind, raw = (_text(part) for part in reply[index : index + 3])
            if kind == "single":
                out.append(Flushed(Alert(**json.loads(raw)), grouped=False))
            else:
                out.append(Flushed(self._grouped(gid, json.loads(raw), now_ms, "firing"), grouped=True))
        return out

    def _grouped(
        self, gid: str, group: dict[str, Any], now_ms: int, status: Literal["firing", "resolved"]
    ) -> Alert:
        """The grouped alert of ``group`` (the JSON the scripts keep) at ``now_ms``."""
        agents: list[str] = list(group.get("order") or [])
        by: dict[str, str] = group.get("by") or {}
        detector = str(group.get("det") or "")
        where = ", ".join(f"{key} {value}" for key, value in by.items())
        since = iso_ms(int(group.get("first_ms") or now_ms))[11:19]
        listed = agents[: self.config.max_listed]
        more = len(agents) - len(listed)
        names = ", ".join(listed) + (f" and {more} more" if more > 0 else "")
        word = _WORDS.get(detector, f"with a {detector} incident")
        if status == "firing":
            count = int(group.get("n") or len(agents))
            summary = f"{where}: {count} agents {word} since {since} UTC ({names})"
        else:
            summary = f"{where}: all {len(agents)} agents recovered ({detector} since {since} UTC)"
        severity = str(group.get("severity") or "error")
        severity = severity if severity in SEVERITIES else "error"
        sent = int(group.get("sent") or 0)
        digest = hashlib.sha1(f"{gid}|{group.get('first_ms')}|{sent}|{status}".encode()).hexdigest()[:12]
        open_agents = sorted(group.get("open") or {}) if isinstance(group.get("open"), dict) else []
        return Alert(
            id=f"{now_ms:012x}{digest}",
            agent=agents[0] if agents else "agentwatch",
            detector=detector,
            status=status,
            severity=severity,
            summary=summary,
            dedup_key=f"group:{','.join(f'{k}={v}' for k, v in by.items())}/{detector}",
            at=iso_ms(now_ms),
            details={
                "labels": dict(by),
                "group": {
                    "by": dict(by),
                    "agents": agents,
                    "open": open_agents if status == "firing" else [],
                    "count": len(agents),
                    "since": iso_ms(int(group.get("first_ms") or now_ms)),
                    "update": sent - 1 if status == "firing" else sent,
                },
            },
        )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
