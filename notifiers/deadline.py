"""One deadline for a whole HTTP attempt: connect, TLS, sending, the status line, headers and body.

Both HTTP transports of the notifiers honour it: the lean client (notifiers/httpclient.py) calls
:func:`cap` before each socket operation itself; httpx, kept for receivers behind a proxy, gets
it through a wrapped network backend (:func:`install`).

httpx has per-operation timeouts only: ``read`` bounds each wait for bytes, so a receiver that
sends its status line and headers one byte every 400 ms never trips a 1 s read timeout, and the
attempt outlives its lease (another worker then claims the same delivery, and both threads are
stuck). A watchdog closing the socket from another thread would not help either: on Linux,
closing a socket does not wake a thread blocked reading it.

So the deadline goes where every wait happens: a network backend whose streams cap the timeout
of each socket operation at the time left before the attempt's deadline, and fail the operation
once it has passed. The deadline belongs to the thread making the request (:func:`attempt`),
because pooled connections move between a notifier's delivery threads.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, overload

import httpcore
import httpx

log = logging.getLogger("agentwatch.notifiers")

_local = threading.local()


@contextmanager
def attempt(timeout_s: float) -> Iterator[None]:
    """Bound every socket operation of this thread's requests, for the block, by ``timeout_s``."""
    _local.deadline = time.monotonic() + timeout_s
    _local.timeout_s = timeout_s
    try:
        yield
    finally:
        _local.deadline = None


@overload
def cap(timeout: float, error: type[Exception]) -> float: ...
@overload
def cap(timeout: None, error: type[Exception]) -> float | None: ...
def cap(timeout: float | None, error: type[Exception]) -> float | None:
    """``timeout`` cut to the time left before this thread's deadline; ``error`` once past it."""
    deadline: float | None = getattr(_local, "deadline", None)
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise _overall(error)
    return left if timeout is None else min(timeout, left)


def _overall(error: type[Exception]) -> Exception:
    return error(f"the attempt's overall timeout ({_local.timeout_s:g}s) ran out")


@contextmanager
def named(error: type[Exception]) -> Iterator[None]:
    """Say so when a timeout was the overall deadline's rather than the operation's own."""
    try:
        yield
    except error:
        deadline: float | None = getattr(_local, "deadline", None)
        if deadline is not None and time.monotonic() >= deadline:
            raise _overall(error) from None
        raise


class _Stream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self.inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        with named(httpcore.ReadTimeout):
            return self.inner.read(max_bytes, cap(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        with named(httpcore.WriteTimeout):
            self.inner.write(buffer, cap(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self.inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        with named(httpcore.ConnectTimeout):
            tls = self.inner.start_tls(ssl_context, server_hostname, cap(timeout, httpcore.ConnectTimeout))
        return _Stream(tls)

    def get_extra_info(self, info: str) -> Any:
        return self.inner.get_extra_info(info)  # the pool asks "is_readable" before reusing one


class _Backend(httpcore.NetworkBackend):
    def __init__(self, inner: httpcore.NetworkBackend) -> None:
        self.inner = inner

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        with named(httpcore.ConnectTimeout):
            capped = cap(timeout, httpcore.ConnectTimeout)
            return _Stream(self.inner.connect_tcp(host, port, capped, local_address, socket_options))

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        with named(httpcore.ConnectTimeout):
            capped = cap(timeout, httpcore.ConnectTimeout)
            return _Stream(self.inner.connect_unix_socket(path, capped, socket_options))

    def sleep(self, seconds: float) -> None:
        self.inner.sleep(seconds)


def install(client: httpx.Client) -> bool:
    """Make ``client``'s connection pools (direct and proxy) honour :func:`attempt` deadlines.

    httpx offers no public way to pass a network backend while keeping its handling of proxy
    environment variables, so this wraps the backend of each pool it built. False (logged) if
    this httpx lays its pools out differently: requests then have their per-read timeouts only,
    and tests/test_notify_webhook.py (the slow-header receiver) fails loudly.
    """
    transports = [getattr(client, "_transport", None), *getattr(client, "_mounts", {}).values()]
    every = True
    for transport in transports:
        if transport is None:
            continue  # a mount that bypasses proxies: requests go through the default transport
        pool: Any = getattr(transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if isinstance(backend, httpcore.NetworkBackend):
            if not isinstance(backend, _Backend):
                pool._network_backend = _Backend(backend)
        else:
            every = False
    if not every:
        log.error("httpx %s: cannot bound whole attempts by `timeout` (only each read)", httpx.__version__)
    return every
