"""What a demo run proved: each failure detected or not, how fast, and whether the alert named
the cause. One place decides "detected with its cause named", for the summary table, the
``--json`` summary and the exit code alike.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from agentwatch.alerts import Alert
from agentwatch.demo.plan import LEAKY, RUNAWAY, STUCK


@dataclass(frozen=True)
class Failure:
    """One failure the demo causes, and the alert that must catch it."""

    key: str  # stable name in --json: death, stall, tokens
    title: str
    agent: str
    detector: str


DEATH: Final = Failure("death", "silent death (OOM-style SIGKILL)", LEAKY.agent, "silence")
STALL: Final = Failure("stall", "stall (stuck in recv)", STUCK.agent, "stall")
TOKENS: Final = Failure("tokens", "runaway token loop", RUNAWAY.agent, "tokens")
FAILURES: Final = (DEATH, STALL, TOKENS)
EARLY_WARNINGS: Final = {(LEAKY.agent, "memory")}
"""Alerts welcome before the failure: the memory trend that precedes the kill."""
BRAKE_ALERTS: Final = {(RUNAWAY.agent, "budget"), (RUNAWAY.agent, "halt")}
"""Alerts of the brake: the runaway's budget warning and exceeded alerts, and its halt."""

_STACK_FRAME: Final = re.compile(r'^\s*File "[^"]+", line \d+, in \S+$')


def cause(failure: Failure, alert: Alert) -> str | None:
    """The cause as the alert names it, or None when it does not name one."""
    text = alert.summary.removeprefix(f"{alert.agent}: ")
    if failure is DEATH:
        match = re.search(r"likely killed for memory: .*", text)
        return match.group(0) if match else None
    if failure is STALL:
        match = re.search(r"blocked in \S+ fetch_reply\b.*", text)
        if not match:
            return None
        call = blocking_call(str(alert.details.get("stack", "")))
        return f"{match.group(0)}: {call}" if call else match.group(0)
    match = re.search(r"(?:token use \S+ in one beat|\S+ tokens in under).*(?:baseline|usual).*", text)
    return match.group(0) if match else None


def blocking_call(stack: str) -> str | None:
    """The source line of the innermost frame (``return conn.recv(4096)``), when the stack has it."""
    lines = stack.rstrip().splitlines()
    for index in range(len(lines) - 1, 0, -1):
        if _STACK_FRAME.match(lines[index - 1]):
            code = lines[index].strip()
            return code.split("  #", 1)[0].strip() or None
    return None


@dataclass
class Detection:
    """How one failure went: caused when, detected when, by which alert."""

    failure: Failure
    caused: str = ""  # what the demo did, in words
    caused_at: float | None = None  # time.monotonic()
    alert: Alert | None = None
    time_to_detect_s: float | None = None

    @property
    def cause(self) -> str | None:
        return cause(self.failure, self.alert) if self.alert else None

    @property
    def ok(self) -> bool:
        return self.alert is not None and self.cause is not None

    def problem(self) -> str | None:
        """Why this failure does not count as caught, in words; None when it does."""
        f = self.failure
        if self.caused_at is None:
            return f"{f.title}: never caused (the demo stopped first)"
        if self.alert is None:
            return f"{f.title}: missed (no {f.detector} alert for {f.agent})"
        if self.cause is None:
            return f"{f.title}: detected, but the alert does not name the cause: {self.alert.summary}"
        return None

    def to_json(self) -> dict[str, Any]:
        f = self.failure
        return {
            "failure": f.key, "title": f.title, "agent": f.agent, "detector": f.detector,
            "caused": self.caused, "detected": self.alert is not None,
            "time_to_detect_s": None if self.time_to_detect_s is None else round(self.time_to_detect_s, 2),
            "cause_named": self.cause is not None, "cause": self.cause,
            "summary": self.alert.summary if self.alert else None,
        }  # fmt: skip


@dataclass
class Outcome:
    """The whole run. ``ok``: every failure caught with its cause, and nothing else alerted."""

    fast: bool
    detections: dict[str, Detection] = field(default_factory=lambda: {f.key: Detection(f) for f in FAILURES})
    early_warnings: list[dict[str, Any]] = field(default_factory=list)
    false_alarms: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0
    interrupted: bool = False
    error: str | None = None
    redis_url: str = ""
    state_dir: str = ""
    brake: dict[str, Any] | None = None
    """The runaway's budget halt: halted or not, spent, past the limit (scenario._brake_report)."""
    brake_alerts: list[dict[str, Any]] = field(default_factory=list)

    def problems(self) -> list[str]:
        caused = [d for d in self.detections.values() if d.caused_at is not None or not self.interrupted]
        found = [p for d in caused if (p := d.problem())]
        if self.brake is not None and not self.brake["halted"]:
            found.append(f"{self.brake['agent']}: never halted by its budget")
        found += [f"false alarm: {a['summary']}" for a in self.false_alarms]
        if self.error:
            found.insert(0, self.error)
        if self.interrupted:
            found.insert(0, "interrupted")
        return found

    @property
    def ok(self) -> bool:
        return not self.problems()

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "fast": self.fast,
            "elapsed_s": round(self.elapsed_s, 2),
            "failures": [d.to_json() for d in self.detections.values()],
            "early_warnings": self.early_warnings,
            "false_alarms": self.false_alarms,
            "brake": self.brake,
            "brake_alerts": self.brake_alerts,
            "missed": [d.failure.key for d in self.detections.values() if not d.ok],
            "problems": self.problems(),
            "interrupted": self.interrupted,
            "redis_url": self.redis_url,
            "state_dir": self.state_dir,
        }


def alert_json(alert: Alert, **extra: Any) -> dict[str, Any]:
    fields = asdict(alert)
    return {key: fields[key] for key in ("agent", "detector", "severity", "summary", "at")} | extra
