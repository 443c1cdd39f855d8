"""The ASGI application: route modules, the access guard, and what a Redis outage looks like.

Starlette + uvicorn, because they are the plain, widely deployed pair for a small ASGI service:
routing, forms, cookies, static files from a package and a test client, with no ORM, no
template engine of their own and few dependencies; uvicorn serves it from the CLI process
without any deployment step, and anyone can put the app behind their own ASGI server.

Route modules each export ``routes``; the OTLP receiver's (otlp.py) sits beside ping.py.
Handlers that read Redis run in a thread pool (redis-py is synchronous, like the workers); the
ping API writes from the event loop on a connection of its own (agentwatch/ingest_link.py). So a
slow Redis never blocks the event loop, and every Redis error that means "away for now"
becomes a 503 (pages say so in plain words; the ping API adds ``Retry-After``). Pings are
answered before Starlette's middleware and router (:class:`App`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final
from urllib.parse import urlencode, urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from agentwatch import __version__
from agentwatch.config import Pipeline
from agentwatch.http import badges, metrics, otlp, pages, ping
from agentwatch.http.server import Server, unavailable
from agentwatch.redisconn import RECOVERABLE, explain

OWN_ACCESS: Final = ("/ping/", "/v1/traces", "/v1/metrics")
"""Paths whose routes check their own credential, not ``[http] token``."""


async def healthz(request: Request) -> Response:
    """200 while this server can reach Redis, else 503 (for load balancers and uptime checks)."""
    server: Server = request.app.state.server
    try:
        await run_in_threadpool(server.client.ping)
    except RECOVERABLE as exc:
        server.metrics.redis_error()
        return JSONResponse({"ok": False, "redis": explain(exc), "version": __version__}, status_code=503)
    return JSONResponse({"ok": True, "redis": "ok", "version": __version__})


async def api_status(request: Request) -> Response:
    """The JSON of ``agentwatch status --json`` (docs/operations.md)."""
    server: Server = request.app.state.server
    return JSONResponse(await run_in_threadpool(server.fleet.get))


async def favicon(request: Request) -> Response:
    return RedirectResponse("/static/favicon.svg", status_code=301)


class Guard:
    """Access rules (access.py) in front of every route, as plain ASGI middleware."""

    def __init__(self, app: ASGIApp, server: Server) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The ping key and the ingest token are those routes' own access (ping.py, otlp.py).
        if scope["type"] != "http" or scope["path"].startswith(OWN_ACCESS):
            await self.app(scope, receive, send)
            return
        refused = self.refusal(HTTPConnection(scope))
        if refused is None:
            await self.app(scope, receive, send)
        else:
            await refused(scope, receive, send)

    def refusal(self, conn: HTTPConnection) -> Response | None:
        access, path = self.server.access, conn.url.path
        if path.startswith("/actions/") and not access.actions_enabled:
            return PlainTextResponse("actions need [http] token to be set\n", status_code=403)
        if not access.is_public(path) and not access.allowed(conn):
            self.server.metrics.denied()
            wants_page = conn.scope["method"] == "GET" and "text/html" in conn.headers.get("accept", "")
            if wants_page:
                return RedirectResponse("/login?" + urlencode({"next": conn.url.path}), status_code=303)
            return PlainTextResponse(
                "a valid [http] token is needed (Authorization: Bearer <token>)\n",
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="agentwatch"'},
            )
        if conn.scope["method"] == "POST" and not path.startswith("/ping/") and not _same_origin(conn):
            return PlainTextResponse("cross-site form posts are refused\n", status_code=403)
        return None


def _same_origin(conn: HTTPConnection) -> bool:
    """A browser names the page a form was posted from; it must be this server."""
    origin = conn.headers.get("origin")
    if origin is None or (origin == "null" and conn.headers.get("sec-fetch-site") == "same-origin"):
        return True
    return urlsplit(origin).netloc == conn.headers.get("host", "")


def _redis_down(request: Request, exc: Exception) -> Response:
    server: Server = request.app.state.server
    server.metrics.redis_error()
    if "text/html" in request.headers.get("accept", "") and request.method == "GET":
        return pages.render(request, "unavailable.html", 503, why=explain(exc))
    return unavailable(exc)


class App(Starlette):
    """Starlette, except that pings are answered before its middleware and router: the ping API
    is the route called most, by far, and those layers cost it more CPU than its own work
    (benchmarks/NOTES.md ``## http_ping``). It checks its own key, so the guard has nothing to
    add; its route stays registered, and any request :func:`ping.match` leaves to the router
    (another method) is routed as before."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            found = ping.match(scope)
            if found is not None:
                await ping.answer(self.state.server, scope, receive, send, found)
                return
        await super().__call__(scope, receive, send)


def create_app(pipeline: Pipeline, url: str, *, cache_s: float | None = None) -> Starlette:
    """The whole server for ``pipeline``, on the Redis at ``url`` (connected lazily: it starts,
    and says so on every page, while Redis is away)."""
    server = Server(pipeline, url, cache_s=cache_s)
    server.metrics.registry.register(metrics.FleetCollector(server))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        sweeping = asyncio.get_running_loop().create_task(server.sweeping())
        yield
        sweeping.cancel()
        if server.link is not None:
            await server.link.close()
        server.otlp.close()
        server.client.close()

    routes: list[Any] = [
        *ping.routes,  # first: the route called most, tried before the others
        Route("/healthz", healthz),
        Route("/api/status", api_status),
        Route("/favicon.ico", favicon),
        *(otlp.routes if pipeline.settings.otlp.enabled else []),
        *metrics.routes,
        *badges.routes,
        *pages.routes,
        Mount("/static", StaticFiles(packages=[("agentwatch.http", "static")]), name="static"),
    ]
    handlers: dict[Any, Any] = dict.fromkeys(RECOVERABLE, _redis_down)
    app = App(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.server = server
    app.add_middleware(Guard, server=server)
    return app
