"""Restart end to end: real agent processes (the producer), real detectors, the restart notifier.

An agent is SIGKILLed, silence fires, the restart command starts it again, beats resume and the
alert resolves. A crash-looping agent is restarted up to the start limit, then yields exactly one
"restart loop" alert and no more restarts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from agentwatch import codec, plugins
from agentwatch.alerts import Alert, decode_alert
from agentwatch.config import Pipeline
from agentwatch.keys import Keys
from agentwatch.redisconn import connect
from agentwatch.workers import detector_worker

from helpers import running, settings_for, wait_for
from notify_kit import notifier_running, pipeline_with, stream

pytestmark = pytest.mark.slow

AGENT = """
import os, sys, time
import producers
from producers import heartbeat

producers.init(interval=0.2, pulse_interval=0.2)
with open(sys.argv[1], "a") as pids:
    pids.write(f"{os.getpid()}\\n")
crash_after = float(os.environ.get("AW_CRASH_AFTER", "0"))
started = time.monotonic()
while True:
    heartbeat(tokens=10)
    if crash_after and time.monotonic() - started > crash_after:
        raise RuntimeError("crash loop")
    time.sleep(0.05)
"""

# What a user's restart command does: start the agent detached from the command, and exit.
LAUNCH = """
import os, subprocess, sys
agent, pids, script = sys.argv[1:4]
subprocess.Popen([sys.executable, script, pids], env=dict(os.environ, AGENTWATCH_AGENT=agent),
                 start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
print("launched", agent)
"""


@pytest.fixture
def fleet(tmp_path: Path, redis_url: str, prefix: str) -> Iterator[dict[str, Any]]:
    """Scripts, the pid file, the environment; kills every agent it started afterwards."""
    (tmp_path / "agent.py").write_text(AGENT)
    (tmp_path / "launch.py").write_text(LAUNCH)
    pids = tmp_path / "pids"
    env = {"AGENTWATCH_REDIS_URL": redis_url, "AGENTWATCH_PREFIX": prefix}
    info = {"pids": pids, "env": env, "launch": tmp_path / "launch.py", "agent": tmp_path / "agent.py"}
    yield info
    for pid in started(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def started(pids: Path) -> list[int]:
    return [int(line) for line in pids.read_text().split()] if pids.exists() else []


def restart_entry(fleet: dict[str, Any], **extra: Any) -> dict[str, Any]:
    command = [sys.executable, str(fleet["launch"]), "{agent}", str(fleet["pids"]), str(fleet["agent"])]
    return {"type": "restart", "command": command, "env": fleet["env"], "backoff": "50ms",
            "restart_backoff": "0s", **extra}  # fmt: skip


def detectors(prefix: str, redis_url: str) -> Pipeline:
    sections = {"silence": {"after": "1s"}}
    loaded, problems = plugins.load_detectors(sections)
    assert not problems, problems
    settings = settings_for(prefix, redis_url, worker={"tick": "50ms", "block": "50ms"})
    return Pipeline(
        settings=settings.model_copy(update={"detectors": sections}), source="test", detectors=loaded
    )


@contextlib.contextmanager
def detector_running(prefix: str, redis_url: str) -> Iterator[None]:
    pipeline = detectors(prefix, redis_url)
    client = connect(pipeline.settings, redis_url)
    try:
        with running(detector_worker(pipeline, client)):
            yield
    finally:
        client.close()


def alerts(r: redis.Redis, keys: Keys, detector: str) -> list[Alert]:
    found = [decode_alert(fields[b"d"]) for _, fields in r.xrange(keys.alerts)]
    return [alert for alert in found if alert.detector == detector]


def beats_of(r: redis.Redis, keys: Keys, agent: str) -> dict[str, int]:
    """Beats per run of ``agent``."""
    runs: dict[str, int] = {}
    for _, fields in r.xrange(keys.events_for(agent)):
        event = codec.decode(fields[b"d"])
        if event["agent"] == agent and event["kind"] == "beat":
            runs[event["run"]] = runs.get(event["run"], 0) + 1
    return runs


def test_sigkilled_agent_is_restarted_by_the_command_and_its_silence_resolves(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str, fleet: dict[str, Any]
) -> None:
    entry = restart_entry(fleet, on=["silence"])
    launch = [sys.executable, str(fleet["launch"]), "worker-7", str(fleet["pids"]), str(fleet["agent"])]
    with (
        detector_running(prefix, redis_url),
        notifier_running(pipeline_with(prefix, redis_url, [entry]), redis_url),
    ):
        subprocess.run(launch, env={**os.environ, **fleet["env"]}, check=True, capture_output=True)
        (first,) = wait_for(lambda: started(fleet["pids"]), 15, what="the agent to start")
        wait_for(lambda: sum(beats_of(r, keys, "worker-7").values()) >= 3, 15, what="beats")
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: alerts(r, keys, "silence"), 15, what="silence to fire")
        _, second = wait_for(lambda: started(fleet["pids"])[1:] and started(fleet["pids"]), 15,
                             what="the restart")  # fmt: skip
        wait_for(lambda: len(alerts(r, keys, "silence")) == 2, 15, what="silence to resolve")
        wait_for(lambda: len(beats_of(r, keys, "worker-7")) == 2, 15, what="beats from the new run")
    assert second != first
    fired, resolved = alerts(r, keys, "silence")
    assert (fired.status, resolved.status) == ("firing", "resolved") and fired.dedup_key == resolved.dedup_key
    (audit,) = [a for a in stream(r, keys.notify_audit) if a["action"] == "restarted"]
    assert audit["agent"] == "worker-7" and audit["exit"] == "0" and "launched worker-7" in audit["output"]


def test_a_crash_looping_agent_hits_the_start_limit_and_yields_exactly_one_loop_alert(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str, fleet: dict[str, Any]
) -> None:
    fleet["env"]["AW_CRASH_AFTER"] = "0.3"
    entry = restart_entry(fleet, on=["silence", "exit"], start_limit_burst=3)
    launch = [sys.executable, str(fleet["launch"]), "crashy", str(fleet["pids"]), str(fleet["agent"])]
    with (
        detector_running(prefix, redis_url),
        notifier_running(pipeline_with(prefix, redis_url, [entry]), redis_url),
    ):
        subprocess.run(launch, env={**os.environ, **fleet["env"]}, check=True, capture_output=True)
        wait_for(lambda: alerts(r, keys, "restart_loop"), 40, what="the restart loop alert")
        # The fourth crash's alert was handled (no restart); nothing else is queued to act later.
        wait_for(lambda: r.hlen(keys.notifier_jobs("restart")) == 0, 10, what="the queue to drain")
        exits = [a for a in alerts(r, keys, "exit") if a.status == "firing"]
    assert len(started(fleet["pids"])) == 4  # the first start and three restarts
    (loop,) = alerts(r, keys, "restart_loop")
    assert loop.status == "firing" and loop.severity == "critical" and loop.agent == "crashy"
    assert len(exits) == 4 and loop.details["trigger"] == "exit"
    restarted = [a for a in stream(r, keys.notify_audit) if a["action"] == "restarted"]
    assert len(restarted) == 3
