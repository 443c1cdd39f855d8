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

from typing import Any, Literal

from pydantic import Field

from agentwatch.codec import Event
from detectors.agent import Agent, ChildRun
from detectors.base import Detector, DetectorConfig

Severity = Literal["info", "warning", "error", "critical"]


class ExitConfig(DetectorConfig):
    severity: Severity = Field("critical", description="for exceptions, signals and non-zero codes")
    clean_exit: bool = Field(True, description="alert (as a warning) on exit code 0 without shutdown()")


def _signal_name(code: int) -> str:
    import signal  # noqa: PLC0415 - only for wording

    number = code - 128 if code > 128 else code
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class Exit(Detector[ExitConfig]):
    """A run that ended without ``shutdown()``: exception, signal or exit code."""

    Config = ExitConfig
    kinds = ("exit",)
    listens = frozenset({"exit"})

    def _pages(self, agent: Agent, event: Event) -> tuple[bool, dict[str, Any]]:
        """Whether this exit pages, and its facts. A clean end (code 0) pages only with
        ``clean_exit``, and never for a scheduled agent (a cron job's normal end)."""
        reason, code = event.get("reason", "exit"), event.get("code")
        facts: dict[str, Any] = {"reason": reason, "error": event.get("error") or "",
                                 "traceback": event.get("traceback") or ""}  # fmt: skip
        if code is not None:  # unknown: left out of the facts, never a made-up 0
            facts["code"] = code
        if reason == "exit" and code == 0:
            silence = self.ctx.shared["engine"].get("Silence")
            scheduled = silence is not None and not silence.watches(agent)
            return self.config.for_agent(agent.name).clean_exit and not scheduled, facts
        return True, facts

    def on_event(self, agent: Agent, event: Event, at_ms: int, child: ChildRun | None) -> None:
        """An exit (not a ``shutdown``) of the current run: alert at once; the agent is no
        longer expected either way (no silence follows for the same death)."""
        if child is not None:
            return  # a worker process that ended: children.py's business
        pages, facts = self._pages(agent, event)
        agent.exited = True
        if pages:
            self.decisions.open(agent, "exit", at_ms, facts)

    def previous_run(self, agent: Agent, event: Event, at_ms: int) -> None:
        """The previous run's exit, applied after the agent had already started again: the
        crash still pages, and is over at once."""
        pages, facts = self._pages(agent, event)
        if pages:
            resolved = {"o": "r", "at": at_ms, "f": {"at": at_ms, "restarted": 1, "late": 1}}
            self.decisions.past(agent, "exit", {"o": "f", "at": at_ms, "f": facts}, resolved)

    def on_new_run(self, agent: Agent, at_ms: int) -> None:
        if "exit" in agent.open:  # (most new runs have nothing to close: no facts to make)
            self.decisions.close(agent, "exit", at_ms, {"at": at_ms, "restarted": 1})

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
