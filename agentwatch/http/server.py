"""What every route of the HTTP server shares: the pipeline, one Redis client, access rules,
the event writer, this server's counters, and a short-lived cache of the fleet's status.

Route modules (ping.py, pages.py, metrics.py, badges.py, and the OTLP receiver's) take a
:class:`Server` from ``request.app.state.server`` and nothing else, so a new module of routes
is added in app.py with one line. Writers call ``await server.writer.awrite(...)`` (batched
round trips); readers run their synchronous Redis reads in the thread pool.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from agentwatch.config import Pipeline
from agentwatch.fleet import fleet_status
from agentwatch.http.access import Access
from agentwatch.http.counters import Counters
from agentwatch.ingest import EventWriter, FloodLimit
from agentwatch.redisconn import Client, connect, explain

RETRY_AFTER_S: Final = 5
"""What a 503 tells a client to wait while Redis is away."""


class BodyTooLarge(Exception):
    """A request body over ``[http] max_body_bytes`` (answered 413)."""


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing more than ``limit`` bytes without reading the rest into memory."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"the body is {int(declared):,} bytes; at most {limit:,} are accepted")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(f"the body is over {limit:,} bytes; at most {limit:,} are accepted")
    return bytes(body)


def unavailable(exc: BaseException) -> Response:
    """503 while Redis is away or refuses writes: the client should retry, nothing was kept."""
    return PlainTextResponse(
        f"unavailable: {explain(exc)}; retry later\n",
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


class FleetCache:
    """``fleet_status`` at most once per ``max_age_s`` however many pages, scrapes and badges ask:
    for a large fleet one status read costs tens of milliseconds of Redis and Python time."""

    def __init__(self, server: Server, max_age_s: float) -> None:
        self.server = server
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._value: dict[str, Any] | None = None
        self._at = 0.0

    def get(self) -> dict[str, Any]:
        with self._lock:
            if self._value is None or time.monotonic() - self._at >= self.max_age_s:
                self._value = fleet_status(self.server.client, self.server.pipeline)
                self._at = time.monotonic()
            return self._value


class Server:
    """Everything the routes share (see the module docstring)."""

    def __init__(self, pipeline: Pipeline, url: str, *, cache_s: float | None = None) -> None:
        http = pipeline.settings.http
        self.pipeline = pipeline
        self.settings = pipeline.settings
        self.keys = pipeline.keys
        self.client: Client = connect(self.settings, url, name="agentwatch-http")
        self.access = Access(http)
        self.writer = EventWriter(
            self.client,
            self.keys,
            limit=FloodLimit(http.ping_rate, http.ping_burst),
            run_ttl_s=http.run_ttl_s,
        )
        self.metrics = Counters()
        self.fleet = FleetCache(self, min(1.0, http.refresh_s / 2) if cache_s is None else cache_s)

    def agent_status(self, name: str) -> dict[str, Any] | None:
        """One agent's entry of the status document, read fresh (None: no such agent)."""
        found = fleet_status(self.client, self.pipeline, only=[name])["agents"]
        return found[0] if found else None
