"""End to end: real agent processes using the producer, a real detector worker, real Redis.

Each built-in detector fires and resolves on the failure it exists for: an agent SIGKILLed after
a memory climb (memory, then silence naming the climb), an agent hung on a socket that never
answers (stall naming the frame), a token loop x200 (tokens and loop), an uncaught exception
(exit); and a clean shutdown() raises nothing at all.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from agents.testkit import hung_server
from agents_detect.kit import alerts, fired, pipeline_for, resolved, transitions, worker_for

from agentwatch.keys import Keys
from agentwatch.redisconn import server_time_ms
from detectors.agent import read_agents

from helpers import running, wait_for

pytestmark = pytest.mark.slow

AGENT = Path(__file__).resolve().parent / "agents_detect" / "agent.py"
FAST = {
    "silence": {"after": "1s"},
    "stall": {"after": "1s"},
    "tokens": {"warmup": 8, "recover_after": 4},
    "memory": {"window": "1s", "points": 10, "min_points": 5, "limit": "2GB", "horizon": "60s"},
}


class Agents:
    """Starts agent processes for one test and makes sure none outlives it."""

    def __init__(self, redis_url: str, prefix: str) -> None:
        self.redis_url, self.prefix = redis_url, prefix
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, name: str, mode: str, **env: Any) -> subprocess.Popen[str]:
        environ = {key: value for key, value in os.environ.items() if not key.startswith("AGENTWATCH_")}
        environ.update(
            AGENTWATCH_REDIS_URL=self.redis_url, AGENTWATCH_PREFIX=self.prefix, AGENTWATCH_AGENT=name,
            AGENTWATCH_INTERVAL="0.1", AGENTWATCH_PULSE_INTERVAL="0.1", PYTHONUNBUFFERED="1",
        )  # fmt: skip
        environ.update({key: str(value) for key, value in env.items()})
        proc = subprocess.Popen(
            [sys.executable, str(AGENT), mode],
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)


@pytest.fixture
def agents(redis_url: str, prefix: str) -> Iterator[Agents]:
    started = Agents(redis_url, prefix)
    yield started
    started.stop_all()


def statuses(r: redis.Redis, keys: Keys, agent: str) -> list[tuple[str, str]]:
    return [(detector, status) for name, detector, status in transitions(r, keys) if name == agent]


def test_killed_after_a_memory_climb(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys, agents: Agents
) -> None:
    # Each beat of the leak touches 25 MB more while the pulse thread goes on: on a loaded box
    # one such beat can take most of a second, and 1 s of stall allowance (a true "work loop
    # stuck") is then a coin toss. This test is about memory and silence: stall gets 3 s.
    detectors = {**FAST, "stall": {"after": "3s"}}
    with running(worker_for(pipeline_for(prefix, redis_url, **detectors), redis_url)):
        proc = agents.start("leaky", "leak", AW_LEAK_MB=25, AW_LEAK_TO_MB=350)
        assert proc.wait(timeout=30) == -9  # it SIGKILLed itself, as the OOM killer would
        silence = wait_for(lambda: fired(r, keys, "silence", "leaky"), timeout=10, what="silence")[0]
        assert "likely killed for memory: RSS grew " in silence.summary
        memory = fired(r, keys, "memory", "leaky")[0]
        assert memory.summary.startswith("leaky: RSS ") and "2.0 GB limit in ~" in memory.summary
        agents.start("leaky", "steady", AW_WARMUP=1)  # restarted by its supervisor: an interpreter's
        # start, its imports and a first beat, which a loaded box can stretch to seconds
        wait_for(lambda: len(resolved(r, keys, "silence", "leaky")) == 1, timeout=30, what="silence resolved")
        wait_for(lambda: len(resolved(r, keys, "memory", "leaky")) == 1, timeout=5, what="memory resolved")
    assert sorted(statuses(r, keys, "leaky")) == [
        ("memory", "firing"), ("memory", "resolved"), ("silence", "firing"), ("silence", "resolved"),
    ]  # fmt: skip


def test_hung_on_a_socket_that_never_answers(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys, agents: Agents
) -> None:
    with hung_server() as server, running(worker_for(pipeline_for(prefix, redis_url, **FAST), redis_url)):
        url = f"http://127.0.0.1:{server.port}/v1/data"
        agents.start("hangs", "hang", AW_HANG_URL=url, AW_HANG_TIMEOUT=4)
        stall = wait_for(lambda: fired(r, keys, "stall", "hangs"), timeout=15, what="stall")[0]
        assert stall.summary.startswith("hangs: process alive, work loop stuck for ")
        assert "; blocked in agent.py:" in stall.summary and " fetch_from_api -> socket.py " in stall.summary
        assert "in fetch_from_api\n" in stall.details["stack"]
        wait_for(lambda: resolved(r, keys, "stall", "hangs"), timeout=10, what="stall resolved")
    assert statuses(r, keys, "hangs") == [("stall", "firing"), ("stall", "resolved")]


def test_a_token_loop_x200(redis_url: str, prefix: str, r: redis.Redis, keys: Keys, agents: Agents) -> None:
    with running(worker_for(pipeline_for(prefix, redis_url, **FAST), redis_url)):
        proc = agents.start("looper", "loop", AW_LOOP=200)
        assert proc.wait(timeout=30) == 0
        wait_for(lambda: len(resolved(r, keys, "loop", "looper")) == 1, timeout=10, what="loop resolved")
        wait_for(lambda: len(resolved(r, keys, "tokens", "looper")) == 1, timeout=5, what="tokens resolved")
    assert sorted(statuses(r, keys, "looper")) == [
        ("loop", "firing"), ("loop", "resolved"), ("tokens", "firing"), ("tokens", "resolved"),
    ]  # fmt: skip
    loop, tokens = fired(r, keys, "loop")[0], fired(r, keys, "tokens")[0]
    pattern = r"looper: work loop: the same work item \(fp 'ticket-4711'\) \d+ beats in a row"
    assert re.fullmatch(pattern, loop.summary)
    assert 20 <= loop.details["count"] <= 200
    assert tokens.summary.startswith("looper: token use ") and "in one beat" in tokens.summary
    assert "shut down" not in resolved(r, keys, "tokens")[0].summary  # calm beats resolved it


def test_an_uncaught_exception(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys, agents: Agents
) -> None:
    with running(worker_for(pipeline_for(prefix, redis_url, **FAST), redis_url)):
        assert agents.start("crashy", "crash").wait(timeout=20) == 1
        exit_alert = wait_for(lambda: fired(r, keys, "exit", "crashy"), timeout=5, what="exit alert")[0]
        assert exit_alert.summary == "crashy: crashed with ValueError: boom in run_job"
        assert "in run_job" in exit_alert.details["traceback"]
        agents.start("crashy", "steady", AW_WARMUP=1)
        wait_for(lambda: resolved(r, keys, "exit", "crashy"), timeout=10, what="exit resolved")
    assert statuses(r, keys, "crashy") == [("exit", "firing"), ("exit", "resolved")]


def test_a_clean_shutdown_raises_nothing(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys, agents: Agents
) -> None:
    with running(worker_for(pipeline_for(prefix, redis_url, **FAST), redis_url)):
        assert agents.start("polite", "shutdown").wait(timeout=20) == 0
        quiet_until = server_time_ms(r) + 2500  # two and a half silence allowances
        wait_for(lambda: server_time_ms(r) > quiet_until, timeout=10)
        time.sleep(0.2)
    assert alerts(r, keys) == []
    assert read_agents(r, keys)["polite"]["retired"]  # expected no more
