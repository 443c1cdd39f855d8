"""Schedules: cron agents, expected once per slot instead of every few seconds.

A glob under ``[detectors.silence.agents."<glob>"]`` with ``schedule = "*/15 * * * *"`` makes
its agents *scheduled* (Healthchecks' model). A scheduled agent is judged by its schedule, not
by the interval rule: it is never ``silence``, and a clean exit (code 0 without ``shutdown()``)
is the normal end of a run, not an ``exit`` page (:func:`profile`). Crashes, signals and
non-zero codes still page ``exit``; stall, tokens, loop and memory judge its runs as any other.

Two incidents, decided here and nowhere else (:func:`decide`, a pure function of the agent's
runs, its watch and the time):

* ``schedule`` (dedup key ``<agent>/schedule``): a slot passed without a run. After the agent
  was last seen, the next slot is *owed*; if nothing at all is seen from it (a start, a beat, a
  pulse, an HTTP ping) by ``slot + grace``, the incident opens, naming that slot: "expected at
  03:15 (*/15 * * * *, grace 5m), last run 03:00:02". It stays open, one incident however many
  slots pass, until the agent is seen again, and then resolves saying how many slots it missed.
  A run that starts up to :data:`EARLY_MS` before a slot counts for that slot (the cron host's
  clock and Redis's differ a little).
* ``runtime`` (dedup key ``<agent>/runtime``, only with ``max_runtime``): a run that started
  but has not finished ``max_runtime`` after its start. A *process* run (its start names a
  ``pid``: the producer) finishes with its ``exit`` (any: a clean end, ``shutdown()``, a crash);
  a run without a process to watch (an HTTP ping job: ``/start``, then ``/ping/<key>/<agent>``
  or ``/0`` on success) finishes with its first beat after the start, or its ``/fail``. It
  resolves when the run finishes or a new run replaces it (a process killed mid-way never
  finishes: this is what catches a SIGKILLed cron job).

An agent is expected from its first event on: one never seen is not late for anything.

How it runs: the batch update (state.py) keeps each agent's record as for any agent. Each
scheduled agent waits in the shard's ``schedule-due`` set, scored with the earliest time a check
could have something to decide (a lower bound, as silence's timers: an agent seen since is
re-armed later when its time comes). A batch moves an agent to score 0 (look at it next tick)
only when that can change a decision early: a new agent, a new run (its ``max_runtime`` clock),
or an agent with an open incident (its resolve). Each tick every worker claims the agents due by
``min(now, horizon)`` (the horizon: every older event has been applied, timers.py), decides in
Python (cron arithmetic is cronsim's), and
commits each decision with one script that checks the agent's watch did not change meanwhile
(two workers never both open or resolve), appends the alerts to the shard's intents (published
once, in order: intents.py) and re-arms the agent at its next deadline. A worker that dies
holding a claim leaves it to expire (the lease), and any worker decides the agent then. After a
gap in which nobody watched (``[detectors.lag] blind_after``), the owed slot is counted from the
end of the gap, as silence's clocks are.

Each agent's watch (``<prefix>:{k}:schedules``) keeps a copy of its last run, so a scheduled
agent whose record was forgotten (``[detectors.silence] forget``: a weekly job is quiet for a
week) is still expected.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final
from zoneinfo import ZoneInfo

from pydantic import Field, field_validator

from agentwatch.codec import Event
from agentwatch.config import Seconds, format_duration
from agentwatch.cron import Cron, CronError
from agentwatch.keys import shard_of
from agentwatch.worker import Message
from detectors import intents, record
from detectors.base import DetectorConfig
from detectors.layout import run_hash

if TYPE_CHECKING:
    from detectors.engine import Engine

log = logging.getLogger("agentwatch.detectors.schedule")

MISSED: Final = "schedule"
"""The ``detector`` name of a missed slot."""
OVERRAN: Final = "runtime"
"""The ``detector`` name of a run over ``max_runtime``."""
EARLY_MS: Final = 1000
"""A run that starts this long before a slot (or less) counts for that slot."""
PROFILE: Final[dict[str, float]] = {"sil_on": 0, "exit_clean": 0}
"""What a schedule changes in its agents' profile (state.PROFILE): no interval rule, and a
clean exit is how a run ends."""
CLAIM_BATCH: Final = 500
_ROUNDS: Final = 20
_CACHE_MAX: Final = 100_000
_OPEN_KEPT_MAX: Final = 10_000
REARM_MS: Final = 60_000
"""A missed-slot incident is looked at again this often even without news of its agent, and a
worker forgets which agents it armed this often (a lost due set fills again)."""
_UNKNOWN: Final = object()
_COUNT_MAX: Final = 10_000
"""Missed slots counted at most (a minutely job down for a month)."""


class ScheduleConfig(DetectorConfig):
    """The keys of a scheduled agent (set per glob under ``[detectors.silence.agents]``)."""

    schedule: str | None = Field(None, description='cron expression, e.g. "*/15 * * * *": one run per slot')
    grace_s: Seconds = Field(300.0, alias="grace", gt=0, description="a slot's run may be seen this late")
    max_runtime_s: Seconds | None = Field(
        None, alias="max_runtime", gt=0, description="a run not finished this long after its start: incident"
    )
    timezone: str | None = Field(None, description="of the schedule; default: [report] timezone")

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                Cron.parse(value)
            except CronError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                Cron.parse("* * * * *", value)
            except CronError as exc:
                raise ValueError(str(exc)) from None
        return value


def profile(config: ScheduleConfig) -> dict[str, float]:
    """The profile entries a schedule overrides for an agent with ``config`` (none: unscheduled)."""
    return dict(PROFILE) if config.schedule is not None else {}


def overrides_ignored(config: ScheduleConfig) -> list[str]:
    """Warnings for per-agent overrides whose keys a schedule makes moot (logged at start)."""
    found = []
    for glob, keys in config.agents.items():
        where = f'[detectors.silence.agents."{glob}"]'
        scheduled = "schedule" in keys or config.schedule is not None
        if scheduled and "after" in keys:
            found.append(f"{where}: schedule wins; after is not used for these agents")
        unused = sorted({"grace", "max_runtime", "timezone"} & set(keys))
        if unused and not scheduled:
            found.append(f"{where}: {', '.join(unused)} without schedule has no effect")
    return found


@dataclass(frozen=True)
class Plan:
    """One agent's schedule, validated."""

    cron: Cron
    grace_ms: int
    max_runtime_ms: int | None

    @classmethod
    def of(cls, config: ScheduleConfig, default_timezone: str) -> Plan | None:
        if config.schedule is None:
            return None
        cron = Cron.parse(config.schedule, config.timezone or default_timezone)
        runtime = None if config.max_runtime_s is None else round(config.max_runtime_s * 1000)
        return cls(cron, round(config.grace_s * 1000), runtime)

    def owed(self, anchor_ms: float) -> int:
        """The first slot after ``anchor_ms``, in ms."""
        return _next_slot(self.cron, int(anchor_ms // 1000))


@functools.lru_cache(maxsize=4096)
def _next_slot(cron: Cron, second: int) -> int:
    """Cached: cron's slots are whole seconds, and a fleet's agents of one glob ask about the same
    few seconds (cronsim parses the expression on every call)."""
    return round(cron.next_after(second) * 1000)


@dataclass(frozen=True)
class Runs:
    """What is known of an agent's runs: from its record, else from its watch's copy."""

    seen: int
    """Its last event of any kind (ms, Redis time)."""
    start: int
    """When its current run started (0: not known)."""
    run: int
    """Its current run (the record's hash of the run id)."""
    finished: bool
    """The current run is over (see the module docstring)."""

    @classmethod
    def of_record(cls, rec: dict[str, Any], process: bool) -> Runs:
        """``process``: the run's start named a pid (it reports its own end with an exit)."""
        over = bool(rec["flags"] & (record.RETIRED | record.EXITED))
        start, beat = int(rec["start"]), int(rec["beat"])
        pinged = not process and beat > 0 and beat >= start  # an HTTP ping job's success
        return cls(int(rec["seen"]), start, int(rec["run"]), over or pinged)


@dataclass(frozen=True)
class Watch:
    """An agent's watch, kept in Redis: its runs as last known, and its open incidents."""

    runs: Runs
    missed: dict[str, int] | None = None
    """The open ``schedule`` incident: ``slot`` it names, ``seen`` when it opened."""
    over: int | None = None
    """The run the open ``runtime`` incident is about."""

    def dump(self) -> str:
        r = self.runs
        runs = {"finished": r.finished, "run": r.run, "seen": r.seen, "start": r.start}
        return json.dumps({"missed": self.missed, "over": self.over, "runs": runs}, separators=(",", ":"))

    @classmethod
    def load(cls, raw: bytes | str | None) -> Watch | None:
        if not raw:
            return None
        data = json.loads(raw)
        return cls(Runs(**data["runs"]), data.get("missed"), data.get("over"))


@dataclass
class Decision:
    """What :func:`decide` concluded: the watch to keep (None: drop it), alerts to publish as
    ``(detector, "f" | "r", facts)``, and when to look again (0: at the agent's next event)."""

    watch: Watch | None
    ops: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    due: int = 0


def decide(
    plan: Plan | None, runs: Runs | None, watch: Watch | None, limit_ms: int, sight_ms: int = 0
) -> Decision:
    """Every decision about a scheduled agent, at ``limit_ms`` (the time up to which every event
    is known: ``min(now, horizon)``). ``runs``: from the agent's record (None: no record, e.g.
    forgotten); ``watch``: as kept so far; ``sight_ms``: the end of the last gap in which nobody
    watched (the owed slot and the runtime count from there at the earliest)."""
    if plan is None:  # no longer scheduled (the config changed): nothing to expect any more
        out = Decision(None)
        if watch is not None and watch.missed is not None:
            out.ops.append((MISSED, "r", {"how": "unscheduled", "slot": watch.missed["slot"]}))
        if watch is not None and watch.over is not None:
            out.ops.append((OVERRAN, "r", {"how": "unscheduled"}))
        return out
    runs = runs or (watch.runs if watch is not None else None)
    if runs is None or runs.seen <= 0:
        return Decision(watch)  # never seen: not expected yet
    watch = replace(watch, runs=runs) if watch is not None else Watch(runs)
    out = Decision(watch)
    dues: list[int] = []
    expr, zone = plan.cron.expr, plan.cron.tz.key

    missed = watch.missed
    if missed is not None and runs.seen > missed["seen"]:
        back = runs.start if runs.start > missed["seen"] else runs.seen  # its new run's start, if known
        count = _slots_between(plan, missed["slot"], back)
        facts = {"how": "ran", "slot": missed["slot"], "back": back, "missed": count, "tz": zone}
        out.ops.append((MISSED, "r", facts))
        missed = None
    if missed is None:
        anchor = max(runs.seen, runs.start + EARLY_MS if runs.start else 0, sight_ms)
        slot = plan.owed(anchor)
        if slot + plan.grace_ms <= limit_ms:
            missed = {"slot": slot, "seen": runs.seen}
            out.ops.append((MISSED, "f", {"slot": slot, "expr": expr, "tz": zone, "grace": plan.grace_ms,
                                          "start": runs.start, "seen": runs.seen}))  # fmt: skip
        else:
            dues.append(slot + plan.grace_ms)

    over = watch.over
    if over is not None and (plan.max_runtime_ms is None or runs.run != over or runs.finished):
        how = "replaced" if runs.run != over else "finished" if runs.finished else "unset"
        out.ops.append((OVERRAN, "r", {"how": how, "seen": runs.seen, "start": runs.start, "tz": zone}))
        over = None
    if over is None and plan.max_runtime_ms is not None and runs.start > 0 and not runs.finished:
        deadline = max(runs.start, sight_ms) + plan.max_runtime_ms
        if deadline <= limit_ms:
            over = runs.run
            out.ops.append((OVERRAN, "f", {"start": runs.start, "max": plan.max_runtime_ms, "seen": runs.seen,
                                           "tz": zone}))  # fmt: skip
        else:
            dues.append(deadline)

    if missed is not None:  # news of its agent wakes it; this is the safety net
        dues.append(limit_ms + REARM_MS)
    out.watch = Watch(runs, missed, over)
    out.due = min(dues) if dues else 0
    return out


def _slots_between(plan: Plan, first_ms: int, back_ms: int) -> int:
    """Slots from ``first_ms`` on whose grace ran out before ``back_ms``: the slots missed."""
    count, slot = 0, first_ms
    while slot + plan.grace_ms <= back_ms and count < _COUNT_MAX:
        count += 1
        slot = plan.owed(slot)
    return max(count, 1)


# -- wording ---------------------------------------------------------------------------------


def _clock(ms: float, tz: ZoneInfo, ref_ms: float | None = None) -> str:
    """``03:15`` (or ``03:15:02``), with the date when it is not the day of ``ref_ms``."""
    at = datetime.fromtimestamp(ms / 1000, UTC).astimezone(tz)
    text = at.strftime("%H:%M" if at.second == 0 and at.microsecond < 1000 else "%H:%M:%S")
    ref = datetime.fromtimestamp((ref_ms or ms) / 1000, UTC).astimezone(tz)
    return text if at.date() == ref.date() else f"{at:%Y-%m-%d} {text}"


def _iso(ms: float) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def render(agent: str, kind: str, op: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(summary, details) of one ``schedule`` or ``runtime`` op (the severity is silence's)."""
    f, at = op["f"], op["at"]
    tz = ZoneInfo(str(f.get("tz") or "UTC"))
    where = "" if tz.key == "UTC" else f" {tz.key}"
    if kind == MISSED and op["o"] == "f":
        slot, last, grace = f["slot"], f["start"] or f["seen"], f["grace"] / 1000
        summary = (f"{agent}: missed a scheduled run: expected at {_clock(slot, tz, at)} "
                   f"({f['expr']}{where}, grace {format_duration(grace)}), "
                   f"last run {_clock(last, tz, slot)}")  # fmt: skip
        details = {"slot": _iso(slot), "schedule": f["expr"], "timezone": tz.key, "grace_s": grace,
                   "last_run": _iso(last), "last_seen": _iso(f["seen"])}  # fmt: skip
        return summary, details
    if kind == MISSED:
        if f.get("how") == "unscheduled":
            return f"{agent}: no longer scheduled", {}
        n = int(f.get("missed") or 1)
        slots = f"{n} slot{'s' if n != 1 else ''}"
        summary = (f"{agent}: ran again at {_clock(f['back'], tz, at)}, {slots} missed "
                   f"since {_clock(f['slot'], tz, f['back'])}")  # fmt: skip
        return summary, {"slots_missed": n, "back": _iso(f["back"]), "slot": _iso(f["slot"])}
    if op["o"] == "f":
        took = max(0.0, (at - f["start"]) / 1000)
        summary = (f"{agent}: run started at {_clock(f['start'], tz, at)} still not finished after "
                   f"{format_duration(took)} (max_runtime {format_duration(f['max'] / 1000)}); last seen "
                   f"{_clock(f['seen'], tz, at)}")  # fmt: skip
        details = {"started": _iso(f["start"]), "max_runtime_s": f["max"] / 1000, "running_s": round(took, 3),
                   "last_seen": _iso(f["seen"])}  # fmt: skip
        return summary, details
    how = str(f.get("how"))
    if how == "finished" and f.get("start"):
        took = max(0.0, (f["seen"] - f["start"]) / 1000)
        return f"{agent}: the run finished after {format_duration(took)}", {"took_s": round(took, 3)}
    words = {"finished": "the run finished", "replaced": "a new run started", "unset": "max_runtime removed",
             "unscheduled": "no longer scheduled"}  # fmt: skip
    return f"{agent}: {words.get(how, 'over')}", {}


# -- the watch in Redis ----------------------------------------------------------------------

# KEYS: schedule-due, clock. ARGV: limit, k, claim until (ms).
# Returns [sight, agent...]: the agents due by limit, each now scored at the claim's end.
_CLAIM: Final = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, a in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[3], a) end
local sight = tonumber(redis.call('HGET', KEYS[2], 'sight')) or 0
table.insert(due, 1, sight)
return due
"""

# KEYS: schedules, schedule-due, intents, schedules-open. ARGV: owner, lease, claim (the score
# the claim set), then per agent 6 values: agent, watch read ('' none), watch to write (''
# drop), next due (0: at its next event), 1 if it has an open incident, ops (JSON list of
# [detector, o, at, facts]). An agent whose watch changed since it was read (another worker
# decided it) is left as it is and looked at again next tick. Returns the owned intents keys.
_COMMIT: Final = """
local OWNER, LEASE, CLAIM = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 4, #ARGV, 6 do
  local a, old, new, due, ops = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3]), ARGV[i + 5]
  local ours = tonumber(redis.call('ZSCORE', KEYS[2], a)) == CLAIM
  if (redis.call('HGET', KEYS[1], a) or '') ~= old then
    if ours then redis.call('ZADD', KEYS[2], 0, a) end
  else
    if new == '' then redis.call('HDEL', KEYS[1], a)
    elseif new ~= old then redis.call('HSET', KEYS[1], a, new) end
    if ARGV[i + 4] == '1' then redis.call('SADD', KEYS[4], a) else redis.call('SREM', KEYS[4], a) end
    if ops ~= '' then
      for _, op in ipairs(cjson.decode(ops)) do emit(a, op[1], op[2], op[3], op[4]) end
    end
    if ours then
      if due > 0 then redis.call('ZADD', KEYS[2], due, a) else redis.call('ZREM', KEYS[2], a) end
    end
  end
end
return flush_ops(KEYS[3], OWNER, LEASE)
"""


class Schedules:
    """The schedule checks of one worker (see the module docstring); made by the engine when
    the silence detector has a schedule anywhere."""

    @classmethod
    def of(cls, engine: Engine) -> Schedules | None:
        silence = engine.get("Silence")
        if silence is None:
            return None
        config = silence.config
        if config.schedule is None and not any("schedule" in keys for keys in config.agents.values()):
            return None
        return cls(engine, config)

    def __init__(self, engine: Engine, config: ScheduleConfig) -> None:
        self.engine = engine
        self.config = config
        self.keys = engine.keys
        self.timezone = engine.ctx.settings.report.timezone
        self._plans: dict[int, Plan | None] = {}
        self._by_agent: dict[str, Plan | None] = {}
        self._armed: set[str] = set()
        """Agents this worker put in the due set lately (forgotten every :data:`REARM_MS`, so a
        due set that was lost, a Redis restarted without persistence, fills again)."""
        self._rearm_at = 0.0
        self._open: dict[int, set[str] | None] = {}
        """Per shard, the open set as of the last check (None: too big to keep here)."""
        client = engine.client
        self.client: Any = client
        self._claim = client.register_script(_CLAIM)
        self._commit = client.register_script(intents.LUA_EMIT + _COMMIT)
        self.decided = 0
        """Decisions committed (alerts included): for tests and status."""

    def plan_for(self, agent: str) -> Plan | None:
        """The schedule of ``agent`` (None: not scheduled); one :class:`Plan` per config glob."""
        found = self._by_agent.get(agent, _UNKNOWN)
        if found is _UNKNOWN:
            config = self.config.for_agent(agent)
            key = id(config)
            if key not in self._plans:
                self._plans[key] = Plan.of(config, self.timezone)
            if len(self._by_agent) >= _CACHE_MAX:
                self._by_agent.clear()
            found = self._by_agent[agent] = self._plans[key]
        return found  # type: ignore[return-value]

    def resync(self) -> None:
        """At start: every agent with a watch, and every known agent a glob now schedules, is
        looked at once (a config change since the last run, a lost due set)."""
        for shard in range(max(self.keys.shards, 1)):
            agents = {self._text(a) for a in self.client.hkeys(self.keys.schedules(shard))}
            for name, _ in self.client.zscan_iter(self.keys.agents(shard), count=1000):
                agent = self._text(name)
                if self.plan_for(agent) is not None:
                    agents.add(agent)
            if agents:
                due = self.keys.schedule_due(shard)
                listed = sorted(agents)
                for i in range(0, len(listed), 1000):
                    self.client.zadd(due, dict.fromkeys(listed[i : i + 1000], 0), nx=True)

    def seen(self, messages: Sequence[Message[Event]]) -> None:
        """After a batch: arm its new scheduled agents, and have those with a new run or an open
        incident looked at next tick (see the module docstring)."""
        if time.monotonic() >= self._rearm_at or len(self._armed) > _CACHE_MAX:
            self._armed.clear()
            self._rearm_at = time.monotonic() + REARM_MS / 1000
        started: dict[str, bool] = {}
        for _, event in messages:
            if event["kind"] == "start":
                started[event["agent"]] = True
            else:
                started.setdefault(event["agent"], False)
        now: dict[int, list[str]] = {}
        new: dict[int, list[str]] = {}
        for agent, start in started.items():
            if self.plan_for(agent) is None:
                continue
            shard = shard_of(agent, self.keys.shards)
            opened = self._open.get(shard)
            if start or opened is None or agent in opened:
                now.setdefault(shard, []).append(agent)
            elif agent not in self._armed:
                new.setdefault(shard, []).append(agent)
                self._armed.add(agent)
        if not (now or new):
            return
        pipe = self.client.pipeline(transaction=False)
        for shard, agents in now.items():
            pipe.zadd(self.keys.schedule_due(shard), dict.fromkeys(agents, 0), lt=True)
        for shard, agents in new.items():
            pipe.zadd(self.keys.schedule_due(shard), dict.fromkeys(agents, 0), nx=True)
        pipe.execute()

    def check(self, shard: int, now_ms: int, limit_ms: int) -> None:
        """Decide every scheduled agent of ``shard`` due by ``limit_ms``."""
        keys = self.keys
        self._open[shard] = self._open_set(shard)
        claim = now_ms + self.engine.lease_ms
        for _ in range(_ROUNDS):  # bounded: a huge backlog continues next tick
            reply = self._claim(keys=[keys.schedule_due(shard), keys.clock(shard)],
                                args=[limit_ms, CLAIM_BATCH, claim])  # fmt: skip
            sight, agents = int(reply[0]), [self._text(a) for a in reply[1:]]
            if not agents:
                return
            raws = self.client.hmget(keys.schedules(shard), agents)
            recs = self.client.hmget(keys.states(shard), agents)
            facts = self.client.hmget(keys.facts(shard), agents)
            args: list[Any] = [self.engine.owner, self.engine.lease_ms, claim]
            for agent, raw, rec_raw, fact in zip(agents, raws, recs, facts, strict=True):
                rec = record.decode(rec_raw)
                runs = (
                    Runs.of_record(rec, _is_process(rec, fact))
                    if rec is not None and rec["seen"] > 0
                    else None
                )
                try:
                    watch = Watch.load(raw)
                except (ValueError, KeyError, TypeError):
                    log.warning("%r: unreadable schedule watch; starting afresh", agent)
                    watch = None
                got = decide(self.plan_for(agent), runs, watch, limit_ms, sight)
                ops = [[det, o, now_ms, facts] for det, o, facts in got.ops]
                new = got.watch.dump() if got.watch is not None else ""
                opened = got.watch is not None and (
                    got.watch.missed is not None or got.watch.over is not None
                )
                known = self._open.get(shard)
                if known is not None:  # this worker's own decisions count at once
                    (known.add if opened else known.discard)(agent)
                args += [
                    agent,
                    self._text(raw or b""),
                    new,
                    got.due,
                    int(opened),
                    json.dumps(ops) if ops else "",
                ]
            owned = self._commit(keys=[keys.schedules(shard), keys.schedule_due(shard), keys.intents(shard),
                                       keys.schedules_open(shard)], args=args)  # fmt: skip
            self.decided += len(agents)
            if owned:
                self.engine.publisher.publish(shard, owned)
            if len(agents) < CLAIM_BATCH:
                return

    def _open_set(self, shard: int) -> set[str] | None:
        """The shard's open set, when small enough to keep (the common case: empty)."""
        key = self.keys.schedules_open(shard)
        count = int(self.client.scard(key))
        if count > _OPEN_KEPT_MAX:
            return None
        return {self._text(a) for a in self.client.smembers(key)} if count else set()

    @staticmethod
    def _text(value: bytes | str) -> str:
        return value.decode() if isinstance(value, bytes) else value


def _is_process(rec: dict[str, Any], raw_fact: bytes | None) -> bool:
    """Whether the agent's current run is a process (its start facts, agentwatch/facts.py, name
    a ``pid``), which reports its own end; else (HTTP pings) its success beat ends it."""
    try:
        fact = json.loads(raw_fact) if raw_fact else {}
    except ValueError:
        return True
    if not isinstance(fact, dict) or not isinstance(fact.get("run"), str):
        return True
    return run_hash(fact["run"]) != int(rec["run"]) or fact.get("pid") is not None
