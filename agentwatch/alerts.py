"""Alerts (SPEC section 5) and incidents: one ``firing`` per incident, one ``resolved`` when it ends.

Detectors decide; this module makes the decision stick exactly once, however many workers race:

* ``fire`` and ``resolve`` are Lua scripts on the agent's shard, so the check "is an incident
  open?" and the change are one atomic step. N workers seeing the same overdue agent produce
  one alert; a redelivered event produces none.
* The script writes the alert into the shard's *outbox* in the same step, then the caller copies
  it to ``<prefix>:alerts`` and deletes it from the outbox. A worker that dies in between leaves
  the alert in the outbox, and any worker's :meth:`Incidents.sweep` publishes it a few seconds
  later. So an alert is published at least once, never lost; consumers de-duplicate on ``id``.

The outbox exists because the alerts stream's name is fixed by the protocol and so cannot share
a Redis Cluster slot with per-shard state (see keys.py).

Every alert is signed as it is published (security.py): notifier workers deliver only entries of
the alerts stream that carry a valid signature, so whoever else can write that stream can
neither page anyone nor close an incident.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

from agentwatch import labels
from agentwatch.errors import InvalidEntry
from agentwatch.keys import Keys, shard_of
from agentwatch.redisconn import Client
from agentwatch.security import AlertSigner, PipelineSecret

Status = Literal["firing", "resolved"]
SEVERITIES: Final = ("info", "warning", "error", "critical")
"""In rising order; notifiers route on a minimum severity (PagerDuty's four levels)."""
PIPELINE_AGENT: Final = "agentwatch"
"""The agent name of alerts about the monitor itself (e.g. detector workers lagging)."""
SWEEP_AFTER_MS: Final = 5000

# Prepended to the deciding scripts: with a fence (a third key, the shard's engine lease, and
# its expected token or whole value as the last argument), a caller whose lease was taken over
# changes nothing and gets -1. Without one (#KEYS == 2) the check is skipped.
_FENCE: Final = """
if KEYS[3] then
  local lease = redis.call('GET', KEYS[3])
  if not lease or (lease ~= ARGV[#ARGV] and string.match(lease, '^[^:]*') ~= ARGV[#ARGV]) then
    return -1
  end
end
"""
REFUSED: Final = -1
"""What a fenced script returns when the lease is not the caller's any more."""

_FIRE: Final = (
    _FENCE
    + """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
return 1
"""
)
# Fire, or raise the stage of the open incident (a budget's warning, then its exceeded alert):
# only a higher ``rank`` than the open incident's is published; the incident keeps its start.
# Returns {1, the earlier stage's alert if still in the outbox} so the caller publishes the two
# in order (a worker that died between deciding and publishing leaves it there), or 0.
_ESCALATE: Final = (
    _FENCE
    + """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
local incident, earlier = ARGV[2], ''
if cur then
  local old = cjson.decode(cur)
  if (tonumber(old.rank) or 1e9) >= tonumber(ARGV[5]) then return 0 end
  local new = cjson.decode(ARGV[2])
  new.since_ms = old.since_ms
  incident = cjson.encode(new)
  earlier = redis.call('HGET', KEYS[2], old.alert) or ''
end
redis.call('HSET', KEYS[1], ARGV[1], incident)
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
return {1, earlier}
"""
)
# Set a flag on the open incident once: 1 for the one caller that set it, else 0.
_MARK: Final = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return 0 end
local doc = cjson.decode(cur)
if doc[ARGV[2]] then return 0 end
doc[ARGV[2]] = 1
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(doc))
return 1
"""
# Compare-and-delete on the exact incident the caller read, so two resolvers cannot both win.
# Returns the incident's firing alert if it is still in the outbox, so the caller can publish
# firing before resolved and never invert them.
_RESOLVE: Final = (
    _FENCE
    + """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return false end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[4], ARGV[5])
