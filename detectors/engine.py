"""The shard owner: applies each event once, in order, to agents kept in memory, and runs timers.

Stateful stream processing the way Kafka Streams does it, on Redis (docs/architecture.md):

* **One owner per shard.** A detector worker leases event shards (detectors/leases.py; more
  shards than workers, rebalanced as workers come and go) and reads only the streams it holds.
  Everything about an agent is decided by one process, so decisions are plain Python over plain
  objects: :class:`detectors.agent.Agent` and each detector's own ``State``.
* **Checkpoints.** Every half second, and at once when something was decided, the owner writes
  the agents that changed, the last applied entry id and its new decisions in one fenced
  transaction (detectors/checkpoint.py). A worker that dies is replaced by one that loads the
  checkpoint and replays the stream from its entry id up to what the group delivered (acked or
  not), then claims what its predecessor left pending; entries at or below the id are skipped.
  A frozen owner that wakes after losing its lease can neither checkpoint nor publish (the fence).
* **Decisions -> alerts.** Detectors decide through :class:`Decisions` (``open``/``close``).
  Each decision is saved with the checkpoint, then published through ``Incidents`` with the
  lease as fence, and dropped from the saved list: a crash in between publishes it at takeover
  (``Incidents`` ignores a second firing of an open incident).
* **Timers** are an in-memory heap per shard of each agent's earliest due time (the minimum of
  its detectors' ``due_ms``). A tick judges nothing past the shard's *horizon* (every older event
  has been applied, horizon.py). After a Redis outage the worker observed (worker.py,
  outages.py) it restarts every clock from the end of the outage plus :data:`RECONNECT_GRACE_MS`;
  after a gap in the checks that no running worker watched, longer than :meth:`sight_ms` (every
  worker down), from the end of the gap (``sight``).

Run classification, repeats and the fields every detector shares live in :meth:`Shard.apply`;
each detector's decisions live in its own module.
"""

from __future__ import annotations

import gc
import heapq
import json
import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import redis

from agentwatch.alerts import PIPELINE_AGENT
from agentwatch.codec import Event, entry_ms
from agentwatch.config import format_duration
from agentwatch.deadletter import entry_field
from agentwatch.errors import InvalidEntry
from agentwatch.halts import Halts
from agentwatch.keys import shard_of
from agentwatch.outages import STALL_MIN_MS
from agentwatch.redisconn import RECOVERABLE
from agentwatch.spend import GROUPS_FIELD, Applied, Spending, Tally, pack_shares, pack_tally
from agentwatch.worker import Handler, Message, Worker
from detectors import horizon
from detectors.agent import Agent, ChildRun
from detectors.base import Detector, DetectorContext, Op
from detectors.budgets import BudgetKeeper
from detectors.checkpoint import Checkpoints
from detectors.exit import Exit
from detectors.lag import Lag
from detectors.leases import ShardLeases
from detectors.silence import Silence
from detectors.stall import Stall

log = logging.getLogger("agentwatch.detectors")

D = TypeVar("D", bound=Detector[Any])

QUIET_WHEN_HALTED: Final = frozenset({"silence", "stall", "exit", "schedule", "runtime"})
"""Incidents a halt explains: not paged while the agent is halted (agentwatch/halts.py)."""
BLIND_AFTER_MS: Final = 5000
"""Default for ``[detectors.lag] blind_after`` when the lag detector is disabled."""
SIGHT_FLOOR_MS: Final = 1500
"""A gap in the checks that no running worker watched (:meth:`sight_ms`) shorter than this never
counts as unwatched, however short the silence allowances. (A worker that watched through the
gap tells an outage by what it observed instead: agentwatch/outages.py.)"""
RECONNECT_GRACE_MS: Final = 1500
"""After an outage, how long the producers may take to deliver what they buffered: the clocks
restart this much after its end. A producer that found Redis refusing retries every 1 s at most
(producers/_sender.py ``BACKOFF_MAX``), one kept waiting answers the moment Redis does, and it
flushes every 0.1 s (``flush_interval``); the rest is margin for a loaded host. docs/detectors.md
states the bound; tests/test_outages.py checks it against the producer's constants."""
FORGET_EVERY_S: Final = 60.0
LEASE_MS: Final = 3000
"""How long a shard stays with a worker that stopped renewing (SIGKILL, a freeze, a lost
network): the longest a failover delays detection, plus one tick (docs/architecture.md)."""
CHECKPOINT_EVERY_S: Final = 0.5
"""How often a shard's changes are saved when nothing was decided (a decision is saved, then
published, at once). Entries are acknowledged as they are applied: a successor replays the
stream from the checkpoint's entry id (``Engine._replay``), so nothing between is lost."""
REPLAY_COUNT: Final = 1000
GC_THRESHOLDS: Final = (10_000, 10, 10)
"""The cyclic garbage collector's thresholds in a process running the engine (Python's default:
700, 10, 10). Every batch allocates thousands of short-lived containers (events, entries), so at
the default a young collection starts every few hundred events, and the full collections they
lead to walk every agent in memory again; yet neither events nor agents form reference cycles,
so those collections free next to nothing. Measured (benchmarks/detectors_throughput.py,
100,000 agents): ~15 % of the worker's CPU at the default."""

CUR, NEW, PREV, FOREIGN, CHILD = "current", "new", "previous", "foreign", "child"
"""How an event relates to its agent's runs (:meth:`Shard.classify`)."""


