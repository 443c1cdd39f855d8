"""Schedules: cron agents, expected once per slot instead of every few seconds.

A glob under ``[detectors.silence.agents."<glob>"]`` with ``schedule = "*/15 * * * *"`` makes
its agents *scheduled* (Healthchecks' model). A scheduled agent is judged by its schedule, not
by the interval rule: it is never ``silence``, and a clean exit (code 0 without ``shutdown()``)
is the normal end of a run, not an ``exit`` page (silence.py ``watches``, exit.py). Crashes, signals and
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

How it runs: :class:`Schedule` is a stateful detector (detectors/base.py), made by the silence
detector as its companion (the keys are silence's, per glob). The shard's owner holds each
scheduled agent's watch in memory (:class:`ScheduleState`, checkpointed with the agent) and
feeds it the agent's events in stream order, once. Events only update the watch; every decision
is taken by :meth:`Schedule.on_due`, which calls :func:`decide` at the time the watch asked for
(:meth:`Schedule.due_ms`): the owed slot's end of grace, the run's ``max_runtime`` deadline, or
at once when an event may resolve an open incident or start a clock (a new agent, a new run).
After a gap in which nobody watched (``sight_ms``), the owed slot and the runtime are counted
from the end of the gap, as silence's clocks are. Agents no glob schedules get no state at all.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Final
from zoneinfo import ZoneInfo

from pydantic import Field, field_validator

from agentwatch.config import Seconds, format_duration
from agentwatch.cron import Cron, CronError
from detectors.base import Agent, ChildRun, Detector, DetectorConfig, DetectorContext, Event, Op

MISSED: Final = "schedule"
"""The ``detector`` name of a missed slot."""
OVERRAN: Final = "runtime"
"""The ``detector`` name of a run over ``max_runtime``."""
EARLY_MS: Final = 1000
"""A run that starts this long before a slot (or less) counts for that slot."""
_COUNT_MAX: Final = 10_000
"""Missed slots counted at most (a minutely job down for a month)."""
PLAN_CACHE_MAX: Final = 100_000
"""Agents whose plan is remembered (the cache starts afresh past it: a churning fleet)."""


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
    """What is known of an agent's runs (the watch's copy, kept by :class:`Schedule`)."""

    seen: int
    """Its last event of any kind (ms, Redis time)."""
    start: int
    """When its current run started: its ``start``, else its first event (0: not known)."""
    run: str
    """Its current run id."""
    finished: bool
    """The current run is over (see the module docstring)."""


@dataclass(frozen=True)
class Watch:
    """An agent's watch: its runs as last known, and its open incidents."""

    runs: Runs
    missed: dict[str, int] | None = None
    """The open ``schedule`` incident: ``slot`` it names, ``seen`` when it opened."""
    over: str | None = None
    """The run the open ``runtime`` incident is about."""


@dataclass
class Decision:
    """What :func:`decide` concluded: the watch to keep (None: drop it), alerts to publish as
    ``(detector, "f" | "r", facts)``, and when to look again (0: at the agent's next event:
    only a missed slot is open, and only news of the agent can change that)."""

    watch: Watch | None
    ops: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    due: int = 0


def decide(
    plan: Plan | None, runs: Runs | None, watch: Watch | None, limit_ms: int, sight_ms: int = 0
) -> Decision:
    """Every decision about a scheduled agent, at ``limit_ms`` (the time up to which every event
    is known). ``runs``: as known now (None: nothing known, e.g. forgotten: the watch's copy
    counts); ``watch``: as kept so far; ``sight_ms``: the end of the last gap in which nobody
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
    watch = Watch(runs, watch.missed, watch.over) if watch is not None else Watch(runs)
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


# -- the detector: the watch in memory, fed by the shard's owner -----------------------------


@dataclass(slots=True)
class ScheduleState:
    """A scheduled agent's watch (:attr:`Agent.states` ``["schedule"]``, checkpointed with the
    agent): what :func:`decide` needs of its runs, and the incidents it holds open. Only
    msgpack-able values: the engine checkpoints it as a list of these fields, in order."""

    seen_ms: int = 0
    """The agent's last event, any run, children included (a sign of life is a sign of life)."""
    run: str = ""
    """The current run as this watch knows it (its first event here started it)."""
    start_ms: int = 0
    """When the current run started: its first event (its ``start``, normally)."""
    process: bool = True
    """The current run is a process (its start named a ``pid``): it reports its own end with an
    ``exit``. False: an HTTP ping job, whose first beat after its start is its success. A run
    whose start was never seen counts as a process (the safe side: only an exit ends it)."""
    finished: bool = False
    """The current run is over: its exit, its ``shutdown()``, or a ping job's success beat."""
    missed_slot_ms: int | None = None
    """The slot the open ``schedule`` incident names (None: not open)."""
    missed_seen_ms: int = 0
    """The agent's last event when that incident opened: any later one resolves it."""
    overran_run: str | None = None
    """The run the open ``runtime`` incident is about (None: not open)."""
    due_ms: int = 0
    """When :meth:`Schedule.on_due` may have something to decide (0: at the next event only)."""


