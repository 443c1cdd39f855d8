"""Connecting to Redis: one place for timeouts, the cluster switch and finding the server.

Finding the server matters because of the embedded default: ``agentwatch up`` may have started a
private server on a Unix socket (when 127.0.0.1:6379 was taken), and ``agentwatch status`` in
another terminal should find it without being told. ``up`` records that URL in its state
directory while it runs.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from redis.cluster import RedisCluster

from agentwatch.config import DEFAULT_REDIS_URL, EMBEDDED, PipelineSettings
from agentwatch.embedded import default_state_dir
from agentwatch.errors import RedisUnavailable
from agentwatch.urls import connection_options, display_url

if TYPE_CHECKING:
    import redis.asyncio

Client = redis.Redis | RedisCluster
log = logging.getLogger("agentwatch.worker")


class WritesRefused(redis.ResponseError):
    """``MISCONF`` (the server cannot persist, so it refuses writes) or ``NOREPLICAS`` (too few
    replicas acknowledge): the server is up but cannot take writes now."""


class ServerBusy(redis.ResponseError):
    """``BUSY``: the server is running a long script or module command and answers nothing else."""


def _register_reply_errors() -> None:
    """Make redis-py raise our classes for the replies above (it raises a bare ResponseError,
    which would look like bad data). Both its parsers map error prefixes through this table."""
    from redis._parsers.base import BaseParser  # noqa: PLC0415 - private, so kept in one place

    for prefix, cls in (("MISCONF", WritesRefused), ("NOREPLICAS", WritesRefused), ("BUSY", ServerBusy)):
        BaseParser.EXCEPTION_CLASSES.setdefault(prefix, cls)


_register_reply_errors()

RECOVERABLE: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ClusterDownError,  # also MasterDownError: a replica without its master
    redis.exceptions.TryAgainError,
    redis.exceptions.OutOfMemoryError,  # maxmemory reached with a noeviction policy
    redis.exceptions.ReadOnlyError,  # a replica, e.g. right after a failover
    WritesRefused,
    ServerBusy,
)
"""Errors that mean "Redis is away, busy or cannot write now": wait and retry, never dead-letter
or crash. A handler hit by one has not failed on its data: the worker keeps the batch pending,
backs off, and processes it again once Redis takes writes (handlers are idempotent)."""


def explain(exc: BaseException) -> str:
    """What a recoverable error means, for the one log line a worker writes when it starts waiting."""
    what = {
        redis.exceptions.OutOfMemoryError: "Redis refuses writes: out of memory (maxmemory reached)",
        redis.exceptions.ReadOnlyError: "Redis refuses writes: it is a read-only replica",
        redis.exceptions.MasterDownError: "Redis refuses commands: the replica lost its master",
        redis.exceptions.BusyLoadingError: "Redis is loading its data set",
        WritesRefused: "Redis refuses writes",
        ServerBusy: "Redis is busy running a script",
        redis.exceptions.ClusterDownError: "the Redis Cluster is down",
        redis.exceptions.TryAgainError: "the Redis Cluster is resharding",
        redis.TimeoutError: "Redis does not answer",
        # A subclass of ConnectionError, so it is waited out like one (an ACL or a password can be
        # fixed on the server without restarting every worker), but named for what it is.
        redis.exceptions.AuthenticationError: "Redis refused the credentials (check the user and "
        "password in [redis] url)",
    }
    for cls, text in what.items():
        if isinstance(exc, cls):
            return f"{text} ({exc})"
    return f"Redis unreachable ({exc})"


_WAITING_LOG_EVERY_S = 60.0


def retry_until_available(
    action: Callable[[], None], stop: threading.Event, first_error: Exception | None = None, *, note: str = ""
) -> bool:
    """Run ``action`` until it gets through a recoverable error, with capped exponential backoff
    and jitter, or until ``stop`` is set; True once it succeeded.

    One log line when the wait starts (saying what kind of trouble it is), one when the kind
    changes, a reminder once a minute, and one when Redis is back.
    """
    delay, since, error = 0.1, time.monotonic(), first_error
    logged: type[Exception] | None = None
    reminded = since
    suffix = f"; retrying with backoff{', ' + note if note else ''}"
    if error is not None:
        log.warning("%s%s", explain(error), suffix)
        logged = type(error)
    while not stop.is_set():
        if error is None:
            try:
                action()
                if logged is not None:
                    log.info("Redis is back after %.1fs", time.monotonic() - since)
                return True
            except RECOVERABLE as exc:
                now = time.monotonic()
                if type(exc) is not logged:
                    log.warning("%s%s", explain(exc), suffix)
                    logged, reminded = type(exc), now
                elif now - reminded >= _WAITING_LOG_EVERY_S:
                    log.warning("still waiting after %.0fs: %s", now - since, explain(exc))
                    reminded = now
        error = None
        stop.wait(delay * random.uniform(0.5, 1.0))
        delay = min(delay * 2, 5.0)
    return False


def _options(settings: PipelineSettings, url: str, name: str) -> dict[str, Any]:
    cfg = settings.redis
    return {
        "socket_timeout": cfg.timeout_s + settings.worker.block_s,
        "socket_connect_timeout": min(cfg.timeout_s, 5.0),
        "client_name": name,
        "protocol": 2,
        **connection_options(url),  # TLS: the server's certificate and name are verified
    }


def connect(settings: PipelineSettings, url: str, *, name: str = "agentwatch") -> Client:
    """A client with timeouts that exceed the worker's BLOCK, so a hung server is noticed."""
    options = _options(settings, url, name)
    if settings.redis.cluster:
        return RedisCluster.from_url(url, **options)
    return redis.Redis.from_url(url, health_check_interval=30, **options)


