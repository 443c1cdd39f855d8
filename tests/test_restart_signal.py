"""No event can aim a signal: the restart notifier's ``signal`` mode signals only a pid proven to
be the agent's run (agentwatch/runfile.py). Real processes throughout: a real ``sleep`` as the
would-be victim, real agents with the real producer, real detector and notifier workers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from agents.testkit import agent_env, spawn
from agents_detect.kit import pipeline_for, worker_for

from agentwatch import codec, runfile
from agentwatch.keys import Keys

from helpers import running, wait_for
from notify_kit import fire, notifier_running, pipeline_with, stream


@pytest.fixture
def victim() -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated process: it must survive whatever the events say."""
    process = subprocess.Popen(["sleep", "60"])
    yield process
    process.kill()
    process.wait()


def forge_crash(r: redis.Redis, keys: Keys, agent: str, pid: int, run: str = "forged") -> None:
    """A start naming this host and ``pid`` (with its real start time: /proc is readable by
    anyone), then a crash exit: what made the notifier SIGTERM an unrelated process before."""
    start = {"kind": "start", "interval": 1.0, "pid": pid, "host": socket.gethostname(),
             "pid_start": runfile.process_start(pid)}  # fmt: skip
    for seq, event in enumerate((start, {"kind": "exit", "reason": "exception", "code": 1})):
        full = {"v": 1, "agent": agent, "ts": time.time(), "run": run, "seq": seq, **event}
        r.xadd(keys.events_for(agent), {"d": codec.encode(full)})


def signal_entry(run_dir: Path, on: str = "exit") -> dict[str, Any]:
    return {"type": "restart", "signal": "SIGTERM", "on": [on], "run_dir": str(run_dir), "backoff": "50ms"}


def audited(r: redis.Redis, keys: Keys, action: str) -> list[dict[str, str]]:
    return [a for a in stream(r, keys.notify_audit) if a["action"] == action]


def run_pipeline_until_refused(r: redis.Redis, keys: Keys, prefix: str, redis_url: str, run_dir: Path) -> str:
    detectors = worker_for(pipeline_for(prefix, redis_url), redis_url)
    with (
        running(detectors),
        notifier_running(pipeline_with(prefix, redis_url, [signal_entry(run_dir)]), redis_url),
    ):
        (audit,) = wait_for(lambda: audited(r, keys, "refused"), what="the refusal")
    detectors.client.close()
    return audit["detail"]


def test_a_forged_start_and_exit_cannot_kill_an_unrelated_process(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str, tmp_path: Path, victim: subprocess.Popen[bytes]
) -> None:
    forge_crash(r, keys, "victim", victim.pid)
    detail = run_pipeline_until_refused(r, keys, prefix, redis_url, tmp_path)
    assert victim.poll() is None  # it survives
    assert detail == (
        f"refused to send SIGTERM to pid {victim.pid}: no run file {tmp_path}/forged.pid: the agent's "
        "producer did not write one (AGENTWATCH_RUN_DIR differs, or another host or container)"
    )
    assert audited(r, keys, "signalled") == []


@pytest.mark.parametrize("forgery", ["stale start time", "symlink", "writable by others", "other user"])
def test_a_forged_run_file_does_not_prove_anything(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str, tmp_path: Path, forgery: str
) -> None:
    argv = ["sleep", "60"]
    if forgery == "other user":  # the run file is ours (root's), the process another user's
        if os.getuid() != 0 or shutil.which("setpriv") is None:
            pytest.skip("needs root and setpriv (util-linux) to start a process as another user")
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
    victim = subprocess.Popen(argv)
    try:
        wait_for(lambda: victim.pid and runfile.process_start(victim.pid), what="the victim running")
        record = {"agent": "victim", "run": "forged", "pid": victim.pid,
                  "pid_start": runfile.process_start(victim.pid), "host": socket.gethostname()}  # fmt: skip
        path = tmp_path / "forged.pid"
        if forgery == "stale start time":  # a pid reused since: the file's process started earlier
            record["pid_start"] -= 1
        if forgery == "symlink":
            (tmp_path / "elsewhere").write_text(json.dumps(record))
            path.symlink_to(tmp_path / "elsewhere")
        else:
            path.write_text(json.dumps(record))
            path.chmod(0o666 if forgery == "writable by others" else 0o644)
        forge_crash(r, keys, "victim", victim.pid)
        if forgery == "stale start time":
            r.delete(keys.events())  # the forged start must agree with the file: send it again
            forge_crash(r, keys, "victim", victim.pid)
        detail = run_pipeline_until_refused(r, keys, prefix, redis_url, tmp_path)
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()
    expected = {
        "stale start time": "disagree on when pid",
        "symlink": "(Too many levels of symbolic links; a symlink?)",
        "writable by others": "is writable by others than its owner",
        "other user": f"pid {victim.pid} runs as uid 65534, the run file belongs to uid 0",
    }[forgery]
    assert expected in detail, detail


def test_the_agents_own_run_is_signalled(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str, tmp_path: Path
) -> None:
    agent = spawn("scripted.py", agent_env(redis_url, prefix, "hung-bot", AGENTWATCH_RUN_DIR=str(tmp_path),
                                           AW_PERIOD="0.05"), "forever")  # fmt: skip
    try:
        (path,) = wait_for(lambda: list(tmp_path.glob("*.pid")), what="the agent's run file")
        record = json.loads(path.read_text())
        assert record["agent"] == "hung-bot" and record["pid"] == agent.pid
        assert (
            record["pid_start"] == runfile.process_start(agent.pid) and path.stat().st_mode & 0o777 == 0o644
        )
        detectors = worker_for(pipeline_for(prefix, redis_url), redis_url)
        with running(detectors):
            wait_for(lambda: b"pid_start" in (r.hget(keys.facts(0), "hung-bot") or b""), what="the facts")
            entry = signal_entry(tmp_path, on="stall")
            with notifier_running(pipeline_with(prefix, redis_url, [entry]), redis_url):
                fire(r, keys, "hung-bot", "stall")  # as the stall detector would, for the test's pace
                assert agent.wait(15) == -signal.SIGTERM  # reported as the run's end, then died of it
                wait_for(lambda: audited(r, keys, "signalled"), what="the audit")
        detectors.client.close()
    finally:
        if agent.poll() is None:
            agent.kill()
        agent.communicate()
    assert [a["detail"] for a in audited(r, keys, "signalled")] == [f"SIGTERM to pid {agent.pid}"]
    assert not path.exists()  # the producer removes its run file as the run ends