class Schedule(Detector[ScheduleConfig]):
    """The ``schedule`` and ``runtime`` incidents of scheduled agents (see the module docstring).

    Made by the silence detector as its companion, ``Schedule("schedule", silence_config, ctx)``:
    the config is silence's section (a :class:`ScheduleConfig`), read per agent with
    ``for_agent``. Schedules without their own ``timezone`` are in ``[report] timezone``."""

    Config = ScheduleConfig
    State = ScheduleState
    kinds = (MISSED, OVERRAN)
    listens = frozenset({"start", "beat", "pulse", "exit"})
    wakes_on_beats: ClassVar[bool] = True
    """Its due time changes at a beat only where :meth:`on_event` says so to the engine
    (``Engine.wake``): the engine does not ask :meth:`due_ms` at every other beat."""

    def __init__(self, name: str, config: ScheduleConfig, ctx: DetectorContext) -> None:
        super().__init__(name, config, ctx)
        self.timezone = ctx.settings.report.timezone
        self._plans: dict[int, tuple[ScheduleConfig, Plan | None]] = {}
        """Per config (one per glob, as ``for_agent`` gives them): the config, kept alive so
        its id is not reused, and its plan (cron parsing is not free)."""
        self._by_agent: dict[str, Plan | None] = {}
        """Per agent, its plan (asked at every beat of a scheduled agent: one look-up)."""

    @staticmethod
    def needed(config: ScheduleConfig) -> bool:
        """Whether ``config`` schedules any agent (the section or one of its globs): without, the
        silence detector need not make this companion at all (no hook would do anything)."""
        return config.schedule is not None or any("schedule" in keys for keys in config.agents.values())

    def plan_for(self, agent: str) -> Plan | None:
        """The schedule of ``agent`` (None: not scheduled); one :class:`Plan` per config glob."""
        try:
            return self._by_agent[agent]
        except KeyError:
            pass
        config = self.config.for_agent(agent)
        found = self._plans.get(id(config))
        if found is None or found[0] is not config:
            found = self._plans[id(config)] = (config, Plan.of(config, self.timezone))
        if len(self._by_agent) >= PLAN_CACHE_MAX:
            self._by_agent.clear()
        self._by_agent[agent] = found[1]
        return found[1]

    # -- the watch follows the agent's events (no decisions here: see on_due) -----------------

    def on_event(self, agent: Agent, event: Event, at_ms: int, child: ChildRun | None) -> None:
        watch: ScheduleState | None = agent.states.get(self.name)
        if watch is None:
            if self.plan_for(agent.name) is None:
                return  # not scheduled: no state at all
            watch = self.state(agent)
        seen = watch.seen_ms
        latest = agent.seen_ms if agent.seen_ms > at_ms else at_ms
        if latest > seen:
            watch.seen_ms = latest
        if (
            seen
            and event.get("kind") == "beat"
            and watch.process
            and watch.run == agent.run
            and watch.missed_slot_ms is None
            and watch.overran_run is None
        ):
            return  # a beat of the run the watch knows, nothing open: only seen_ms moves (the
            # usual event by far: a fleet's every beat; benchmarks/detectors_schedules.py)
        timed = False  # a new run whose max_runtime starts a clock
        run = agent.run
        if child is None and event.get("run") == run:  # the current run's (a str, as agent.run)
            if run != watch.run:  # its first event here (a new watch, or on_new_run came first)
                self._begin(watch, run, at_ms)
                timed = self._times_runs(agent.name)
            kind = event.get("kind")
            if kind == "beat":
                if not watch.process:
                    watch.finished = True
            elif kind == "start":
                watch.process = event.get("pid") is not None
            elif kind == "exit":
                watch.finished = True
        # Look at once only when that can change a decision early: a new run's ``max_runtime``
        # clock, or the resolve of an open incident. A new agent's first decision can say
        # nothing before the grace of the first slot after it was seen is over (decide's anchor
        # is that time or later): it is armed for then, not looked at on the next tick (a
        # fleet's first backlog). Otherwise the due time kept is at most early (news, a new
        # run too, only ever pushes the owed slot later), and its check re-arms the watch: a
        # fleet of cron agents without ``max_runtime`` is not decided again at every run it
        # starts (benchmarks/detectors_schedules.py).
        if timed or watch.missed_slot_ms is not None or watch.overran_run is not None:
            watch.due_ms = at_ms
        elif not seen:
            plan = self.plan_for(agent.name)
            due = at_ms if plan is None else plan.owed(latest) + plan.grace_ms
            watch.due_ms = due if not watch.due_ms or due < watch.due_ms else watch.due_ms
        else:
            return
        engine = self.ctx.shared.get("engine") if self.ctx is not None else None
        if engine is not None:
            engine.wake(self)

    def on_new_run(self, agent: Agent, at_ms: int) -> None:
        watch: ScheduleState | None = agent.states.get(self.name)
        if watch is not None:
            self._begin(watch, agent.run, at_ms)
            open_incident = watch.missed_slot_ms is not None or watch.overran_run is not None
            if open_incident or self._times_runs(agent.name):
                watch.due_ms = at_ms  # as on_event: only when that can change a decision early

    def _times_runs(self, agent: str) -> bool:
        """Whether ``agent``'s schedule has a ``max_runtime``: each new run starts a clock."""
        plan = self.plan_for(agent)
        return plan is not None and plan.max_runtime_ms is not None

    def on_retire(self, agent: Agent, at_ms: int) -> None:
        watch: ScheduleState | None = agent.states.get(self.name)
        if watch is not None:
            watch.finished = True
            if watch.overran_run is not None:
                watch.due_ms = at_ms

    @staticmethod
    def _begin(watch: ScheduleState, run: str, at_ms: int) -> None:
        """A new run, from ``at_ms``: not finished, a process until its start says otherwise."""
        watch.run, watch.start_ms, watch.process, watch.finished = run, at_ms, True, False

    # -- decisions ------------------------------------------------------------------------------

    def due_ms(self, agent: Agent) -> int:
        watch: ScheduleState | None = agent.states.get(self.name)
        if watch is None:
            return 0
        if self.plan_for(agent.name) is None:
            return 1  # no longer scheduled (the config changed): resolve and drop it at once
        return watch.due_ms

    def on_due(self, agent: Agent, now_ms: int, limit_ms: int, sight_ms: int) -> None:
        watch: ScheduleState | None = agent.states.get(self.name)
        if watch is None:
            return
        runs = Runs(watch.seen_ms, watch.start_ms, watch.run, watch.finished)
        missed = None
        if watch.missed_slot_ms is not None:
            missed = {"slot": watch.missed_slot_ms, "seen": watch.missed_seen_ms}
        before = Watch(runs, missed, watch.overran_run)
        got = decide(self.plan_for(agent.name), runs, before, limit_ms, sight_ms)
        for kind, how, facts in got.ops:
            if how == "f":
                self.decisions.open(agent, kind, now_ms, facts)
            else:
                self.decisions.close(agent, kind, now_ms, facts)
        if got.watch is None:
            del agent.states[self.name]
            return
        kept = got.watch
        watch.missed_slot_ms = None if kept.missed is None else kept.missed["slot"]
        watch.missed_seen_ms = 0 if kept.missed is None else kept.missed["seen"]
        watch.overran_run = kept.over
        watch.due_ms = got.due

    def render(self, agent: str, kind: str, op: Op) -> tuple[str, str, dict[str, Any]]:
        """(severity, summary, details): the module's :func:`render`, with the severity of the
        config (silence's ``severity`` for the agent; ``critical`` if the config has none)."""
        severity = str(getattr(self.config.for_agent(agent), "severity", "critical"))
        summary, details = render(agent, kind, op)  # (the module function, not this method)
        return severity, summary, details
