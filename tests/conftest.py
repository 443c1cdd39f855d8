"""Shared fixtures: a real Redis for the session, a fresh key prefix per test.

Which Redis: ``AGENTWATCH_TEST_REDIS_URL`` when set (an explicit choice); else a private server
started for this test session through agentwatch's own launcher
(:class:`agentwatch.embedded.EmbeddedRedis`) and removed at its end. Never the server that may
answer on 127.0.0.1:6379: other programs use it, and what they keep there (keys, memory, load)
must neither change a result nor be changed by the tests. Every test gets its own prefix, so
tests never see each other's keys, and the prefix's keys are deleted afterwards.

Tests that kill or restart Redis never touch the shared server: they use ``spawn_redis``.

The suite runs in parallel processes (pytest-xdist): each process is a session of its own, with
its own private server, so nothing here is shared between them.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from agentwatch.embedded import EmbeddedRedis
from agentwatch.errors import EmbeddedRedisError
from agentwatch.keys import Keys
from agentwatch.localcluster import LocalCluster, await_true


def pytest_configure(config: pytest.Config) -> None:
    """Children start with default signal dispositions, however the test run was started.

    An ignored signal is inherited across exec: a run started in the background by a
    non-interactive shell (``cmd &`` ignores SIGINT) or under ``nohup`` (SIGHUP) would hand that
    to every agent and CLI process the tests start, and the tests that send them Ctrl-C or a
    hang-up would test the ignore instead of agentwatch.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``apprise`` need the optional extra: without it they skip, saying so, so the
    README's ``pip install -e '.[dev]' && pytest`` passes (``.ci/run`` runs them with the extra)."""
    if importlib.util.find_spec("apprise") is not None:
        return
    skip = pytest.mark.skip(reason="needs the apprise extra: pip install -e '.[dev,apprise]'")
    for item in items:
        if item.get_closest_marker("apprise"):
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def run_dir() -> Iterator[Path]:
    """The producers' run files (agentwatch/runfile.py) of this session, agent processes included
    (they inherit the environment), go to a directory of its own, not the machine's
    /tmp/agentwatch-runs."""
    path = Path(tempfile.mkdtemp(prefix="aw-runs-"))
    before = os.environ.get("AGENTWATCH_RUN_DIR")
    os.environ["AGENTWATCH_RUN_DIR"] = str(path)
    yield path
    if before is None:
        os.environ.pop("AGENTWATCH_RUN_DIR", None)
    else:
        os.environ["AGENTWATCH_RUN_DIR"] = before
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of the session's Redis (see the module docstring for which one)."""
    explicit = os.environ.get("AGENTWATCH_TEST_REDIS_URL")
    if explicit:
        yield explicit
        return
    server = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="aw-test-")))
    server.start()
    try:
        yield server.url
    finally:
        server.cleanup()


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix no other test uses; its keys are removed after the test."""
    name = f"t{uuid.uuid4().hex[:10]}"
    yield name
    client = redis.Redis.from_url(redis_url)
    try:
        batch = [key for key in client.scan_iter(match=f"{name}:*", count=1000)]
        for start in range(0, len(batch), 500):
            client.unlink(*batch[start : start + 500])
    finally:
        client.close()


@pytest.fixture
def keys(prefix: str) -> Keys:
    return Keys(prefix=prefix)


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client (bytes in, bytes out) on the session's Redis."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def spawn_redis() -> Iterator[Callable[..., EmbeddedRedis]]:
    """Start private servers a test may kill or restart; all are stopped afterwards.

    The state directory is short (socket paths are limited to ~100 bytes) and kept across
    ``stop()``/``start()`` so a restarted server answers at the same URL.
    """
    servers: list[EmbeddedRedis] = []

    def spawn(*, port: int = 0, **kwargs: object) -> EmbeddedRedis:
        server = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="aw-")), port=port, **kwargs)  # type: ignore[arg-type]
        servers.append(server)
        return server.start()

    yield spawn
    for server in servers:
        server.stop()
        shutil.rmtree(server.state_dir, ignore_errors=True)


def free_port() -> int:
    """A TCP port nothing listens on right now (for servers a test starts itself)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (Unix socket paths are limited to ~100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="aw-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _await(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    await_true(predicate, timeout, what)


@pytest.fixture(scope="session")
def cluster_ports() -> Iterator[list[int]]:
    """A real 3-master Redis Cluster on loopback for the session; yields its node ports.

    Skipped only when no server binary or no matching ``redis-cli``/``valkey-cli`` exists.
    """
    cluster = LocalCluster(Path(tempfile.mkdtemp(prefix="aw-cl-")))
    try:
        cluster.start()
    except EmbeddedRedisError as exc:
        pytest.skip(f"cannot build a cluster: {exc}")
    try:
        yield cluster.ports
    finally:
        cluster.stop()
