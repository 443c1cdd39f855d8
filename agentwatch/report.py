"""Fleet reports: per agent uptime, beats, incidents with durations, tokens and cost; fleet totals.

Two sources, neither of them the raw event stream:

* **beats, tokens, cost** are differences of running totals (rollups.py): now minus the latest
  snapshot at or before the requested start. So the report's span starts on that snapshot's
  boundary (``from``; ``requested_from`` is what was asked), and a report over 7 days costs two
  reads per agent. When no snapshot reaches back that far (older ones expired after
  ``[report] retention``), the span starts at the earliest snapshot instead and the report says
  ``partial``: it never counts "everything ever" as if it were the period.
* **uptime and incidents** come from the alerts stream, the state history: an agent is *down*
  from the moment its silence, stall or exit incident began (the last sign of life, or the
  last beat, as the alert records it) until the incident resolved. Uptime is the share of the
  same span, from when the agent was first seen if later, that it was not down. Incidents
  still open are also read from the incident hashes, so they count however old their firing
  alert is; but the alerts stream is capped, and when it no longer reaches back to the span's
  start the report says so (``history_complete: false``) instead of overstating uptime.

``from``, ``to`` and ``period_s`` describe the one span that counts, uptime and incidents are
all measured over.

The dict :func:`build_report` returns is the stable ``report --json`` format (docs/operations.md)
and what a webhook receives as a scheduled report.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import redis as redis_py

from agentwatch.alerts import PIPELINE_AGENT, Alert, Incidents, decode_alert, iso_ms
from agentwatch.codec import entry_ms
from agentwatch.config import Pipeline, ReportSection, format_duration
from agentwatch.errors import InvalidEntry
from agentwatch.facts import read_facts
from agentwatch.redisconn import Client, server_time_ms
from agentwatch.rollups import Base, Totals, base_totals

DOWN_DETECTORS: Final = ("silence", "stall", "exit")
"""Incidents during which an agent counts as down (it is not doing its work)."""
_LOOKBACK_MS: Final = 7 * 86400_000
"""How far before the period to look for the firing alert of an incident still open in it."""


@dataclass
class _Incident:
    agent: str
    detector: str
    severity: str
    summary: str
    start_ms: int
    fired_ms: int
    end_ms: int | None = None

    def clipped(self, lo: int, hi: int) -> int:
        end = self.end_ms if self.end_ms is not None else hi
        return max(0, min(end, hi) - max(self.start_ms, lo))


def build_report(
    client: Client,
    pipeline: Pipeline,
    *,
    since_s: float,
    now_ms: int | None = None,
    agents: str | None = None,
) -> dict[str, Any]:
    """The report over the last ``since_s`` seconds (``agents``: only names matching this glob)."""
    from detectors.agent import read_agents  # noqa: PLC0415 - the spine imports plugins lazily

    keys = pipeline.keys
    now = server_time_ms(client) if now_ms is None else now_ms
    requested = now - int(since_s * 1000)
    records = read_agents(client, keys)
    records.pop(PIPELINE_AGENT, None)
    # Agents the detectors forgot have no record: nothing to report (and no totals to subtract).
    names = sorted(n for n in records if agents is None or fnmatch.fnmatchcase(n, agents))
    facts = read_facts(client, keys, names)
    first_seen = {
        name: int(facts.get(name, {}).get("first_ms") or records[name].get("started_ms") or requested)
        for name in names
    }
    base = base_totals(client, keys, requested, names)
    begin, partial = _span_start(base, requested, first_seen, now)
    incidents = _incidents(client, pipeline, begin, now)
    history = _history(client, pipeline, begin, now)
    unpriced = _unpriced(client, pipeline, names, begin, now)
    rows = []
    for name in names:
        first = first_seen[name]
        if first > now:
            continue
        spent = Totals.of_record(records[name]).since(base.totals.get(name, Totals()))
        observed_from = max(begin, first)
        mine = [i for i in incidents if i.agent == name]
        down = [(i.start_ms, i.end_ms or now) for i in mine if i.detector in DOWN_DETECTORS]
        down_ms = _union_ms(down, observed_from, now)
        observed_ms = max(1, now - observed_from)
        rows.append(
            {
                "agent": name,
                "first_seen": iso_ms(first),
                "uptime_pct": round(100 * (1 - down_ms / observed_ms), 3),
                "down_s": round(down_ms / 1000, 3),
                "beats": round(spent.beats),
                "tokens": round(spent.tokens),
                # None: unknown (beats with tokens but no price, none priced): never $0.00
                "cost": None if unpriced.get(name) and not spent.cost else round(spent.cost, 6),
                "unpriced_beats": unpriced.get(name, 0),
                "incidents": [_incident_dict(i, begin, now) for i in mine],
            }
        )
    return {
        "from": iso_ms(begin),
        "to": iso_ms(now),
        "period_s": round((now - begin) / 1000, 3),
        "requested_from": iso_ms(requested),
        "partial": partial,
        "history_complete": history is None,
        "history_from": None if history is None else iso_ms(history),
        "prefix": pipeline.settings.redis.prefix,
        "agents": rows,
        "fleet": _fleet(rows, [i for i in incidents if i.agent == PIPELINE_AGENT], begin, now),
        # budgets over several agents (scope = "together"): their incidents name the glob
        "budget_incidents": [
            _incident_dict(i, begin, now) | {"agents": i.agent}
            for i in incidents
            if i.detector == "budget" and i.agent not in rows_named(rows)
        ],
    }


def rows_named(rows: list[dict[str, Any]]) -> set[str]:
    return {row["agent"] for row in rows}


def _unpriced(client: Client, pipeline: Pipeline, names: list[str], begin: int, now: int) -> dict[str, int]:
    """Beats whose price was unknown, per agent, over the days the period touches (the spend
    ledger keeps them per calendar day in ``[report] timezone``, 40 days)."""
    from agentwatch.spend import Ledger  # noqa: PLC0415

    ledger = Ledger(client, pipeline.keys, pipeline.settings.report.zone)
    first, last = ledger.clock("day", begin).id, ledger.clock("day", now).id
    return {
        name: total
        for name, windows in ledger.read(names).items()
        if (total := sum(s.unpriced for wid, s in windows.items() if wid[0] == "d" and first <= wid <= last))
    }


def _span_start(base: Base, requested: int, first_seen: dict[str, int], now: int) -> tuple[int, bool]:
    """Where the report's one span begins, and whether that is later than was asked (partial).

    Counts are differences against a snapshot, so the span begins at that snapshot: the latest
    at or before the requested start (a bucket boundary, so up to one bucket earlier), or, when
    the rollups do not reach back that far, the earliest one (later than asked: partial). With
    no snapshot at all, agents count from their first sighting: the span begins at the oldest
    of those if that is before the requested start (partial: the counts include older events).
    """
    if base.from_ms is not None:
        return min(base.from_ms, now), base.partial
    older = [first for first in first_seen.values() if first < requested]
    if older:
        return min(older), True
    return requested, False


def _history(client: Client, pipeline: Pipeline, begin: int, now: int) -> int | None:
    """None if the alerts stream (the state history) covers the span; else the time of its
    oldest entry: older alerts were trimmed (``[streams] alerts_max_len`` or ``alerts_retention``)
    and incidents that began and ended before it are missing from uptime."""
    redis: Any = client
    try:
        info = redis.xinfo_stream(pipeline.keys.alerts)
    except redis_py.ResponseError:
        return None  # no alert was ever published
    first = info.get("first-entry")
    if not first:
        return None
    oldest = entry_ms(first[0])
    if oldest <= begin:
        return None
    added = info.get("entries-added")
    if added is not None:
        trimmed = int(added) > int(info["length"])
    else:  # Redis < 7 does not count what was added: judge by the caps
        streams = pipeline.settings.streams
        trimmed = int(info["length"]) >= 0.9 * streams.alerts_max_len or (
            now - begin > streams.alerts_retention_s * 1000
        )
    return oldest if trimmed else None


def _fleet(rows: list[dict[str, Any]], own: list[_Incident], start: int, now: int) -> dict[str, Any]:
    observed = len(rows)
    return {
        "agents": observed,
        "uptime_pct": round(sum(r["uptime_pct"] for r in rows) / observed, 3) if observed else None,
        "down_s": round(sum(r["down_s"] for r in rows), 3),
        "beats": sum(r["beats"] for r in rows),
        "tokens": sum(r["tokens"] for r in rows),
        "cost": round(sum(r["cost"] or 0.0 for r in rows), 6),
        "unpriced_beats": sum(r["unpriced_beats"] for r in rows),
        "incidents": sum(len(r["incidents"]) for r in rows),
        "pipeline_incidents": [_incident_dict(i, start, now) for i in own],
    }


def _incident_dict(incident: _Incident, start: int, now: int) -> dict[str, Any]:
    end = incident.end_ms
    return {
        "detector": incident.detector,
        "severity": incident.severity,
        "summary": incident.summary,
        "from": iso_ms(incident.start_ms),
        "to": iso_ms(end) if end is not None else None,
        "open": end is None,
        "duration_s": round(((end if end is not None else now) - incident.start_ms) / 1000, 3),
        "in_period_s": round(incident.clipped(start, now) / 1000, 3),
    }


def _incidents(client: Client, pipeline: Pipeline, start: int, now: int) -> list[_Incident]:
    """Incidents that overlap [start, now], from the alerts stream (firing/resolved pairs)."""
    redis: Any = client
    open_by_key: dict[str, _Incident] = {}
    found: list[_Incident] = []
    for _, fields in _scan(redis, pipeline.keys.alerts, start - _LOOKBACK_MS, now):
        try:
            alert = decode_alert(fields[b"d"])
        except (InvalidEntry, KeyError):
            continue
        if alert.status == "firing" and (raised := open_by_key.get(alert.dedup_key)) is not None:
            raised.severity, raised.summary = (
                alert.severity,
                alert.summary,
            )  # a budget: warning, then exceeded
        elif alert.status == "firing":
            open_by_key[alert.dedup_key] = _Incident(
                alert.agent, alert.detector, alert.severity, alert.summary, _began(alert), alert.at_ms
            )
        elif (incident := open_by_key.pop(alert.dedup_key, None)) is not None:
            incident.end_ms = alert.at_ms
            found.append(incident)
        else:  # resolved; its firing is older than the lookback
            duration = float(alert.details.get("duration_s", 0))
            began = alert.at_ms - int(duration * 1000)
            found.append(
                _Incident(
                    alert.agent, alert.detector, alert.severity, alert.summary, began, began, alert.at_ms
                )
            )
    # Incidents still open whose firing alert the scan did not find (it is older than the
    # lookback, or was trimmed from the capped stream): the incident hashes still hold them.
    for dedup_key, held in Incidents(client, pipeline.keys).all_open().items():
        agent, _, detector = dedup_key.partition("/")
        agent, detector = str(held.get("agent") or agent), str(held.get("detector") or detector)
        if dedup_key not in open_by_key and held.get("since_ms"):
            since = int(held["since_ms"])
            open_by_key[dedup_key] = _Incident(agent, detector, str(held.get("severity") or "error"),
                                               str(held.get("summary") or ""), since, since)  # fmt: skip
    found += open_by_key.values()
    overlapping = (i for i in found if (i.end_ms is None or i.end_ms >= start) and i.start_ms <= now)
    return sorted(overlapping, key=lambda i: i.start_ms)


def _began(alert: Alert) -> int:
    """When the trouble began, by the alert's own account: the last sign of life or last beat."""
    for key in ("last_seen_ms", "last_beat_ms"):
        value = alert.details.get(key)
        if isinstance(value, int | float) and 0 < value <= alert.at_ms:
            return int(value)
    return alert.at_ms