return redis.call('HGET', KEYS[2], ARGV[3]) or ''
"""
)


def _fenced(keys: list[str], args: list[Any], fence: tuple[str, str] | None) -> tuple[list[str], list[Any]]:
    """A deciding script's keys and args, with the fence (see ``_FENCE``) appended if given."""
    if fence is None:
        return keys, args
    tag = keys[0].rpartition(":")[0]
    if not fence[0].startswith(f"{tag}:"):
        raise ValueError(f"a fence must be a key of the same shard ({tag}), not {fence[0]!r}")
    return [*keys, fence[0]], [*args, fence[1]]


def iso_ms(at_ms: int) -> str:
    """Milliseconds since the epoch -> ``2026-11-24T03:00:04.120Z``."""
    moment = datetime.fromtimestamp(at_ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at_ms % 1000:03d}Z"


def new_alert_id(at_ms: int) -> str:
    """Sortable by time, unique without coordination: 12 hex digits of ms + 12 random."""
    return f"{at_ms:012x}{os.urandom(6).hex()}"


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert exactly as SPEC section 5 shows it; ``to_json`` is what the webhook POSTs."""

    id: str
    agent: str
    detector: str
    status: Status
    severity: str
    summary: str
    dedup_key: str
    at: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        # Field by field, not dataclasses.asdict: its deep copy of ``details`` was ~0.1 ms an
        # alert (a notifier with [grouping] encodes each alert it routes), and the JSON is the same.
        return json.dumps({name: getattr(self, name) for name in _FIELDS}, separators=(",", ":"), default=str)

    @property
    def at_ms(self) -> int:
        moment = datetime.strptime(self.at, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        return round(moment.timestamp() * 1000)


_FIELDS: Final = tuple(Alert.__dataclass_fields__)


def decode_alert(raw: bytes) -> Alert:
    """Parse one alerts-stream entry; :class:`InvalidEntry` (-> dead letter) if it is not an alert."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidEntry(f"alert is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidEntry(f"alert is not a JSON object but {type(data).__name__}")
    missing = [name for name in Alert.__dataclass_fields__ if name not in data]
    if missing:
        raise InvalidEntry(f"alert lacks {', '.join(missing)}")
    if data["status"] not in ("firing", "resolved"):
        raise InvalidEntry(f"alert status must be firing or resolved, got {data['status']!r}")
    if data["severity"] not in SEVERITIES:
        raise InvalidEntry(f"alert severity must be one of {', '.join(SEVERITIES)}")
    if not all(isinstance(data[name], str) for name in Alert.__dataclass_fields__ if name != "details"):
        raise InvalidEntry("alert fields other than details must be strings")
    if not isinstance(data["details"], dict):
        raise InvalidEntry("alert details must be an object")
    return Alert(**{name: data[name] for name in Alert.__dataclass_fields__})


