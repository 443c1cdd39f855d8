"""What the pages show, read from what the workers keep: the fleet (``fleet_status``), the
alerts stream (incident history, stacks, exits), the notifiers' journal and queues (what each
notifier did), mutes, and the chart series. No detection here, and no Redis key that
agentwatch/keys.py does not name.

Every function returns plain data; pages.py renders it. All text in it may come from an agent
and is escaped by the templates, never here.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from agentwatch.alerts import Alert, decode_alert
from agentwatch.errors import InvalidEntry
from agentwatch.halts import Halt, Halts
from agentwatch.http.server import Server
from agentwatch.redisconn import server_time_ms
from agentwatch.rollups import Totals
from agentwatch.series import Point, read_series
from notifiers.journal import decode_fields
from notifiers.queue import Retrying, notifier_names, pending_jobs, retrying, retrying_ids
from notifiers.routing import Mute, Mutes

STATE_ORDER: Final = ("down", "exited", "stalled", "halted", "late", "muted", "ok", "retired")
"""Worst first: the fleet page's default order. (``halted`` arrives with the brake.)"""
ALERT_SCAN: Final = 5000
"""At most this many alerts are read back for one agent's history (newest first)."""
LOG_SCAN: Final = 5000
"""Delivery-log entries read for the alerts page (newest first)."""


@dataclass(frozen=True, slots=True)
class Incident:
    """One incident of an agent, from its firing alert to its resolved one (or still open)."""

    detector: str
    severity: str
    summary: str
    start_ms: int
    end_ms: int | None
    details: dict[str, Any]
    resolution: str = ""

    def duration_s(self, now_ms: int) -> float:
        return ((self.end_ms or now_ms) - self.start_ms) / 1000


@dataclass
class FleetPage:
    agents: list[dict[str, Any]]
    total: int
    page: int
    pages: int
    counts: dict[str, int]
    pipeline: dict[str, Any]
    at: str
    sparks: dict[str, list[float]] = field(default_factory=dict)


