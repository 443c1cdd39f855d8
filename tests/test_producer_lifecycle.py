"""How an agent process ends, as the stream tells it: real processes, real signals, real Redis."""

from __future__ import annotations

import glob
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

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

from producers import _exitcode

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


def test_sigterm_with_the_work_loop_in_a_thread_reports_signal(
    redis_url: str, prefix: str, r: redis.Redis
) -> None:
    # The main thread never calls the producer: the handler went in at `import producers`.
    process = spawn("scripted.py", agent_env(redis_url, prefix), "thread-forever")
    wait_for(lambda: len(of_kind(read_events(r, stream(prefix)), "beat")) >= 3, what="beats")

    process.send_signal(signal.SIGTERM)
    code, _, err = finish(process)

    exit_ = read_events(r, stream(prefix))[-1]
    assert code == -signal.SIGTERM
    assert_no_internal_errors(err)
    assert (exit_["kind"], exit_["reason"], exit_["error"], exit_["code"]) == (
        "exit",
        "signal",
        "SIGTERM",
        143,
    )


def test_sighup_reports_signal_and_the_process_still_dies_by_it(
    redis_url: str, prefix: str, r: redis.Redis
) -> None:
    process = spawn("scripted.py", agent_env(redis_url, prefix), "forever")
    wait_for(lambda: len(of_kind(read_events(r, stream(prefix)), "beat")) >= 3, what="beats")

    process.send_signal(signal.SIGHUP)  # the terminal or the SSH session went away
    code, _, err = finish(process)

    exit_ = read_events(r, stream(prefix))[-1]
    assert code == -signal.SIGHUP
    assert_no_internal_errors(err)
    assert (exit_["kind"], exit_["reason"], exit_["error"], exit_["code"]) == (
        "exit",
        "signal",
        "SIGHUP",
        129,
    )


def test_a_program_handler_that_calls_ours_keeps_its_own_behaviour(
    redis_url: str, prefix: str, r: redis.Redis
) -> None:
    process = spawn("scripted.py", agent_env(redis_url, prefix), "chain-sigterm")
    wait_for(lambda: len(of_kind(read_events(r, stream(prefix)), "beat")) >= 3, what="beats")

    process.send_signal(signal.SIGTERM)
    code, out, err = finish(process)

    exit_ = read_events(r, stream(prefix))[-1]
    assert "own handler ran" in out  # ours, called as "the previous handler", did not kill it
    assert code == 0
    assert_no_internal_errors(err)
    assert (exit_["kind"], exit_["reason"], exit_["code"]) == ("exit", "exit", 0)


MONITORED = sys.version_info >= (3, 12)  # sys.monitoring sees `raise SystemExit(main())`
ENDINGS: dict[str, tuple[int, int | None]] = {
    # mode: (the process's exit code, the exit event's code; None = sent without one)
    "raise-literal": (4, 4),
    "raise-main": (4, 4 if MONITORED else None),
    "raise-class": (0, 0),
    "builtin-exit": (4, 4),
    "in-function": (5, None),  # unknowable: no code rather than a wrong 0
    "thread-exit": (0, 0),
    "caught-exit": (0, 0),
    "stale-error": (0, 0),
}


def test_exit_events_carry_the_real_exit_code_or_none(redis_url: str, prefix: str, r: redis.Redis) -> None:
    processes = {
        mode: spawn("ending.py", agent_env(redis_url, prefix, agent=mode), mode) for mode in ENDINGS
    }  # all at once: each is a short interpreter run
    results = {mode: finish(process) for mode, process in processes.items()}

    events = read_events(r, stream(prefix))
    for mode, (process_code, event_code) in ENDINGS.items():
        code, _, err = results[mode]
        assert code == process_code, (mode, err)
        assert_no_internal_errors(err)
        exit_ = [e for e in events if e["agent"] == mode][-1]
        assert (exit_["kind"], exit_["reason"]) == ("exit", "exit"), (mode, exit_)
        assert exit_.get("code") == event_code, (mode, exit_)
        assert ("code" in exit_) == (event_code is not None), (mode, exit_)
    assert "ZeroDivisionError" in results["stale-error"][2]  # the handled error was shown


EXITCODE_PROBE = """
import atexit, importlib.util, json, sys, threading
spec = importlib.util.spec_from_file_location("aw_exitcode", sys.argv[1])
exitcode = importlib.util.module_from_spec(spec)
spec.loader.exec_module(exitcode)
exitcode.watch()
atexit.register(lambda: print(json.dumps([exitcode.main_ending(), exitcode.exit_code()])))

def main():
    return 4

def fail_deep():
    raise SystemExit(5)

mode = sys.argv[2]
if mode == "raise-literal":
    raise SystemExit(4)
elif mode == "raise-main":
    raise SystemExit(main())
elif mode == "builtin-exit":
    exit(4)
elif mode == "in-function":
    fail_deep()
elif mode == "error":
    raise ValueError("boom")
"""
PROBES: dict[str, tuple[str, int | None]] = {
    "raise-literal": ("raise", 4),
    "raise-main": ("raise", 4),  # on 3.11: None, see below
    "builtin-exit": ("raise", 4),
    "in-function": ("raise", None),
    "end": ("return", 0),
    "error": ("raise", None),
}


def interpreter(minor: int) -> str | None:
    """A CPython 3.<minor> on this machine (PATH, or pyenv's versions), if there is one."""
    if sys.version_info[:2] == (3, minor):
        return sys.executable
    candidates = [
        shutil.which(f"python3.{minor}"),
        *glob.glob(str(Path.home() / f".pyenv/versions/3.{minor}.*/bin/python3.{minor}")),
    ]
    for candidate in filter(None, candidates):
        try:
            probe = [candidate, "-c", "import sys; print(sys.version_info[1])"]
            version = subprocess.run(probe, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if version.returncode == 0 and version.stdout.strip() == str(minor):
            return candidate
    return None


@pytest.mark.parametrize("minor", [11, 12, 13])
def test_exit_code_detection_on_each_python_version(minor: int) -> None:
    python = interpreter(minor)
    if python is None:
        pytest.skip(f"no Python 3.{minor} on this machine")
    argv = [python, "-c", EXITCODE_PROBE, str(Path(_exitcode.__file__))]
    runs = {
        mode: subprocess.Popen([*argv, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for mode in PROBES
    }
    for mode, (ending, code) in PROBES.items():
        out, err = runs[mode].communicate(timeout=30)
        # Without sys.monitoring (3.11) the value main() returned is gone by atexit time.
        expected = None if mode == "raise-main" and minor < 12 else code
        assert json.loads(out.strip().splitlines()[-1]) == [ending, expected], (mode, err)
