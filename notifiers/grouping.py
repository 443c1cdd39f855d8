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

# A waiting member's own alert is kept in the members hash under '#<gid>\n<agent>' ('#' and
# newlines are in no dedup key), not in the group's JSON, and a batch's alerts go through one
# script call that decodes and re-encodes each group it touches once: a host of 100 agents
# otherwise cost the server ~0.3 ms per alert (benchmarks/fleet_grouping.py). A group written by
# an older version still has the alerts in ``members`` (read as a fallback).

# KEYS: groups, due, members. ARGV: now, wait ms, max groups, cap, interval ms, then per alert,
# in stream order, 8 values: op ('add' a firing alert | 'resolve'), agent, dedup key, gid, alert
# JSON, severity, detector, labels JSON (the last five for 'add' only). Returns one reply per
# alert: for 'add' 'new', 'joined', 'dup' or 'full'; for 'resolve' 'pass' (not a member: send
# it as usual), 'dropped' (the group never went out), 'held' (others still open) or the group's
# JSON (the last open member: send the group's resolve).
_APPLY: Final = """
local now, wait, max_groups = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local cap, interval = tonumber(ARGV[4]), tonumber(ARGV[5])
local rank = {info = 1, warning = 2, error = 3, critical = 4}
local groups, count = {}, nil
local function load(gid)
  local g = groups[gid]
  if g == nil then
    local raw = redis.call('HGET', KEYS[1], gid)
    g = raw and cjson.decode(raw) or false
    groups[gid] = g
  end
  return g
end
local function drop(gid)
  groups[gid] = false
  redis.call('HDEL', KEYS[1], gid)
  redis.call('ZREM', KEYS[2], gid)
  if count then count = count - 1 end
end
local function add(agent, key, gid, alert, severity, det, by)
  local g = load(gid)
  local result = 'joined'
  if not g then
    count = count or redis.call('HLEN', KEYS[1])
    if count >= max_groups then return 'full' end
    count = count + 1
    g = {det = det, by = cjson.decode(by), first_ms = now, state = 'wait', members = {},
         open = {}, n = 0, sent = 0, dirty = 0, last = 0, severity = severity, order = {}}
    groups[gid] = g
    redis.call('ZADD', KEYS[2], now + wait, gid)
    result = 'new'
  end
  if g.open[agent] then return 'dup' end
  redis.call('HSET', KEYS[3], key, gid)
  g.open[agent] = 1
  g.n = g.n + 1
  if g.members[agent] == nil then g.order[#g.order + 1] = agent end
  g.members[agent] = 1
  if g.state == 'wait' and g.n <= cap then
    redis.call('HSET', KEYS[3], '#' .. gid .. '\\n' .. agent, alert)
  end
  if (rank[severity] or 0) > (rank[g.severity] or 0) then g.severity = severity end
  if g.state == 'sent' and g.dirty == 0 then
    g.dirty = 1
    redis.call('ZADD', KEYS[2], math.max(now, g.last + interval), gid)
  end
  g.touched = true
  return result
end
local function resolve(agent, key)
  local gid = redis.call('HGET', KEYS[3], key)
  if not gid then return 'pass' end
  redis.call('HDEL', KEYS[3], key)
  local g = load(gid)
  if not g or not g.open[agent] then return 'pass' end
  g.open[agent] = nil
  g.n = g.n - 1
  if g.state == 'wait' then
    g.members[agent] = nil
    redis.call('HDEL', KEYS[3], '#' .. gid .. '\\n' .. agent)
    local order = {}
    for _, a in ipairs(g.order) do if a ~= agent then order[#order + 1] = a end end
    g.order = order
  end
  g.touched = true
  if g.n <= 0 then
    drop(gid)
    if g.state == 'wait' then return 'dropped' end
    g.touched = nil
    return cjson.encode({gid = gid, group = g})
  end
  if g.state == 'wait' then return 'dropped' end
  return 'held'
end
local out = {}
for i = 6, #ARGV, 8 do
  if ARGV[i] == 'add' then
    out[#out + 1] = add(ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], ARGV[i + 6],
                        ARGV[i + 7])
  else
    out[#out + 1] = resolve(ARGV[i + 1], ARGV[i + 2])
  end
end
for gid, g in pairs(groups) do
  if g and g.touched then
    g.touched = nil
    redis.call('HSET', KEYS[1], gid, cjson.encode(g))
  end
end
return out
"""

