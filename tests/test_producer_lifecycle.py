"""How an agent process ends, as the stream tells it: real processes, real signals, real Redis."""

from __future__ import annotations

import signal

import pytest
import redis
from agents.testkit import (
    agent_env,
    assert_no_internal_errors,
    finish,
    kinds,
    of_kind,
    read_events,
    run,
    spawn,
    wait_for,
)

pytestmark = pytest.mark.slow


def stream(prefix: str) -> str:
    return f"{prefix}:events"


def test_normal_exit_sends_start_beats_and_exit_code_0(redis_url: str, prefix: str, r: redis.Redis) -> None:
    code, _, err = run("scripted.py", agent_env(redis_url, prefix, "life-ok", AW_BEATS=3), "exit")

    events = read_events(r, stream(prefix))
    assert code == 0
    assert_no_internal_errors(err)
    assert kinds(events) == ["start", "beat", "beat", "beat", "exit"]
    assert [event["seq"] for event in events] == [0, 1, 2, 3, 4]
    assert len({event["run"] for event in events}) == 1
    assert {event["agent"] for event in events} == {"life-ok"}
    start, exit_ = events[0], events[-1]
    assert start["pid"] > 0 and start["host"] and start["version"]
    assert exit_["reason"] == "exit" and exit_["code"] == 0
    assert [event["tokens"] for event in of_kind(events, "beat")] == [10, 11, 12]


def test_sys_exit_3_reports_code_3(redis_url: str, prefix: str, r: redis.Redis) -> None:
    code, _, err = run("scripted.py", agent_env(redis_url, prefix), "exit3")

    exit_ = read_events(r, stream(prefix))[-1]
    assert code == 3
    assert_no_internal_errors(err)
    assert (exit_["kind"], exit_["reason"], exit_["code"]) == ("exit", "exit", 3)


def test_uncaught_exception_reports_type_and_keeps_traceback_and_code(
    redis_url: str, prefix: str, r: redis.Redis
) -> None:
    code, _, err = run("scripted.py", agent_env(redis_url, prefix), "raise")

    exit_ = read_events(r, stream(prefix))[-1]
    assert code == 1  # unchanged
    assert "Traceback (most recent call last)" in err  # the original hook still printed it
    assert "ValueError: boom in run_job" in err
    assert exit_["kind"] == "exit" and exit_["reason"] == "exception" and exit_["code"] == 1
    assert exit_["error"] == "ValueError: boom in run_job"
    assert "in run_job" in exit_["traceback"] and len(exit_["traceback"]) <= 4096


def test_sigterm_reports_signal_and_process_still_dies_by_sigterm(
    redis_url: str, prefix: str, r: redis.Redis
) -> None:
    process = spawn("scripted.py", agent_env(redis_url, prefix), "forever")
    wait_for(lambda: len(of_kind(read_events(r, stream(prefix)), "beat")) >= 3, what="beats")

    process.send_signal(signal.SIGTERM)
    code, _, err = finish(process)

    events = read_events(r, stream(prefix))
    assert code == -signal.SIGTERM  # terminated by the signal, exactly as without agentwatch
    assert_no_internal_errors(err)
    assert events[-1]["kind"] == "exit"
    exit_ = events[-1]
    assert (exit_["reason"], exit_["error"], exit_["code"]) == ("signal", "SIGTERM", 143)
    assert kinds(events).count("exit") == 1


def test_sigint_still_raises_keyboard_interrupt_and_reports_signal(
    redis_url: str, prefix: str, r: redis.Redis
) -> None:
    process = spawn("scripted.py", agent_env(redis_url, prefix), "forever")
    wait_for(lambda: len(of_kind(read_events(r, stream(prefix)), "beat")) >= 3, what="beats")

    process.send_signal(signal.SIGINT)
    code, _, err = finish(process)

    exit_ = read_events(r, stream(prefix))[-1]
    assert "KeyboardInterrupt" in err  # Python's own handler ran and the traceback printed
    assert code == -signal.SIGINT  # an unhandled KeyboardInterrupt ends the process by SIGINT
    assert exit_["kind"] == "exit"
    assert (exit_["reason"], exit_["error"], exit_["code"]) == ("signal", "SIGINT", 130)