@dataclass(eq=False)
class Shard:
    """One leased shard: its agents, their timers, what is not yet checkpointed or published."""

    index: int
    token: int
    agents: dict[str, Agent]
    last_id: bytes = b"0-0"
    """The last entry applied (entries at or below it are replays: skipped)."""
    tick_ms: int = 0
    """The last timer check (a checkpointed watch clock: a new owner knows how long nobody watched)."""
    sight_ms: int = 0
    """Nobody watched before this (see the module docstring)."""
    timers: list[tuple[int, str]] = field(default_factory=list)
    armed: dict[str, int] = field(default_factory=dict)
    """Agent -> the due time its heap entry holds (other heap entries of it are stale)."""
    dirty: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)
    decided: list[bytes] = field(default_factory=list)
    """Decisions made since the last checkpoint (JSON of [agent, kind, op])."""
    unpublished: list[bytes] = field(default_factory=list)
    """Checkpointed decisions not yet published, oldest first."""
    duplicates: int = 0
    saved_at: float = 0.0
    spent: set[str] = field(default_factory=set)
    """Agents whose spend changed since the last checkpoint."""
    shares: Tally = field(default_factory=Tally)
    """The shard's shares of the ``together`` budgets (agentwatch/spend.py)."""
    shares_changed: bool = False
    unclaimed: dict[str, Tally] = field(default_factory=dict)
    """Spend of agents without a record (forgotten): theirs again if they come back."""

    def agent(self, name: str) -> Agent:
        found = self.agents.get(name)
        if found is None:
            found = self.agents[name] = Agent(name)
            self.removed.discard(name)
        return found

    def classify(self, agent: Agent, event: Event, at_ms: int) -> tuple[str, ChildRun | None]:
        """How ``event`` relates to ``agent``'s runs:

        * CUR: the current run's; NEW: it begins a new run (a ``start`` newer than the current
          run's, or any event of an unknown run while the agent is retired, exited or silent:
          a restart whose ``start`` was lost);
        * CHILD: a worker process of the agent (its ``start`` named a ``parent``; its later
          events are known by ``agent.children``): its usage is the agent's;
        * PREV: the run before the current one (its late ``exit`` still alerts); FOREIGN:
          anything else, a sign of life only.
        """
        run = event["run"]
        if agent.run and run == agent.run:
            return CUR, None
        kind = event["kind"]
        parent = event.get("parent") if kind == "start" else None
        if kind == "start" and not parent and at_ms >= agent.started_ms:
            return NEW, None
        child = agent.children.get(run)
        if child is None and isinstance(parent, str) and parent:
            child = agent.children[run] = ChildRun(parent, started_ms=at_ms)
            pid, host = event.get("pid"), event.get("host")
            child.pid = pid if isinstance(pid, int) else 0
            child.host = host if isinstance(host, str) else ""
        if child is not None:
            return CHILD, child
        adopt = agent.retired or agent.exited or "silence" in agent.open
        if not agent.run or (adopt and at_ms > agent.seen_ms and run != agent.prev_run):
            return NEW, None
        if agent.prev_run and run == agent.prev_run:
            return PREV, None
        return FOREIGN, None

    def apply(self, engine: Engine, entry_id: bytes, event: Event) -> None:
        """Apply one event to its agent: the shared fields, then the detectors, in this order."""
        at = int(entry_id[: entry_id.index(b"-")])
        name = event["agent"]
        agent = self.agents.get(name) or self.agent(name)
        self.dirty.add(name)
        cls, child = self.classify(agent, event, at)
        kind = event["kind"]
        seq = event["seq"]
        silence, stall = engine.silence, engine.stall
        if cls == CHILD:
            assert child is not None
            if seq <= child.last_seq:
                self.duplicates += 1
                return
            child.last_seq = seq
            child.seen_ms = max(child.seen_ms, at)
            if event.get("interval") is not None:
                child.interval_s = float(event["interval"])
            if kind == "exit":
                child.exited = True
            agent.seen_ms = max(agent.seen_ms, at)
            if kind == "beat":
                agent.beats += 1
                _count_usage(agent, event)
                if engine.spending is not None:
                    self.spend(engine.spending, engine.applied, agent, event, at)
            for detector in engine.listeners[kind]:
                try:
                    detector.on_event(agent, event, at, child)
                except Exception as exc:
                    engine.failed(detector, "on_event", exc)
            engine._arm(self, agent)
            engine.woke.clear()
            return
        if (cls == NEW or (cls == CUR and seq > agent.last_seq)) and (
            # (what _backlog asks, loosened to skip its work for an agent that is on time)
            at - agent.seen_ms > engine.shortest_silence_ms or at - agent.beat_ms > engine.shortest_stall_ms
        ):
            self._backlog(engine, agent, event, at, cls)
        if cls == NEW:
            self.new_run(engine, agent, event, at)
        if cls in (CUR, NEW):
            if seq <= agent.last_seq:
                self.duplicates += 1
                return  # applied before: a producer repeating itself (`status` counts them)
            agent.last_seq = seq
            if cls == CUR and kind == "start" and (not agent.started_ms or at < agent.started_ms):
                agent.started_ms = at  # this run's own start, arriving after its first events
            interval = event.get("interval")
            if cls == CUR and interval is not None:
                agent.interval_s = float(interval)  # declared by the start, repeated by pulses
        seen0, beat0, clocks0 = agent.seen_ms, agent.beat_ms, agent.clocks_from_ms
        self.signs_of_life(engine, agent, event, at, cls)
        if agent.open:  # (most agents have no incident open)
            if silence is not None and at > seen0 and "silence" in agent.open:
                silence.back(agent, event, at, seen0)
            if stall is not None and cls == CUR and kind == "beat" and at > beat0 and "stall" in agent.open:
                stall.back(agent, at, beat0)
        if kind == "beat" and engine.spending is not None:
            # (every applied beat spent, a late one of an earlier run or another process's too)
            self.spend(engine.spending, engine.applied, agent, event, at)
        if cls in (CUR, NEW):
            if kind == "beat":
                agent.beats += 1
                _count_usage(agent, event)
            elif kind == "pulse":
                _track_pulse(agent, event, at)
            if kind == "exit" and event.get("reason") == "shutdown":
                self.retire(engine, agent, at)
            else:
                for detector in engine.listeners[kind]:
                    try:
                        detector.on_event(agent, event, at, None)
                    except Exception as exc:
                        engine.failed(detector, "on_event", exc)
        elif cls == PREV and kind == "exit" and event.get("reason") != "shutdown" and engine.exit is not None:
            engine.exit.previous_run(agent, event, at)
            agent.prev_run = ""  # once only
        if kind != "beat" or cls == NEW or agent.name not in self.armed or agent.clocks_from_ms < clocks0:
            engine._arm(self, agent)
        elif engine.timed_on_beats or engine.woke:
            engine._arm(self, agent, [*engine.timed_on_beats, *engine.woke])
        # (else: a beat only moves an armed agent's due times later, and the armed one is a
        # lower bound: the check re-arms it then. Not so a beat that begins a run or ends an
        # ``extend()``: the clocks start earlier again. A timed detector whose due time a beat
        # can bring earlier listens to beats: every beat asks those, and only those:
        # timed_on_beats; or, with ``wakes_on_beats``, only the beats it says so of: woke.)
        if engine.woke:  # (asked above, by either branch)
            engine.woke.clear()

    def _backlog(self, engine: Engine, agent: Agent, event: Event, at: int, cls: str) -> None:
        """A gap longer than an allowance found in the events themselves (a backlog applied
        late): what a watcher in real time would have told, silence and stall decide now.
        (asked only past the shortest allowance in force: most events are well within it)
        Not while the watch itself stopped before this event (Redis frozen or down, every
        worker gone): such a gap proves nothing; the next check restarts the clocks."""
        silence, stall = engine.silence, engine.stall
        quiet = at - max(agent.seen_ms, agent.clocks_from_ms)
        stuck = at - max(agent.beat_ms, agent.started_ms, agent.clocks_from_ms)
        late = quiet > engine.shortest_silence_ms or stuck > engine.shortest_stall_ms
        if late and self.tick_ms and at - max(self.tick_ms, engine.last_watch_ms) <= engine.sight_now:
            if silence is not None and agent.seen_ms and quiet > engine.shortest_silence_ms:
                silence.backlog(agent, event, at, cls == CUR, self.sight_ms)
            if stall is not None and cls == CUR and stuck > engine.shortest_stall_ms:
                stall.backlog(agent, event, at, self.sight_ms)

    def spend(self, spending: Spending, applied: Applied, agent: Agent, event: Event, at: int) -> None:
        """A beat's spend into the agent's windows (saved with the next checkpoint, so a window
        counts each beat once however often the stream is replayed)."""
        tally = agent.spent
        if tally is None:
            tally = self.unclaimed.pop(agent.name, None) or Tally()
        if spending.add(tally, self.shares, agent.name, event, at, applied):
            agent.spent = tally
            self.spent.add(agent.name)
            self.shares_changed = self.shares_changed or bool(applied.groups)

    def signs_of_life(self, engine: Engine, agent: Agent, event: Event, at: int, cls: str) -> None:
        """When the agent was seen, beat and pulsed; where its clocks start (``extend()``, or a
        return after a gap that proved nothing about it)."""
        stall = engine.stall
        kind = event["kind"]
        # (a gap shorter than half the shortest stall allowance proves something: skip the rest)
        gap = at - agent.seen_ms if agent.seen_ms else 0
        dead = stall.dead_after_ms(agent) if stall is not None and gap > engine.shortest_stall_ms / 2 else 0
        back = at if cls == CUR and dead and gap > dead else 0
        agent.seen_ms = max(agent.seen_ms, at)
        if cls == PREV:
            return
        extend = event.get("extend")
        if kind == "beat":
            if at >= agent.beat_ms:
                # a beat ends any extension announced before it (PROTOCOL.md: extend)
                agent.clocks_from_ms = at + int(extend * 1000) if extend else 0
                agent.beat_ms = at
                if agent.stack:
                    agent.stack, agent.stack_ms = "", 0
        elif extend:
            agent.clocks_from_ms = max(agent.clocks_from_ms, at + int(extend * 1000))
        if kind == "pulse" and at > agent.pulse_ms:
            # (the pulse period is not learnt from a gap that proved nothing: it is not one)
            gap = at - agent.pulse_ms if agent.pulse_ms else 0
            if gap > 0 and (not back or gap <= dead):
                agent.pulse_period_ms = gap
            agent.pulse_ms = at
            stack = event.get("stack")
            if stack and at > agent.beat_ms:
                agent.stack, agent.stack_ms = stack, at
        agent.clocks_from_ms = max(agent.clocks_from_ms, back)

    def new_run(self, engine: Engine, agent: Agent, event: Event, at: int) -> None:
        """``event`` begins a new run: the detectors close what was about the old run (their
        facts may quote it), then the run's shared fields start afresh."""
        for detector in engine.new_run_hooks:
            try:
                detector.on_new_run(agent, at)
            except Exception as exc:
                engine.failed(detector, "on_new_run", exc)
        if agent.run:
            agent.prev_run = agent.run
        agent.run = event["run"]
        agent.last_seq = -1
        agent.started_ms = at
        agent.beat_ms = agent.pulse_ms = agent.clocks_from_ms = 0
        interval = event.get("interval")
        if interval is not None:
            agent.interval_s = float(interval)
        elif event["kind"] == "start":
            agent.interval_s = 0.0
        agent.retired = agent.exited = False
        agent.rss_first = agent.rss_first_ms = agent.rss_last = agent.rss_peak = 0
        agent.stack, agent.stack_ms = "", 0
        # (a worker process may flush before its parent's start is applied: keep its children)
        agent.children = {run: c for run, c in agent.children.items() if c.parent == agent.run}

    def retire(self, engine: Engine, agent: Agent, at: int) -> None:
        """``shutdown()``: the agent stopped on purpose; nothing more is expected of it."""
        agent.retired = True
        for detector in engine.retire_hooks:
            try:
                detector.on_retire(agent, at)
            except Exception as exc:
                engine.failed(detector, "on_retire", exc)


