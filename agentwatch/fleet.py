"""The fleet as ``agentwatch status`` shows it: each agent's state, and the pipeline's own health.

Everything here is read from what the workers already keep (detector records, start facts, open
incidents, mutes, worker health hashes, rollup snapshots) plus the detector group's own numbers
(XINFO GROUPS, XPENDING): status never replays a stream, so it answers in milliseconds for a
large fleet. The dict :func:`fleet_status` returns is the stable ``status --json`` format
documented in docs/operations.md; add keys, never rename them.

States are judged as of the pipeline's *horizon*: the Redis time before which every event has
been applied to the records (the oldest entry the detector group has not yet read or not yet
acknowledged). With detection running that is "now" less a few milliseconds; with no detector
worker running it stands still, and so do the records. Judging "late" against the wall clock
then would turn every healthy agent late just because nobody reads its beats, so lateness is
measured up to the horizon, and ``pipeline.detecting`` says that detection is not running.
The records are the detectors' checkpoints (saved every half second), so the horizon is also
capped at the oldest checkpoint's time: an agent is never called late for beats applied but not
saved yet.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from agentwatch.alerts import PIPELINE_AGENT, Incidents, iso_ms
from agentwatch.config import Pipeline, format_duration, parse_duration
from agentwatch.facts import labels_of, read_facts
from agentwatch.halts import Halts
from agentwatch.keys import shard_of
from agentwatch.redisconn import Client, server_time_ms
from agentwatch.rollups import Totals, base_totals, local_midnight_ms
from agentwatch.spend import Ledger, Spent

if TYPE_CHECKING:
    from agentwatch.maintenance import Window
    from detectors.horizon import Positions
    from notifiers.routing import Mute

STATES: Final = ("ok", "late", "muted", "stalled", "down", "exited", "halted", "retired")
"""Every value ``state`` can take. Precedence when several apply: retired, halted, exited, down,
stalled, muted, late, ok (a muted agent that is down still shows ``down``; a halted agent shows
``halted`` whether it has exited or still calls ``heartbeat()``)."""
_DOWN_DETECTORS: Final = {
    "exit": "exited", "silence": "down", "stall": "stalled",
    "schedule": "down",  # a cron agent that missed its slot (detectors/schedule.py)
    "runtime": "stalled",  # a cron agent's run past its max_runtime
}  # fmt: skip
_NOT_RUNNING: Final = ("down", "exited", "retired")
"""States in which an agent spends nothing: its tokens/min is not shown."""
_DEFAULT_WINDOW_MS: Final = 60_000
_DEFAULT_STALL_AFTER_MS: Final = 120_000
_MIN_SPAN_MS: Final = 5_000
"""Younger than this, an agent's own tokens/min says too little (see _tokens_per_min)."""


