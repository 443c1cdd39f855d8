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
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from agentwatch.embedded import EmbeddedRedis, find_server_binary
from agentwatch.errors import EmbeddedRedisError
from agentwatch.keys import Keys


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


def _node_port(taken: list[int]) -> int:
    """A free port whose cluster-bus port (port + 10000) is free and valid too."""
    while True:
        port = random.randrange(20_000, 45_000)
        if port in taken:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10_000))
        except OSError:
            continue
        return port


def _node_answers(port: int, ready: bool = False) -> bool:
    """The node answers PING (``ready``: and its cluster is up). 127.0.0.1, not localhost (::1)."""
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        return bool(client.cluster("info")["cluster_state"] == "ok" if ready else client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _await(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="session")
def cluster_ports() -> Iterator[list[int]]:
    """A real 3-master Redis Cluster on loopback for the session; yields its node ports.

    Skipped only when no server binary or no matching ``redis-cli``/``valkey-cli`` exists.
    """
    try:
        server = find_server_binary()
    except EmbeddedRedisError:
        pytest.skip("no Redis server binary to build a cluster with")
    cli_name = "valkey-cli" if server.name.startswith("valkey") else "redis-cli"
    cli = shutil.which(cli_name) or (
        str(server.parent / cli_name) if (server.parent / cli_name).exists() else None
    )
    if cli is None:
        pytest.skip(f"no {cli_name} to create a cluster with")
    root = Path(tempfile.mkdtemp(prefix="aw-cl-"))
    ports: list[int] = []
    for _ in range(3):
        ports.append(_node_port(ports))
    nodes = []
    try:
        for port in ports:
            (root / str(port)).mkdir()
            argv = [str(server), "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes"]
            argv += ["--dir", str(root / str(port)), "--save", "", "--appendonly", "no"]
            nodes.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in ports:
            _await(lambda port=port: _node_answers(port), 10, f"cluster node {port}")
        create = [cli, "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports]]
        create += ["--cluster-replicas", "0", "--cluster-yes"]
        subprocess.run(create, check=True, capture_output=True, timeout=30)
        _await(lambda: all(_node_answers(p, ready=True) for p in ports), 20, "cluster_state:ok")
        yield ports
    finally:
        for node in nodes:
            node.terminate()
        for node in nodes:
            node.wait(5)
        shutil.rmtree(root, ignore_errors=True)
