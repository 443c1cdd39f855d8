"""``agentwatch demo``, start to finish: bring up a private pipeline, run a small fleet, break
three agents in the three ways agentwatch exists for, watch the alerts arrive, see the runaway
stopped by its budget inside its own loop (and how much it spent past the limit), clean up.

Everything is started here and stopped here, in reverse order, on success, error or Ctrl-C:
agents, the never-answering server, the detector worker, the Redis server, the temporary
directory. Waits are polls with deadlines that also read the alerts stream and notice a stop
request, an agent that died on its own, or a worker that keeps crashing.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import redis

from agentwatch import loading
from agentwatch.alerts import Alert, decode_alert
from agentwatch.config import Pipeline
from agentwatch.demo import plan
from agentwatch.demo.fleet import Fleet, SilentServer, clean_env
from agentwatch.demo.outcome import (
    BRAKE_ALERTS,
    DEATH,
    EARLY_WARNINGS,
    FAILURES,
    STALL,
    TOKENS,
    Outcome,
    alert_json,
)
from agentwatch.demo.plan import Timings
from agentwatch.demo.report import Reporter
from agentwatch.embedded import EmbeddedRedis, find_server_binary
from agentwatch.errors import AgentwatchError, ConfigError, EmbeddedRedisError
from agentwatch.redisconn import connect
from agentwatch.supervisor import Supervisor, worker_child


class DemoError(AgentwatchError):
    """The demo could not run (no server binary, a part that would not start)."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: stop where we are and clean up."""


