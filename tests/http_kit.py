"""A deployment for the HTTP tests, run the way a user runs it: a pipeline.toml, ``agentwatch
serve`` and ``agentwatch worker`` as real processes on the test's prefix, and a real HTTP
client (or curl, or Chromium) talking to the server over loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from agentwatch.alerts import Alert, decode_alert
from agentwatch.keys import Keys

from conftest import free_port
from helpers import wait_for

PING_KEY = "ping-key-for-tests-0123456789"
TOKEN = "dashboard-token-for-tests-0123"


@dataclass
class Deployment:
    """The configuration file, the processes started on it, and how to reach the server."""

    root: Path
    config: Path
    base: str
    keys: Keys
    r: redis.Redis
    token: str | None
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, what: str, *argv: str) -> subprocess.Popen[bytes]:
        argv = (*argv, "--config", str(self.config), "--log-level", "warning")
        with (self.root / f"{what}.log").open("wb") as log:  # the child keeps its own descriptor
            process = subprocess.Popen(
                [sys.executable, "-m", "agentwatch", *argv], stdout=log, stderr=subprocess.STDOUT,
                cwd=self.root, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        self.processes[what] = process
        return process

    def log(self, what: str) -> str:
        return (self.root / f"{what}.log").read_text(errors="replace")

    def client(self, *, auth: bool = True) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token}"} if auth and self.token else {}
        return httpx.Client(base_url=self.base, headers=headers, timeout=10)

    def ping_url(self, path: str) -> str:
        return f"{self.base}/ping/{PING_KEY}/{path}"

    def alerts(self) -> list[Alert]:
        return [decode_alert(fields[b"d"]) for _, fields in self.r.xrange(self.keys.alerts)]

    def fired(self, agent: str, detector: str) -> list[Alert]:
        return [a for a in self.alerts() if (a.agent, a.detector, a.status) == (agent, detector, "firing")]

    def status(self, agent: str) -> dict[str, Any] | None:
        with self.client() as http:
            found = [a for a in http.get("/api/status").json()["agents"] if a["agent"] == agent]
        return found[0] if found else None

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def write_config(
    root: Path,
    *,
    prefix: str,
    redis_url: str,
    port: int,
    token: str | None = TOKEN,
    extra: str = "",
    http: str = "",
) -> Path:
    config = root / "pipeline.toml"
    lines = [
        f'[redis]\nurl = "{redis_url}"\nprefix = "{prefix}"\n',
        f'[http]\nbind = "127.0.0.1:{port}"\nping_key = "{PING_KEY}"\nrefresh = "500ms"\n',
        f'token = "{token}"\n' if token else "",
        http,
        '[worker]\ntick = "100ms"\nblock = "100ms"\n',
        extra,
    ]
    config.write_text("".join(lines))
    return config


@contextmanager
def shared_prefix(redis_url: str) -> Iterator[str]:
    """A prefix for a module's shared deployment (starting servers is the slow part of these
    tests; their agents have distinct names), deleted afterwards like the ``prefix`` fixture's."""
    name = f"t{uuid.uuid4().hex[:10]}"
    yield name
    client = redis.Redis.from_url(redis_url)
    try:
        batch = list(client.scan_iter(match=f"{name}:*", count=1000))
        for start in range(0, len(batch), 500):
            client.unlink(*batch[start : start + 500])
    finally:
        client.close()


@contextmanager
def deployment(
    root: Path, *, prefix: str, redis_url: str, workers: tuple[str, ...] = ("detectors",),
    token: str | None = TOKEN, extra: str = "", http: str = "",
) -> Iterator[Deployment]:  # fmt: skip
    """``agentwatch serve`` (waited for until /healthz answers) plus the given workers."""
    port = free_port()
    config = write_config(
        root, prefix=prefix, redis_url=redis_url, port=port, token=token, extra=extra, http=http
    )
    r = redis.Redis.from_url(redis_url)
    dep = Deployment(root, config, f"http://127.0.0.1:{port}", Keys(prefix), r, token)
    try:
        for kind in workers:
            dep.start(kind, "worker", kind)
        dep.start("serve", "serve")
        wait_for(
            lambda: _answers(dep), timeout=90, what=f"agentwatch serve on port {port}: {dep.log('serve')}"
        )
        yield dep
    finally:
        dep.stop()
        r.close()


def _answers(dep: Deployment) -> bool:
    if dep.processes["serve"].poll() is not None:
        raise AssertionError(f"agentwatch serve exited: {dep.log('serve')}")
    try:
        return httpx.get(f"{dep.base}/healthz", timeout=2).status_code in (200, 503)
    except httpx.TransportError:
        time.sleep(0.05)
        return False
