"""``type = "restart"``: restart an agent when it dies or stalls, within start limits.

Either ``command`` - an argv list run without a shell, with ``{agent}``, ``{run}``, ``{host}``,
``{pid}`` and ``{detector}`` replaced inside each element, each value checked first so that it
can be neither a second argument, an option, a path out of its directory nor a shell construct
(notifiers/restart_argv.py) - or ``signal`` - sent to the agent's pid, only when the agent
runs on this worker's host and the pid is proven to be the agent's run: the run file its
producer left, the pid's owner and its start time must all agree (agentwatch/runfile.py), for an
event's pid is only a claim (for agents whose supervisor restarts them on exit but cannot see a
hang). Only alerts of the detectors listed in ``on`` act.

Before acting the notifier checks that the incident is still open (an agent that came back by
itself is left alone) and asks the start limit (notifiers/startlimit.py): past ``burst``
restarts within ``interval`` it raises one critical ``restart_loop`` alert instead and makes no
more restarts for that agent until it recovers: the incident that hit the limit resolves, or no
incident of a detector in ``on`` is open for it any more (an older stall ending while the agent
is still dead is no recovery). Every
action, or reason for holding off, is an audit record in ``<prefix>:notify:audit`` with the
exit status and the tail of the command's output.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal as signals
import socket
import subprocess
import tempfile
import time
from typing import Any, ClassVar

from pydantic import Field, field_validator, model_validator

from agentwatch import runfile
from agentwatch.alerts import Alert
from agentwatch.config import Seconds, format_duration
from agentwatch.facts import read_facts
from notifiers.base import Notifier, NotifierConfig
from notifiers.delivery import Delivered, Delivery, Failed, Outcome, Retry
from notifiers.restart_argv import UnsafeValue, command_problem, substitute
from notifiers.routing import LOOP_DETECTOR
from notifiers.startlimit import StartLimit

_OUTPUT_TAIL = 2000


class RestartConfig(NotifierConfig):
    grouping_supported: ClassVar[bool] = False  # restarts are per agent: never grouped

    command: list[str] | None = Field(
        None, min_length=1, description="argv; {agent} {run} {host} {pid} {detector}"
    )
    signal: str | None = Field(None, description='e.g. "SIGTERM": signal the agent instead')
    run_dir: str = Field(runfile.DEFAULT_DIR, description="where producers leave run files (signal)")
    on: list[str] = Field(default_factory=lambda: ["silence", "stall", "exit"], min_length=1)
    timeout_s: Seconds = Field(60.0, alias="timeout", gt=0, description="the command's time limit")
    start_limit_burst: int = Field(5, ge=1, le=1000)
    start_limit_interval_s: Seconds = Field(600.0, alias="start_limit_interval", gt=0)
    restart_backoff_s: Seconds = Field(10.0, alias="restart_backoff", ge=0)
    restart_backoff_max_s: Seconds = Field(300.0, alias="restart_backoff_max", ge=0)
    env: dict[str, str] = Field(default_factory=dict, description="extra environment for the command")
    cwd: str | None = None
    allow_shell: bool = Field(False, description="accept placeholders in a shell's -c script")

    def referenced_detectors(self) -> set[str]:
        return super().referenced_detectors() | set(self.on)

    @field_validator("signal")
    @classmethod
    def _signal(cls, name: str | None) -> str | None:
        if name is None:
            return None
        full = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
        if full not in signals.Signals.__members__:
            raise ValueError(f"unknown signal {name!r} (e.g. SIGTERM, SIGKILL, SIGHUP)")
        return full

    @model_validator(mode="after")
    def _one_action(self) -> RestartConfig:
        if (self.command is None) == (self.signal is None):
            raise ValueError("set exactly one of command (an argv list) or signal")
        problem = command_problem(self.command, allow_shell=self.allow_shell) if self.command else None
        if problem is not None:
            raise ValueError(f"command: {problem}")
        if not self.send_resolved or "resolved" not in self.match.statuses:
            # Resolved alerts are how it learns an agent recovered; without them a restart loop
            # would never end and the agent would never be restarted again.
            raise ValueError(
                "the restart notifier needs resolved alerts: drop send_resolved / match.statuses"
            )
        return self


class Restart(Notifier[RestartConfig]):
    Config = RestartConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.config
        self.limit = StartLimit(
            self.ctx.client, self.ctx.keys, self.name, burst=cfg.start_limit_burst,
            interval_s=cfg.start_limit_interval_s, backoff_s=cfg.restart_backoff_s,
            backoff_max_s=cfg.restart_backoff_max_s,
        )  # fmt: skip
        self.host = socket.gethostname()

    @property
    def attempt_budget_s(self) -> float:
        return self.config.timeout_s + 5.0

    def wants(self, alert: Alert) -> bool:
        return alert.detector in self.config.on

    def deliver(self, delivery: Delivery) -> Outcome:
        alert = delivery.alert
        incidents = self.ctx.incidents
        assert incidents is not None, "the restart notifier needs incidents in its context"
        if alert.status == "resolved":
            return self._recovered(alert)
        first = str(alert.details.get("first_alert", alert.id))  # a reminder repeats an earlier alert
        incident = incidents.open(alert.agent, alert.detector)
        if not incident or incident.get("alert") != first:
            return self._held(alert, "skipped", "the incident is no longer open")
        if incidents.open(alert.agent, LOOP_DETECTOR):
            return self._held(alert, "skipped", "in a restart loop: no restarts until the agent recovers")
        decision = self.limit.reserve(alert.agent, first, alert.at_ms)
        if decision.verdict == "done":
            return self._held(alert, "skipped", "already restarted after this alert fired")
        if decision.verdict == "wait":
            self._audit(alert, "wait", detail=f"start backoff: {decision.value_ms} ms")
            return Retry("start backoff", after_s=decision.value_ms / 1000)
        if decision.verdict == "loop":
            return self._loop(alert, decision.restarts, decision.now_ms)
        facts = self.facts(alert)
        if self.config.signal:
            return self._signal(alert, facts)
        return self._run(alert, facts, decision.restarts)

    # -- the two actions -----------------------------------------------------------------------------
    def _run(self, alert: Alert, facts: dict[str, str], restarts: int) -> Outcome:
        assert self.config.command is not None
        try:
            argv = substitute(self.config.command, facts)
        except KeyError as exc:
            reason = f"the command uses {{{exc.args[0]}}} but the alert and agent state do not say it"
            self._audit(alert, "failed", detail=reason)
            return Failed(reason)
        except UnsafeValue as exc:  # from an event: never passed, whatever the command
            reason = f"refused to run the command: {exc}"
            self._audit(alert, "refused", detail=reason)
            return Failed(reason)
        env = {**os.environ, **self.config.env, "AW_ALERT": alert.to_json(),
               **{f"AW_{name.upper()}": value for name, value in facts.items()}}  # fmt: skip
        started = time.monotonic()
        # Output goes to a file, not a pipe: a command that starts the agent in the background
        # leaves the agent holding the pipe open, and reading it would wait for the agent to die.
        with tempfile.TemporaryFile() as output:
            try:
                process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output,
                                           stderr=subprocess.STDOUT, env=env, cwd=self.config.cwd,
                                           start_new_session=True)  # fmt: skip
            except OSError as exc:
                self._audit(alert, "failed", argv=argv, detail=f"cannot run: {exc}")
                return Failed(f"cannot run {argv[0]!r}: {exc}")
            timed_out = False
            try:
                code: int | None = process.wait(self.config.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(process)
                code = None
            output.seek(0, os.SEEK_END)
            output.seek(max(0, output.tell() - _OUTPUT_TAIL))
            tail = output.read().decode(errors="replace")
        ms = int((time.monotonic() - started) * 1000)
        action = "restarted" if code == 0 else "failed"
        self._audit(
            alert,
            action,
            argv=argv,
            exit=code,
            timed_out=timed_out,
            ms=ms,
            output=tail,
            detail=f"restart {restarts} of {self.config.start_limit_burst} in the window",
        )
        if code == 0:
            return Delivered(detail=f"exit 0 in {ms} ms")
        why = f"timed out after {format_duration(self.config.timeout_s)}" if timed_out else f"exit {code}"
        # Retried after the start backoff; each try counts against the start limit, so a command
        # that always fails ends in a "restart loop" alert rather than silence.
        return Retry(f"restart command {why}", body=tail[-500:])

    def _signal(self, alert: Alert, facts: dict[str, str]) -> Outcome:
        name = self.config.signal
        assert name is not None
        host, pid = facts.get("host", ""), facts.get("pid", "")
        if host != self.host:
            reason = f"agent runs on host {host or '(unknown)'}, this worker on {self.host}: cannot signal it"
            self._audit(alert, "failed", detail=reason)
            return Failed(reason)
        if not pid.isdigit() or int(pid) <= 1 or int(pid) == os.getpid():
            self._audit(alert, "failed", detail=f"no usable pid ({pid or 'unknown'})")
            return Failed(f"no usable pid for {alert.agent} ({pid or 'unknown'})")
        started = facts.get("pid_start", "")
        try:
            runfile.send_signal(
                self.config.run_dir, agent=alert.agent, run=facts.get("run", ""), pid=int(pid),
                pid_start=int(started) if started.isdigit() else None, signum=signals.Signals[name],
            )  # fmt: skip
        except runfile.NotProven as exc:  # an event's pid is a claim: never signal on it alone
            reason = f"refused to send {name} to pid {pid}: {exc}"
            self._audit(alert, "refused", detail=reason)
            return Failed(reason)
        except ProcessLookupError:
            self._audit(alert, "skipped", detail=f"pid {pid} is already gone")
            return Delivered(detail=f"pid {pid} already gone")
        except PermissionError as exc:
            self._audit(alert, "failed", detail=f"{name} to pid {pid}: {exc}")
            return Failed(f"not allowed to signal pid {pid}: {exc}")
        self._audit(alert, "signalled", detail=f"{name} to pid {pid}")
        return Delivered(detail=f"{name} to pid {pid}")

    # -- loops and recovery --------------------------------------------------------------------------
    def _loop(self, alert: Alert, restarts: int, now_ms: int) -> Outcome:
        window = format_duration(self.config.start_limit_interval_s)
        summary = (f"{alert.agent}: restart loop: {restarts} restarts within {window}; "
                   "restarts stop until it recovers")  # fmt: skip
        assert self.ctx.incidents is not None
        fired = self.ctx.incidents.fire(
            alert.agent, LOOP_DETECTOR, severity="critical", summary=summary, at_ms=now_ms,
            details={"restarts": restarts, "window_s": self.config.start_limit_interval_s,
                     "trigger": alert.detector, "trigger_alert": alert.id},
        )  # fmt: skip
        if fired:
            self.limit.looping(alert.agent, alert.detector)
        self._audit(alert, "loop", detail=summary if fired else "restart loop already open")
        return Delivered(detail="start limit hit: restart loop alert raised")

    def _recovered(self, alert: Alert) -> Outcome:
        """An incident of ``alert.agent`` resolved: end its restart loop if the agent recovered."""
        incidents = self.ctx.incidents
        assert incidents is not None
        if not incidents.open(alert.agent, LOOP_DETECTOR):
            return Delivered(detail="nothing to do")
        trigger = self.limit.loop_trigger(alert.agent)
        if alert.detector != trigger:
            still = [name for name in self.config.on if incidents.open(alert.agent, name)]
            if still:
                why = f"still in a restart loop: {', '.join(still)} still open"
                return self._held(alert, "skipped", why + (f" ({trigger} hit the limit)" if trigger else ""))
        incidents.resolve(alert.agent, LOOP_DETECTOR, at_ms=alert.at_ms,
                          summary=f"{alert.agent}: recovered; restarts resume")  # fmt: skip
        self.limit.forget(alert.agent)
        self._audit(alert, "recovered", detail="restart loop resolved; start budget reset")
        return Delivered(detail="restart loop resolved")

    def _held(self, alert: Alert, action: str, why: str) -> Outcome:
        self._audit(alert, action, detail=why)
        return Delivered(detail=f"{action}: {why}")

    # -- facts and audit ------------------------------------------------------------------------------
    def facts(self, alert: Alert) -> dict[str, str]:
        """agent, detector, and run/host/pid from the alert's details, else from the agent's
        latest start as the detector workers record it (agentwatch/facts.py)."""
        facts = {"agent": alert.agent, "detector": alert.detector}
        recorded = read_facts(self.ctx.client, self.ctx.keys, [alert.agent]).get(alert.agent, {})
        for name in ("run", "host", "pid", "pid_start"):
            value = alert.details.get(name, recorded.get(name))
            if value not in (None, ""):
                facts[name] = str(value)
        return facts

    def _audit(self, alert: Alert, action: str, *, argv: list[str] | None = None, exit: int | None = None,
               timed_out: bool = False, ms: int = 0, output: str = "", detail: str = "") -> None:  # fmt: skip
        fields = {
            "notifier": self.name, "agent": alert.agent, "detector": alert.detector, "alert": alert.id,
            "action": action, "argv": json.dumps(argv) if argv else "",
            "exit": "" if exit is None else exit, "timed_out": int(timed_out), "ms": ms,
            "output": output, "detail": detail, "worker_host": self.host,
        }  # fmt: skip
        client: Any = self.ctx.client
        client.xadd(self.ctx.keys.notify_audit, fields, maxlen=self.ctx.settings.streams.deadletter_max_len,
                    approximate=True)  # fmt: skip


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """The command timed out: kill it and whatever it started in its session."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signals.SIGKILL)
    process.wait()
