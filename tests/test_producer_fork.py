"""Forks and multiprocessing: every process run reports on its own, under its own run id."""

from __future__ import annotations

import pytest
import redis
from agents.testkit import agent_env, assert_no_internal_errors, kinds, read_events, run

pytestmark = pytest.mark.slow


def runs(events: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for event in events:
        grouped.setdefault(event["run"], []).append(event)
    return grouped


def test_os_fork_child_gets_a_new_run_and_reports(redis_url: str, prefix: str, r: redis.Redis) -> None:
    code = """
import os, sys
from producers import heartbeat
heartbeat(tokens=1)
heartbeat(tokens=2)
pid = os.fork()
if pid == 0:
    heartbeat(tokens=100)
    heartbeat(tokens=101)
    sys.exit(7)  # a normal interpreter exit in the child: atexit runs there too
heartbeat(tokens=3)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""
    exit_code, out, err = run(code, agent_env(redis_url, prefix))

    grouped = runs(read_events(r, f"{prefix}:events"))
    assert exit_code == 0 and out.strip() == "7"
    assert_no_internal_errors(err)
    assert len(grouped) == 2
    parent = next(events for events in grouped.values() if "parent" not in events[0])
    child = next(events for events in grouped.values() if "parent" in events[0])
    assert kinds(parent) == ["start", "beat", "beat", "beat", "exit"]
    assert [e["tokens"] for e in parent if e["kind"] == "beat"] == [1, 2, 3]
    assert kinds(child) == ["start", "beat", "beat", "exit"]  # nothing of the parent's queue
    assert [e["tokens"] for e in child if e["kind"] == "beat"] == [100, 101]
    assert [e["seq"] for e in child] == [0, 1, 2, 3]
    assert child[0]["parent"] == parent[0]["run"]
    assert child[0]["pid"] != parent[0]["pid"]
    assert (child[-1]["reason"], child[-1]["code"]) == ("exit", 7)
    assert (parent[-1]["reason"], parent[-1]["code"]) == ("exit", 0)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_multiprocessing_workers_each_report(
    redis_url: str, prefix: str, r: redis.Redis, method: str
) -> None:
    exit_code, out, err = run("pool.py", agent_env(redis_url, prefix, agent="from-env"), method, timeout=30)

    events = read_events(r, f"{prefix}:events")
    grouped = runs(events)
    starts = [e for e in events if e["kind"] == "start"]
    assert exit_code == 0
    assert_no_internal_errors(err)
    assert {e["agent"] for e in events} == {"mp-agent"}  # workers keep init()'s agent name
    parent_run = next(e["run"] for e in starts if "parent" not in e)
    worker_starts = [e for e in starts if e.get("parent") == parent_run]
    assert len(worker_starts) == int(out.strip())  # every worker process that worked reported
    assert {e["pid"] for e in worker_starts} == {e["pid"] for e in worker_starts if e["pid"]}
    worker_beats = [e for e in events if e["kind"] == "beat" and e["run"] != parent_run]
    assert sorted(e["tokens"] for e in worker_beats) == sorted(list(range(1, 9)) * 2)
    assert all(kinds(run_events)[0] == "start" for run_events in grouped.values())


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_spawned_workers_without_init_are_workers_not_restarts(
    redis_url: str, prefix: str, r: redis.Redis, method: str
) -> None:
    # Zero setup: a plain heartbeat() in the parent, no init(). Without the parent's run id a
    # spawned worker's start looks like a restart, and its end like the agent exiting.
    env = agent_env(redis_url, prefix, agent="zero-setup", AGENTWATCH_PULSE_INTERVAL=60)
    exit_code, out, err = run("pool.py", env, method, "noinit", timeout=30)

    starts = [e for e in read_events(r, f"{prefix}:events") if e["kind"] == "start"]
    assert exit_code == 0
    assert_no_internal_errors(err)
    (parent,) = [e for e in starts if "parent" not in e]  # one run is the agent itself...
    workers = [e for e in starts if e is not parent]
    assert len(workers) == int(out.strip())  # ...every other one is a worker of it
    assert {e["parent"] for e in workers} == {parent["run"]}
    assert {e["agent"] for e in starts} == {"zero-setup"}
