"""What a detector is: a class with a config model, optional per-agent state, and hooks.

Write one by subclassing :class:`Detector`, declaring a ``Config`` (a subclass of
:class:`DetectorConfig` with your keys), and overriding only the hooks you need. Every hook is a
no-op here. A hook that raises is logged, counted and isolated by the runtime: other detectors
and the worker keep running. See docs/writing-a-detector.md.

Two kinds of hooks, and the built-ins use the same ones a plugin does:

* **Stateful** (``State``, ``on_event``, ``due_ms``, ``on_due``...): the shard owner
  (detectors/engine.py) keeps one ``State`` per agent in memory, calls ``on_event`` for each
  event of the agent in stream order, exactly once (repeats and replays are dropped before any
  detector sees them), checkpoints the state to Redis and calls ``on_due`` when the time
  ``due_ms`` asked for has come. Decisions go through :attr:`Detector.decisions`: ``open`` and
  ``close`` an incident; the engine words them with :meth:`Detector.render` and publishes them.
* **Batch** (``on_batch``, ``on_tick``): the runtime hands every batch of valid events, at least
  once; you keep your own state in Redis and make every effect idempotent.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from agentwatch.alerts import Incidents
from agentwatch.codec import Event
from agentwatch.config import PipelineSettings
from agentwatch.keys import Keys
from agentwatch.plugins import DetectorConfig
from agentwatch.redisconn import Client
from agentwatch.worker import Handler, Message, Stats
from detectors.agent import Agent, ChildRun

__all__ = [
    "Agent",
    "ChildRun",
    "Decisions",
    "Detector",
    "DetectorConfig",
    "DetectorContext",
    "Event",
    "Message",
    "Op",
    "RecordedDecisions",
]

C = TypeVar("C", bound=DetectorConfig)

Op = dict[str, Any]
"""One decision: ``{"o": "f" (fired) or "r" (resolved), "at": Redis ms, "f": facts}``. The
facts are what :meth:`Detector.render` words the alert from."""


class Decisions(Protocol):
    """Where a stateful detector's decisions go (the engine; :class:`RecordedDecisions` in tests).

    ``agent.open`` holds the open incidents: ``open`` of an open one, or ``close`` of one that is
    not open, decides nothing and returns False."""

    def open(self, agent: Agent, kind: str, at_ms: int, facts: dict[str, Any]) -> bool: ...

    def close(self, agent: Agent, kind: str, at_ms: int, facts: dict[str, Any]) -> bool: ...

    def past(self, agent: Agent, kind: str, fired: Op, resolved: Op) -> None:
        """An incident that began and ended in the past, found in a backlog of events (a worker
        was down): one watching in real time would have fired and resolved it, so publish both."""
        ...


@dataclass
class RecordedDecisions:
    """A :class:`Decisions` that keeps every op in a list: for tests of a detector's logic."""

    ops: list[tuple[str, str, Op]] = field(default_factory=list)
    """(agent, kind, op) in decision order."""

    def open(self, agent: Agent, kind: str, at_ms: int, facts: dict[str, Any]) -> bool:
        if kind in agent.open:
            return False
        agent.open.add(kind)
        self.ops.append((agent.name, kind, {"o": "f", "at": at_ms, "f": facts}))
        return True

    def close(self, agent: Agent, kind: str, at_ms: int, facts: dict[str, Any]) -> bool:
        if kind not in agent.open:
            return False
        agent.open.discard(kind)
        self.ops.append((agent.name, kind, {"o": "r", "at": at_ms, "f": facts}))
        return True

    def past(self, agent: Agent, kind: str, fired: Op, resolved: Op) -> None:
        self.ops += [(agent.name, kind, fired), (agent.name, kind, resolved)]


@dataclass(frozen=True)
class DetectorContext:
    """What the worker gives every detector: one Redis client, the key schema, incidents, the
    pipeline settings, and the worker's own live counters (lag, last entry time).

    ``shared`` is scratch space common to every detector of one worker: the engine keeps itself
    there (detectors/engine.py), and a family of plugins may do the same."""

    client: Client
    keys: Keys
    incidents: Incidents
    settings: PipelineSettings
    stats: Stats
    shared: dict[str, Any] = field(default_factory=dict)


class Detector(Handler[Event], Generic[C]):
    """Base class of every detector (see the module docstring)."""

    Config: ClassVar[type[DetectorConfig]] = DetectorConfig
    State: ClassVar[type[Any] | None] = None
    """Per-agent state (a dataclass whose fields msgpack can hold), or None: a batch detector."""
    kinds: ClassVar[tuple[str, ...]] = ()
    """The ``detector`` names of the alerts this detector decides and words (default: its name)."""
    listens: ClassVar[frozenset[str]] = frozenset()
    """Event kinds ``on_event`` is called for ("beat", "pulse", "start", "exit")."""

    decisions: Decisions
    """Set by the engine before any stateful hook runs."""

    def __init__(self, name: str, config: C, ctx: DetectorContext) -> None:
        self.name = name
        self.config = config
        self.ctx = ctx
        self.log = logging.getLogger(f"agentwatch.detectors.{name}")
        self.decisions = RecordedDecisions()

    # -- stateful hooks (the shard owner calls them; see the module docstring) ----------------
    def state(self, agent: Agent) -> Any:
        """This detector's state for ``agent``, created on first use."""
        found = agent.states.get(self.name)
        if found is None:
            assert self.State is not None, f"{type(self).__name__} declares no State"
            found = agent.states[self.name] = self.State()
        return found

    def on_event(self, agent: Agent, event: Event, at_ms: int, child: ChildRun | None) -> None:
        """An event of a kind in :attr:`listens`, in stream order, once. ``at_ms``: its entry's
        Redis time. ``child``: the worker process that sent it, or None for the agent's current
        run (a child's events are the agent's too: its tokens, cost, fingerprints)."""

    def on_new_run(self, agent: Agent, at_ms: int) -> None:
        """The agent started a new run (a restart): what was about the old run is over."""

    def on_retire(self, agent: Agent, at_ms: int) -> None:
        """The agent called ``shutdown()``: it stopped on purpose."""

    def due_ms(self, agent: Agent) -> int:
        """The earliest Redis time at which :meth:`on_due` may have something to decide for
        ``agent`` (0: nothing). Asked after every event and every ``on_due``; an earlier time
        than necessary only costs a check."""
        return 0

    def on_due(self, agent: Agent, now_ms: int, limit_ms: int, sight_ms: int) -> None:
        """Time has come (see :meth:`due_ms`). ``limit_ms`` <= ``now_ms``: every event of the
        agent older than it has been applied; judge no deadline after it (its beat may still be
        unread). ``sight_ms``: nobody watched before this (the checks stopped for longer than
        ``blind_after``: workers or Redis down), so no allowance counts time before it."""

    def render(self, agent: str, kind: str, op: Op) -> tuple[str, str, dict[str, Any]]:
        """(severity, summary, details) of one decision; ``op["f"]`` holds the facts."""
        verb = "started" if op["o"] == "f" else "ended"
        return "warning", f"{agent}: {kind} incident {verb}", dict(op.get("f") or {})

    # -- batch hooks (the runtime calls them; see the module docstring) -------------------------
    def on_batch(self, messages: Sequence[Message[Event]]) -> None:
        """Per batch of valid events (see :class:`agentwatch.worker.Handler`)."""

    def on_tick(self, now_ms: int) -> None:
        """Every ``[worker] tick`` on every worker, with Redis server time in ms."""
