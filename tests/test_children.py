"""Child runs with a real ``multiprocessing.Pool`` agent (fork and spawn) and a real detector
worker: the workers' tokens count for the agent, a runaway in a worker fires ``tokens``, a
worker SIGKILLed while the parent beats is a ``child`` incident naming it and its parent run,
and a pool that retires its workers (close/terminate) raises nothing."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import pytest
import redis
from agents.testkit import agent_env, assert_no_internal_errors, finish, read_events, spawn
from agents_detect.kit import alerts, fired, pipeline_for, resolved, worker_for

from agentwatch.keys import Keys
from detectors import state

from helpers import running, wait_for

pytestmark = pytest.mark.slow

METHODS = ["fork", "spawn"]


def detectors(prefix: str, redis_url: str, **extra: dict[str, object]) -> object:
    return worker_for(pipeline_for(prefix, redis_url, silence={"after": "1s"}, **extra), redis_url)


@pytest.mark.parametrize("method", METHODS)
def test_pool_workers_tokens_count_and_a_closed_pool_raises_nothing(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys, tmp_path: Path, method: str
) -> None:
    with running(detectors(prefix, redis_url)):  # type: ignore[arg-type]
        code, _, err = finish(
            spawn("pool_fleet.py", agent_env(redis_url, prefix), method, "map", str(tmp_path)), 60
        )
        assert code == 0, err
        assert_no_internal_errors(err)
        events = read_events(r, keys.events())
        sent = sum(e.get("tokens", 0) for e in events if e["kind"] == "beat")
        children = {e["run"] for e in events if e["kind"] == "start" and e.get("parent")}
        assert children  # the pool's workers reported as child runs
        wait_for(lambda: state.read_agents(r, keys, ["pool-agent"]).get("pool-agent", {}).get("tt") == sent,
                 timeout=15, what=f"{sent} tokens counted for the agent")  # fmt: skip
        assert sent > 8 * 4 * 100
        with contextlib.suppress(AssertionError):  # give the watch a few checks: still nothing
            wait_for(lambda: alerts(r, keys), timeout=2.5)
    assert alerts(r, keys) == []


@pytest.mark.parametrize("method", METHODS)
def test_a_worker_killed_while_its_parent_beats_is_named_as_its_child(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys, tmp_path: Path, method: str
) -> None:
    agent = pool_agent(redis_url, prefix, method, "busy", tmp_path)
    try:
        with running(detectors(prefix, redis_url)):  # type: ignore[arg-type]
            pid = int(wait_for(lambda: _read(tmp_path / "worker"), timeout=30, what="the busy worker"))
            events = wait_for(lambda: [e for e in read_events(r, keys.events()) if e.get("pid") == pid],
                              timeout=10, what="the worker's start")  # fmt: skip
            os.kill(pid, signal.SIGKILL)
            alert = wait_for(lambda: fired(r, keys, "child"), timeout=15, what="child alert")[0]
            assert alert.agent == "pool-agent" and alert.severity == "critical"
            assert (
                f"worker process {pid} (run {events[0]['run']}, child of run {events[0]['parent']})"
                in alert.summary
            )
            assert alert.details["pid"] == pid and alert.details["parent"] == events[0]["parent"]
            assert not fired(r, keys, "silence")  # the parent still beats
            (tmp_path / "stop").write_text("1")
            code, _, err = finish(agent, 30)
            assert code == 0, err
            back = wait_for(lambda: resolved(r, keys, "child"), timeout=10, what="child resolved")[0]
            assert "is over" in back.summary
        assert len(fired(r, keys, "child")) == 1 and not fired(r, keys, "exit")
    finally:
        with contextlib.suppress(ProcessLookupError):
            agent.kill()
        agent.communicate()


@pytest.mark.parametrize("method", METHODS)
def test_a_runaway_in_a_pool_worker_fires_tokens(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys, tmp_path: Path, method: str
) -> None:
    with running(detectors(prefix, redis_url, tokens={"warmup": 10})):  # type: ignore[arg-type]
        code, _, err = finish(
            spawn("pool_fleet.py", agent_env(redis_url, prefix), method, "runaway", str(tmp_path)), 60
        )
        assert code == 0, err
        alert = wait_for(lambda: fired(r, keys, "tokens"), timeout=15, what="tokens alert")[0]
    assert alert.agent == "pool-agent" and "40,000" in alert.summary


def pool_agent(redis_url: str, prefix: str, method: str, mode: str, where: Path) -> subprocess.Popen[str]:
    return spawn("pool_fleet.py", agent_env(redis_url, prefix), method, mode, str(where))


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""