def async_pool(
    settings: PipelineSettings, url: str, *, name: str = "agentwatch"
) -> redis.asyncio.ConnectionPool:
    """The connections an event loop opens to ``url`` (agentwatch/ingest_link.py), with the same
    options as :func:`connect`'s (not for a cluster). Imported here: only the HTTP server needs it."""
    import redis.asyncio  # noqa: PLC0415

    return redis.asyncio.ConnectionPool.from_url(url, **_options(settings, url, name))


def answers(url: str, timeout_s: float = 0.5) -> bool:
    """True when a Redis server answers PING at ``url`` within the timeout."""
    client = redis.Redis.from_url(
        url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s, **connection_options(url)
    )
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError, ValueError):
        return False
    finally:
        client.close()


def embedded_url_file(state_dir: Path | None = None) -> Path:
    return (state_dir or default_state_dir()) / "current-url"


def resolve_url(settings: PipelineSettings) -> str:
    """The URL to use: configured, else the default if it answers, else a running embedded one."""
    configured = settings.redis.url
    if configured and configured != EMBEDDED:
        return configured
    if configured is None and answers(DEFAULT_REDIS_URL):
        return DEFAULT_REDIS_URL
    url = running_embedded_url(settings)
    if url:
        return url
    raise RedisUnavailable(
        f"no Redis answers at {DEFAULT_REDIS_URL} and no embedded server is running; "
        "start one with `agentwatch up` (it embeds Redis when none is configured), or set "
        "[redis] url in pipeline.toml / AGENTWATCH_REDIS__URL"
    )


def running_embedded_url(settings: PipelineSettings) -> str | None:
    """The URL `agentwatch up` recorded for its embedded server, if that server answers."""
    record = embedded_url_file(settings.embedded.state_dir)
    try:
        url = record.read_text().strip()
    except OSError:
        return None
    return url if url and answers(url) else None


def describe(url: str) -> str:
    """The URL without its password, for logs and error messages."""
    return display_url(url)


def disconnect(client: Client) -> None:
    """Close every connection of ``client``, also those in use by another thread: a read
    blocked on a hung server returns at once with a ConnectionError. Safe from any thread."""
    if isinstance(client, RedisCluster):
        client.disconnect_connection_pools()  # type: ignore[no-untyped-call]
    else:
        client.connection_pool.disconnect()


def responsive(client: Client, timeout_s: float) -> bool | None:
    """Whether the server (every node, for a cluster) answers a PING on a fresh socket within
    ``timeout_s``; any reply counts, even NOAUTH: a server that replies is not hung. None when
    this cannot be told without the client's own handshake (TLS). Safe from any thread."""
    if isinstance(client, RedisCluster):
        nodes = client.get_nodes()  # type: ignore[no-untyped-call]
        pools = [n.redis_connection.connection_pool for n in nodes if n.redis_connection]
        addresses: list[str | tuple[str, int]] = [(n.host, int(n.port)) for n in nodes]
    else:
        pools = [client.connection_pool]
        kwargs = client.connection_pool.connection_kwargs
        path = kwargs.get("path")
        addresses = [path] if path else [(kwargs.get("host", "localhost"), int(kwargs.get("port", 6379)))]
    if any(issubclass(pool.connection_class, redis.SSLConnection) for pool in pools):
        return None
    for address in addresses:
        try:
            if isinstance(address, str):
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                probe.settimeout(timeout_s)
                probe.connect(address)
            else:
                probe = socket.create_connection(address, timeout=timeout_s)
            with probe:
                probe.sendall(b"PING\r\n")
                if not probe.recv(64):
                    return False
        except OSError:
            return False
    return True


def server_time_ms(client: Client) -> int:
    """Redis server time in ms: the detectors' clock, shared by every worker."""
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def consumer_name(kind: str) -> str:
    """Unique per process, readable in XINFO CONSUMERS: ``<kind>-<host>-<pid>-<random>``."""
    host = "".join(c if c.isalnum() or c in "-." else "-" for c in os.uname().nodename)[:40]
    return f"{kind}-{host}-{os.getpid()}-{os.urandom(2).hex()}"