class Incidents:
    """Open incidents and the alerts they produce, for one deployment (prefix and shards)."""

    def __init__(
        self, client: Client, keys: Keys, *, alerts_max_len: int = 100_000, secret: str | None = None
    ) -> None:
        """``secret``: ``[security] secret``; None reads (or makes) the one kept in Redis, only
        when an alert is published (readers of incidents never touch it)."""
        self.client: Any = client  # untyped: redis-py's stubs do not model scripts and pipelines well
        self.keys = keys
        self.alerts_max_len = alerts_max_len
        self.signer = AlertSigner(PipelineSecret(client, keys, secret))
        self._fire = self.client.register_script(_FIRE)
        self._resolve = self.client.register_script(_RESOLVE)
        self._escalate = self.client.register_script(_ESCALATE)
        self._mark = self.client.register_script(_MARK)

    def _shard(self, agent: str) -> int:
        return shard_of(agent, self.keys.shards)

    def fire(
        self,
        agent: str,
        detector: str,
        *,
        severity: str,
        summary: str,
        at_ms: int,
        details: dict[str, Any] | None = None,
        fence: tuple[str, str] | None = None,
    ) -> Alert | None:
        """Open an incident and publish its ``firing`` alert; None if one is already open.

        ``fence``: (the shard's lease key, the caller's token or whole lease value): publish only
        while the lease still holds it, else change nothing and return None (a worker that lost
        its shard to another must not speak for it). Same hash tag as the shard, so same slot."""
        if severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
        alert = Alert(
            id=new_alert_id(at_ms),
            agent=agent,
            detector=detector,
            status="firing",
            severity=severity,
            summary=summary,
            dedup_key=f"{agent}/{detector}",
            at=iso_ms(at_ms),
            details=self._labelled(agent, details or {}),
        )
        incident = json.dumps(
            {"alert": alert.id, "since_ms": at_ms, "severity": severity, "summary": summary},
            separators=(",", ":"),
        )
        shard = self._shard(agent)
        keys = [self.keys.incidents(shard), self.keys.outbox(shard)]
        keys, args = _fenced(keys, [alert.dedup_key, incident, alert.id, alert.to_json()], fence)
        opened = self._fire(keys=keys, args=args)
        if opened != 1:
            return None  # already open, or (REFUSED) the fence no longer holds
        self._publish(shard, [alert])
        return alert

    def escalate(
        self,
        agent: str,
        detector: str,
        *,
        rank: int,
        severity: str,
        summary: str,
        at_ms: int,
        details: dict[str, Any] | None = None,
        dedup_key: str | None = None,
        extra: dict[str, Any] | None = None,
        fence: tuple[str, str] | None = None,
    ) -> Alert | None:
        """Open an incident at stage ``rank``, or move the open one up to it: publish a
        ``firing`` alert with the same dedup key; None when the open incident is at ``rank`` or
        above already (so each stage is published once, in order, however many workers race).
        ``extra`` is kept with the incident (``all_open`` returns it). ``fence``: as for :meth:`fire`."""
        if severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
        key = dedup_key or f"{agent}/{detector}"
        alert = Alert(new_alert_id(at_ms), agent, detector, "firing", severity, summary, key, iso_ms(at_ms),
                      details or {})  # fmt: skip
        incident = json.dumps(
            {**(extra or {}), "alert": alert.id, "since_ms": at_ms, "severity": severity, "summary": summary,
             "rank": rank, "agent": agent},
            separators=(",", ":"),
        )  # fmt: skip
        shard = self._shard(agent)
        keys = [self.keys.incidents(shard), self.keys.outbox(shard)]
        keys, args = _fenced(keys, [key, incident, alert.id, alert.to_json(), rank], fence)
        done = self._escalate(keys=keys, args=args)
        if not done or done == REFUSED:
            return None
        earlier = [decode_alert(done[1])] if done[1] else []
        self._publish(shard, [*earlier, alert])
        return alert

    def mark(self, agent: str, dedup_key: str, flag: str) -> bool:
        """Set ``flag`` on the open incident ``dedup_key`` (of ``agent``'s shard); True for the
        one caller that set it (an effect of the incident done once: a budget's halt)."""
        keys = [self.keys.incidents(self._shard(agent))]
        return bool(self._mark(keys=keys, args=[dedup_key, flag]))

    def resolve(
        self,
        agent: str,
        detector: str,
        *,
        summary: str,
        at_ms: int,
        details: dict[str, Any] | None = None,
        dedup_key: str | None = None,
        fence: tuple[str, str] | None = None,
    ) -> Alert | None:
        """Close the open incident and publish its ``resolved`` alert; None if none is open.
        ``fence``: as for :meth:`fire` (None, the incident left open, if it no longer holds)."""
        shard = self._shard(agent)
        dedup_key = dedup_key or f"{agent}/{detector}"
        current = self.client.hget(self.keys.incidents(shard), dedup_key)
        if current is None:
            return None
        incident = json.loads(current)
        alert = Alert(
            id=new_alert_id(at_ms),
            agent=agent,
            detector=detector,
            status="resolved",
            severity=incident["severity"],
            summary=summary,
            dedup_key=dedup_key,
            at=iso_ms(at_ms),
            details=self._labelled(
                agent, {**(details or {}), "duration_s": round((at_ms - incident["since_ms"]) / 1000, 3)}
            ),
        )
        keys = [self.keys.incidents(shard), self.keys.outbox(shard)]
        args = [dedup_key, current, incident["alert"], alert.id, alert.to_json()]
        keys, args = _fenced(keys, args, fence)
        firing = self._resolve(keys=keys, args=args)
        if firing is None or firing == REFUSED:
            return None  # another worker resolved it first, or the fence no longer holds
        earlier = [decode_alert(firing)] if firing else []
        self._publish(shard, [*earlier, alert])
        return alert

    def _labelled(self, agent: str, details: dict[str, Any]) -> dict[str, Any]:
        """``details`` with the agent's labels (``details.labels``, from its latest start), which
        notifiers route and group on; unchanged if it has labels already or the agent has none."""
        if "labels" in details or agent == PIPELINE_AGENT:
            return details
        found = labels.read(self.client, self.keys, agent)
        return {**details, "labels": found} if found else details

    def open(self, agent: str, detector: str) -> dict[str, Any] | None:
        """The open incident of ``agent``/``detector`` (``since_ms``, ``severity``...), or None."""
        raw = self.client.hget(self.keys.incidents(self._shard(agent)), f"{agent}/{detector}")
        return json.loads(raw) if raw else None

    def any_open(self, agent: str, detectors: Sequence[str]) -> bool:
        """Whether ``agent`` has an open incident of one of ``detectors`` (one round trip)."""
        names = [f"{agent}/{detector}" for detector in detectors]
        found = self.client.hmget(self.keys.incidents(self._shard(agent)), names) if names else []
        return any(json.loads(raw) for raw in found if raw)  # (as open() reads each one)

    def all_open(self) -> dict[str, dict[str, Any]]:
        """Every open incident of every shard, by dedup key."""
        found: dict[str, dict[str, Any]] = {}
        for shard in range(self.keys.shards):
            for key, raw in self.client.hgetall(self.keys.incidents(shard)).items():
                found[key.decode() if isinstance(key, bytes) else key] = json.loads(raw)
        return found

    def open_keys(self, match: str | None = None) -> list[str]:
        """The dedup keys (``<agent>/<detector>``) of the open incidents: what deciding who is
        down needs, without decoding every incident (notifiers/holds.py, once per batch).
        ``match``: only keys matching this Redis glob (a superset is fine: Redis filters, the
        caller decides), so a fleet with thousands open sends back only the few asked about."""
        found: list[str] = []
        for shard in range(self.keys.shards):
            name = self.keys.incidents(shard)
            if match is None:
                keys = self.client.hkeys(name)
            else:
                keys = [key for key, _ in self.client.hscan_iter(name, match=match, count=10_000)]
            found += [key.decode() if isinstance(key, bytes) else key for key in keys]
        return found

    def sweep(self, now_ms: int, older_than_ms: int = SWEEP_AFTER_MS) -> int:
        """Publish alerts a dead worker left in an outbox. Run from every worker's tick."""
        published = 0
        for shard in range(self.keys.shards):
            stale = [
                alert
                for alert in map(decode_alert, self.client.hvals(self.keys.outbox(shard)))
                if alert.at_ms <= now_ms - older_than_ms
            ]
            if stale:
                stale.sort(key=lambda a: (a.at, a.status != "firing"))
                self._publish(shard, stale)
                published += len(stale)
        return published

    def _publish(self, shard: int, alerts: list[Alert]) -> None:
        signed = [(data, self.signer.sign(data)) for data in (alert.to_json().encode() for alert in alerts)]
        pipe = self.client.pipeline(transaction=False)
        for data, signature in signed:
            pipe.xadd(
                self.keys.alerts, {"d": data, "s": signature}, maxlen=self.alerts_max_len, approximate=True
            )
        pipe.hdel(self.keys.outbox(shard), *[alert.id for alert in alerts])
        pipe.execute()
