"""Silence: no event of any kind from an agent for max(``after``, 3 x its declared interval).

The process is gone: SIGKILL, the OOM killer, a lost host. Detected by the shard owner's timer
checks (detectors/engine.py: a heap of due times, O(log n) per agent due) against Redis time,
however large the fleet. An ``extend(seconds)`` from the agent pushes the deadline that much further.

The alert names the likely cause. When the run's pulses showed RSS growing (to at least
``rss_growth`` x its first value, and by ``rss_growth_min`` or more) and it was still near its
peak, it says "likely killed for memory: RSS grew 210 MB -> 3.9 GB"; otherwise "process gone
without a goodbye (SIGKILL, OOM, host loss)". The incident resolves when the agent is seen again:
at its first event, or, with ``recover_after`` N, once N events in a row came on time (each
within the allowance of the one before), so an agent that only limps back does not flap.

Agents whose glob sets a ``schedule`` (cron agents) are judged by it instead: detectors/schedule.py
(incidents ``schedule`` and ``runtime``, worded here with silence's severity).

Agents silent for ``forget`` are forgotten: their state is deleted and anything still open about
them resolves, so a fleet whose agent names churn does not grow Redis forever.
"""

from __future__ import annotations

from typing import Any, Literal, cast

from pydantic import Field

from agentwatch.codec import Event
from agentwatch.config import Allowance, Seconds, format_duration
from agentwatch.dependencies import DependsOnConfig
from detectors import schedule
from detectors.agent import Agent
from detectors.base import Detector, DetectorContext
from detectors.children import Children
from detectors.memory import Bytes, format_bytes
from detectors.recovery import Recovery
from detectors.schedule import Schedule, ScheduleConfig

Severity = Literal["info", "warning", "error", "critical"]


class SilenceConfig(ScheduleConfig, DependsOnConfig):
    """Silence's keys, a scheduled agent's (``schedule``, ``grace``, ``max_runtime``,
    ``timezone``: detectors/schedule.py) and ``depends_on`` (agentwatch/dependencies.py)."""

    after_s: Allowance = Field(60.0, alias="after", description="no event this long: gone")
    severity: Severity = "critical"
    rss_growth: float = Field(1.5, ge=1.0, description='"killed for memory" if RSS grew this much')
    rss_growth_min: Bytes = Field(50 * 10**6, ge=0, description="... and by at least this")
    forget_s: Seconds = Field(7 * 86400.0, alias="forget", gt=0, description="forget agents silent this long")
    recover_after: int = Field(1, ge=1, le=10_000, description="events on time in a row to resolve")


