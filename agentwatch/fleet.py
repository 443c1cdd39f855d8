"""The fleet as ``agentwatch status`` shows it: each agent's state, and the pipeline's own health.

Everything here is read from what the workers already keep (detector records, start facts, open
incidents, mutes, worker health hashes, rollup snapshots): status never replays a stream, so it
answers in milliseconds for a large fleet. The dict :func:`fleet_status` returns is the stable
``status --json`` format documented in docs/operations.md; add keys, never rename them.
"""

from __future__ import annotations

import fnmatch
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

from agentwatch.alerts import PIPELINE_AGENT, Incidents, iso_ms
from agentwatch.config import Pipeline
from agentwatch.facts import read_facts
from agentwatch.redisconn import Client, server_time_ms
from agentwatch.rollups import Totals, totals_at

if TYPE_CHECKING:
    from notifiers.routing import Mute

STATES: Final = ("ok", "late", "muted", "stalled", "down", "exited", "retired")
"""Every value ``state`` can take. Precedence when several apply: retired, exited, down,
stalled, muted, late, ok (a muted agent that is down still shows ``down``)."""
_DOWN_DETECTORS: Final = {"exit": "exited", "silence": "down", "stall": "stalled"}


def fleet_status(client: Client, pipeline: Pipeline, now_ms: int | None = None) -> dict[str, Any]:
    """The whole ``status --json`` document (see the module docstring)."""
    from detectors.state import read_agents  # noqa: PLC0415 - the spine imports plugins lazily
    from notifiers.routing import Mutes  # noqa: PLC0415

    keys = pipeline.keys
    now = server_time_ms(client) if now_ms is None else now_ms
    records = read_agents(client, keys)
    records.pop(PIPELINE_AGENT, None)
    facts = read_facts(client, keys)
    incidents = Incidents(client, keys).all_open()
    mutes = Mutes(client, keys).active(now)
    day_start = _day_start_ms(now, pipeline)
    names = sorted(set(records) | set(facts))
    day_totals, _ = totals_at(client, keys, day_start, names)
    agents = []
    for name in names:
        record = records.get(name, {})
        fact = facts.get(name, {})
        open_here = {
            key.split("/", 1)[1]: value for key, value in incidents.items() if key.split("/", 1)[0] == name
        }
        agents.append(
            _agent(name, record=record, fact=fact, open_incidents=open_here, mutes=mutes, now=now,
                   day_start=day_start, day_totals=day_totals)
        )  # fmt: skip
    return {
        "at": iso_ms(now),
        "prefix": pipeline.settings.redis.prefix,
        "agents": agents,
        "pipeline": pipeline_health(client, pipeline, now, incidents),
    }


def _agent(
    name: str,
    *,
    record: dict[str, Any],
    fact: dict[str, Any],
    open_incidents: dict[str, dict[str, Any]],
    mutes: list[Mute],
    now: int,
    day_start: int,
    day_totals: dict[str, Totals],
) -> dict[str, Any]:
    interval = round(float(fact.get("interval") or record.get("iv") or 0.0), 6)  # record: float32
    beat, pulse, seen = (int(record.get(k, 0)) for k in ("beat", "pulse", "seen"))
    muted = any(fnmatch.fnmatchcase(name, m.agent) and not m.detector for m in mutes)
    totals = Totals.of_record(record)
    if name in day_totals:
        today = totals - day_totals[name]
    elif int(fact.get("first_ms", now)) >= day_start:
        today = totals  # first seen today: all of it is today's
    else:
        today = None  # no snapshot from before today yet (the pipeline is younger than a day)
    return {
        "agent": name,
        "state": _state(
            record, open_incidents, muted=muted, interval=interval, beat=beat, seen=seen, now=now
        ),
        "muted": muted,
        "last_beat_age_s": _age(now, beat),
        "last_pulse_age_s": _age(now, pulse),
        "last_seen_age_s": _age(now, seen),
        "interval_s": interval or None,
        "tokens_per_min": _tokens_per_min(record, now),
        "tokens_today": None if today is None else round(today.tokens),
        "cost_today": None if today is None else round(today.cost, 6),
        "beats_total": round(totals.beats),
        "tokens_total": round(totals.tokens),
        "cost_total": round(totals.cost, 6),
        "run": fact.get("run"),
        "host": fact.get("host"),
        "pid": fact.get("pid"),
        "version": fact.get("version"),
        "started": iso_ms(int(fact["started_ms"])) if fact.get("started_ms") else None,
        "incidents": [
            {
                "detector": detector,
                "since": iso_ms(int(incident["since_ms"])),
                "severity": incident.get("severity"),
                "summary": incident.get("summary"),
            }
            for detector, incident in sorted(open_incidents.items())
        ],
    }


