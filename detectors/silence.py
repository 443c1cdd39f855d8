"""Silence: no event of any kind from an agent for max(``after``, 3 x its declared interval).

The process is gone: SIGKILL, the OOM killer, a lost host. Detected by the timer checks
(detectors/timers.py) against Redis time, from every worker, in O(log n + k) per check however
large the fleet. An ``extend(seconds)`` from the agent pushes the deadline that much further.

The alert names the likely cause. When the run's pulses showed RSS growing (to at least
``rss_growth`` x its first value, and by ``rss_growth_min`` or more) and it was still near its
peak, it says "likely killed for memory: RSS grew 210 MB -> 3.9 GB"; otherwise "process gone
without a goodbye (SIGKILL, OOM, host loss)". The incident resolves when the agent is seen again.

Agents silent for ``forget`` are forgotten: their state is deleted and anything still open about
them resolves, so a fleet whose agent names churn does not grow Redis forever.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from agentwatch.config import Seconds, format_duration
from detectors.base import DetectorConfig
from detectors.engine import BuiltinDetector
from detectors.memory import Bytes, format_bytes

Severity = Literal["info", "warning", "error", "critical"]


class SilenceConfig(DetectorConfig):
    after_s: Seconds = Field(60.0, alias="after", gt=0, description="no event this long: gone")
    severity: Severity = "critical"
    rss_growth: float = Field(1.5, ge=1.0, description='"killed for memory" if RSS grew this much')
    rss_growth_min: Bytes = Field(50 * 10**6, ge=0, description="... and by at least this")
    forget_s: Seconds = Field(7 * 86400.0, alias="forget", gt=0, description="forget agents silent this long")


class Silence(BuiltinDetector[SilenceConfig]):
    """An agent that sends nothing at all for its allowance: the process is gone."""

    Config = SilenceConfig
    kinds = ("silence",)

    def profile(self, config: DetectorConfig) -> dict[str, Any]:
        assert isinstance(config, SilenceConfig)
        return {"sil_on": 1, "sil_after": config.after_s * 1000}

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
                details["interval_s"] = f["iv"]
            if f.get("rl"):
                details["rss"] = f["rl"]
                details["rss_start"] = f["r0"]
            summary = f"{agent}: no heartbeat for {format_duration(quiet_s)}; {self.cause(agent, f)}"
            return severity, summary, details
        if f.get("shutdown"):
            return severity, f"{agent}: shut down", {}
        away = format_duration(max(0.0, (f["back"] - f["since"]) / 1000))
        return (
            severity,
            f"{agent}: seen again after {away} of silence",
            {"silent_s": (f["back"] - f["since"]) / 1000},
        )