class Silence(Detector[SilenceConfig]):
    """An agent that sends nothing at all for its allowance: the process is gone.

    Its companions watch what silence's settings also govern: scheduled agents
    (detectors/schedule.py) and an agent's worker processes (detectors/children.py)."""

    Config = SilenceConfig
    State = Recovery
    kinds = ("silence",)

    def __init__(self, name: str, config: SilenceConfig, ctx: DetectorContext) -> None:
        super().__init__(name, config, ctx)
        for warning in schedule.overrides_ignored(config):
            self.log.warning("%s", warning)
        self.companions: list[Detector[Any]] = [Children("children", config, ctx)]
        if Schedule.needed(config):
            self.companions.append(Schedule("schedule", config, ctx))

    # -- settings --------------------------------------------------------------------------------
    def watches(self, agent: Agent) -> bool:
        """Silence judges this agent (a scheduled agent is judged by its schedule instead)."""
        return self.settings(agent).schedule is None

    def settings(self, agent: Agent) -> SilenceConfig:
        """This detector's settings as they apply to ``agent`` (per-glob overrides)."""
        config: SilenceConfig = self.config.for_agent(agent.name)
        return config

    def allowance_ms(self, agent: Agent) -> int:
        """max(``after``, 3 x the declared interval), in ms."""
        return int(max(self.settings(agent).after_s * 1000, 3000 * agent.interval_s))

    def shortest_after_ms(self) -> int:
        """The shortest ``after`` of any unscheduled glob (engine.sight_ms)."""
        overrides = [cast(SilenceConfig, cfg) for _, cfg in self.config._overrides]
        configs = [self.config, *overrides]
        afters = [int(c.after_s * 1000) for c in configs if c.schedule is None]
        return min(afters) if afters else int(self.config.after_s * 1000)

    # -- decisions -------------------------------------------------------------------------------
    def _expected(self, agent: Agent) -> bool:
        """Seen, neither retired nor exited, not silent already, and judged by silence."""
        ended = agent.retired or agent.exited or not agent.seen_ms or "silence" in agent.open
        return not ended and self.watches(agent)

    def due_ms(self, agent: Agent) -> int:
        if not self._expected(agent):
            return 0
        return max(agent.seen_ms, agent.clocks_from_ms) + self.allowance_ms(agent)

    def on_due(self, agent: Agent, now_ms: int, limit_ms: int, sight_ms: int) -> None:
        """Nothing at all since the allowance began (no earlier than ``sight``): gone."""
        if not self._expected(agent):
            return
        allowance = self.allowance_ms(agent)
        if max(agent.seen_ms, agent.clocks_from_ms, sight_ms) + allowance <= limit_ms:
            self.decisions.open(agent, "silence", now_ms, self._facts(agent, agent.seen_ms, allowance))

    def back(self, agent: Agent, event: Event, at_ms: int, seen0: int) -> None:
        """An event of an agent whose silence incident is open (the engine calls it): count
        events on time in a row; ``recover_after`` of them resolve it. An event late by more
        than the allowance starts the count again."""
        state: Recovery = self.state(agent)
        if state.step(at_ms, seen0, self.allowance_ms(agent)) >= self.settings(agent).recover_after:
            facts = {"back": at_ms, "since": seen0, "away": state.away_ms, "on_time": state.on_time,
                     "start": 1 if event["kind"] == "start" else 0}  # fmt: skip
            self.decisions.close(agent, "silence", at_ms, facts)
            state.reset()

    def backlog(self, agent: Agent, event: Event, at_ms: int, current: bool, sight_ms: int) -> None:
        """A gap longer than the allowance found in the events themselves (a backlog applied
        late: the owner died, or the checks waited for the horizon). One watching in real time
        would have fired and resolved: so do exactly that, with those times."""
        if not self._expected(agent):
            return
        since = max(agent.seen_ms, agent.clocks_from_ms, sight_ms)
        allowance = self.allowance_ms(agent)
        if at_ms - since > allowance:
            facts = {**self._facts(agent, since, allowance), "since": since}
            fired = {"o": "f", "at": since + allowance, "f": facts}
            resolved = {"o": "r", "at": at_ms, "f": {"back": at_ms, "since": since, "late": 1}}
            self.decisions.past(agent, "silence", fired, resolved)

    def on_retire(self, agent: Agent, at_ms: int) -> None:
        self.decisions.close(agent, "silence", at_ms, {"at": at_ms, "shutdown": 1})
        agent.states.pop(self.name, None)

    @staticmethod
    def _facts(agent: Agent, seen: int, allowance: int) -> dict[str, Any]:
        return {"seen": seen, "allowance": allowance, "iv": agent.interval_s, "r0": agent.rss_first,
                "rl": agent.rss_last, "rpk": agent.rss_peak, "t0": agent.rss_first_ms}  # fmt: skip

    # -- wording ---------------------------------------------------------------------------------

    def cause(self, agent: str, facts: dict[str, Any]) -> str:
        cfg = self.config.for_agent(agent)
        r0, rl, peak = facts.get("r0", 0), facts.get("rl", 0), facts.get("rpk", 0)
        grew = r0 > 0 and rl >= cfg.rss_growth * r0 and rl - r0 >= cfg.rss_growth_min and rl >= 0.9 * peak
        if grew:
            return f"likely killed for memory: RSS grew {format_bytes(r0)} -> {format_bytes(rl)}"
        return "process gone without a goodbye (SIGKILL, OOM, host loss)"

    def render(self, agent: str, kind: str, op: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
        f = op["f"]
        severity = self.config.for_agent(agent).severity
        if op["o"] == "f":
            quiet_s = max(0.0, (op["at"] - f["seen"]) / 1000)
            details: dict[str, Any] = {
                "silent_s": round(quiet_s, 3),
                "allowance_s": f["allowance"] / 1000,
                "last_seen_ms": f["seen"],
            }
            if f.get("iv"):
                details["interval_s"] = round(f["iv"], 6)
            if f.get("rl"):
                details["rss"] = f["rl"]
                details["rss_start"] = f["r0"]
            summary = f"{agent}: no heartbeat for {format_duration(quiet_s)}; {self.cause(agent, f)}"
            return severity, summary, details
        if f.get("shutdown"):
            return severity, f"{agent}: shut down", {}
        away_s = max(0.0, float(f.get("away", f["back"] - f["since"])) / 1000)
        summary = f"{agent}: seen again after {format_duration(away_s)} of silence"
        back: dict[str, Any] = {"silent_s": round(away_s, 3)}
        if f.get("on_time", 1) > 1:
            summary += f"; {f['on_time']} events on time since"
            back["on_time"] = f["on_time"]
        return severity, summary, back
