"""Exit: a process run that ended without a deliberate ``shutdown()`` alerts at once.

The producer reports how a run ends (PROTOCOL.md, ``exit``): an uncaught exception (type, message
and a short traceback), a signal, or an exit code. Any of them fires an ``exit`` incident as soon
as the event is applied, and the agent stops being expected (no silence alert follows for the
same death). A ``shutdown`` retires the agent instead: no alert now, none later, and open
silence/stall/tokens/loop/memory incidents resolve. The ``exit`` incident resolves when the agent
starts again (a ``start`` with a new run).

``clean_exit``: whether an exit with reason ``exit`` and code 0 (the program simply ended without
calling ``shutdown()``) alerts too, as a ``warning``. Either way the agent is no longer expected.
"""

from __future__ import annotations

from typing import Any, Final, Literal

from pydantic import Field

from detectors.base import DetectorConfig
from detectors.engine import BuiltinDetector

Severity = Literal["info", "warning", "error", "critical"]


class ExitConfig(DetectorConfig):
    severity: Severity = Field("critical", description="for exceptions, signals and non-zero codes")
    clean_exit: bool = Field(True, description="alert (as a warning) on exit code 0 without shutdown()")


# Called by the batch update with an exit event of the agent's current run (stale = false) or
# of its previous run, applied only after the agent had already started again (stale = true).
LUA: Final = """
local function exit_fire(a, r, p, ex, stale)
  if p[P_EXIT_ON] ~= 1 then return end
  local reason, code = ex[2], ex[3]
  if code == false then code = nil end  -- unknown: left out of the facts
  local facts = {reason = reason, code = code, error = ex[4], traceback = ex[5]}
  if reason == 'exit' and code == 0 and p[P_EXIT_CLEAN] ~= 1 then
    if not stale then set(r, F_EXITED) end
    return
  end
  if stale then
    emit(a, 'exit', 'f', ex[1], facts)
    emit(a, 'exit', 'r', ex[1], {at = ex[1], restarted = 1, late = 1})
    return
  end
  open(a, r, F_EXIT, 'exit', ex[1], facts)
  set(r, F_EXITED)
end
"""


def _signal_name(code: int) -> str:
    import signal  # noqa: PLC0415 - only for wording

    number = code - 128 if code > 128 else code
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class Exit(BuiltinDetector[ExitConfig]):
    """A run that ended without ``shutdown()``: exception, signal or exit code."""

    Config = ExitConfig
    kinds = ("exit",)

    def profile(self, config: DetectorConfig) -> dict[str, Any]:
        assert isinstance(config, ExitConfig)
        return {"exit_on": 1, "exit_clean": 1 if config.clean_exit else 0}

    def render(self, agent: str, kind: str, op: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
        f = op["f"]
        severity = self.config.for_agent(agent).severity
        if op["o"] == "r":
            late = " (its exit was processed after the restart)" if f.get("late") else ""
            return severity, f"{agent}: started again{late}", {}
        reason, error = f["reason"], f.get("error") or ""
        code = int(f["code"]) if isinstance(f.get("code"), int | float) else None  # None: unknown
        details: dict[str, Any] = {"reason": reason, "code": code}
        if error:
            details["error"] = error
        if f.get("traceback"):
            details["traceback"] = f["traceback"]
        if reason == "exception":
            summary = f"{agent}: crashed with {error or 'an uncaught exception'}"
        elif reason == "signal":
            how = error or (_signal_name(code) if code is not None else "a signal")
            summary = f"{agent}: killed by {how}"
        elif code is None:
            summary = f"{agent}: exited without shutdown(), exit code unknown"
        elif code == 0:
            severity = "warning"
            summary = f"{agent}: exited with code 0 without shutdown()"
        else:
            summary = f"{agent}: exited with code {code}"
        return severity, summary, details
