"""What every route of the HTTP server shares: the pipeline, one Redis client, access rules,
the event writer, this server's counters, and a short-lived cache of the fleet's status.

Route modules (ping.py, pages.py, metrics.py, badges.py, otlp.py) take a
:class:`Server` from ``request.app.state.server`` and nothing else, so a new module of routes
is added in app.py with one line. Writers call ``await server.writer.awrite(...)`` (batched
round trips on the event loop's own connection, :attr:`Server.link`); readers run their
synchronous Redis reads in the thread pool.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Final, TypeVar

from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import Receive, Scope

from agentwatch.config import Pipeline
from agentwatch.fleet import fleet_status
from agentwatch.http.access import Access
from agentwatch.http.counters import Counters
from agentwatch.ingest import Contended, EventWriter, FloodLimit
from agentwatch.ingest_link import Link
from agentwatch.maintenance import any_glob
from agentwatch.otlp.receiver import Receiver
from agentwatch.redisconn import RECOVERABLE, Client, async_pool, connect, explain

log = logging.getLogger("agentwatch.http")
T = TypeVar("T")
RETRY_AFTER_S: Final = 5
"""What a 503 tells a client to wait while Redis is away."""
SWEEP_EVERY_MAX_S: Final = 600.0
UNAVAILABLE: Final[tuple[type[Exception], ...]] = (*RECOVERABLE, Contended)
"""What a writing route answers 503 (``Retry-After``) to: the client keeps its data and retries."""


class BodyTooLarge(Exception):
    """A request body over ``[http] max_body_bytes`` (answered 413)."""


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing more than ``limit`` bytes without reading the rest into memory."""
    return await receive_body(request.scope, request.receive, limit)


async def receive_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """:func:`read_body` for a plain ASGI handler (the ping API's). Raises :class:`BodyTooLarge`,
    or ``ClientDisconnect`` when the client went away."""
    message = await receive()
    body = message.get("body", b"")
    if message["type"] == "http.request" and not message.get("more_body", False) and len(body) <= limit:
        return bytes(body)  # the whole body in one message (a ping's, always): nothing to refuse
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise BodyTooLarge(f"the body is {int(value):,} bytes; at most {limit:,} are accepted")
    received = bytearray()
    while True:
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        received += message.get("body", b"")
        if len(received) > limit:
            raise BodyTooLarge(f"the body is over {limit:,} bytes; at most {limit:,} are accepted")
        if not message.get("more_body", False):
            return bytes(received)
        message = await receive()


