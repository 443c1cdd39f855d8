"""Error rate: fire when at least ``fire_at`` of an agent's last ``window`` beats carry ``ok=False``.

A complete agentwatch detector in one file, written with the hooks the built-ins use
(docs/writing-a-detector.md):

* **Per-agent state, kept by the engine.** :class:`ErrorRateState` holds the agent's last
  ``window`` outcomes as the bits of an int. The shard owner keeps it in memory, applies each
  beat once and in stream order, checkpoints it to Redis and loads it back after a failover:
  no Redis calls, no Lua, nothing to make idempotent here.
* **Decisions, not alerts.** ``on_event`` opens and closes the incident through
  ``self.decisions`` with the facts that decided it (hysteresis: open at ``fire_at``, close at
  ``resolve_at``); the engine publishes each transition once, worded by :meth:`ErrorRate.render`.
* **Runs.** A restart (a new run) or a ``shutdown()`` ends what was about the old run: the
  incident closes and the window starts afresh. Beats of the agent's worker processes (child
  runs: a ``multiprocessing`` pool doing its work) count like its own: they are its work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import Field

from detectors.base import Agent, ChildRun, Detector, DetectorConfig, Event, Op

__all__ = ["ErrorRate", "ErrorRateConfig", "ErrorRateState"]


class ErrorRateConfig(DetectorConfig):
    window: int = Field(20, ge=1, le=52, description="judge this many of the agent's last beats")
    fire_at: float = Field(0.5, gt=0, le=1, description="fire when this share of them failed")
    resolve_at: float = Field(0.25, ge=0, lt=1, description="resolve when the share drops to this")
    severity: str = Field("warning", pattern="^(info|warning|error|critical)$")


@dataclass(slots=True)
class ErrorRateState:
    """One agent's last outcomes (checkpointed by the engine: plain ints only)."""

    mask: int = 0
    """The last ``window`` outcomes, newest in the lowest bit: 1 = failed."""
    seen: int = 0
    """How many outcomes the mask holds (up to ``window``)."""


class ErrorRate(Detector[ErrorRateConfig]):
    """Too many failed beats among the last ones (beat meta ``ok=False``)."""

    Config = ErrorRateConfig
    State = ErrorRateState
    listens = frozenset({"beat"})

    def on_event(self, agent: Agent, event: Event, at_ms: int, child: ChildRun | None) -> None:
        ok = event.get("ok")
        if not isinstance(ok, bool):
            return  # a beat that says nothing about how it went
        config = self.config.for_agent(agent.name)
        state: ErrorRateState = self.state(agent)
        state.mask = ((state.mask << 1) | (not ok)) & ((1 << config.window) - 1)
        state.seen = min(state.seen + 1, config.window)
        failures = state.mask.bit_count()
        share = failures / config.window
        facts = {"failures": failures, "beats": state.seen, "share": round(share, 3)}
        if failures and share >= config.fire_at:
            self.decisions.open(agent, self.name, at_ms, facts)
        elif share <= config.resolve_at:
            self.decisions.close(agent, self.name, at_ms, facts)

    def on_new_run(self, agent: Agent, at_ms: int) -> None:
        """A restart: the failures were the old run's."""
        self.decisions.close(agent, self.name, at_ms, {"restarted": 1})
        agent.states.pop(self.name, None)

    def on_retire(self, agent: Agent, at_ms: int) -> None:
        self.decisions.close(agent, self.name, at_ms, {"shutdown": 1})
        agent.states.pop(self.name, None)

    def render(self, agent: str, kind: str, op: Op) -> tuple[str, str, dict[str, Any]]:
        f = op["f"]
        severity = self.config.for_agent(agent).severity
        if op["o"] == "f":
            summary = f"{agent}: {f['failures']} of its last {f['beats']} beats failed (ok=False)"
            return severity, summary, dict(f)
        if f.get("restarted"):
            return severity, f"{agent}: restarted; its failed beats were the previous run's", {}
        if f.get("shutdown"):
            return severity, f"{agent}: shut down", {}
        return severity, f"{agent}: failures down to {f['failures']} of its last {f['beats']} beats", {}