def _scan(
    redis: Any, stream: str, lo: int, hi: int, page: int = 1000
) -> Iterator[tuple[bytes, dict[bytes, bytes]]]:
    """Entries with ids in [lo, hi] ms, a page at a time (an id of "hi" alone includes all of hi)."""
    cursor = f"{max(lo, 0)}-0"
    while True:
        entries = redis.xrange(stream, cursor, str(hi), count=page)
        yield from entries
        if len(entries) < page:
            return
        cursor = "(" + entries[-1][0].decode()


def _union_ms(intervals: list[tuple[int, int]], lo: int, hi: int) -> int:
    """Total length of the union of intervals, clipped to [lo, hi]."""
    total, reach = 0, lo
    for a, b in sorted((max(a, lo), min(b, hi)) for a, b in intervals):
        if b <= reach:
            continue
        total += b - max(a, reach)
        reach = b
    return total


def render_text(report: dict[str, Any]) -> str:
    """The report as plain text, for Slack, apprise and the terminal."""
    fleet = report["fleet"]
    lines = [
        f"agentwatch report {report['from']} -> {report['to']} ({format_duration(report['period_s'])})",
        *notes(report),
        f"fleet: {fleet_summary(report)}",
    ]
    for row in report["agents"]:
        lines.append(
            f"- {row['agent']}: uptime {pct(row['uptime_pct'])}, {row['beats']:,} beats, "
            f"{row['tokens']:,} tokens, {money(row['cost'], row['unpriced_beats'])}"
        )
        for incident in row["incidents"]:
            state = "still open" if incident["open"] else f"lasted {format_duration(incident['duration_s'])}"
            lines.append(f"    {incident['detector']} ({state}): {incident['summary']}")
    for incident in report.get("budget_incidents", []):
        state = "still open" if incident["open"] else f"lasted {format_duration(incident['duration_s'])}"
        lines.append(f"budget of {incident['agents']} ({state}): {incident['summary']}")
    for incident in fleet["pipeline_incidents"]:
        lines.append(f"pipeline: {incident['summary']} ({format_duration(incident['duration_s'])})")
    return "\n".join(lines)


