"""Child runs: worker processes of an agent (``os.fork``, ``multiprocessing`` pools), and their
silent deaths.

The model (PROTOCOL.md, docs/producer.md): every process reports as its own *run* of the same
agent; a child's ``start`` names its ``parent`` run. The engine core keeps a
:class:`~detectors.agent.ChildRun` per child run in ``agent.children`` (its last event, interval,
whether it exited, pid and host) and counts the child's beats for the agent's tokens and cost.
This module decides the one thing about children nothing else can: a child that stopped sending
anything (SIGKILL, the OOM killer) while its parent lives on. Such a pool looks healthy to the
parent's beats, yet the work the dead worker held never comes back (``multiprocessing.Pool``
waits for it forever).

* A child that sent an ``exit`` (any reason: a pool retiring its workers with ``close()`` or
  ``terminate()``, a worker that finished) ended on purpose: nothing is raised.
* A child silent for the agent's silence allowance (``[detectors.silence] after``, or 3 x the
  child's interval if longer) while its parent run is still the agent's run and the agent was
  seen since opens one ``child`` incident per agent: "bot: worker process 4711 (run 9f2c...,
  child of run 1a2b...) gone without a goodbye". Later dead children while it is open are named
  in the log only. Each dead child is told once.
* The incident resolves when the agent starts a new run, retires or its run exits: the dead
  worker's run is over.

The silence detector creates this one as its companion (a child's death is a silence of its
own), with its own config: no silence detector, no watch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from agentwatch.config import format_duration
from detectors.base import Agent, ChildRun, Detector, Event, Op

if TYPE_CHECKING:  # silence.py imports this module to create its companion
    from detectors.silence import SilenceConfig

log = logging.getLogger("agentwatch.detectors.children")

DETECTOR: Final = "child"
"""The ``detector`` name of the alerts about a worker process that died silently."""
KEEP_EXITED_MS: Final = 60_000
"""How long the record of a child that is no longer watched (it exited, or its parent run is
over) stays after its last event: the engine needs it to know the child's late events as a
child's, not as a new run of the agent."""
KEEP_ORPHANS_MS: Final = 10 * KEEP_EXITED_MS
"""How long the record of a child of an agent that has no run yet stays (its parent's own
``start`` may still come: a parent's sender can flush after its workers')."""
RETIRED_OR_EXITED: Final = "retired or exited"
REPLACED: Final = "replaced by a new run"


@dataclass(slots=True)
class ChildState:
    """What the watch remembers beside ``agent.children`` (the engine's records)."""

    told: list[str] = field(default_factory=list)
    """Child runs whose death was told (alerted or logged): each is told once."""
    dead_parent: str = ""
    """The parent run of the open ``child`` incident: the incident lasts as long as that run."""
    ended_run: str = ""
    """The last run of the agent that sent an ``exit``: its children are no longer watched,
    even if no exit alert marked the agent as exited (the exit detector disabled)."""
    sight_ms: int = 0
    """The latest ``sight`` the engine gave: no allowance counts time before it."""