def fleet_page(server: Server, *, query: str, state: str, page: int, size: int) -> FleetPage:
    """One page of the fleet, worst first, filtered by a name glob (or substring) and a state."""
    status, (ordered, counts) = server.fleet.derived("worst-first", _worst_first)
    agents = ordered
    if query:
        pattern = query if any(c in query for c in "*?[") else f"*{query}*"
        agents = [a for a in agents if fnmatch.fnmatchcase(a["agent"], pattern)]
    if state:
        agents = [a for a in agents if a["state"] == state]
    pages = max(1, -(-len(agents) // size))
    page = min(max(page, 1), pages)
    shown = agents[(page - 1) * size : page * size]
    result = FleetPage(shown, len(agents), page, pages, counts, status["pipeline"], status["at"])
    result.sparks = sparklines(server, shown)
    return result


def _worst_first(status: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The fleet ordered worst state first, then by name; and how many agents are in each state."""
    rank = {name: i for i, name in enumerate(STATE_ORDER)}
    counts: dict[str, int] = {}
    for agent in status["agents"]:
        counts[agent["state"]] = counts.get(agent["state"], 0) + 1
    ordered = sorted(status["agents"], key=lambda a: (rank.get(a["state"], len(rank)), a["agent"]))
    return ordered, counts


def sparklines(
    server: Server, agents: list[dict[str, Any]], span_ms: int = 3_600_000
) -> dict[str, list[float]]:
    """Tokens per minute over the last hour per bucket (the bucket in progress last)."""
    http = server.settings.http
    now = server_time_ms(server.client)
    series = read_series(
        server.client,
        server.keys,
        [a["agent"] for a in agents],
        bucket_s=http.series_bucket_s,
        span_s=http.series_span_s,
        now_ms=now,
        window_s=span_ms / 1000,
    )
    minutes = http.series_bucket_s / 60
    out = {}
    for agent in agents:
        found = series[agent["agent"]]
        points = [p for p in found.points if p.start_ms >= now - span_ms]
        live = found.live(_totals(agent))
        elapsed = max((now - live.start_ms) / 60_000, 1 / 60)
        out[agent["agent"]] = [p.tokens / minutes for p in points] + [live.tokens / elapsed]
    return out


def _totals(agent: dict[str, Any]) -> Totals:
    return Totals(agent["beats_total"], agent["tokens_total"], agent["cost_total"])


@dataclass
class AgentPage:
    status: dict[str, Any]
    points: list[Point]
    incidents: list[Incident]
    mutes: list[Mute]
    halts: list[Halt]
    stack: str | None
    exit: Incident | None
    now_ms: int
    span_start_ms: int


def agent_page(server: Server, name: str) -> AgentPage | None:
    status = server.agent_status(name)
    if status is None:
        return None
    http = server.settings.http
    now = server_time_ms(server.client)
    start = now - int(http.series_span_s * 1000)
    found = read_series(
        server.client,
        server.keys,
        [name],
        bucket_s=http.series_bucket_s,
        span_s=http.series_span_s,
        now_ms=now,
    ).get(name)
    points: list[Point] = []
    if found is not None:
        points = [*found.points, found.live(_totals(status))]
    history = incidents(agent_alerts(server, name, since_ms=min(start, _oldest_open(status))))
    stalls = [i for i in history if i.detector == "stall" and i.details.get("stack")]
    exits = [i for i in history if i.detector == "exit"]
    mutes = [m for m in Mutes(server.client, server.keys).active(now) if fnmatch.fnmatchcase(name, m.agent)]
    return AgentPage(
        status=status,
        points=points,
        incidents=history,
        mutes=mutes,
        halts=Halts(server.client, server.keys).halting(name, now),
        stack=str(stalls[-1].details["stack"]) if stalls else None,
        exit=exits[-1] if exits else None,
        now_ms=now,
        span_start_ms=start,
    )


def _oldest_open(status: dict[str, Any]) -> int:
    """An incident open for longer than the chart span still belongs in the history."""
    from datetime import datetime  # noqa: PLC0415

    since = [datetime.fromisoformat(i["since"].replace("Z", "+00:00")) for i in status["incidents"]]
    return min((int(s.timestamp() * 1000) for s in since), default=2**62)


def agent_alerts(server: Server, name: str, *, since_ms: int) -> list[Alert]:
    """The agent's alerts since ``since_ms``, oldest first (at most :data:`ALERT_SCAN` read)."""
    redis: Any = server.client
    out: list[Alert] = []
    upper, read = "+", 0
    while read < ALERT_SCAN:
        page = redis.xrevrange(server.keys.alerts, max=upper, min=f"{since_ms}-0", count=500)
        read += len(page)
        out += [a for a in _decoded(page) if a.agent == name]
        if len(page) < 500:
            break
        upper = "(" + page[-1][0].decode()
    return out[::-1]


def _decoded(entries: Iterable[tuple[bytes, dict[bytes, bytes]]]) -> list[Alert]:
    found = []
    for _, fields in entries:
        try:
            found.append(decode_alert(fields.get(b"d", b"")))
        except InvalidEntry:
            continue  # dead-lettered by the notifier workers; nothing to show
    return found


def incidents(alerts: list[Alert]) -> list[Incident]:
    """Pair each firing alert with the resolved one of its ``dedup_key`` (oldest first)."""
    open_by_key: dict[str, Incident] = {}
    done: list[Incident] = []
    for alert in alerts:
        if alert.status == "firing":
            if alert.dedup_key in open_by_key:
                continue  # a redelivered or repeated firing: the incident is already open
            open_by_key[alert.dedup_key] = Incident(
                alert.detector, alert.severity, alert.summary, alert.at_ms, None, dict(alert.details)
            )
        elif alert.dedup_key in open_by_key:
            first = open_by_key.pop(alert.dedup_key)
            done.append(
                Incident(
                    first.detector,
                    first.severity,
                    first.summary,
                    first.start_ms,
                    alert.at_ms,
                    first.details,
                    alert.summary,
                )
            )
    return sorted(done + list(open_by_key.values()), key=lambda i: i.start_ms)


@dataclass
class Delivery:
    notifier: str
    outcome: str
    attempts: int
    http_status: str
    detail: str


@dataclass
class AlertsPage:
    alerts: list[tuple[Alert, list[Delivery]]]
    failed: list[dict[str, str]]
    mutes: list[Mute]
    now_ms: int
    retrying: list[Retrying] = field(default_factory=list)
    """Per notifier with deliveries waiting for a retry: how many, and the newest failed attempt."""


def alerts_page(server: Server, *, limit: int = 100) -> AlertsPage:
    """Recent alerts with what each notifier did: its final outcome (delivered, failed after N
    attempts, muted, stale, skipped), or the retry in progress."""
    redis: Any = server.client
    keys = server.keys
    now = server_time_ms(server.client)
    alerts = _decoded(redis.xrevrange(keys.alerts, count=limit))
    wanted = {a.id for a in alerts}
    by_alert: dict[str, list[Delivery]] = {}
    for _, fields in redis.xrevrange(keys.notify_log, count=LOG_SCAN):
        row = decode_fields(fields)
        if row.get("alert") in wanted:
            by_alert.setdefault(row["alert"], []).append(
                Delivery(
                    row.get("notifier", "?"),
                    row.get("outcome", "?"),
                    int(row.get("attempts") or 0),
                    row.get("http_status", ""),
                    row.get("detail", ""),
                )
            )
    names = sorted({plugin.name for plugin in server.pipeline.notifiers} | set(notifier_names(redis, keys)))
    for name in names:
        jobs = pending_jobs(redis, keys, name, sorted(wanted))
        failing = retrying_ids(redis, keys, name, list(jobs))
        for job in jobs.values():
            if not any(d.notifier == name for d in by_alert.get(job.id, [])):
                outcome = "retrying" if job.id in failing else "queued"
                status = "" if job.last_status is None else str(job.last_status)
                by_alert.setdefault(job.id, []).append(
                    Delivery(name, outcome, job.attempts, status, job.last_error)
                )
    failed = [decode_fields(fields) for _, fields in redis.xrevrange(keys.notify_failed, count=20)]
    waiting = [found for found in (retrying(redis, keys, name) for name in names) if found.count]
    mutes = Mutes(server.client, keys).active(now)
    return AlertsPage([(a, by_alert.get(a.id, [])) for a in alerts], failed, mutes, now, waiting)


def pretty(value: Any) -> str:
    """A details value as text for a page (the template escapes it)."""
    return value if isinstance(value, str) else json.dumps(value, default=str)