def test_program_own_sigterm_handler_is_left_alone(redis_url: str, prefix: str, r: redis.Redis) -> None:
    process = spawn("scripted.py", agent_env(redis_url, prefix), "own-sigterm")
    wait_for(lambda: len(of_kind(read_events(r, stream(prefix)), "beat")) >= 3, what="beats")

    process.send_signal(signal.SIGTERM)
    code, out, err = finish(process)

    exit_ = read_events(r, stream(prefix))[-1]
    assert "own handler ran" in out
    assert code == 0
    assert_no_internal_errors(err)
    assert (exit_["kind"], exit_["reason"], exit_["code"]) == ("exit", "exit", 0)


def test_sigkill_leaves_start_and_beats_and_no_exit(redis_url: str, prefix: str, r: redis.Redis) -> None:
    process = spawn("scripted.py", agent_env(redis_url, prefix), "forever")
    wait_for(lambda: len(of_kind(read_events(r, stream(prefix)), "beat")) >= 5, what="beats")

    process.kill()
    finish(process)

    events = read_events(r, stream(prefix))  # the process is gone: nothing more can arrive
    assert events[0]["kind"] == "start"
    assert len(of_kind(events, "beat")) >= 5
    assert "exit" not in kinds(events)


def test_shutdown_sends_one_exit_with_reason_shutdown(redis_url: str, prefix: str, r: redis.Redis) -> None:
    code, _, err = run("scripted.py", agent_env(redis_url, prefix, AW_BEATS=2), "shutdown")

    events = read_events(r, stream(prefix))
    assert code == 0
    assert_no_internal_errors(err)
    assert kinds(events) == ["start", "beat", "beat", "exit"]  # later beats are ignored
    assert (events[-1]["reason"], events[-1]["code"]) == ("shutdown", 0)


def test_work_thread_dying_of_an_exception_is_the_exit_reason(
    redis_url: str, prefix: str, r: redis.Redis
) -> None:
    code, _, err = run("scripted.py", agent_env(redis_url, prefix), "thread-raise")

    exit_ = read_events(r, stream(prefix))[-1]
    assert code == 0  # a thread's exception does not change the process exit code
    assert "ValueError: boom in run_job" in err  # threading's own hook still printed it
    assert (exit_["kind"], exit_["reason"], exit_["code"]) == ("exit", "exception", 0)
    assert exit_["error"] == "ValueError: boom in run_job"


def test_work_resumed_by_another_thread_is_a_normal_exit(redis_url: str, prefix: str, r: redis.Redis) -> None:
    code, _, err = run("scripted.py", agent_env(redis_url, prefix), "takeover")

    exit_ = read_events(r, stream(prefix))[-1]
    assert code == 0
    assert "ValueError: boom in run_job" in err
    assert (exit_["kind"], exit_["reason"], exit_["code"]) == ("exit", "exit", 0)


def test_explicit_producer_as_context_manager(redis_url: str, prefix: str, r: redis.Redis) -> None:
    code = """
from producers import Producer
with Producer("ctx-a", pulse_interval=60) as a:
    a.heartbeat(tokens=1)
try:
    with Producer("ctx-b", pulse_interval=60) as b:
        b.heartbeat(tokens=2)
        raise KeyError("gone")
except KeyError:
    pass
"""
    exit_code, _, err = run(code, agent_env(redis_url, prefix))

    events = read_events(r, stream(prefix))
    by_agent = {agent: [e for e in events if e["agent"] == agent] for agent in ("ctx-a", "ctx-b")}
    assert exit_code == 0
    assert_no_internal_errors(err)
    assert kinds(by_agent["ctx-a"]) == ["start", "beat", "exit"]
    assert by_agent["ctx-a"][-1]["reason"] == "shutdown"
    assert kinds(by_agent["ctx-b"]) == ["start", "beat", "exit"]
    assert by_agent["ctx-b"][-1]["reason"] == "exception"
    assert by_agent["ctx-b"][-1]["error"] == "KeyError: 'gone'"
