"""Stall: the process is alive (pulses keep coming) but its work loop is stuck (no beats) for
max(``after``, 3 x interval).

Pulses come from the producer's own thread; beats only from the work loop. Once the last beat is
late, pulses carry the work thread's stack. The alert quotes the newest one in ``details.stack``
and names where the loop is blocked: the innermost frame of the agent's own code, and the
library call it is waiting in, e.g. "blocked in api_client.py:47 fetch_from_api -> ssl.py
do_handshake". The incident resolves when beats resume: at the first beat, or, with
``recover_after`` N, once N beats in a row came on time (each within the allowance of the one
before); or when the agent restarts or shuts down.
"""

from __future__ import annotations

import re
from typing import Any, Final, Literal

from pydantic import Field

from agentwatch.config import Seconds, format_duration
from detectors.base import DetectorConfig
from detectors.engine import BuiltinDetector

Severity = Literal["info", "warning", "error", "critical"]

_FRAME: Final = re.compile(r'^\s*File "(?P<path>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)', re.MULTILINE)
_LIBRARY: Final = re.compile(r"(site-packages|dist-packages|/lib/python\d|\\lib\\|^<frozen |^<)")


class StallConfig(DetectorConfig):
    after_s: Seconds = Field(120.0, alias="after", gt=0, description="no beat this long while pulses arrive")
    severity: Severity = "critical"
    recover_after: int = Field(1, ge=1, le=10_000, description="beats on time in a row to resolve")


# Called by the batch update for a segment of the current run with beats newer than the last
# one (``beat0``) while a stall incident is open: silence_back (silence.py) for beats. A gap
# between beats longer than the allowance inside the segment is bounded by the segment's longest
# gaps (between beats with a pulse between them, or between any two events).
LUA: Final = """
local function stall_back(a, r, p, s, beat0)
  if r.kr == 0 then r.kw = s[S_FBEAT] - beat0 end
  if math.max(s[S_BB] - s[S_BA], s[S_GB] - s[S_GA]) > r.ta then r.kr = 1
  elseif r.kr > 0 and s[S_FBEAT] - beat0 > r.ta then r.kr = s[S_NBEAT]
  else r.kr = math.min(r.kr + s[S_NBEAT], 65535) end
  if r.kr >= p[P_STALL_RECOVER] then
    close(a, r, F_STALL, 'stall', s[S_BEAT], {back = s[S_BEAT], since = beat0, away = r.kw, on_time = r.kr})
    r.kr, r.kw = 0, 0
  end
end
"""


def _base(path: str) -> str:
    return path.replace("\\", "/").rsplit("/", 1)[-1]


def blocked_in(stack: str) -> str | None:
    """Where a Python stack (``File "...", line N, in f`` lines) is blocked, in a few words.

    The innermost frame of the agent's own code (not the standard library or site-packages),
    then, when deeper frames exist, the innermost frame of all: what it waits in.
    """
    frames = [(m["path"], m["line"], m["func"]) for m in _FRAME.finditer(stack)]
    if not frames:
        return None
    own = [f for f in frames if not _LIBRARY.search(f[0])]
    inner = frames[-1]
    if not own:
        return f"{_base(inner[0])}:{inner[1]} {inner[2]}"
    mine = own[-1]
    where = f"{_base(mine[0])}:{mine[1]} {mine[2]}"
    if mine is not inner:
        where += f" -> {_base(inner[0])} {inner[2]}"
    return where


class Stall(BuiltinDetector[StallConfig]):
    """Pulses without beats: the process lives, its work loop does not move."""

    Config = StallConfig
    kinds = ("stall",)

    def profile(self, config: DetectorConfig) -> dict[str, Any]:
        assert isinstance(config, StallConfig)
        return {"stall_on": 1, "stall_after": config.after_s * 1000, "stall_recover": config.recover_after}

    def render(self, agent: str, kind: str, op: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
        f = op["f"]
        severity = self.config.for_agent(agent).severity
        if op["o"] == "r":
            if f.get("restarted"):
                return severity, f"{agent}: restarted", {}
            if f.get("shutdown"):
                return severity, f"{agent}: shut down", {}
            stuck_s = max(0.0, float(f.get("away", f["back"] - f["since"])) / 1000)
            summary = f"{agent}: beats resumed after {format_duration(stuck_s)}"
            if f.get("on_time", 1) > 1:
                summary += f"; {f['on_time']} beats on time since"
            return severity, summary, {"stuck_s": round(stuck_s, 3)}
        last = max(f["beat"], f["start"])
        stuck_s = max(0.0, (op["at"] - last) / 1000)
        stack = f.get("stack") or ""
        summary = f"{agent}: process alive, work loop stuck for {format_duration(stuck_s)}"
        if "died of an uncaught exception" in stack.split("\n", 1)[0]:
            error = stack.rstrip().rsplit("\n", 1)[-1].strip()
            summary += f"; the work thread died: {error}"
        else:
            where = blocked_in(stack)
            if where:
                summary += f"; blocked in {where}"
        details: dict[str, Any] = {
            "stack": stack,
            "stuck_s": round(stuck_s, 3),
            "allowance_s": f["allowance"] / 1000,
        }
        if f["beat"]:
            details["last_beat_ms"] = f["beat"]
        return severity, summary, details