def fleet_status(
    client: Client, pipeline: Pipeline, now_ms: int | None = None, only: Sequence[str] | None = None
) -> dict[str, Any]:
    """The whole ``status --json`` document (see the module docstring). With ``only``, just those
    agents (of them, the ones that exist) are read and listed: the dashboard's agent page, badges."""
    from detectors.agent import read_agents  # noqa: PLC0415 - the spine imports plugins lazily
    from detectors.tokens import TokenState  # noqa: PLC0415
    from notifiers.routing import Mutes  # noqa: PLC0415

    keys = pipeline.keys
    now = server_time_ms(client) if now_ms is None else now_ms
    records = read_agents(client, keys, only, states={"tokens": TokenState})
    records.pop(PIPELINE_AGENT, None)
    # Only agents with a detector record: one the detectors forgot has no state to show, and
    # its leftover facts (if any) must not make it look "ok" forever.
    names = sorted(records)
    facts = read_facts(client, keys, names)
    incidents = Incidents(client, keys).all_open()
    mutes = Mutes(client, keys).active(now)
    health = pipeline_health(client, pipeline, now, incidents)
    day_start = local_midnight_ms(now, pipeline.settings.report.zone)
    day = base_totals(client, keys, day_start, names)
    window_ms = _setting_ms(pipeline, "tokens", "window", _DEFAULT_WINDOW_MS)
    stall_after_ms = _setting_ms(pipeline, "stall", "after", _DEFAULT_STALL_AFTER_MS)
    halts = Halts(client, keys, Incidents(client, keys)).in_force(now)
    spend = _Spend(client, pipeline, now, names)
    windows, held_for = _holds(client, pipeline, now, incidents)
    agents = []
    for name in names:
        open_here = {
            key.split("/", 1)[1]: value for key, value in incidents.items() if key.split("/", 1)[0] == name
        }
        today: Totals | None
        totals = Totals.of_record(records[name])
        if day.from_ms is not None and not day.partial:
            today = totals.since(day.totals.get(name, Totals()))  # absent: first seen after it
        elif int(facts.get(name, {}).get("first_ms", now)) >= day_start:
            today = totals  # first seen today: all of it is today's
        else:
            today = None  # no snapshot from before today yet (the pipeline is younger than a day)
        row = _agent(name, record=records[name], fact=facts.get(name, {}), open_incidents=open_here,
                     mutes=mutes, now=now, judged_at=health["judged_ms"], today=today,
                     window_ms=window_ms, stall_after_ms=stall_after_ms)  # fmt: skip
        halt = next((h for h in halts if fnmatch.fnmatchcase(name, h.pattern)), None)
        if halt is not None and row["state"] != "retired":
            row["state"] = "halted"
        row["halt"] = None if halt is None else {
            "pattern": halt.pattern, "reason": halt.reason, "by": halt.by, "since": iso_ms(halt.at_ms),
            "until": None if halt.until_ms is None else iso_ms(halt.until_ms),
        }  # fmt: skip
        row.update(spend.of(name, row["cost_today"]))
        window = next((w for w in windows if w.covers(name, row["labels"])), None)
        row["maintenance"] = None if window is None else {"id": window.id, "until": iso_ms(window.end_ms)}
        row["held_for"] = held_for.get(name)
        row["dependents"] = sorted(child for child, parent in held_for.items() if parent == name)
        agents.append(row)
    today_from = day.from_ms if day.from_ms is not None and not day.partial else day_start
    return {
        "at": iso_ms(now),
        "prefix": pipeline.settings.redis.prefix,
        "today_from": iso_ms(today_from),
        "agents": agents,
        "pipeline": {k: v for k, v in health.items() if k not in ("horizon_ms", "judged_ms")},
        "maintenance": [window.to_dict() for window in windows],
    }


def _holds(
    client: Client, pipeline: Pipeline, now: int, incidents: dict[str, dict[str, Any]]
) -> tuple[list[Window], dict[str, str]]:
    """The maintenance windows in force, and child -> parent for each silence a dependency holds
    (notifiers/holds.py decides; this only shows what it recorded)."""
    from agentwatch.dependencies import Dependents  # noqa: PLC0415 - plugins: only when status runs
    from agentwatch.maintenance import windows  # noqa: PLC0415 - cronsim, likewise

    settings = pipeline.settings
    found = windows(client, pipeline.keys, settings.maintenance, settings.report.timezone, now)
    held = Dependents(client, pipeline.keys).by_parent(incidents)
    return [w for w in found if w.in_force(now)], {c: p for p, children in held.items() for c in children}


class _Spend:
    """Today's exact spend (the ledger, agentwatch/spend.py) and the budgets covering each agent."""

    def __init__(self, client: Client, pipeline: Pipeline, now: int, names: Sequence[str]) -> None:
        settings = pipeline.settings
        self.ledger = Ledger(client, pipeline.keys, settings.report.zone)
        self.now = now
        self.today = self.ledger.clock("day", now).id
        self.read = self.ledger.read(names)
        self.budgets = settings.budgets
        wanted = {(b.agents, self.ledger.clock(b.per, now).id) for b in self.budgets if b.scope == "together"}
        self.groups = self.ledger.groups(wanted)

    def of(self, agent: str, cost_today: float | None) -> dict[str, Any]:
        """``cost_today`` (None when unknown: nothing priced, some beats unpriced),
        ``unpriced_beats_today``, ``budgets`` (each covering budget's window and share used) and
        ``budget`` (the one of them most used, or None: what the dashboard shows)."""
        windows = self.read.get(agent, {})
        day = windows.get(self.today)
        if day is not None:
            cost_today = round(day.cost, 6) if day.beats or not day.unpriced else None
        budgets: list[dict[str, Any]] = []
        for index, budget in enumerate(self.budgets):
            if not fnmatch.fnmatchcase(agent, budget.agents):
                continue
            window = self.ledger.clock(budget.per, self.now)
            if budget.scope == "together":
                spent = self.groups.get((budget.agents, window.id), Spent())
            else:
                spent = windows.get(window.id, Spent())
            budgets.append({
                "index": index, "agents": budget.agents, "scope": budget.scope, "per": budget.per,
                "limit": budget.limit, "spent": round(spent.cost, 6),
                "used_pct": round(100 * spent.cost / budget.limit, 1),
                "unpriced_beats": spent.unpriced, "halt": budget.halt, "ends": iso_ms(window.end_ms),
            })  # fmt: skip
        return {
            "cost_today": cost_today,
            "unpriced_beats_today": day.unpriced if day else 0,
            "budgets": budgets,
            "budget": max(budgets, key=lambda b: b["used_pct"], default=None),
        }