def _state(
    record: dict[str, Any],
    open_incidents: dict[str, Any],
    *,
    muted: bool,
    interval: float,
    beat: int,
    seen: int,
    now: int,
) -> str:
    if record.get("retired"):
        return "retired"
    for detector in ("exit", "silence", "stall"):
        if detector in open_incidents:
            return _DOWN_DETECTORS[detector]
    if muted:
        return "muted"
    # Late: the work loop has not beaten for twice its declared interval (or, with no declared
    # interval, half the stall allowance), but no detector has fired yet.
    late_after_ms = 2000 * interval if interval else float(record.get("ta", 0)) / 2
    last = beat or seen
    if late_after_ms and last and now - last > late_after_ms:
        return "late"
    return "ok"


def _tokens_per_min(record: dict[str, Any], now: int) -> float | None:
    """The current rate window's tokens per minute once it is 10 s old, else the EWMA of past
    windows (which, by design, does not learn a runaway: so it is not used while one fires)."""
    started, tokens = float(record.get("ws", 0)), float(record.get("wt", 0))
    if started and now - started >= 10_000:
        return round(tokens / (now - started) * 60_000, 1)
    weight = float(record.get("rw", 0))
    if weight > 0:
        return round(float(record.get("rb", 0)) / weight * 60, 1)
    return None


def pipeline_health(
    client: Client, pipeline: Pipeline, now: int, incidents: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Workers alive (by kind), their counters, lag and pending, dead letters, failed deliveries."""
    redis: Any = client
    keys = pipeline.keys
    ttl_ms = int(pipeline.settings.worker.health_ttl_s * 1000)
    names = [n.decode() for n in redis.zrangebyscore(keys.workers, now - ttl_ms, "+inf")]
    workers = []
    for name in names:
        health = {k.decode(): v.decode() for k, v in redis.hgetall(keys.worker(name)).items()}
        if not health:
            continue  # expired between the two reads
        workers.append(
            {
                "name": name,
                "kind": health.get("kind"),
                "host": health.get("host"),
                "pid": _int(health.get("pid")),
                "state": health.get("state"),
                "processed": _int(health.get("processed")),
                "deadlettered": _int(health.get("deadlettered")),
                "reclaimed": _int(health.get("reclaimed")),
                "errors": _int(health.get("errors")),
                "lag": _int(health.get("lag")),
                "pending": _int(health.get("pending")),
                "oldest_pending_s": _int(health.get("oldest_pending_ms")) / 1000,
                "seen_age_s": _age(now, _int(health.get("seen_ms"))),
            }
        )
    alive: dict[str, int] = {}
    for worker in workers:
        alive[str(worker["kind"])] = alive.get(str(worker["kind"]), 0) + 1
    detectors = [w for w in workers if w["kind"] == "detectors"]
    own = {
        key.split("/", 1)[1]: value
        for key, value in (incidents or {}).items()
        if key.split("/", 1)[0] == PIPELINE_AGENT
    }
    return {
        "workers_alive": alive,
        "workers": workers,
        # Every detector worker reports its group's lag and pending: the same numbers, so max.
        "lag": max((int(w["lag"]) for w in detectors), default=None),
        "pending": max((int(w["pending"]) for w in detectors), default=None),
        "oldest_pending_s": max((float(w["oldest_pending_s"]) for w in detectors), default=None),
        "deadletter": int(redis.xlen(keys.deadletter)),
        "failed_deliveries": int(redis.xlen(keys.notify_failed)),
        "incidents": [
            {"detector": d, "since": iso_ms(int(i["since_ms"])), "summary": i.get("summary")}
            for d, i in sorted(own.items())
        ],
    }


def _day_start_ms(now: int, pipeline: Pipeline) -> int:
    """Midnight today in ``[report] timezone``, in ms: where "today" starts for cost_today."""
    zone = pipeline.settings.report.zone
    local = datetime.fromtimestamp(now / 1000, tz=zone)
    return int(local.replace(hour=0, minute=0, second=0, microsecond=0).timestamp() * 1000)


def _age(now: int, then: int) -> float | None:
    return round((now - then) / 1000, 3) if then else None


def _int(value: str | None) -> int:
    return int(float(value)) if value else 0
