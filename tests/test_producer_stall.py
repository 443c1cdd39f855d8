"""Stall evidence: while the work loop is stuck, pulses keep coming and carry its stack."""

from __future__ import annotations

import re
import signal

import pytest
import redis
from agents.testkit import (
    AGENTS,
    agent_env,
    assert_no_internal_errors,
    finish,
    of_kind,
    read_events,
    run,
    spawn,
    wait_for,
)

pytestmark = pytest.mark.slow
FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)')


def test_work_loop_hung_in_recv_pulses_carry_the_stack(redis_url: str, prefix: str, r: redis.Redis) -> None:
    env = agent_env(redis_url, prefix, AGENTWATCH_INTERVAL=0.05, AGENTWATCH_PULSE_INTERVAL=0.1)
    process = spawn("scripted.py", env, "recv")
    stream = f"{prefix}:events"
    try:
        pulses = wait_for(
            lambda: [p for p in of_kind(read_events(r, stream), "pulse") if "stack" in p][:3],
            what="three pulses with a stack",
        )
    finally:
        process.send_signal(signal.SIGTERM)
        code, _, err = finish(process)

    stack = pulses[-1]["stack"]
    frames = FRAME.findall(stack)
    innermost_file, _line, innermost_func = frames[-1]
    assert innermost_func == "fetch_from_api"  # the agent's own blocking function, named
    assert innermost_file == str(AGENTS / "scripted.py")
    assert "conn.recv(4096)" in stack  # and the line that blocks
    assert [func for _, _, func in frames[-3:]] == ["<module>", "main", "fetch_from_api"]
    assert stack.startswith("Thread 'MainThread', last beat ")
    assert len(stack) <= 4096
    assert all(p["rss"] > 1_000_000 for p in pulses)
    assert code == -signal.SIGTERM
    assert_no_internal_errors(err)


def test_no_stack_while_beats_are_on_time(redis_url: str, prefix: str, r: redis.Redis) -> None:
    env = agent_env(redis_url, prefix, AGENTWATCH_INTERVAL=0.5, AGENTWATCH_PULSE_INTERVAL=0.05, AW_BEATS=30)
    code, _, err = run("scripted.py", env, "exit")

    pulses = of_kind(read_events(r, f"{prefix}:events"), "pulse")
    assert code == 0
    assert_no_internal_errors(err)
    assert pulses, "300 ms of beating must have produced pulses"
    assert not [p for p in pulses if "stack" in p]


def test_dead_work_thread_pulses_say_how_it_died(redis_url: str, prefix: str, r: redis.Redis) -> None:
    code = """
import threading, time
from producers import heartbeat, init
init(interval=0.05, pulse_interval=0.1)

def work():
    heartbeat()
    raise RuntimeError("model client exploded")

threading.Thread(target=work, name="work-loop").start()
time.sleep(30)  # the main thread lives on; the work is dead
"""
    process = spawn(code, agent_env(redis_url, prefix))
    try:
        pulse = wait_for(
            lambda: [p for p in of_kind(read_events(r, f"{prefix}:events"), "pulse") if "stack" in p],
            what="a pulse with the dead thread's story",
        )[0]
    finally:
        process.send_signal(signal.SIGTERM)
        finish(process)

    assert "'work-loop' (the work thread) died of an uncaught exception" in pulse["stack"]
    assert "RuntimeError: model client exploded" in pulse["stack"]
