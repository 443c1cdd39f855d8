"""What the sender does while Redis hangs, and at start, that the agent's thread would pay for.

The sender shares the GIL with the agent's thread: every time it wakes up while the agent runs
Python it takes the GIL from it, and a long burst of its work (reading a hundred files, say)
stalls the agent, ``heartbeat()`` included (benchmarks/producer_hung.py, benchmarks/NOTES.md).
So with Redis hung it waits on the connection that timed out instead of reconnecting on a short
back-off, and it sweeps stale run files one per step. These tests pin the behaviour; the stalls
themselves are measured by the benchmark, never asserted here.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from agents.testkit import of_kind, read_events, wait_for

from agentwatch import runfile
from agentwatch.embedded import EmbeddedRedis
from producers import Producer, _guard, _sender


@pytest.fixture(autouse=True)
def strict(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_guard, "RAISE_INTERNAL", True)
    monkeypatch.setattr(_guard, "_warned", set())


@pytest.fixture
def rare_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stalled connection's next reconnect a minute away: anything sooner is the watch's doing."""
    monkeypatch.setattr(_sender, "STALLED_RETRY", 60.0)
    monkeypatch.setattr(_sender, "STALLED_RETRY_MAX", 60.0)


class SilentServer:
    """Accepts TCP connections, never answers; the test can hang up on them or close shop."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.listener.getsockname()[1]}/0"
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.connections.append(self.listener.accept()[0])
            except OSError:  # closed
                return

    def hang_up(self) -> None:
        for conn in self.connections:
            conn.close()

    def close(self) -> None:
        self.listener.close()
        self.hang_up()


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


def stalled(producer: Producer) -> bool:
    sender = producer._sender
    assert sender is not None
    return sender._failing == "redis_timeout" and sender._transport.stalled


@pytest.mark.parametrize("auth", ["", "user:secret@"], ids=["no-auth", "auth"])
def test_a_hung_redis_is_watched_not_reconnected_and_a_hang_up_brings_a_retry_at_once(
    silent: SilentServer, prefix: str, rare_retries: None, auth: str
) -> None:
    url = silent.url.replace("redis://", f"redis://{auth}")  # AUTH is in the handshake that hangs
    producer = Producer("hung-bot", redis_url=url, prefix=prefix, socket_timeout=0.2, run_dir="")
    try:
        producer.heartbeat()
        wait_for(lambda: stalled(producer), what="the first batch to time out")
        # The old back-off reconnected after 0.1 s, then 0.2 s... (each try 0.2 s of timeout):
        # three connections or more in this window. A watched connection needs none.
        time.sleep(0.6)
        assert len(silent.connections) == 1
        assert stalled(producer)

        silent.hang_up()  # a sign of life on the watched connection: try again now, not in 60 s
        wait_for(lambda: len(silent.connections) >= 2, what="a new connection after the hang-up")
    finally:
        silent.close()  # refused from now on: close() gives up at once instead of in 2 s
        producer.close()


def test_close_during_a_watch_tries_redis_once_more_and_does_not_wait_out_the_deadline(
    silent: SilentServer, prefix: str, rare_retries: None, caplog: pytest.LogCaptureFixture
) -> None:
    producer = Producer("leaving-bot", redis_url=silent.url, prefix=prefix, socket_timeout=0.2, run_dir="")
    producer.heartbeat()
    wait_for(lambda: stalled(producer), what="the first batch to time out")
    sender = producer._sender
    assert sender is not None

    producer.close()  # the sender sits in a 60 s watch: the exit flush must wake it

    assert sender.done  # it finished by itself, not abandoned at the 2 s deadline
    assert "could not be delivered before exit" in caplog.text
    assert "flush gave up" not in caplog.text
    assert len(silent.connections) == 2  # one last try on a new connection


def test_a_paused_redis_is_noticed_the_moment_it_resumes(
    spawn_redis: Callable[..., EmbeddedRedis], prefix: str, rare_retries: None
) -> None:
    server = spawn_redis()
    assert server.process is not None
    stream = f"{prefix}:events"
    client = redis.Redis.from_url(server.url)
    producer = Producer("paused-bot", redis_url=server.url, prefix=prefix, socket_timeout=0.2,
                        flush_interval=0.01, run_dir="")  # fmt: skip
    try:
        producer.heartbeat()
        wait_for(lambda: of_kind(read_events(client, stream), "beat"), what="a beat before the pause")
        server.process.send_signal(signal.SIGSTOP)
        try:
            producer.heartbeat(tokens=1)
            wait_for(lambda: stalled(producer), what="the batch sent into the pause to time out")
        finally:
            server.process.send_signal(signal.SIGCONT)
        producer.heartbeat(tokens=2)
        # Only the watch can deliver this within the bound: the next reconnect is 60 s away.
        events = wait_for(lambda: [e for e in read_events(client, stream) if e.get("tokens") == 2],
                          what="a beat after the resume")  # fmt: skip
        assert events[0]["kind"] == "beat"
    finally:
        producer.close()
        client.close()


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def write_run_file(directory: Path, run: str, pid: int, pid_start: int | None) -> Path:
    path = directory / f"{run}.pid"
    path.write_text(json.dumps({"agent": "a", "run": run, "pid": pid, "pid_start": pid_start}))
    return path


@pytest.fixture
def runs_dir() -> Iterator[Path]:
    """A run dir of this test only: a process sweeps each directory once."""
    path = Path(tempfile.mkdtemp(prefix="aw-sweep-"))
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def test_stale_run_files_are_swept_one_per_step_and_live_ones_kept(runs_dir: Path) -> None:
    gone = dead_pid()
    stale = [write_run_file(runs_dir, f"stale{n}", gone, 12345) for n in range(3)]
    live = write_run_file(runs_dir, "live", os.getpid(), runfile.process_start(os.getpid()))
    (runs_dir / "notes.txt").write_text("not a run file")

    steps = runfile.sweeper(str(runs_dir))
    remaining = [len([p for p in stale if p.exists()])]
    for _ in steps:
        remaining.append(len([p for p in stale if p.exists()]))

    assert remaining[0] == 3
    assert all(before - after <= 1 for before, after in itertools.pairwise(remaining))
    assert remaining[-1] == 0 and live.exists() and (runs_dir / "notes.txt").exists()
    assert list(runfile.sweeper(str(runs_dir))) == []  # once per process


def test_the_sender_sweeps_stale_run_files_in_the_background(
    runs_dir: Path, redis_url: str, prefix: str
) -> None:
    gone = dead_pid()
    stale = [write_run_file(runs_dir, f"stale{n}", gone, 12345) for n in range(5)]
    producer = Producer("sweep-bot", redis_url=redis_url, prefix=prefix, flush_interval=0.01,
                        run_dir=str(runs_dir))  # fmt: skip
    try:
        producer.heartbeat()
        mine = runs_dir / f"{producer.run}.pid"
        wait_for(mine.exists, what="the producer's own run file")

        def swept() -> bool:
            producer.heartbeat()  # a beating agent keeps the sender stepping (one entry a step)
            return not any(path.exists() for path in stale)

        wait_for(swept, interval=0.02, what="the stale run files to go")
        assert mine.exists()
        record: dict[str, Any] = json.loads(mine.read_text())
        assert record["pid"] == os.getpid()
    finally:
        producer.close()
