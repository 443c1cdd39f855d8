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
from agents_detect.kit import Agent, Feed, alerts, fired, pipeline_for, resolved, transitions, worker_for

from agentwatch.keys import Keys
from detectors.agent import read_agents

from helpers import caught_up, running, wait_for

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
        wait_for(lambda: read_agents(r, keys, ["pool-agent"]).get("pool-agent", {}).get("tokens") == sent,
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


def test_pools_terminated_by_with_never_hang_the_agent(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    """``with Pool(3) as pool: pool.map(...)``, 40 times: the ``with`` ends in ``terminate()``,
    which SIGTERMs the workers. A worker that got it before its after-fork hooks ran (CPython
    drops signals that arrive then), or while woken inside ``sem_wait`` on the task queue's
    lock, never ran the exit handler it inherited, and ``terminate()`` waited for it for ever:
    the agent hung, about once in 30 pools on a loaded machine. 40 pools take ~5 s (forks),
    which is what makes the hang show without the fix most times."""
    with running(detectors(prefix, redis_url)):  # type: ignore[arg-type]
        agent = spawn("pool_fleet.py", agent_env(redis_url, prefix), "fork", "pools", str(tmp_path))
        try:
            agent.wait(30)
        except subprocess.TimeoutExpired:
            _kill_tree(agent)
            raise AssertionError("the agent hung (in Pool.terminate(), waiting for a worker)") from None
        code, _, err = finish(agent, 10)
        assert code == 0, err
        assert_no_internal_errors(err)
        wait_for(lambda: caught_up(r, keys), timeout=10, what="every event applied")
        assert read_agents(r, keys, ["pool-agent"])["pool-agent"]["retired"]
    assert alerts(r, keys) == []


def _kill_tree(agent: subprocess.Popen[str]) -> None:
    """End a hung agent and the pool workers that keep its pipes open (else communicate()
    waits for them)."""
    found = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True, check=False)
    for pid in found.stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    agent.kill()
    agent.communicate()


def test_a_worker_seen_before_its_parent_with_its_start_in_an_earlier_batch_stays_a_child(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    """A pool worker's events reach the detectors before its parent's start (the parent's sender
    flushed later), and a reader took the worker's start alone, between two XADDs: the next
    batch holds the worker's beats and clean exit, which only the children hash knows as a
    child. They were taken for a new run of the agent, so the worker's ``exit`` paged as
    "exited without shutdown()" (resolved a moment later by the parent's start) and its child
    record, never updated, looked like a worker dead without a goodbye."""
    worker = worker_for(pipeline_for(prefix, redis_url, silence={"after": "1s"}), redis_url)
    feed = Feed(worker)
    feed.apply([feed.event("pool-agent", "start", run="worker-1", parent="parent-1", interval=0.2)])
    late = [feed.event("pool-agent", "beat", run="worker-1", tokens=100) for _ in range(4)]
    feed.apply([*late, feed.event("pool-agent", "exit", run="worker-1", reason="exit", code=0)])
    feed.apply([feed.event("pool-agent", "start", run="parent-1", interval=0.2),
                feed.event("pool-agent", "beat", run="parent-1", tokens=10)])  # fmt: skip
    assert transitions(r, keys) == []  # the worker's clean exit ended the worker, not the agent
    rec = read_agents(r, keys, ["pool-agent"])["pool-agent"]
    assert rec["run"] == "parent-1" and rec["tokens"] == 4 * 100 + 10
    child = rec["children"]["worker-1"]
    assert child["exited"] and child["last_seq"] == 5  # its exit applied to it, as a child's
    for _ in range(3):  # the parent beats on past the silence allowance: the worker ended on purpose
        feed.apply([feed.event("pool-agent", "beat", run="parent-1", at=feed.now + 1000, tokens=10)])
        feed.tick(feed.now)
    assert transitions(r, keys) == []
    worker.client.close()


def test_a_closed_pools_worker_events_split_across_batches_raise_nothing_live(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    """The same order through a running detector worker and its stream: the worker's start is
    read on its own (caught up before the rest is sent), then its beats and exit, then the
    parent's run, which closes its pool and shuts down."""
    with running(detectors(prefix, redis_url)):  # type: ignore[arg-type]
        pool_worker = Agent(r, keys, "pool-agent", run="worker-1")
        pool_worker.start(parent="parent-1", interval=0.2)
        wait_for(lambda: caught_up(r, keys), timeout=10, what="the worker's start applied alone")
        for _ in range(4):
            pool_worker.beat(tokens=100)
        pool_worker.exit("exit", 0)
        wait_for(lambda: caught_up(r, keys), timeout=10, what="the worker's beats and exit applied")
        parent = Agent(r, keys, "pool-agent", run="parent-1")
        parent.start(interval=0.2)
        parent.beat(tokens=10)
        parent.exit("shutdown")
        wait_for(lambda: caught_up(r, keys), timeout=10, what="the parent's run applied")
        rec = read_agents(r, keys, ["pool-agent"])["pool-agent"]
        assert rec["run"] == "parent-1" and rec["tokens"] == 410 and rec["retired"]
    assert alerts(r, keys) == []


def pool_agent(redis_url: str, prefix: str, method: str, mode: str, where: Path) -> subprocess.Popen[str]:
    return spawn("pool_fleet.py", agent_env(redis_url, prefix), method, mode, str(where))


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""