class Engine(Handler[Event]):
    """The built-in detector engine of one worker (see the module docstring)."""

    name = "engine"

    def __init__(
        self,
        worker: Worker[Event],
        ctx: DetectorContext,
        detectors: Sequence[Detector[Any]],
        budgets: BudgetKeeper | None = None,
    ) -> None:
        self.worker = worker
        self.budgets = budgets
        """Spend and budgets: the engine adds each beat it applies to its agent's spend, and the
        keeper judges the budgets on what a batch added (detectors/budgets.py)."""
        self.spending = budgets.spending if budgets is not None else None
        self.applied = Applied()
        """What the batch being applied added to the spend windows."""
        self.sight_now = 0
        """:meth:`sight_ms` for the batch being applied (asked once per batch, not per event)."""
        self.ctx = ctx
        self.client: Any = ctx.client
        self.keys = ctx.keys
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}".replace(":", "-")
        self.detectors: list[Detector[Any]] = []
        for detector in detectors:
            self.detectors += [detector, *getattr(detector, "companions", ())]
        self.by_class = {type(d).__name__: d for d in self.detectors}
        self.silence = self._one(Silence)
        self.stall = self._one(Stall)
        self.exit = self._one(Exit)
        self.lag = self._one(Lag)
        self.shortest_silence_ms = self.silence.shortest_after_ms() if self.silence else 0
        self.shortest_stall_ms = self.stall.shortest_after_ms() if self.stall else 0
        self.renderers = {kind: d for d in self.detectors for kind in (d.kinds or (d.name,))}
        self.listeners: dict[str, list[Detector[Any]]] = {}
        for kind in ("beat", "pulse", "start", "exit"):
            self.listeners[kind] = [d for d in self.detectors if kind in d.listens]
        self.timed = [d for d in self.detectors if type(d).due_ms is not Detector.due_ms]
        # (a hook a detector does not override is the base's no-op: not called at all)
        self.new_run_hooks = [d for d in self.detectors if type(d).on_new_run is not Detector.on_new_run]
        self.retire_hooks = [d for d in self.detectors if type(d).on_retire is not Detector.on_retire]
        self.timed_on_beats = [
            d for d in self.timed if d in self.listeners["beat"] and not getattr(d, "wakes_on_beats", False)
        ]
        self.woke: list[Detector[Any]] = []
        """Detectors that said (:meth:`wake`) that the event being applied brought their due time
        earlier: a beat re-arms its (armed) agent for them. A timed detector listening to beats
        whose due time moves only where it knows it (``wakes_on_beats``, detectors/schedule.py)
        is asked only then, not at every beat of a fleet it watches."""
        self.state_classes = {d.name: d.State for d in self.detectors if d.State is not None}
        decisions = _Decisions(self)
        for detector in self.detectors:
            detector.decisions = decisions
        self.lease_ms = LEASE_MS
        self.leases = ShardLeases(self.client, self.keys, self.owner, self.lease_ms)
        self.checkpoints = Checkpoints(self.client, self.keys)
        self.halts = Halts(self.client, self.keys, ctx.incidents)
        self.shards: dict[int, Shard] = {}
        self.last_gap_ms = 0
        self.horizons: list[int] = []
        self._lost = [0] * len(self.keys.event_streams())
        self._next_forget = 0.0
        self._decided_shard: Shard | None = None
        self.last_watch_ms = 0
        self.restart_ms = 0
        """After the last outage this worker observed, every clock restarts here (Redis ms)."""
        self._outages_seen = 0
        self._watching: dict[int, Shard] = {}
        """The shards this engine checked at its previous tick (they were watched since)."""
        self._ticked_at = 0.0
        """When (monotonic) this engine's previous tick ran."""
        # A stall shorter than the worker counts can hold a beat back unseen: it must fit in what
        # the shortest allowance leaves over a beat interval (2/3 of it, less a flush), so the
        # worker counts stalls from a quarter of it (docs/detectors.md, "Redis outages").
        shortest = min(ms for ms in (self.shortest_silence_ms, self.shortest_stall_ms, 10**9) if ms)
        outages = worker.outages
        outages.stall_ms = max(STALL_MIN_MS, min(outages.stall_ms, shortest // 4))
        self.refused = ""
        """Why this worker takes no shard (the shard count changed under the state), or ""."""
        self._next_refusal_log = 0.0
        self._next_failure_log: dict[str, float] = {}
        ctx.shared["engine"] = self

    def failed(self, detector: Detector[Any], hook: str, exc: Exception) -> None:
        """A detector's stateful hook raised: counted under its name and logged (at most once a
        minute per detector); the other detectors still get the event, and the engine goes on.
        Redis unavailable is no bug of the detector's: that goes on up to the worker."""
        if isinstance(exc, RECOVERABLE):
            raise exc
        errors = self.ctx.stats.handler_errors
        errors[detector.name] = errors.get(detector.name, 0) + 1
        now = time.monotonic()
        if now >= self._next_failure_log.get(detector.name, 0.0):
            self._next_failure_log[detector.name] = now + 60
            log.error("detector %r raised in %s (isolated; the engine carries on)", detector.name, hook,
                      exc_info=exc)  # fmt: skip

    # -- settings shared by the detectors ----------------------------------------------------
    def wake(self, detector: Detector[Any]) -> None:
        """``detector`` (one with ``wakes_on_beats``) brought its due time for the agent of the
        event being applied earlier, from its ``on_event``: the engine asks its ``due_ms`` after
        this event even if it is a beat (it asks after every other event anyway)."""
        self.woke.append(detector)

    def get(self, kind: str) -> Detector[Any] | None:
        """The enabled built-in of class name ``kind`` (e.g. "Silence"), if any."""
        return self.by_class.get(kind)

    def _one(self, cls: type[D]) -> D | None:
        found = self.by_class.get(cls.__name__)
        return found if isinstance(found, cls) else None

    def blind_ms(self) -> int:
        """``[detectors.lag] blind_after`` in ms (its default when the lag detector is off)."""
        lag = self.lag
        return int(lag.config.blind_after_s * 1000) if lag is not None else BLIND_AFTER_MS

    def sight_ms(self) -> int:
        """How long without a timer check means nobody was watching, when no running worker
        watched the gap (every worker down, or a worker that cannot tell a stall from a starved
        CPU, outages.py): :meth:`blind_ms`, or the shortest silence ``after`` if that is shorter
        (but not below :data:`SIGHT_FLOOR_MS`). A gap shorter than blind_after but longer than an
        allowance (Redis restarted while the workers were down) would otherwise judge agents on
        time nobody watched, and page them falsely."""
        silence = self.silence
        if silence is None:
            return self.blind_ms()
        shortest = silence.shortest_after_ms()
        return min(self.blind_ms(), max(shortest, SIGHT_FLOOR_MS))

    # -- the runtime's hooks -------------------------------------------------------------------
    def on_start(self) -> None:
        gc.set_threshold(*GC_THRESHOLDS)
        self.worker.streams = []  # nothing until a lease is held (the first tick takes some)
        self.worker.trim_floor = self.trim_floor

    def on_batch(self, messages: Sequence[Message[Event]]) -> None:
        touched: set[Shard] = set()
        shards = self.keys.shards
        self.applied = applied = Applied()
        self.sight_now = self.sight_ms()
        for entry_id, event in messages:
            agent = event["agent"]
            shard = self.shards.get(shard_of(agent, shards) if shards > 1 else 0)
            if shard is None:  # an event in a stream not of its agent's shard (PROTOCOL.md)
                self.ctx.stats.handler_errors["engine-misplaced"] = (
                    self.ctx.stats.handler_errors.get("engine-misplaced", 0) + 1
                )
                continue
            if _after(entry_id, shard.last_id):
                self._decided_shard = shard
                shard.apply(self, entry_id, event)
                shard.last_id = entry_id
                touched.add(shard)
        if applied.agents or applied.groups:
            self._judge_budgets(applied, messages)
        now = time.monotonic()
        for shard in touched:  # decisions go out at once; the rest is saved every half second
            if shard.decided or now - shard.saved_at >= CHECKPOINT_EVERY_S:
                self.checkpoint(shard)

    def _judge_budgets(self, applied: Applied, messages: Sequence[Message[Event]]) -> None:
        """The budgets on the windows the batch added to, at their totals after it. A failure is
        the budget keeper's, isolated like a detector's (the next beat judges again)."""
        assert self.budgets is not None
        now = max(entry_ms(entry_id) for entry_id, _ in messages)
        try:
            self.budgets.decide(applied, now, {index: shard.shares for index, shard in self.shards.items()})
        except RECOVERABLE:
            raise
        except Exception:
            errors = self.ctx.stats.handler_errors
            errors[self.budgets.name] = errors.get(self.budgets.name, 0) + 1
            log.exception("the budgets could not judge a batch (isolated; the engine carries on)")

    def on_tick(self, now_ms: int) -> None:
        if self.refused:
            if time.monotonic() >= self._next_refusal_log:
                self._next_refusal_log = time.monotonic() + 60
                log.error("%s", self.refused)
            return
        self.last_watch_ms = self._last_watch()
        outages = self.worker.outages
        if outages.count > self._outages_seen:
            # Redis was away until about now: agents could not send; their producers need up
            # to RECONNECT_GRACE_MS to deliver what they buffered.
            self._outages_seen = outages.count
            self.restart_ms = now_ms + RECONNECT_GRACE_MS
        gained, lost = self.leases.refresh(now_ms, before_release=self._hand_over)
        for index in lost:
            log.warning("lost the lease of shard %d; another worker owns it now", index)
            self.shards.pop(index, None)
        for index in sorted(gained):
            try:
                self._take(index)
            except LayoutChanged as exc:
                self.refused = str(exc)
                log.error("%s", exc)
                self.shards.clear()
                self.leases.release_all()
                self.worker.streams = []
                return
        self.worker.streams = [self.keys.events(index) for index in sorted(self.shards)]
        if not self.shards:
            return
        positions = horizon.read_positions(self.client, self.keys.event_streams(), now_ms, self._lost)
        self.horizons = positions.horizons
        self._lost = [
            new if new is not None else old for new, old in zip(positions.lost, self._lost, strict=True)
        ]
        gaps = [self._check(shard, now_ms) for shard in self.shards.values()]
        self._watching, self._ticked_at = dict(self.shards), time.monotonic()
        self.last_gap_ms = max(gaps)
        lag = self.lag
        pipeline = shard_of(PIPELINE_AGENT, self.keys.shards)
        if lag is not None and pipeline in self.shards:
            shard = self.shards[pipeline]
            self._decided_shard = shard
            agent = shard.agent(PIPELINE_AGENT)
            lag.check(agent, now_ms, now_ms - min(self.horizons), self.last_gap_ms, positions)
            shard.dirty.add(PIPELINE_AGENT)
        if time.monotonic() >= self._next_forget:
            self._next_forget = time.monotonic() + FORGET_EVERY_S
            self.forget(now_ms)
        for shard in list(self.shards.values()):
            if (
                shard.decided
                or shard.unpublished
                or (shard.dirty and time.monotonic() - shard.saved_at >= CHECKPOINT_EVERY_S)
            ):
                self.checkpoint(shard)
            else:
                self._save_clock(shard)

    def on_stop(self) -> None:
        self.flush()
        self.leases.release_all()

    def _last_watch(self) -> int:
        """The last tick of any engine worker, this one included (Redis ms), before this one's:
        each registers itself until a lease from its tick (leases.py), so the newest
        registration less a lease says when somebody last watched."""
        newest = self.client.zrevrange(self.keys.engines, 0, 0, withscores=True)
        return int(newest[0][1]) - self.lease_ms if newest else 0

    def flush(self) -> None:
        """Checkpoint every shard held now (a stop; tests that read the state right away)."""
        for shard in list(self.shards.values()):
            self.checkpoint(shard)

    # -- taking a shard over, handing one over --------------------------------------------------
    def _hand_over(self, index: int, token: int) -> None:
        """A shard we give up to balance the workers: checkpoint it while it is still ours."""
        shard = self.shards.pop(index, None)
        if shard is not None:
            self.shards[index] = shard
            self.checkpoint(shard)
            self.shards.pop(index, None)

    def _take(self, index: int) -> None:
        """Load shard ``index``'s checkpoint, arm its timers, publish what its last owner decided
        but did not publish, and claim the entries it read but did not acknowledge."""
        started = time.monotonic()
        loaded = self.checkpoints.load(index, self.state_classes)
        recorded = int(loaded.meta.get("shards") or self.keys.shards)
        if recorded != self.keys.shards:
            raise LayoutChanged(
                f"the detector state was written with [redis] shards = {recorded}, and this worker is "
                f"configured with {self.keys.shards}: agents would be judged from the wrong shard's "
                "state, so this worker takes no shard. Change the shard count as docs/operations.md "
                "says (drain, stop every worker, clear the detector state, restart), or set it back."
            )
        shard = Shard(index, self.leases.held[index], loaded.agents, last_id=_bytes(loaded.last_id))
        shard.tick_ms = int(loaded.meta.get("tick_ms", 0))
        shard.sight_ms = int(loaded.meta.get("sight_ms", 0))
        shard.duplicates = 0
        shard.unpublished = list(loaded.decided)
        shard.shares, shard.unclaimed = loaded.shares, loaded.unclaimed
        for agent in shard.agents.values():
            self._arm(shard, agent)
        self.shards[index] = shard
        self._publish(shard)
        replayed = self._replay(shard)
        log.info(
            "took over shard %d: %d agents, checkpoint at %s, %d entries replayed, in %.0f ms",
            index, len(shard.agents), shard.last_id.decode(), replayed, (time.monotonic() - started) * 1000,
        )  # fmt: skip
        self.worker.streams = [self.keys.events(i) for i in sorted(self.shards)]
        stream = self.keys.events(index)
        try:
            self.client.xgroup_create(stream, self.worker.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self.worker.upkeep.reclaim([stream], idle_ms=0)

    def _replay(self, shard: Shard) -> int:
        """Apply what the previous owner had read after its last checkpoint: the stream from
        the checkpoint's entry id up to the group's last delivered one (acknowledged or not).
        Entries that do not decode or verify were dead-lettered when first read: skipped."""
        stream = self.keys.events(shard.index)
        try:
            groups = self.client.xinfo_groups(stream)
        except redis.ResponseError:  # no stream yet
            return 0
        group = next((g for g in groups if _text(g["name"]) == self.worker.group), None)
        if group is None:
            return 0
        end = _bytes(group["last-delivered-id"])
        replayed = 0
        while _after(end, shard.last_id):
            entries = self.client.xrange(stream, min=b"(" + shard.last_id, max=end, count=REPLAY_COUNT)
            if not entries:
                break
            batch: list[Message[Event]] = []
            for entry_id, fields in entries:
                try:
                    data = entry_field(fields)
                    event = self.worker.decode(data)
                    if self.worker.verify is not None:
                        self.worker.verify(stream, entry_id, fields, data, event)
                except InvalidEntry:
                    continue
                batch.append((_bytes(entry_id), event))
            self.on_batch(batch)
            shard.last_id = _bytes(entries[-1][0])  # (past skipped entries too)
            replayed += len(entries)
        self.checkpoint(shard)
        return replayed

    def trim_floor(self, stream: str) -> int | None:
        """The oldest entry time a stream must keep: its shard's replay start (Worker.trim)."""
        for shard in self.shards.values():
            if self.keys.events(shard.index) == stream:
                return int(shard.last_id.split(b"-", 1)[0]) if shard.saved_at else 0
        return None

    # -- timers ----------------------------------------------------------------------------------
    def _arm(
        self, shard: Shard, agent: Agent, detectors: Sequence[Detector[Any]] = (), not_before: int = 0
    ) -> None:
        """(Re-)arm ``agent`` at the earliest due time of its detectors (``detectors``: only
        these, the others' due times known not to have come earlier), if earlier than armed.
        ``not_before``: a check that just looked at the agent re-arms it no earlier than its
        next check (a detector whose time has come but that decided nothing yet, waiting for
        the horizon or for the end of a gap in the watch, is asked again then)."""
        due = 0
        for detector in detectors or self.timed:
            try:
                when = detector.due_ms(agent)
            except Exception as exc:
                self.failed(detector, "due_ms", exc)
                continue
            if when and (not due or when < due):
                due = when
        if due:
            due = max(due, not_before)
        armed = shard.armed.get(agent.name, 0)
        if due and (not armed or due < armed):
            shard.armed[agent.name] = due
            heapq.heappush(shard.timers, (due, agent.name))

    def _check(self, shard: Shard, now_ms: int) -> int:
        """One timer check of ``shard``: the gap found in the checks (ms; 0: none)."""
        gap = 0
        # Watched until: this shard's last check, or any engine worker's last tick (a standby
        # ticks through an owner's failover, so a failover is not a gap; a frozen or restarting
        # Redis, or every worker down, stops every tick: that is one).
        watched = max(shard.tick_ms, self.last_watch_ms)
        # Checked by this worker at its previous tick, and the worker lived through the time
        # since (its own clock moved as far as Redis'): a Redis outage since then was observed
        # (restart_ms), so a late check is only a late check: judged, not excused (a busy or
        # starved worker must still page). Otherwise the gap's length is all there is to go by.
        lived_ms = (time.monotonic() - self._ticked_at) * 1000 + self.worker.outages.stall_ms
        observed = (
            self.worker.outages.precise
            and self._watching.get(shard.index) is shard
            and lived_ms >= now_ms - shard.tick_ms
        )
        restart = 0
        if not shard.tick_ms:
            shard.sight_ms = now_ms
        elif now_ms - watched > self.sight_ms():
            gap = now_ms - watched
            if not observed:  # (from its end: the agents' producers had the gap to reconnect)
                restart = now_ms
        if self.restart_ms > shard.sight_ms:  # an outage this worker observed
            restart = max(restart, self.restart_ms)
        if restart:
            shard.sight_ms = restart
            for each in shard.agents.values():  # every clock restarts there (Agent.clocks_from_ms)
                if each.clocks_from_ms < restart:
                    each.clocks_from_ms = restart
                    shard.dirty.add(each.name)
        shard.tick_ms = max(shard.tick_ms, now_ms)
        horizon_ms = self.horizons[shard.index] if shard.index < len(self.horizons) else now_ms
        limit = min(now_ms, horizon_ms)
        self._decided_shard = shard
        timers, armed = shard.timers, shard.armed
        while timers and timers[0][0] <= limit:
            due, name = heapq.heappop(timers)
            if armed.get(name) != due:
                continue  # a stale entry: the agent was re-armed earlier, or forgotten
            del armed[name]
            agent = shard.agents.get(name)
            if agent is None:
                continue
            for detector in self.timed:
                try:
                    when = detector.due_ms(agent)
                    if when and when <= limit:
                        detector.on_due(agent, now_ms, limit, shard.sight_ms)
                except Exception as exc:
                    self.failed(detector, "on_due", exc)
            shard.dirty.add(name)
            self._arm(shard, agent, not_before=limit + 1)
        return gap

    def forget(self, now_ms: int) -> None:
        """Agents silent for ``[detectors.silence] forget``: close what is open, drop their state
        (and their start facts: a forgotten agent is listed nowhere), so a fleet whose agent
        names churn does not grow Redis for ever. Scheduled agents are kept: a weekly job is
        expected however long its quiet spells."""
        silence = self.silence
        forget_ms = int((silence.config.forget_s if silence is not None else 7 * 86400.0) * 1000)
        for shard in list(self.shards.values()):
            self._decided_shard = shard
            old = [a for a in shard.agents.values() if a.seen_ms and now_ms - a.seen_ms > forget_ms]
            for agent in old:
                if agent.name == PIPELINE_AGENT or (silence is not None and not silence.watches(agent)):
                    continue  # (a scheduled agent is expected however long its schedule's gaps)
                decisions = self.detectors[0].decisions if self.detectors else None
                for kind in sorted(agent.open):
                    if decisions is not None:
                        decisions.close(agent, kind, now_ms, {"forgotten": 1, "seen": agent.seen_ms})
                del shard.agents[agent.name]
                if agent.spent is not None and agent.spent.windows:
                    shard.unclaimed[agent.name] = agent.spent  # (the views keep it: reports)
                shard.spent.discard(agent.name)
                shard.armed.pop(agent.name, None)
                shard.dirty.discard(agent.name)
                shard.removed.add(agent.name)
            gone = [a.name for a in old if a.name not in shard.agents]
            if gone and self.checkpoint(shard):  # (fenced: a stale owner deletes nothing)
                self.client.hdel(self.keys.facts(shard.index), *gone)

    # -- checkpoints and publishing ------------------------------------------------------------
    def checkpoint(self, shard: Shard) -> bool:
        """Save what changed in ``shard`` (fenced), then publish its decisions. False: the
        lease was lost (the shard is dropped; its new owner carries on from its checkpoint)."""
        read = self.worker.read_through.get(self.keys.events(shard.index))
        if read is not None and _after(read, shard.last_id):
            shard.last_id = read  # entries past the last applied one were dead-lettered: covered too
        dirty = [shard.agents[name] for name in shard.dirty if name in shard.agents]
        meta = {"tick_ms": shard.tick_ms, "sight_ms": shard.sight_ms, "owner": self.owner,
                "shards": self.keys.shards}  # fmt: skip
        packb = self.checkpoints.packb
        spend = {name: pack_tally(agent.spent, packb) for name in shard.spent
                 if (agent := shard.agents.get(name)) is not None and agent.spent is not None}  # fmt: skip
        if shard.shares_changed:
            spend[GROUPS_FIELD] = pack_shares(shard.shares)
        ok = self.checkpoints.save(
            shard.index, shard.token, dirty, sorted(shard.removed), last_id=shard.last_id, meta=meta,
            decided=shard.decided, spend=spend,
        )  # fmt: skip
        if not ok:
            log.warning("shard %d: the lease was lost before the checkpoint; dropping it", shard.index)
            self.shards.pop(shard.index, None)
            self.worker.streams = [self.keys.events(i) for i in sorted(self.shards)]
            return False
        if shard.duplicates:
            self.client.hincrby(self.keys.clock(shard.index), "duplicates", shard.duplicates)
            shard.duplicates = 0
        shard.unpublished += shard.decided
        shard.decided = []
        shard.dirty.clear()
        shard.removed.clear()
        shard.spent.clear()
        shard.shares_changed = False
        shard.saved_at = time.monotonic()
        self._publish(shard)
        return True

    def _save_clock(self, shard: Shard) -> None:
        """Only the watch clock changed: keep it in the checkpoint, cheaply (one fenced write)."""
        if time.monotonic() - shard.saved_at >= CHECKPOINT_EVERY_S:
            self.checkpoint(shard)

    def _publish(self, shard: Shard) -> None:
        """Publish the shard's checkpointed decisions, oldest first, and drop them from the
        saved list. One that fails (a bug: Redis errors go up to the runtime, which retries) is
        logged, counted and kept with every later decision about the same incident, so that a
        resolve never overtakes its fire; they are tried again at the next checkpoint, and the
        others go out meanwhile."""
        if not shard.unpublished:
            return
        fence = self.leases.fence(shard.index)
        kept: list[bytes] = []
        blocked: set[tuple[str, str]] = set()
        done = 0
        try:
            for raw in shard.unpublished:
                agent, kind, op = json.loads(raw)
                if (agent, kind) not in blocked:
                    try:
                        self._publish_one(agent, kind, op, fence)
                    except RECOVERABLE:
                        raise
                    except Exception:
                        errors = self.ctx.stats.handler_errors
                        errors["publish"] = errors.get("publish", 0) + 1
                        log.exception("could not publish the %s decision about %s (%r); trying again "
                                      "at the next checkpoint", kind, agent, op)  # fmt: skip
                        blocked.add((agent, kind))
                if (agent, kind) in blocked:
                    kept.append(raw)
                done += 1
        finally:
            shard.unpublished = kept + shard.unpublished[done:]
            self.checkpoints.pop_decided(shard.index, shard.token, done, kept)

    def _publish_one(self, agent: str, kind: str, op: Op, fence: Any) -> None:
        incidents = self.ctx.incidents
        if op["o"] == "f" and kind in QUIET_WHEN_HALTED and self.halts.halting(agent):
            log.info("%s: not paging %s: the agent is halted", agent, kind)
            return  # its resolve later finds no open incident and publishes nothing either
        severity, summary, details = self.render(agent, kind, op)
        if op["o"] == "f":
            incidents.fire(agent, kind, severity=severity, summary=summary, at_ms=int(op["at"]),
                           details=details, fence=fence)  # fmt: skip
        else:
            incidents.resolve(agent, kind, summary=summary, at_ms=int(op["at"]), details=details, fence=fence)

    def decided(self, agent: Agent, kind: str, op: Op) -> None:
        """Record a decision of the shard being applied or checked (see :class:`_Decisions`)."""
        shard = self._decided_shard
        assert shard is not None, "a decision outside a batch or a tick"
        shard.decided.append(json.dumps([agent.name, kind, op], separators=(",", ":")).encode())
        shard.dirty.add(agent.name)

    # -- wording -------------------------------------------------------------------------------
    def render(self, agent: str, kind: str, op: Op) -> tuple[str, str, dict[str, Any]]:
        """(severity, summary, details) of one decision. Never raises: a decision must reach
        the alerts stream even if its wording fails (a bug, facts of an older version), so a
        failing renderer is logged and counted, and the decision is published in plain words."""
        detector = self.renderers.get(kind)
        try:
            facts = op.get("f") or {}
            if op["o"] == "r" and facts.get("forgotten"):
                return self._forgotten(detector, agent, kind, op)
            if detector is None:  # decided while enabled, published after being disabled
                return Detector.render(detector, agent, kind, op)  # type: ignore[arg-type]
            return detector.render(agent, kind, op)
        except Exception:
            name = detector.name if detector is not None else kind
            self.ctx.stats.handler_errors[name] = self.ctx.stats.handler_errors.get(name, 0) + 1
            log.exception("could not word the %s alert of %s (op %r); publishing it plainly", kind, agent, op)
            verb = "started" if op.get("o") == "f" else "ended"
            facts = op.get("f")
            return (
                _severity(detector, agent),
                f"{agent}: {kind} incident {verb}",
                dict(facts if isinstance(facts, dict) else {}),
            )

    @staticmethod
    def _forgotten(
        detector: Detector[Any] | None, agent: str, kind: str, op: Op
    ) -> tuple[str, str, dict[str, Any]]:
        """The resolve of an incident still open when its agent was forgotten: worded here once
        for every kind, from the facts every forget decision carries."""
        seen = float(op["f"].get("seen") or 0)
        silent_s = max(0.0, (op["at"] - seen) / 1000) if seen else 0.0
        summary = f"{agent}: forgotten after {format_duration(silent_s)} of silence; {kind} incident closed"
        return _severity(detector, agent), summary, {"forgotten": True, "silent_s": round(silent_s, 3)}


class LayoutChanged(Exception):
    """A shard's checkpoint was written under another ``[redis] shards``."""


class _Decisions:
    """The engine's :class:`detectors.base.Decisions`: open/close against ``agent.open``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def open(self, agent: Agent, kind: str, at_ms: int, facts: dict[str, Any]) -> bool:
        if kind in agent.open:
            return False
        agent.open.add(kind)
        self.engine.decided(agent, kind, {"o": "f", "at": at_ms, "f": facts})
        return True

    def close(self, agent: Agent, kind: str, at_ms: int, facts: dict[str, Any]) -> bool:
        if kind not in agent.open:
            return False
        agent.open.discard(kind)
        self.engine.decided(agent, kind, {"o": "r", "at": at_ms, "f": facts})
        return True

    def past(self, agent: Agent, kind: str, fired: Op, resolved: Op) -> None:
        self.engine.decided(agent, kind, fired)
        self.engine.decided(agent, kind, resolved)


def is_stateful(detector: Detector[Any]) -> bool:
    """Whether the engine runs ``detector`` (it keeps per-agent state or has timers); the
    others are batch detectors the worker runtime feeds directly."""
    return (
        detector.State is not None or bool(detector.listens) or type(detector).due_ms is not Detector.due_ms
    )


def _severity(detector: Detector[Any] | None, agent: str) -> str:
    """The severity ``detector`` is configured with for ``agent`` ("error" when unknown)."""
    if detector is None:
        return "error"
    severity = getattr(detector.config.for_agent(agent), "severity", "error")
    return severity if isinstance(severity, str) else "error"


def _count_usage(agent: Agent, event: Event) -> None:
    """A beat's tokens and cost into the agent's totals (children's too)."""
    tokens = event.get("tokens")
    if tokens is None and ("tokens_in" in event or "tokens_out" in event):
        tokens = event.get("tokens_in", 0) + event.get("tokens_out", 0)
    if tokens is not None:
        agent.tokens += tokens
    cost = event.get("cost")
    if cost is not None:
        agent.cost += cost


def _track_pulse(agent: Agent, event: Event, at: int) -> None:
    """The run's first, last and highest RSS (the silence alert names a memory death from them)."""
    rss = event.get("rss")
    if rss is None:
        return
    if not agent.rss_first:
        agent.rss_first, agent.rss_first_ms = rss, at
    agent.rss_last = rss
    agent.rss_peak = max(agent.rss_peak, rss)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _bytes(entry_id: bytes | str) -> bytes:
    return entry_id if isinstance(entry_id, bytes) else entry_id.encode()


def _after(entry_id: bytes, last: bytes) -> bool:
    """Whether stream entry ``entry_id`` comes after ``last`` ("<ms>-<seq>" ids)."""
    if len(entry_id) == len(last) and entry_id[13:14] == b"-" == last[13:14]:
        return entry_id > last  # 13-digit ms (Redis time until 2286), same length: as text
    ms, _, seq = entry_id.partition(b"-")
    last_ms, _, last_seq = last.partition(b"-")
    return (int(ms), int(seq or 0)) > (int(last_ms), int(last_seq or 0))


__all__ = ["CHILD", "CUR", "FOREIGN", "NEW", "PREV", "ChildRun", "Engine", "Shard"]
