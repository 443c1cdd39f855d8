"""``agentwatch up`` says what happens: a line per alert and per delivery outcome (issue 10, point 4).

Real parts throughout: the notifier worker delivering to a real HTTP receiver on 127.0.0.1, and
for the end-to-end tests a real ``up`` process and a real agent killed with SIGKILL.
"""

from __future__ import annotations

import io
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from agentwatch.activity import Activity, alert_line, literal
from agentwatch.keys import Keys

from conftest import free_port
from helpers import wait_for
from notify_kit import FAST_DELIVERY, Reply, fire, notifier_running, pipeline_with, receiver


def _poll_until(activity: Activity, out: io.StringIO, marker: str, timeout: float = 15.0) -> str:
    def seen() -> bool:
        activity.poll()
        return marker in out.getvalue()

    wait_for(seen, timeout, interval=0.05, what=f"{marker!r} in:\n{out.getvalue()}")
    return out.getvalue()


def test_alerts_retries_and_deliveries_are_one_line_each(redis_url: str, prefix: str, r: redis.Redis) -> None:
    keys = Keys(prefix)
    with receiver() as hook:
        hook.reply(Reply(status=500, body=b"boom"))  # the first attempt fails, the second lands
        # A retry a second later: the pending retry is there to be seen by a poll, even on a
        # loaded machine (at 50 ms it can be gone between two polls, and ``up`` says so only
        # while it is pending).
        slow_retry = {**FAST_DELIVERY, "backoff": "1s", "backoff_max": "1s"}
        pipeline = pipeline_with(prefix, redis_url, [{"type": "webhook", "name": "hook", "url": hook.url,
                                                      **slow_retry}])  # fmt: skip
        out = io.StringIO()
        activity = Activity(r, keys, ["hook"], out=out)
        activity.start_here()
        with notifier_running(pipeline, redis_url):
            fire(r, keys, agent="scraper-1", summary="scraper-1: no heartbeat for 5s")
            text = _poll_until(activity, out, "delivery hook: delivered")
    lines = text.splitlines()
    assert any(
        line.endswith("alert FIRING silence agent 'scraper-1' [critical]: scraper-1: no heartbeat for 5s")
        for line in lines
    ), text
    retrying = [line for line in lines if "delivery hook: retrying silence firing agent 'scraper-1'" in line]
    assert retrying and "(1, HTTP 500" in retrying[0], text
    assert any("delivery hook: delivered silence firing agent 'scraper-1' (attempt 2, HTTP 200)" in line
               for line in lines), text  # fmt: skip
    assert all(line[:8].count(":") == 2 for line in lines)  # each starts with the time


def test_only_what_happens_after_up_started_is_printed(prefix: str, r: redis.Redis) -> None:
    keys = Keys(prefix)
    fire(r, keys, agent="before-up")
    out = io.StringIO()
    activity = Activity(r, keys, [], out=out)
    activity.start_here()
    fire(r, keys, agent="after-up")
    assert activity.poll() == 1
    assert "agent 'after-up'" in out.getvalue() and "before-up" not in out.getvalue()


def test_a_dead_webhook_is_said_to_fail(redis_url: str, prefix: str, r: redis.Redis) -> None:
    keys = Keys(prefix)
    url = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    pipeline = pipeline_with(prefix, redis_url, [{"type": "webhook", "name": "hook", "url": url,
                                                  "max_attempts": 2, **FAST_DELIVERY}])  # fmt: skip
    out = io.StringIO()
    activity = Activity(r, keys, ["hook"], out=out)
    activity.start_here()
    with notifier_running(pipeline, redis_url):
        fire(r, keys, agent="bot")
        text = _poll_until(activity, out, "delivery hook: FAILED")
    assert (
        "delivery hook: FAILED silence firing agent 'bot' after 2 attempt(s): gave up after 2 attempts"
        in text
    )


def test_agent_text_is_printed_literally() -> None:
    hostile = "evil\x1b[2J\x1b]0;owned\x07\nFAKE LINE\u202e"
    line = alert_line({"status": "firing", "detector": "silence", "agent": hostile, "severity": "critical",
                       "summary": f"{hostile}: gone"})  # fmt: skip
    assert "\x1b" not in line and "\n" not in line and "\u202e" not in line and "\x07" not in line
    assert "evil\\x1b[2J\\x1b]0;owned\\x07\\nFAKE LINE\\u202e" in line
    assert literal("it's\ttabbed") == "it's\\ttabbed"


