"""Shared fixtures: a real Redis for the session, a fresh key prefix per test.

Which Redis: ``AGENTWATCH_TEST_REDIS_URL`` when set; else the server at 127.0.0.1:6379 when it
answers; else a private server started through agentwatch's own launcher
(:class:`agentwatch.embedded.EmbeddedRedis`). Every test gets its own prefix, so tests never see
each other's keys, and the prefix's keys are deleted afterwards.

Tests that kill or restart Redis never touch the shared server: they use ``spawn_redis``.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from agentwatch.embedded import EmbeddedRedis
from agentwatch.keys import Keys

DEFAULT_URL = "redis://127.0.0.1:6379/0"


def _answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of the session's Redis (see the module docstring for which one)."""
    explicit = os.environ.get("AGENTWATCH_TEST_REDIS_URL")
    if explicit:
        yield explicit
        return
    if _answers(DEFAULT_URL):
        yield DEFAULT_URL
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
