"""What the maintenance and dependency tests share: a pipeline loaded from a real pipeline.toml,
its detector and notifier workers, and real agent processes that beat every 0.1 s."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from agentwatch import loading
from agentwatch.alerts import Alert, decode_alert
from agentwatch.config import Pipeline
from agentwatch.keys import Keys
from agentwatch.redisconn import connect
from agentwatch.workers import detector_worker, notifier_worker
from detectors.agent import read_agents

from helpers import running, wait_for

LAUNCHER = """
import os, sys, time
import producers  # imported once: each agent is a fork of this process, so launching 20 is quick

ready, names = sys.argv[1], sys.argv[2:]
for name in names:
    if os.fork() == 0:
        os.environ["AGENTWATCH_AGENT"] = name  # this launcher never called init(): a new agent
        producers.init(interval=0.1, pulse_interval=0.2)
        producers.heartbeat()
        with open(ready, "a") as out:
            out.write(f"{name} {os.getpid()}\\n")
        while True:
            producers.heartbeat()
            time.sleep(0.05)
while True:
    time.sleep(60)
"""


def write_config(path: Path, prefix: str, redis_url: str, hook_url: str, extra: str = "") -> Path:
    """A pipeline.toml: fast worker ticks, silence after 1 s, one webhook, plus ``extra``."""
    path.write_text(
        f'[redis]\nurl = "{redis_url}"\nprefix = "{prefix}"\n'
        '[worker]\ntick = "50ms"\nblock = "100ms"\n'
        '[detectors.silence]\nafter = "1s"\n'
        f"{extra}\n"
        f'[[notifiers]]\ntype = "webhook"\nurl = "{hook_url}"\nbackoff = "50ms"\ntimeout = "1s"\n'
    )
    return path


@contextlib.contextmanager
def pipeline_running(path: Path, redis_url: str) -> Iterator[Pipeline]:
    """The detector and the notifier worker of the pipeline in ``path``, each with its client."""
    pipeline = loading.load(path)
    detectors = connect(pipeline.settings, redis_url)
    notifiers = connect(pipeline.settings, redis_url)
    try:
        with running(detector_worker(pipeline, detectors)), running(notifier_worker(pipeline, notifiers)):
            yield pipeline
    finally:
        detectors.close()
        notifiers.close()


class Agents:
    """Real agent processes by name (each its own process, forked from a launcher that has
    imported the producer already); every one still running is killed at the end."""

    def __init__(self, tmp_path: Path, prefix: str, redis_url: str) -> None:
        self.script = tmp_path / "launcher.py"
        self.script.write_text(LAUNCHER)
        self.ready = tmp_path / "ready"
        self.env = {**os.environ, "AGENTWATCH_REDIS_URL": redis_url, "AGENTWATCH_PREFIX": prefix}
        self.launchers: list[subprocess.Popen[bytes]] = []
        self.redis: Any = redis.Redis.from_url(redis_url)
        self.keys = Keys(prefix)
        self.pids: dict[str, int] = {}

    def launch(self, *names: str, labels: str = "") -> None:
        """Start each agent and wait until every one has beaten once."""
        self.ready.write_text("")
        env = {**self.env, "AGENTWATCH_LABELS": labels} if labels else self.env
        self.launchers.append(
            subprocess.Popen(
                [sys.executable, str(self.script), str(self.ready), *names], env=env, start_new_session=True
            )
        )

        def started() -> bool:
            lines = [line.split() for line in self.ready.read_text().splitlines()]
            self.pids.update({name: int(pid) for name, pid in lines})
            return {name for name, _ in lines} >= set(names)

        wait_for(started, timeout=60, what=f"{len(names)} agents started")
        # Known to the pipeline: the detectors recorded each new run's start (a beat is only
        # queued when heartbeat() returns; an agent killed before it was sent never existed).
        wait_for(lambda: all(self._known(name) for name in names), timeout=30, what="their starts applied")

    def _known(self, name: str) -> bool:
        """Its start applied: in the start facts, and in the detectors' checkpoint of the agent."""
        raw = self.redis.hget(self.keys.facts(0), name)
        if raw is None or json.loads(raw).get("pid") != self.pids[name]:
            return False
        agent = read_agents(self.redis, self.keys, [name]).get(name)
        return agent is not None and agent["run"] == json.loads(raw).get("run")

    def kill(self, *names: str) -> None:
        """SIGKILL, as the OOM killer or a deploy's hard stop would."""
        for name in names:
            os.kill(self.pids.pop(name), signal.SIGKILL)

    def close(self) -> None:
        for launcher in self.launchers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(launcher.pid, signal.SIGKILL)  # the launcher and every agent it forked
            launcher.wait(10)
        self.redis.close()


def alerts(r: Any, keys: Keys, status: str | None = None, detector: str = "silence") -> list[Alert]:
    """The alerts stream, of ``detector`` (and ``status``)."""
    found = [decode_alert(fields[b"d"]) for _, fields in r.xrange(keys.alerts)]
    return [a for a in found if a.detector == detector and (status is None or a.status == status)]


def outcomes(r: Any, keys: Keys) -> list[tuple[str, str, str]]:
    """(outcome, agent, status) of every delivery-log record."""
    out = []
    for _, fields in r.xrange(keys.notify_log):
        row = {k.decode(): v.decode() for k, v in fields.items()}
        out.append((row.get("outcome", ""), row.get("agent", ""), row.get("status", "")))
    return out