def unavailable(exc: BaseException) -> Response:
    """503 while Redis is away or refuses writes, or other servers keep changing the agent's
    record (:class:`~agentwatch.ingest.Contended`): the client should retry, nothing was kept."""
    why = str(exc) if isinstance(exc, Contended) else explain(exc)
    return PlainTextResponse(
        f"unavailable: {why}; retry later\n",
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


class FleetCache:
    """The fleet's status, shared by every page, scrape and badge of this server.

    ``fleet_status`` reads every agent: tens of milliseconds for a hundred agents, about a
    second of Python and Redis time for 10,000 on a busy machine. So a status younger than
    ``max_age_s`` (or twice what the last read cost, when that is longer) is served as is;
    an older one is served while one background thread reads the next (stale-while-revalidate),
    so a page polled every few seconds never waits for the whole fleet. A status older than
    ``stale_s``, or none yet, is read before answering; a read that failed (Redis away) is
    raised to every caller until a read succeeds, so pages say so instead of showing old data.
    """

    def __init__(self, server: Server, max_age_s: float, stale_s: float = 30.0) -> None:
        self.server = server
        self.max_age_s = max_age_s
        self.stale_s = stale_s
        self._lock = threading.Lock()
        self._reading = threading.Lock()
        self._value: dict[str, Any] | None = None
        self._at = 0.0
        self._cost = 0.0
        self._error: Exception | None = None
        self._refreshing = False
        self._derived: dict[str, tuple[int, Any]] = {}

    def get(self) -> dict[str, Any]:
        with self._lock:
            if self._error is not None:
                error, self._error = self._error, None
                self._value = None
                raise error
            age = time.monotonic() - self._at
            if self._value is not None and age < max(self.max_age_s, 2 * self._cost):
                return self._value
            if self._value is not None and age < self.stale_s:
                if not self._refreshing:
                    self._refreshing = True
                    threading.Thread(target=self._refresh, name="fleet-status", daemon=True).start()
                return self._value
        return self._read()

    def derived(self, name: str, build: Callable[[dict[str, Any]], T]) -> tuple[dict[str, Any], T]:
        """The status and ``build(status)``, built once per status read (e.g. the fleet sorted
        worst first: sorting 10,000 agents on every page view would cost more than the page)."""
        value = self.get()
        with self._lock:
            known = self._derived.get(name)
            if known is not None and known[0] == id(value) and value is self._value:
                return value, known[1]
        built = build(value)
        with self._lock:
            if value is self._value:
                self._derived[name] = (id(value), built)
        return value, built

    def _read(self) -> dict[str, Any]:
        with self._reading:  # one read at a time: concurrent callers wait for it, not add to it
            with self._lock:
                if self._value is not None and time.monotonic() - self._at < self.max_age_s:
                    return self._value
            started = time.monotonic()
            value = fleet_status(self.server.client, self.server.pipeline)
            with self._lock:
                self._value, self._at, self._cost = value, time.monotonic(), time.monotonic() - started
            return value

    def _refresh(self) -> None:
        try:
            self._read()
        except Exception as exc:  # Redis away: the next caller gets it (pages say so)
            with self._lock:
                self._error = exc
        finally:
            with self._lock:
                self._refreshing = False


class Server:
    """Everything the routes share (see the module docstring)."""

    def __init__(self, pipeline: Pipeline, url: str, *, cache_s: float | None = None) -> None:
        http = pipeline.settings.http
        self.pipeline = pipeline
        self.settings = pipeline.settings
        self.keys = pipeline.keys
        self.client: Client = connect(self.settings, url, name="agentwatch-http")
        self.access = Access(http)
        self.ping_key = None if http.ping_key is None else http.ping_key.encode()
        """``[http] ping_key`` as bytes, encoded once (ping.py ``authorised`` compares every ping's)."""
        self.ping_accepts = any_glob((http.ping_accept,))
        """``[http] ping_accept`` compiled once (``fnmatchcase``'s rule, without its cache lookup
        on every ping)."""
        security = self.settings.security
        # the ping API's writes go from the event loop on a connection of its own (not for a
        # cluster: its client routes each script call to its node, in a worker thread)
        pool = None if self.settings.redis.cluster else async_pool(self.settings, url, name="agentwatch-http")
        self.link = None if pool is None else Link(pool)
        self.writer = EventWriter(
            self.client,
            self.keys,
            limit=FloodLimit(http.ping_rate, http.ping_burst),
            run_ttl_s=http.run_ttl_s,
            secret=security.secret if security.agent_keys else None,  # signed like a producer's
            link=self.link,
        )
        self.metrics = Counters()
        self.otlp = Receiver(
            self.client, self.keys, self.settings.otlp, self.writer, secret=self.settings.security.secret
        )
        self.fleet = FleetCache(self, min(1.0, http.refresh_s / 2) if cache_s is None else cache_s)

    @property
    def sweep_every_s(self) -> float:
        """How often this server deletes the run records and OTLP process states that have
        expired (memory only: an expired record is treated as absent whether swept or not)."""
        shortest = min(self.settings.http.run_ttl_s, self.settings.otlp.forget_s)
        return min(max(shortest / 4, 1.0), SWEEP_EVERY_MAX_S)

    async def sweeping(self) -> None:
        """Run :meth:`EventWriter.sweep` every :attr:`sweep_every_s`, for as long as the server
        runs; a Redis that is away is swept on a later round, and a sweep that fails otherwise
        (an ACL without the ingest keys, say) is logged and tried again, never ends the loop."""
        while True:
            await asyncio.sleep(self.sweep_every_s)
            try:
                await asyncio.to_thread(self.writer.sweep)
            except RECOVERABLE:
                self.metrics.redis_error()
            except Exception as exc:  # the loop must outlive any one failure: said, not raised
                self.metrics.redis_error()
                log.warning("sweeping expired run records failed: %s: %s", type(exc).__name__, exc)

    def agent_status(self, name: str) -> dict[str, Any] | None:
        """One agent's entry of the status document, read fresh (None: no such agent)."""
        found = fleet_status(self.client, self.pipeline, only=[name])["agents"]
        return found[0] if found else None
