"""``agentwatch status --watch`` as a real process: on a terminal (a pty) and on a pipe.

It must redraw on every refresh, survive Redis going away (the error shown in place, the board
back once Redis is), and stop cleanly on Ctrl-C and SIGTERM (exit 0, no traceback; on a pipe
the last frame is what gets printed). Each test runs against a private server, so the refresh
count can be read off that server's command statistics.
"""

from __future__ import annotations

import os
import pty
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from agentwatch.embedded import EmbeddedRedis

from helpers import wait_for

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
TITLE = re.compile(r"agentwatch status - (\d{4}-\d\d-\d\dT[\d:.]+Z)")
WATCH = [sys.executable, "-m", "agentwatch", "status", "--watch", "--refresh", "0.2s"]


def env_for(url: str, prefix: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTWATCH_")}
    return env | {"AGENTWATCH_REDIS__URL": url, "AGENTWATCH_REDIS__PREFIX": prefix, "COLUMNS": "100"}


class OnPty:
    """A process whose stdout and stderr are a terminal; everything it writes is collected."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd="/")
        os.close(slave)
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the process and every copy of the terminal are gone
                return
            if not chunk:
                return
            self._chunks.append(chunk)

    @property
    def text(self) -> str:
        """What it wrote, without the terminal's control sequences (colours, cursor moves)."""
        return ANSI.sub("", b"".join(self._chunks).decode(errors="replace"))

    def titles(self) -> list[str]:
        return TITLE.findall(self.text)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._reader.join(5)
        os.close(self.master)


@pytest.fixture
def server(spawn_redis: Callable[..., EmbeddedRedis]) -> EmbeddedRedis:
    return spawn_redis()


@pytest.fixture
def on_pty(server: EmbeddedRedis, prefix: str) -> Iterator[OnPty]:
    watched = OnPty(WATCH, env_for(server.url, prefix))
    yield watched
    watched.close()


def refreshes(server: EmbeddedRedis) -> int:
    """How often ``status`` has asked this server for the time: once per frame."""
    client = redis.Redis.from_url(server.url)
    try:
        stats: dict[str, Any] = client.info("commandstats")
        return int(stats.get("cmdstat_time", {}).get("calls", 0))
    finally:
        client.close()


def test_on_a_terminal_it_redraws_and_stops_cleanly_on_ctrl_c(on_pty: OnPty) -> None:
    wait_for(lambda: len(set(on_pty.titles())) >= 3, timeout=15, what="three frames")
    on_pty.process.send_signal(signal.SIGINT)
    assert on_pty.process.wait(timeout=10) == 0
    on_pty._reader.join(5)
    assert "Traceback" not in on_pty.text and "KeyboardInterrupt" not in on_pty.text
    assert "(no agents yet)" in on_pty.text


def test_losing_redis_shows_the_error_in_place_and_the_board_comes_back(
    on_pty: OnPty, server: EmbeddedRedis
) -> None:
    wait_for(on_pty.titles, timeout=15, what="the first frame")
    server.stop()
    wait_for(lambda: "is unreachable since" in on_pty.text, timeout=15, what="the error in place")
    assert on_pty.process.poll() is None  # still watching
    error_at = on_pty.text.rindex("is unreachable since")
    assert "retrying every 200ms" in " ".join(on_pty.text[error_at:].split())  # lines wrap at 100
    server.start()

    def recovered() -> bool:  # two frames began after the last error: the one between is clean
        text = on_pty.text
        return len(TITLE.findall(text, text.rindex("is unreachable since"))) >= 2

    wait_for(recovered, timeout=15, what="a frame without the error after Redis came back")
    on_pty.process.send_signal(signal.SIGINT)
    assert on_pty.process.wait(timeout=10) == 0
    assert "Traceback" not in on_pty.text


def test_on_a_pipe_sigterm_prints_the_last_frame_and_exits_0(server: EmbeddedRedis, prefix: str) -> None:
    process = subprocess.Popen(WATCH, env=env_for(server.url, prefix), cwd="/", stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_for(lambda: refreshes(server) >= 3, timeout=15, what="three refreshes")
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert len(TITLE.findall(out)) == 1  # nothing can be redrawn on a pipe: the last frame only
    assert "workers alive: none" in out and "not detecting:" in out
    assert "Traceback" not in err