# -- a real `up`, a real agent, SIGKILL ----------------------------------------------------------


class Output:
    """Every line a process writes to stdout, collected by a thread (select() on a text pipe
    can miss lines already buffered)."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        self.process = process
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen = ""
        stdout = process.stdout
        threading.Thread(target=lambda: [self.lines.put(line) for line in stdout], daemon=True).start()

    def until(self, marker: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while marker not in self.seen:
            try:
                self.seen += self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {marker!r} within {timeout}s (exit {self.process.poll()}):\n"
                                     f"{self.seen}") from None  # fmt: skip
        return self.seen

    def drain(self) -> str:
        while True:
            try:
                self.seen += self.lines.get_nowait()
            except queue.Empty:
                return self.seen


def _config(short_dir: Path, hook_url: str | None) -> Path:
    path = short_dir / "pipeline.toml"
    text = (
        f'[redis]\nurl = "embedded"\n[embedded]\nstate_dir = "{short_dir / "state"}"\n'
        "port = 0\npersist = false\n"
        '[worker]\ntick = "100ms"\nblock = "200ms"\n[http]\nenabled = false\n'
        '[detectors.silence]\nafter = "1s"\n'
    )
    if hook_url:
        text += f'[[notifiers]]\ntype = "webhook"\nname = "hook"\nurl = "{hook_url}"\nbackoff = "100ms"\n'
    path.write_text(text)
    return path


@pytest.fixture
def run_up() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout:
            process.stdout.close()


def _start_up(config: Path, run_up: list[subprocess.Popen[str]], *flags: str) -> tuple[Output, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "agentwatch", "up", "--config", str(config), "--log-level", "warning", *flags],
        stdout=subprocess.PIPE, text=True, cwd=config.parent, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    run_up.append(process)
    output = Output(process)
    banner = output.until("Ctrl-C to stop.")
    need = next(line for line in banner.splitlines() if line.startswith("agents need: "))
    url = need.split("AGENTWATCH_REDIS_URL=", 1)[1].split(" ", 1)[0].strip("'")
    return output, url


def _kill_an_agent(url: str, name: str) -> None:
    """Run a real agent beating every 0.2 s until its events reach Redis, then SIGKILL it."""
    code = (
        "import time, producers\n"
        f"producers.init(agent={name!r}, interval=0.2)\n"
        "while True:\n    time.sleep(0.2)\n    producers.heartbeat(tokens=100)\n"
    )
    env = {**os.environ, "AGENTWATCH_REDIS_URL": url, "AGENTWATCH_PREFIX": "aw"}
    agent = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        client = redis.Redis.from_url(url)
        try:
            wait_for(lambda: client.xlen("aw:events") >= 3, 20, what="the agent's events")
        finally:
            client.close()
    finally:
        agent.send_signal(signal.SIGKILL)
        agent.wait()


@pytest.mark.slow
def test_up_prints_the_alert_of_a_killed_agent_and_its_delivery(
    short_dir: Path, run_up: list[subprocess.Popen[str]]
) -> None:
    with receiver() as hook:
        output, url = _start_up(_config(short_dir, hook.url), run_up)
        _kill_an_agent(url, "victim")
        seen = output.until("delivery hook: delivered silence firing agent 'victim'")
    assert "alert FIRING silence agent 'victim' [critical]: victim: no heartbeat for " in seen


@pytest.mark.slow
def test_quiet_up_prints_no_alert_lines(short_dir: Path, run_up: list[subprocess.Popen[str]]) -> None:
    output, url = _start_up(_config(short_dir, None), run_up, "--quiet")
    _kill_an_agent(url, "victim")
    client = redis.Redis.from_url(url)
    try:
        wait_for(lambda: client.xlen("aw:alerts") >= 1, 30, what="the silence alert")
    finally:
        client.close()
    time.sleep(1.5)  # three of the polls a non-quiet `up` would have printed it by
    assert "alert FIRING" not in output.drain()