def fleet_summary(report: dict[str, Any]) -> str:
    """One line about the whole fleet: "3 agents, uptime 99.52%, 2 incidents, ..."."""
    fleet = report["fleet"]
    if not fleet["agents"]:
        return "no agents were seen in this period"
    agents = "1 agent" if fleet["agents"] == 1 else f"{fleet['agents']} agents"
    incidents = "1 incident" if fleet["incidents"] == 1 else f"{fleet['incidents']} incidents"
    return (
        f"{agents}, uptime {pct(fleet['uptime_pct'])}, {incidents}, {fleet['beats']:,} beats, "
        f"{fleet['tokens']:,} tokens, {money(fleet['cost'], fleet.get('unpriced_beats', 0))}"
    )


def money(cost: float | None, unpriced: int = 0) -> str:
    """``$1.23``; ``$1.23 (+4 unpriced beats)``; ``unknown (4 unpriced beats)``: never $0.00
    for spending whose price is unknown."""
    if cost is None:
        return f"unknown ({unpriced:,} unpriced beats)" if unpriced else "unknown"
    return f"${cost:,.2f}" + (f" (+{unpriced:,} unpriced beats)" if unpriced else "")


def notes(report: dict[str, Any]) -> list[str]:
    """What a reader must know about how far the figures reach (empty: they cover the period)."""
    out = []
    if report.get("partial"):
        out.append(
            f"note: covers only from {report['from']}, not from {report['requested_from']} as asked: "
            "no rollup reaches back further ([report] retention, or the pipeline is younger)"
        )
    if not report.get("history_complete", True):
        out.append(
            f"note: the alert history reaches back only to {report['history_from']} (older alerts were "
            "trimmed: [streams] alerts_max_len / alerts_retention); earlier downtime is missing from uptime"
        )
    return out


def pct(value: float | None) -> str:
    """A percentage as reports print it: two decimals, "n/a" when there is nothing to measure."""
    return "n/a" if value is None else f"{value:.2f}%"


def due_slot(now_ms: int, cfg: ReportSection) -> str | None:
    """The schedule slot a scheduled report is due for at ``now_ms`` (None: no schedule set).

    ``every``: slots are multiples of the period since the epoch; ``at``: one slot per local
    day, due from that day's ``at`` on. A slot is sent once (the caller records it).
    """
    if cfg.every_s is not None:
        every_ms = int(cfg.every_s * 1000)
        return f"every:{now_ms // every_ms * every_ms}"
    if cfg.at is not None:
        local = datetime.fromtimestamp(now_ms / 1000, tz=cfg.zone)
        hour, minute = (int(part) for part in cfg.at.split(":"))
        due = local.replace(hour=hour, minute=minute, second=0, microsecond=0)
        if local < due:
            due -= timedelta(days=1)
        return f"at:{due.date().isoformat()}"
    return None