class Children(Detector["SilenceConfig"]):
    """Worker processes gone without a goodbye while their parent runs on: one incident per agent."""

    config: SilenceConfig
    State = ChildState
    kinds = (DETECTOR,)
    listens = frozenset({"exit"})

    # -- the engine's hooks ------------------------------------------------------------------
    def on_event(self, agent: Agent, event: Event, at_ms: int, child: ChildRun | None) -> None:
        """An ``exit`` of one of the agent's own runs (not a child's): that run is over, and so is
        the incident about a worker it lost."""
        if child is not None:
            return
        run = str(event.get("run") or agent.run)
        state: ChildState = self.state(agent)
        state.ended_run = run
        if run == state.dead_parent:
            self._close(agent, state, at_ms, RETIRED_OR_EXITED)

    def on_new_run(self, agent: Agent, at_ms: int) -> None:
        """The children the engine kept were the old run's: what was told about them is over."""
        state: ChildState | None = agent.states.get(self.name)
        if state is None:
            return
        self._close(agent, state, at_ms, REPLACED)
        state.told.clear()
        state.ended_run = ""

    def on_retire(self, agent: Agent, at_ms: int) -> None:
        state: ChildState | None = agent.states.get(self.name)
        if state is not None:
            self._close(agent, state, at_ms, RETIRED_OR_EXITED)

    def due_ms(self, agent: Agent) -> int:
        """The earliest deadline of a watched child, or the time to forget an unwatched one."""
        state: ChildState | None = agent.states.get(self.name)
        if state is not None and self._over(agent, state):
            return max(agent.seen_ms, 1)  # the incident's run is over: end it now
        if not agent.children:
            return 0
        after_ms = self._after_ms(agent)
        sight_ms = state.sight_ms if state is not None else 0
        due = 0
        for run, child in agent.children.items():
            keep = self._keep_ms(agent, state, child)
            if keep:
                when = child.seen_ms + keep + 1
            elif state is not None and run in state.told:
                continue
            else:
                since, allowance = _clock(child, after_ms, sight_ms)
                if agent.seen_ms <= since + allowance // 2:
                    continue  # not judged before the agent is seen again (its next event asks again)
                when = since + allowance + 1
            due = when if due == 0 else min(due, when)
        return due

    def on_due(self, agent: Agent, now_ms: int, limit_ms: int, sight_ms: int) -> None:
        """Tell each watched child silent past its allowance (judged at ``limit_ms``: its next
        event may still be unread after that), and forget the records no longer needed."""
        state: ChildState = self.state(agent)
        state.sight_ms = max(state.sight_ms, sight_ms)
        if self._over(agent, state):
            how = RETIRED_OR_EXITED if agent.run == state.dead_parent else REPLACED
            self._close(agent, state, now_ms, how)
        after_ms = self._after_ms(agent)
        for run, child in list(agent.children.items()):
            keep = self._keep_ms(agent, state, child)
            if keep:
                if now_ms - child.seen_ms > keep:
                    del agent.children[run]
                    if run in state.told:
                        state.told.remove(run)
                continue
            if run in state.told:
                continue
            since, allowance = _clock(child, after_ms, state.sight_ms)
            if limit_ms - since > allowance and agent.seen_ms > since + allowance // 2:
                self._dead(agent, state, run, since=since, allowance=allowance, limit_ms=limit_ms)

    def render(self, agent: str, kind: str, op: Op) -> tuple[str, str, dict[str, Any]]:
        facts = op["f"]
        severity = self.config.for_agent(agent).severity
        if op["o"] == "r":
            return severity, f"{agent}: the run whose worker died is over ({facts['how']})", {}
        return severity, _summary(agent, facts), dict(facts)

    # -- the decisions ---------------------------------------------------------------------
    def _dead(
        self, agent: Agent, state: ChildState, run: str, *, since: int, allowance: int, limit_ms: int
    ) -> None:
        """The child ``run`` is gone without a goodbye: the agent's incident (from the end of its
        allowance) if none is open, else a log line. Its silence is told as known at ``limit_ms``."""
        state.told.append(run)
        child = agent.children[run]
        facts = {
            "pid": child.pid or None,
            "run": run,
            "parent": child.parent,
            "host": child.host or None,
            "silent_s": round((limit_ms - child.seen_ms) / 1000, 3),
            "allowance_s": allowance / 1000,
        }
        if self.decisions.open(agent, DETECTOR, since + allowance, facts):
            state.dead_parent = child.parent
        else:
            # (%r: the run ids come from the agent, and a log line may be a terminal's)
            log.warning("%r (a child incident of this agent is open already)", _summary(agent.name, facts))

    def _close(self, agent: Agent, state: ChildState, at_ms: int, how: str) -> None:
        if self.decisions.close(agent, DETECTOR, at_ms, {"how": how}):
            state.dead_parent = ""

    # -- helpers ---------------------------------------------------------------------------
    def _after_ms(self, agent: Agent) -> int:
        return int(self.config.for_agent(agent.name).after_s * 1000)

    def _over(self, agent: Agent, state: ChildState) -> bool:
        """Is the ``child`` incident open and the run whose worker died over?"""
        return agent.is_open(DETECTOR) and not self._running(agent, state, state.dead_parent)

    def _running(self, agent: Agent, state: ChildState | None, parent: str) -> bool:
        """Is ``parent`` still the agent's run, neither retired nor exited?"""
        if not parent or agent.run != parent or agent.retired or agent.exited:
            return False
        return state is None or state.ended_run != parent

    def _keep_ms(self, agent: Agent, state: ChildState | None, child: ChildRun) -> int:
        """How long an unwatched child's record stays after its last event; 0: it is watched."""
        if not agent.run:
            return KEEP_ORPHANS_MS
        if child.exited or not self._running(agent, state, child.parent):
            return KEEP_EXITED_MS
        return 0


def _clock(child: ChildRun, after_ms: int, sight_ms: int) -> tuple[int, int]:
    """(when the child's allowance starts, the allowance): from its last event, or from ``sight``
    if nobody watched then; silence's ``after``, or 3 x the child's declared interval if longer."""
    return max(child.seen_ms, sight_ms), max(after_ms, int(3000 * child.interval_s))


def _summary(agent: str, facts: dict[str, Any]) -> str:
    pid = facts["pid"]
    return (
        f"{agent}: worker process {pid if pid is not None else '?'} (run {facts['run']}, child of run "
        f"{facts['parent']}) gone without a goodbye: no event for {format_duration(facts['silent_s'])} "
        "while its parent kept running (SIGKILL, OOM killer?)"
    )