def _agent(
    name: str,
    *,
    record: dict[str, Any],
    fact: dict[str, Any],
    open_incidents: dict[str, dict[str, Any]],
    mutes: list[Mute],
    now: int,
    judged_at: int,
    today: Totals | None,
    window_ms: int,
    stall_after_ms: int,
) -> dict[str, Any]:
    interval = round(float(fact.get("interval") or record.get("interval_s") or 0.0), 6)
    beat, pulse, seen = (int(record.get(k, 0)) for k in ("beat_ms", "pulse_ms", "seen_ms"))
    muted = any(fnmatch.fnmatchcase(name, m.agent) and not m.detector for m in mutes)
    totals = Totals.of_record(record)
    state = _state(record, open_incidents, muted=muted, interval=interval, at=min(now, judged_at),
                   stall_after_ms=stall_after_ms)  # fmt: skip
    return {
        "agent": name,
        "state": state,
        "muted": muted,
        "last_beat_age_s": _age(now, beat),
        "last_pulse_age_s": _age(now, pulse),
        "last_seen_age_s": _age(now, seen),
        "interval_s": interval or None,
        "tokens_per_min": _tokens_per_min(record, now, window_ms, state),
        "tokens_today": None if today is None else round(today.tokens),
        "cost_today": None if today is None else round(today.cost, 6),
        "beats_total": round(totals.beats),
        "tokens_total": round(totals.tokens),
        "cost_total": round(totals.cost, 6),
        "run": fact.get("run"),
        "host": fact.get("host"),
        "labels": labels_of(fact),
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
    at: int,
    stall_after_ms: int,
) -> str:
    """The agent's state as of ``at`` (the horizon: see the module docstring)."""
    if record.get("retired"):
        return "retired"
    for detector in ("exit", "silence", "schedule", "stall", "runtime"):
        if detector in open_incidents:
            return _DOWN_DETECTORS[detector]
    if muted:
        return "muted"
    if "schedule" in record.get("states", {}):
        return "ok"  # a cron agent between its runs: its schedule judges it, not its interval
    # Late: the work loop has not beaten for twice its declared interval (or, with no declared
    # interval, half the stall allowance), but no detector has fired yet. Counted like the
    # detectors count: from the last beat, or from the run's start for an agent that pulses
    # but has not beaten yet, and not before an extend() runs out (``clocks_from_ms``).
    late_after_ms = 2000 * interval if interval else stall_after_ms / 2
    beat, start, extended = (int(record.get(k, 0)) for k in ("beat_ms", "started_ms", "clocks_from_ms"))
    last = max(beat, start) or int(record.get("seen_ms", 0))
    if late_after_ms and last and at - max(last, extended) > late_after_ms:
        return "late"
    return "ok"


def _tokens_per_min(record: dict[str, Any], now: int, window_ms: int, state: str) -> float | None:
    """Tokens per minute over the last window-length (a sliding window), from the detector's
    rate windows (its ``tokens`` state): the current one (``window_start``, ``window_tokens``)
    and the one closed last (``closed_start``, ``closed_tokens``). Those windows are aligned to
    the wall clock, so dividing a window's tokens by the time since its boundary would
    understate an agent that started (or died) inside it.

    So each window's tokens are taken as spread over the part of it the agent was there for:
    from its run's start (``started_ms``) to its last event (``seen_ms``); the rate is what of
    them lies in the last window-length, over that length or, for an agent younger than it, over
    its age. An agent that stops spending decays to 0 one window-length after its last event.
    After a restart the windows may hold the previous run's tokens, and when that run ended is
    not kept: the rate is then over the whole window-length (it can read low for the first
    minute of the new run, never high). An agent that is down, exited or retired spends
    nothing: None. A life shorter than ``_MIN_SPAN_MS`` says too little: the EWMA of past
    windows stands in, if there are any (by design it does not learn a runaway)."""
    if state in _NOT_RUNNING:
        return None
    first_run = not record.get("prev_run")
    start = float(record.get("started_ms", 0)) if first_run else 0.0
    seen = float(record.get("seen_ms", 0)) or float(now)
    rate = record.get("states", {}).get("tokens") or {}
    since = now - window_ms
    spent = 0.0
    for begin, tokens in (
        (float(rate.get("window_start", 0)), float(rate.get("window_tokens", 0))),
        (float(rate.get("closed_start", 0)), float(rate.get("closed_tokens", 0))),
    ):
        if not begin or tokens <= 0:
            continue
        low = max(begin, start)
        high = max(low + 1, min(begin + window_ms, seen))
        share = (min(high, now) - max(low, since)) / (high - low)
        spent += tokens * min(1.0, max(0.0, share))
    span = min(window_ms, now - start) if start else window_ms
    if span >= min(_MIN_SPAN_MS, window_ms):
        return round(spent / span * 60_000, 1)
    weight = float(rate.get("rate_weight", 0))
    if weight > 0:
        return round(float(rate.get("rate_num", 0)) / weight * 60, 1)
    return None


