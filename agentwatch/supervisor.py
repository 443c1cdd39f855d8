"""``agentwatch up``: run worker processes in the foreground, restart the ones that crash.

Workers are separate processes (``python -m agentwatch worker ...``) so that one crashing or
hung worker cannot take the others down, and so ``up`` is exactly "the same workers you would
scale out by hand". Each child runs in its own session, so a terminal Ctrl-C reaches only
``up``, which then stops every child once, gracefully; each child also dies with ``up`` if
``up`` itself is SIGKILLed (``PR_SET_PDEATHSIG``).

The embedded Redis that ``up`` may have started is watched the same way (:class:`ServerWatch`):
a monitor whose Redis died must not sit there with every worker retrying in silence. It is
restarted on the same socket and port, so the URL ``up`` printed stays right and the workers
reconnect by themselves; if it keeps dying, ``up`` exits 1 saying so.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from agentwatch.embedded import EmbeddedRedis, dies_with
from agentwatch.errors import EmbeddedRedisError

log = logging.getLogger("agentwatch.up")


@dataclass
class Child:
    """One supervised worker process and its recent crash times (for the restart limit)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    crashes: deque[float] = field(default_factory=lambda: deque(maxlen=16))
    restart_at: float = 0.0
    essential: bool = True
    """A crash loop of an essential child stops ``up``; of another (the dashboard), only that
    child is given up on: monitoring goes on without its web pages."""
    abandoned: bool = False


class Supervisor:
    """Start children, restart crashed ones with backoff, stop all on request.

    More than ``burst`` crashes of one child within ``window_s`` is a crash loop: ``up`` gives
    up and exits 1 rather than burn CPU, like systemd's StartLimitBurst.
    """

    def __init__(
        self,
        children: list[Child],
        *,
        burst: int = 5,
        window_s: float = 60.0,
        stopping: threading.Event | None = None,
        server: ServerWatch | None = None,
    ) -> None:
        self.children = children
        self.burst = burst
        self.window_s = window_s
        self.stopping = stopping or threading.Event()
        self.server = server

    def start(self) -> None:
        for child in self.children:
            if not self.stopping.is_set():
                self._spawn(child)

    def _spawn(self, child: Child) -> None:
        child.process = subprocess.Popen(
            child.argv,
            env=child.env,
            start_new_session=True,
            preexec_fn=dies_with(),  # noqa: PLW1509 - prctl must run in the child
        )
        log.info("started %s (pid %d)", child.name, child.process.pid)

    def run(self) -> int:
        """Watch children until :meth:`stop`; returns the exit code for ``up``."""
        while not self.stopping.wait(0.2):
            now = time.monotonic()
            if self.server is not None and not self.server.check(now):
                self.stop()
                return 1
            for child in self.children:
                process = child.process
                if child.abandoned:
                    continue
                if process is None:
                    if now >= child.restart_at:
                        self._spawn(child)
                    continue
                code = process.poll()
                if code is None:
                    continue
                child.process = None
                child.crashes.append(now)
                recent = [t for t in child.crashes if now - t <= self.window_s]
                if len(recent) > self.burst and not child.essential:
                    log.error(
                        "%s crashed %d times in %.0fs; giving up on it, the workers go on (see the "
                        "errors above)", child.name, len(recent), self.window_s,
                    )  # fmt: skip
                    child.abandoned = True
                    continue
                if len(recent) > self.burst:
                    log.error(
                        "%s crashed %d times in %.0fs; giving up (see the errors above)",
                        child.name, len(recent), self.window_s,
                    )  # fmt: skip
                    self.stop()
                    return 1
                delay = min(2 ** (len(recent) - 1), 30)
                child.restart_at = now + delay
                log.warning("%s exited with code %s; restarting in %ss", child.name, code, delay)
        return 0

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM every child (each finishes its batch), SIGKILL what is left after the timeout."""
        self.stopping.set()
        stop_processes([c.process for c in self.children if c.process], timeout_s)


class ServerWatch:
    """Restart the embedded Redis when it dies, with backoff; give up if it keeps dying.

    The first restart is immediate (workers are waiting), later ones wait 1, 2, 4... s (up to
    30 s; ``backoff_s`` is the first wait). More
    than ``burst`` deaths within ``window_s`` mean something is wrong with the server itself
    (its log says what): :meth:`check` returns False and ``up`` exits 1.
    """

    def __init__(
        self, server: EmbeddedRedis, *, burst: int = 5, window_s: float = 60.0, backoff_s: float = 1.0
    ) -> None:
        self.server = server
        self.burst = burst
        self.window_s = window_s
        self.backoff_s = backoff_s
        self.deaths: deque[float] = deque(maxlen=burst + 1)
        self.restart_at: float | None = None

    def check(self, now: float) -> bool:
        """Called from ``up``'s main thread (PR_SET_PDEATHSIG follows the thread that started
        the server). False once it gave up."""
        if self.restart_at is None:
            process = self.server.process
            if process is not None and process.poll() is None:
                return True
            self.deaths.append(now)
            recent = [t for t in self.deaths if now - t <= self.window_s]
            how = _exit_text(process.returncode if process is not None else None)
            if len(recent) > self.burst:
                log.error(
                    "the embedded Redis %s, %d times in %.0fs; giving up (its log: %s)",
                    how, len(recent), self.window_s, self.server.log_path,
                )  # fmt: skip
                return False
            delay = 0.0 if len(recent) == 1 else min(self.backoff_s * 2 ** (len(recent) - 2), 30.0)
            log.error(
                "the embedded Redis %s; restarting it at %s in %gs (workers wait and reconnect; "
                "its data is %s)",
                how, self.server.url, delay,
                "kept (persist = true)" if self.server.persist else "gone: detectors start afresh",
            )  # fmt: skip
            self.restart_at = now + delay
        if now < self.restart_at:
            return True
        self.restart_at = None
        try:
            self.server.start()
        except EmbeddedRedisError as exc:
            log.error("could not restart the embedded Redis: %s", exc)  # the next check counts it
            return True
        assert self.server.process is not None
        log.warning("embedded Redis restarted (pid %d) at %s", self.server.process.pid, self.server.url)
        return True


def _exit_text(code: int | None) -> str:
    if code is None:
        return "is not running"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def stop_processes(processes: Iterable[subprocess.Popen[Any]], timeout_s: float) -> None:
    """SIGTERM each running process (a graceful stop), then SIGKILL whatever is still running
    once ``timeout_s`` has passed in all (one deadline, however many processes)."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for process in running:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("pid %d did not stop within %.0fs; killing it", process.pid, timeout_s)
            process.kill()
            process.wait()


def worker_child(kind: str, index: int, url: str, config: str | None, log_level: str) -> Child:
    """A ``python -m agentwatch worker <kind>`` child pointed at ``url``."""
    argv = [sys.executable, "-m", "agentwatch", "worker", kind, "--log-level", log_level]
    if config:
        argv += ["--config", config]
    env = {**os.environ, "AGENTWATCH_REDIS__URL": url}
    return Child(name=f"{kind}-worker-{index}", argv=argv, env=env)


def serve_child(url: str, config: str | None, log_level: str, bind: str) -> Child:
    """A ``python -m agentwatch serve`` child (the dashboard), not essential to monitoring."""
    argv = [sys.executable, "-m", "agentwatch", "serve", "--bind", bind, "--log-level", log_level]
    if config:
        argv += ["--config", config]
    env = {**os.environ, "AGENTWATCH_REDIS__URL": url}
    return Child(name="http-server", argv=argv, env=env, essential=False)