# KEYS: groups, due, members. ARGV: now, limit. Returns a flat list: gid, kind ('single' | 'fire'),
# JSON.
_FLUSH: Final = """
local now = tonumber(ARGV[1])
local out = {}
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, gid in ipairs(ids) do
  redis.call('ZREM', KEYS[2], gid)
  local raw = redis.call('HGET', KEYS[1], gid)
  if raw then
    local g = cjson.decode(raw)
    local single
    if g.state == 'wait' then
      for a, kept in pairs(g.members) do
        local field = '#' .. gid .. '\\n' .. a
        local stored = redis.call('HGET', KEYS[3], field)
        if type(kept) == 'string' then stored = kept end
        if stored then redis.call('HDEL', KEYS[3], field) end
        if g.n == 1 and a == g.order[1] then single = stored end
      end
    end
    if single then
      redis.call('HDEL', KEYS[1], gid)
      out[#out + 1] = gid; out[#out + 1] = 'single'; out[#out + 1] = single
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
class GroupCall:
    """One call of the group script for a batch's alerts (:meth:`Grouper.call`)."""

    keys: list[str]
    args: list[Any]


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
        self._apply = self.client.register_script(_APPLY)
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

    def op(self, alert: Alert) -> list[Any] | None:
        """The script arguments that put a firing ``alert`` into its group (None: it does not
        group) or take a resolved one out of its group; a batch's go in one :meth:`call`."""
        if alert.status == "resolved":
            return ["resolve", alert.agent, alert.dedup_key, "", "", "", "", ""]
        found = self.group_of(alert)
        if found is None:
            return None
        gid, by = found
        return ["add", alert.agent, alert.dedup_key, gid, alert.to_json(), alert.severity, alert.detector,
                json.dumps(by)]  # fmt: skip

    def call(self, ops: list[list[Any]], now_ms: int) -> GroupCall:
        """One script call for ``ops`` (:meth:`op`, in stream order): to :meth:`run` now, or
        :meth:`stage` in a pipeline with every notifier's (notifiers/fanout.py). Its reply has
        one item per op, which :meth:`Notifier.grouped <notifiers.base.Notifier.grouped>` reads."""
        config = self.config
        args: list[Any] = [now_ms, int(config.group_wait_s * 1000), config.max_groups, _LIST_CAP,
                           int(config.group_interval_s * 1000)]  # fmt: skip
        for op in ops:
            args += op
        return GroupCall(self.keys, args)

    def run(self, call: GroupCall) -> list[Any]:
        """Run one call now (loading the script if Redis does not have it)."""
        return list(self._apply(keys=call.keys, args=call.args))

    def stage(self, pipe: Any, call: GroupCall) -> None:
        """Add one call to ``pipe`` as a bare EVALSHA (as notifiers/queue.py stages its own): a
        reply that is a NoScriptError is re-run with :meth:`run`."""
        pipe.evalsha(self._apply.sha, len(call.keys), *call.keys, *call.args)

    def load_scripts(self) -> None:
        """Load the script a batch stages, ahead of the first batch."""
        self.client.script_load(_APPLY)

    @staticmethod
    def joined(reply: Any) -> str:
        """What putting a firing alert into its group replied: ``new``/``joined``/``dup`` (do
        not queue it) or ``full`` (too many groups: queue it alone)."""
        return _text(reply)

    def resolved(self, reply: Any, now_ms: int) -> tuple[str, Alert | None]:
        """What taking a resolved alert out of its group replied: ``pass`` (not grouped: send it
        as usual), ``dropped``/``held`` (send nothing), or ``resolved`` with the group's resolve
        to send."""
        result = _text(reply)
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