def _setting_ms(pipeline: Pipeline, detector: str, key: str, default_ms: int) -> int:
    """A duration of a detector's section in ms (per-agent overrides aside, which status cannot
    see): the tokens rate window, the stall allowance.

    ``status`` loads the settings without the plugins (importing the detectors costs a CLI
    start-up numpy), so the value then comes from the ``[detectors.<name>]`` section itself."""
    for plugin in pipeline.detectors:
        if plugin.name == detector:
            return int(float(getattr(plugin.config, f"{key}_s", default_ms / 1000)) * 1000)
    section = pipeline.settings.detectors.get(detector, {})
    try:
        return int(parse_duration(section[key]) * 1000) if key in section else default_ms
    except ValueError:  # validated where the detectors run (and by check-config), not here
        return default_ms


def pipeline_health(
    client: Client, pipeline: Pipeline, now: int, incidents: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Workers alive (by kind), their counters, the detector group's lag and pending (read from
    Redis directly, so they are right with no worker running), dead letters, failed deliveries,
    whether detection is running, and ``horizon_ms`` (internal: see the module docstring)."""
    redis: Any = client
    keys = pipeline.keys
    workers = _workers(redis, pipeline, now)
    alive: dict[str, int] = {}
    for worker in workers:
        alive[str(worker["kind"])] = alive.get(str(worker["kind"]), 0) + 1
    from detectors.horizon import read_positions  # noqa: PLC0415 - the spine imports plugins lazily

    backlog = read_positions(redis, keys.event_streams(), now, [])  # what the detectors use too
    horizon = min(backlog.horizons, default=now)
    oldest = backlog.oldest_pending_ms
    own = {
        key.split("/", 1)[1]: value
        for key, value in (incidents or {}).items()
        if key.split("/", 1)[0] == PIPELINE_AGENT
    }
    detecting = alive.get("detectors", 0) > 0
    shards = shard_owners(redis, pipeline, now)
    return {
        "workers_alive": alive,
        "workers": workers,
        "detecting": detecting,
        "detecting_reason": None if detecting else _why_not_detecting(backlog, horizon, now),
        "applied_until": iso_ms(horizon),
        "lag": backlog.unread,
        "pending": backlog.pending,
        "oldest_pending_s": round(max(0, now - oldest) / 1000, 3) if oldest is not None else 0.0,
        "deadletter": int(redis.xlen(keys.deadletter)),
        # entries refused for a missing, wrong or stale signature, since the prefix was created
        "rejected": sum(
            _int(redis.hget(keys.stats, f"{kind}:rejected")) for kind in ("detectors", "notifiers")
        ),
        # events trimmed from a stream before any detector read them (detectors/lag.py counts them)
        "trimmed_unread": _int(redis.hget(keys.clock(shard_of(PIPELINE_AGENT, keys.shards)), "trimmed")),
        "failed_deliveries": int(redis.xlen(keys.notify_failed)),
        "deliveries": delivery_health(redis, pipeline, now),
        "shards": [{k: v for k, v in s.items() if k != "saved_ms"} for s in shards],
        "incidents": [
            {"detector": d, "since": iso_ms(int(i["since_ms"])), "summary": i.get("summary")}
            for d, i in sorted(own.items())
        ],
        "horizon_ms": horizon,
        # what the views can judge agents as of: the horizon, and no later than the detectors'
        # oldest checkpoint (saved every half second: the state is as of then)
        "judged_ms": min([horizon, *(s["saved_ms"] for s in shards if s["saved_ms"])]),
    }


def shard_owners(redis: Any, pipeline: Pipeline, now: int) -> list[dict[str, Any]]:
    """Per event shard: the detector worker that owns it (its lease; None: nobody, the shard
    is not being watched), how long the lease still runs, and the age of its last checkpoint
    (detectors/engine.py: what a successor would start from)."""
    from detectors.leases import parse_lease  # noqa: PLC0415 - the spine imports plugins lazily

    keys = pipeline.keys
    pipe = redis.pipeline(transaction=False)
    for shard in range(keys.shards):
        pipe.get(keys.lease(shard))
        pipe.pttl(keys.lease(shard))
        pipe.hmget(keys.checkpoint(shard), "saved_at", "last_id")
    replies = pipe.execute()
    out = []
    for shard in range(keys.shards):
        lease, ttl, (saved_at, last_id) = replies[3 * shard : 3 * shard + 3]
        held = parse_lease(lease)
        out.append({
            "shard": shard,
            "owner": held[1] if held else None,
            "lease_left_s": round(max(int(ttl), 0) / 1000, 3) if held else 0.0,
            "checkpoint_age_s": _age(now, int(saved_at)) if saved_at else None,
            "saved_ms": int(saved_at) if saved_at else 0,
            "applied_through": _str(last_id) if last_id else None,
        })  # fmt: skip
    return out


_FAILED_SCAN: Final = 100
"""Newest failed deliveries read for the per-notifier figures of the last 24 h."""
_DAY_MS: Final = 86_400_000


def delivery_health(redis: Any, pipeline: Pipeline, now: int) -> list[dict[str, Any]]:
    """Per notifier: deliveries waiting for a retry after a failed attempt (a receiver that is
    down shows here from its first failure, not only when ``retry_for`` gives up on it), those
    that failed for good in the last 24 h, and the newest error of either. Only notifiers with
    something wrong are listed; each entry's ``last_error`` is the receiver's own words."""
    from notifiers.queue import notifier_names, retrying  # noqa: PLC0415 - plugins load lazily

    keys = pipeline.keys
    names = set(notifier_names(redis, keys)) | {plugin.name for plugin in pipeline.notifiers}
    failed: dict[str, dict[str, Any]] = {}
    for _, fields in redis.xrevrange(keys.notify_failed, "+", now - _DAY_MS, count=_FAILED_SCAN):
        row = {_str(k): _str(v) for k, v in fields.items()}
        seen = failed.setdefault(row.get("notifier", "?"), {"count": 0, "row": row})
        seen["count"] += 1
    out = []
    for name in sorted(names | set(failed)):
        waiting = retrying(redis, keys, name)
        gone = failed.get(name)
        if not waiting.count and not gone:
            continue
        entry: dict[str, Any] = {"notifier": name, "retrying": waiting.count,
                                 "failed_24h": gone["count"] if gone else 0}  # fmt: skip
        newest_failed = int(gone["row"].get("failed_ms") or 0) if gone else 0
        if waiting.last is not None and (waiting.last_ms or 0) >= newest_failed:
            job = waiting.last
            entry.update(last_error=job.last_error, last_status=job.last_status,
                         last_error_at=iso_ms(waiting.last_ms or now),
                         last_error_age_s=_age(now, waiting.last_ms or now), last_attempts=job.attempts,
                         last_alert=job.id, last_state="retrying")  # fmt: skip
        elif gone:
            row = gone["row"]
            status = row.get("http_status", "")
            code = int(status) if status.isdigit() else None
            entry.update(last_error=row.get("reason", ""), last_status=code,
                         last_error_at=iso_ms(newest_failed), last_error_age_s=_age(now, newest_failed),
                         last_attempts=int(row.get("attempts") or 0),
                         last_alert=row.get("id", ""), last_state="failed")  # fmt: skip
        out.append(entry)
    return out


def _str(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _workers(redis: Any, pipeline: Pipeline, now: int) -> list[dict[str, Any]]:
    """Workers whose health hash still exists (it expires when a worker stops refreshing it)."""
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
                "skipped": _int(health.get("skipped")),
                "rejected": _int(health.get("rejected")),
                "broken": [name for name in (health.get("broken") or "").split(",") if name],
                "lag": _int(health.get("lag")),
                "pending": _int(health.get("pending")),
                "oldest_pending_s": _int(health.get("oldest_pending_ms")) / 1000,
                "seen_age_s": _age(now, _int(health.get("seen_ms"))),
            }
        )
    return workers


def _why_not_detecting(backlog: Positions, horizon: int, now: int) -> str:
    if backlog.group_missing:
        why = "no detector worker is running, and none has ever read this prefix's events"
    else:
        why = "no detector worker is running"
    if backlog.unread:
        why += f"; {backlog.unread:,} events wait unread"
    if now - horizon >= 1000:
        why += f"; agent states are as of {format_duration((now - horizon) / 1000)} ago"
    return why + " (start `agentwatch up` or `agentwatch worker detectors`)"


def _age(now: int, then: int) -> float | None:
    return round((now - then) / 1000, 3) if then else None


def _int(value: str | None) -> int:
    return int(float(value)) if value else 0