class Demo:
    """One run. ``stopping`` is set by the caller's signal handler to end it early."""

    def __init__(self, timings: Timings, reporter: Reporter, *, fast: bool, stopping: threading.Event,
                 log_level: str = "warning") -> None:  # fmt: skip
        self.t = timings
        self.out = reporter
        self.stopping = stopping
        self.log_level = log_level
        self.outcome = Outcome(fast=fast)
        self.started = time.monotonic()
        self._client: Any = None  # untyped: redis-py's stubs model stream replies loosely
        self._last_id = "0-0"
        self._fleet: Fleet | None = None
        self._worker_code: list[int] = []
        self._said: dict[str, dict[str, float]] = {}  # agent -> first line of each kind -> when
        self._said_text: dict[str, str] = {}

    def run(self) -> Outcome:
        """Run the demo; always returns the outcome (errors and interruptions are in it)."""
        try:
            binary = find_server_binary()
        except EmbeddedRedisError as exc:
            raise DemoError(f"the demo runs its own private Redis server, and {exc}") from None
        try:
            with ExitStack() as cleanup:
                self._run(binary, cleanup)
        except Interrupted:
            self.outcome.interrupted = True
        except (AgentwatchError, OSError, redis.RedisError) as exc:
            self.outcome.error = str(exc) or type(exc).__name__
        self.outcome.elapsed_s = time.monotonic() - self.started
        return self.outcome

    # -- the story -------------------------------------------------------------------------------
    def _run(self, binary: Path, cleanup: ExitStack) -> None:
        t = self.t
        root = Path(tempfile.mkdtemp(prefix="aw-demo-"))  # short: the socket path must fit
        cleanup.callback(shutil.rmtree, root, ignore_errors=True)
        self.outcome.state_dir = str(root)
        server = EmbeddedRedis(root / "redis", port=0, binary=binary)
        try:
            server.start()
        except EmbeddedRedisError as exc:
            raise DemoError(f"cannot start the demo's Redis server: {exc}") from None
        cleanup.callback(server.stop)
        self.outcome.redis_url = server.url
        pipeline_path = root / "pipeline.toml"
        pipeline_path.write_text(plan.pipeline_toml(t, server.url))
        pipeline = _load(pipeline_path)
        self._client = connect(pipeline.settings, server.url, name="agentwatch-demo")
        cleanup.callback(self._client.close)
        self.out.intro(t, server.url, str(pipeline_path), plan.FLEET)

        self._start_worker(pipeline, server.url, str(pipeline_path), cleanup)
        silent = SilentServer().start()
        cleanup.callback(silent.stop)  # after the agents stop: the stuck one is in recv() on it
        fleet = self._fleet = Fleet(self._agent_env(server.url), root)
        cleanup.callback(fleet.stop)
        for role in plan.FLEET:
            extra = {"AW_DEMO_SERVER": silent.address} if role is plan.STUCK else {}
            fleet.start(role, **extra)
        self.out.step(f"started {len(plan.FLEET)} agent processes (python -m agentwatch.demo.agents)")

        self._wait(lambda: self._client.zcard(pipeline.keys.workers) > 0, t.start_timeout,
                   "the detector worker to start")  # fmt: skip
        self.out.step("detector worker up")
        self._wait(self._warmed_up, t.start_timeout, "every agent to warm up")
        low, high = self._said_text.get("leaky:rss", "0"), self._said_text.get("leaky:peak", "0")
        self.out.step(
            f"all agents beating; the tokens detector has learned their normal use; "
            f"leaky's memory climbed {_mb(int(low))} -> {_mb(int(high))}"
        )
        self._strike(fleet, int(high))
        self._wait(lambda: all(d.alert for d in self.outcome.detections.values()), t.detect_timeout,
                   "", missing_ok=True)  # fmt: skip
        self._wait(lambda: "halted" in self._said.get(plan.RUNAWAY.agent, {}), t.detect_timeout, "",
                   missing_ok=True)  # fmt: skip
        self._watch(t.settle)  # the healthy agents must stay quiet a little longer
        self._brake_report(pipeline)
        self.out.step("stopping agents, worker and Redis")

    def _brake_report(self, pipeline: Pipeline) -> None:
        """How the budget's halt went: what the runaway spent today, and how much past its limit."""
        from agentwatch.spend import Ledger  # noqa: PLC0415

        agent = plan.RUNAWAY.agent
        halted = "halted" in self._said.get(agent, {})
        ledger = Ledger(self._client, pipeline.keys, pipeline.settings.report.zone)
        today = ledger.read([agent]).get(agent, {}).get(ledger.clock("day", int(time.time() * 1000)).id)
        spent = today.cost if today is not None else 0.0
        past = max(0.0, spent - plan.BUDGET_USD)
        self.outcome.brake = {
            "agent": agent, "halted": halted, "limit_usd": plan.BUDGET_USD, "spent_usd": round(spent, 6),
            "past_limit_usd": round(past, 6), "reason": self._said_text.get(f"{agent}:halted"),
        }  # fmt: skip
        if halted:
            self.out.step(
                f"{agent} stopped by its budget inside its own loop (heartbeat() raised Halted): spent "
                f"${spent:.4f} of its ${plan.BUDGET_USD:.2f}/day, ${past:.4f} past the limit"
            )

    def _warmed_up(self) -> bool:
        """Every agent past its warm-up beats, and leaky's peak carried by its pulses."""
        ready = all("ready" in self._said.get(role.agent, {}) for role in plan.FLEET)
        return ready and "peak" in self._said.get(plan.LEAKY.agent, {})

    def _strike(self, fleet: Fleet, peak: int) -> None:
        """Cause the three failures, runaway first: its alert is the quickest."""
        fleet.signal(TOKENS.agent, signal.SIGUSR1)
        self._caused(TOKENS.key, f"tokens {plan.NORMAL_RATE}/min -> {plan.RUNAWAY_RATE:,}/min")
        self._watch(self.t.stagger)
        fleet.signal(STALL.agent, signal.SIGUSR1)
        self._caused(STALL.key, "calls a model server that accepts and never answers: stuck in recv()")
        self._watch(self.t.stagger)
        fleet.signal(DEATH.agent, signal.SIGKILL)
        self._caused(DEATH.key, f"SIGKILL at RSS {_mb(peak)}, as the OOM killer would")

    def _caused(self, key: str, text: str) -> None:
        detection = self.outcome.detections[key]
        detection.caused, detection.caused_at = text, time.monotonic()
        self.out.strike(detection.failure.agent, text)

    # -- parts -----------------------------------------------------------------------------------
    def _start_worker(self, pipeline: Pipeline, url: str, path: str, cleanup: ExitStack) -> None:
        """The same worker process ``agentwatch up`` runs, under the same supervisor."""
        child = worker_child("detectors", 0, url, path, self.log_level)
        child.env = {**clean_env(), "AGENTWATCH_REDIS__URL": url}
        halt = threading.Event()
        supervisor = Supervisor([child], stopping=halt)
        supervisor.start()

        def watch() -> None:
            self._worker_code.append(supervisor.run())

        watcher = threading.Thread(target=watch, name="demo-supervisor", daemon=True)
        watcher.start()

        def stop() -> None:
            halt.set()
            watcher.join(2.0)  # no restart can race the stop below
            supervisor.stop()

        cleanup.callback(stop)

    def _agent_env(self, url: str) -> dict[str, str]:
        t = self.t
        return clean_env() | {
            "AGENTWATCH_REDIS_URL": url, "AGENTWATCH_PREFIX": plan.PREFIX,
            "AGENTWATCH_INTERVAL": str(t.interval), "AGENTWATCH_PULSE_INTERVAL": str(t.pulse),
            "AW_DEMO_READY": str(t.ready_beats), "AW_DEMO_LEAK_MB": str(t.leak_mb),
            "AW_DEMO_LEAK_TO_MB": str(t.leak_to_mb), "AW_DEMO_RUNAWAY_RATE": str(plan.RUNAWAY_RATE),
            "AW_DEMO_MODEL": plan.MODEL,
            "PYTHONUNBUFFERED": "1",
        }  # fmt: skip

    # -- waiting, and everything that happens meanwhile -------------------------------------------
    def _wait(
        self, done: Callable[[], bool], timeout_s: float, what: str, *, missing_ok: bool = False
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.stopping.is_set():
                raise Interrupted
            self._pump()
            if done():
                return
            if time.monotonic() >= deadline:
                if missing_ok:
                    return
                raise DemoError(f"timed out after {timeout_s:g}s waiting for {what}")

    def _watch(self, seconds: float) -> None:
        """Keep reading alerts (and watching for trouble) for ``seconds``."""
        if seconds > 0:
            self._wait(lambda: False, seconds, "", missing_ok=True)

    def _pump(self) -> None:
        """One round: agents' lines, the worker's health, then alerts (blocking up to 100 ms)."""
        fleet = self._fleet
        if fleet is not None:
            with contextlib.suppress(queue.Empty):
                while True:
                    line = fleet.lines.get_nowait()
                    kind, _, value = line.text.partition(" ")
                    self._said.setdefault(line.agent, {}).setdefault(kind, line.at)
                    self._said_text.setdefault(f"{line.agent}:{kind}", value)
            for agent, code in fleet.exited().items():
                if agent == plan.RUNAWAY.agent and "halted" in self._said.get(agent, {}):
                    continue  # stopped by its budget, as it should
                if agent != DEATH.agent or self.outcome.detections[DEATH.key].caused_at is None:
                    raise DemoError(f"agent {agent} exited on its own (code {code}): {fleet.log_tail(agent)}")
        if self._worker_code:
            raise DemoError("the detector worker keeps crashing (its errors are above)")
        reply = self._client.xread({plan.PREFIX + ":alerts": self._last_id}, count=100, block=100)
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                self._last_id = entry_id
                self._on_alert(decode_alert(fields[b"d"]), time.monotonic())

    def _on_alert(self, alert: Alert, now: float) -> None:
        if alert.status == "resolved":
            self.out.resolved(alert)
            return
        for failure in FAILURES:
            d = self.outcome.detections[failure.key]
            if (alert.agent, alert.detector) == (failure.agent, failure.detector) and d.caused_at:
                if d.alert is None:
                    d.alert, d.time_to_detect_s = alert, now - d.caused_at
                    self.out.detected(alert, d.time_to_detect_s)
                return
        if (alert.agent, alert.detector) in BRAKE_ALERTS:
            self.outcome.brake_alerts.append(alert_json(alert))
            self.out.early(alert, "the brake")
            return
        if (alert.agent, alert.detector) in EARLY_WARNINGS:
            killed = self.outcome.detections[DEATH.key].caused_at
            note = "early warning, before the kill" if killed is None else "memory trend, seen after the kill"
            self.outcome.early_warnings.append(alert_json(alert, note=note))
            self.out.early(alert, note)
            return
        self.outcome.false_alarms.append(alert_json(alert))
        self.out.unexpected(alert)


def _mb(size: int) -> str:
    return f"{size / 1e6:.0f} MB"


@contextlib.contextmanager
def _without_agentwatch_env() -> Iterator[None]:
    """The user's AGENTWATCH_* overrides must not reshape the demo's pipeline (nor point it at
    their Redis): hide them while the demo's own file is loaded."""
    saved = {k: v for k, v in os.environ.items() if k not in clean_env()}
    for key in saved:
        del os.environ[key]
    try:
        yield
    finally:
        os.environ.update(saved)


def _load(path: Path) -> Pipeline:
    with _without_agentwatch_env():
        try:
            return loading.load(path)
        except ConfigError as exc:  # a bug in plan.py, not the user's doing
            raise DemoError(exc.render()) from None
