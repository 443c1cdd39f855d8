"""Helpers for the producer tests: run real agent processes, read what they wrote, wait honestly.

Every wait is a bounded poll on a condition (:func:`wait_for`), never a sleep that hopes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

from agentwatch.codec import FIELD, decode

from helpers import wait_for

AGENTS = Path(__file__).resolve().parent


def read_events(client: redis.Redis, stream: str) -> list[dict[str, Any]]:
    """Every event of ``stream``, decoded and validated exactly as a worker would."""
    return [decode(fields[FIELD]) for _id, fields in client.xrange(stream)]


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [event["kind"] for event in events]


def of_kind(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [event for event in events if event["kind"] == kind]


def agent_env(redis_url: str, prefix: str, agent: str = "test-agent", **extra: Any) -> dict[str, str]:
    """Environment for an agent process: our Redis, our prefix, internal errors raised."""
    env = dict(os.environ)
    env.pop("_AGENTWATCH_INIT", None)
    env.update(
        AGENTWATCH_REDIS_URL=redis_url,
        AGENTWATCH_PREFIX=prefix,
        AGENTWATCH_AGENT=agent,
        AGENTWATCH_RAISE_INTERNAL="1",
        PYTHONUNBUFFERED="1",
    )
    env.update({key: str(value) for key, value in extra.items()})
    return env


def spawn(script: str, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """Start ``tests/agents/<script>`` (or ``-c`` code when it contains a newline)."""
    argv = [sys.executable, "-c", script] if "\n" in script else [sys.executable, str(AGENTS / script)]
    return subprocess.Popen(
        [*argv, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str], timeout: float = 15.0) -> tuple[int, str, str]:
    """Wait for the process; its return code, stdout and stderr."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"agent did not exit within {timeout}s; stderr:\n{err}") from None
    return process.returncode, out, err


def run(script: str, env: dict[str, str], *args: str, timeout: float = 15.0) -> tuple[int, str, str]:
    return finish(spawn(script, env, *args), timeout)


def assert_no_internal_errors(stderr: str) -> None:
    assert "internal error" not in stderr, stderr
    assert "agentwatch-sender" not in stderr, stderr


class HungServer:
    """A TCP server that accepts connections and never reads or answers them.

    What a Redis behind a dead proxy, a stopped VM or a full SYN-flooded box looks like to a
    client: the connect succeeds, then nothing ever comes back.
    """

    def __init__(self) -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.05)
        self.port = int(self._listener.getsockname()[1])
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="hung-redis", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        for conn in self.accepted:
            conn.close()
        self._listener.close()


@contextmanager
def hung_server() -> Iterator[HungServer]:
    server = HungServer()
    try:
        yield server
    finally:
        server.close()


class Echo:
    """Reads an ``AW_ECHO=1`` agent's stdout on a thread: how many beats it has made so far.

    Lines that are not a beat count are kept in :attr:`lines`; :attr:`exited_at` is the
    monotonic time at which :meth:`finish` saw the process gone.
    """

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.beats = 0
        self.lines: list[str] = []
        self.exited_at = 0.0
        self._thread = threading.Thread(target=self._read, name="echo-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.strip().isdigit():
                self.beats = int(line)
            elif line.strip():
                self.lines.append(line.strip())

    def wait_beats(self, more: int, timeout: float = 10.0) -> None:
        """Wait until the agent has made ``more`` beats beyond the count seen now."""
        target = self.beats + more
        wait_for(lambda: self.beats >= target, timeout, what=f"{target} beats from the agent")

    def finish(self, timeout: float = 15.0) -> tuple[int, str]:
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"agent did not exit within {timeout}s") from None
        self.exited_at = time.monotonic()
        self._thread.join(5)
        assert self.process.stderr is not None
        err = self.process.stderr.read()
        self.process.stdout.close()  # type: ignore[union-attr]
        self.process.stderr.close()
        return code, err
