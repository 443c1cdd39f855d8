"""Silence: no event of any kind from an agent for max(``after``, 3 x its declared interval).

The process is gone: SIGKILL, the OOM killer, a lost host. Detected by the timer checks
(detectors/timers.py) against Redis time, from every worker, in O(log n + k) per check however
large the fleet. An ``extend(seconds)`` from the agent pushes the deadline that much further.

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

from typing import Any, Final, Literal

from pydantic import Field

from agentwatch.config import Seconds, format_duration
from agentwatch.dependencies import DependsOnConfig
from detectors import schedule
from detectors.base import DetectorConfig, DetectorContext
from detectors.engine import BuiltinDetector
from detectors.memory import Bytes, format_bytes
from detectors.schedule import ScheduleConfig

Severity = Literal["info", "warning", "error", "critical"]


class SilenceConfig(ScheduleConfig, DependsOnConfig):
    """Silence's keys, a scheduled agent's (``schedule``, ``grace``, ``max_runtime``,
    ``timezone``: detectors/schedule.py) and ``depends_on`` (agentwatch/dependencies.py)."""

    after_s: Seconds = Field(60.0, alias="after", gt=0, description="no event this long: gone")
    severity: Severity = "critical"
    rss_growth: float = Field(1.5, ge=1.0, description='"killed for memory" if RSS grew this much')
    rss_growth_min: Bytes = Field(50 * 10**6, ge=0, description="... and by at least this")
    forget_s: Seconds = Field(7 * 86400.0, alias="forget", gt=0, description="forget agents silent this long")
    recover_after: int = Field(1, ge=1, le=10_000, description="events on time in a row to resolve")


# Called by the batch update for a segment that brings an agent with an open silence incident
# back (its events are newer than the last seen, ``seen0``). Counts events on time in a row;
# a segment with a gap longer than the allowance inside restarts the count at that gap
# (counting only the event after it: the events after it are not told apart, so the count
# errs on the late side, never early). The first event back ends the silence (``r.sw``).
LUA: Final = """
local function silence_back(a, r, p, s, seen0)
  if r.sr == 0 then r.sw = s[S_FIRST] - seen0 end
  if s[S_GB] - s[S_GA] > r.sa then r.sr = 1
  elseif r.sr > 0 and s[S_FIRST] - seen0 > r.sa then r.sr = s[S_NEV]
  else r.sr = math.min(r.sr + s[S_NEV], 65535) end
  if r.sr >= p[P_SIL_RECOVER] then
    close(a, r, F_SILENCE, 'silence', s[S_LAST], {back = s[S_LAST], since = seen0, away = r.sw,
      on_time = r.sr, start = s[S_START] > 0 and 1 or 0})
    r.sr, r.sw = 0, 0
  end
end
"""


class Silence(BuiltinDetector[SilenceConfig]):
    """An agent that sends nothing at all for its allowance: the process is gone."""

    Config = SilenceConfig
    kinds = ("silence", schedule.MISSED, schedule.OVERRAN)

    def __init__(self, name: str, config: SilenceConfig, ctx: DetectorContext) -> None:
        super().__init__(name, config, ctx)
        for warning in schedule.overrides_ignored(config):
            self.log.warning("%s", warning)

    def profile(self, config: DetectorConfig) -> dict[str, Any]:
        assert isinstance(config, SilenceConfig)
        return {"sil_on": 1, "sil_after": config.after_s * 1000, "sil_recover": config.recover_after}

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
        if kind in (schedule.MISSED, schedule.OVERRAN):
            return severity, *schedule.render(agent, kind, op)
        if op["o"] == "f":
            quiet_s = max(0.0, (op["at"] - f["seen"]) / 1000)
            details: dict[str, Any] = {
                "silent_s": round(quiet_s, 3),
                "allowance_s": f["allowance"] / 1000,
                "last_seen_ms": f["seen"],
            }
            if f.get("iv"):
                details["interval_s"] = round(f["iv"], 6)  # a float32 in the record
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
