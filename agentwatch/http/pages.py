"""The dashboard: fleet, agent and alerts pages, rendered on the server, updated in place.

Each page is one Jinja2 template with autoescaping on for everything (agent names, summaries,
stacks and errors come from whoever can write an event). A page polls itself with
``?partial=1`` every ``[http] refresh`` and swaps in the fresh middle part (static/app.js): no
reload, no client-side rendering of agent text, works behind any proxy that passes plain GETs.

Actions (mute, unmute, halt, resume) are POST forms, allowed only when ``[http] token`` is set
(access.py); they redirect back to the page they came from.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import quote, urlencode

import jinja2
from markupsafe import Markup
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from agentwatch import __version__, codec
from agentwatch.config import format_duration, parse_duration
from agentwatch.errors import InvalidEntry
from agentwatch.fleet import STATES
from agentwatch.halts import Halts, pattern_problem, reason_problem
from agentwatch.http import charts, views
from agentwatch.http.access import COOKIE
from agentwatch.http.server import Server
from notifiers.routing import Mutes, known_detectors

MUTE_CHOICES: Final = ("15m", "1h", "4h", "1d", "7d")
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
    "script-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def agent_url(name: str) -> str:
    """The agent page's URL. Every character but the name's own is percent-encoded (``/``
    too), and a name of only dots gets the query form: a browser would resolve ``/agents/..``
    to ``/`` (and ``%2E%2E`` likewise) before asking."""
    if name.strip(".") == "":
        return "/agents?" + urlencode({"agent": name})
    return "/agents/" + quote(name, safe="")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    return "now" if seconds < 1 else f"{format_duration(seconds)} ago"


def _when(at_ms: int | None) -> str:
    if at_ms is None:
        return "-"
    return datetime.fromtimestamp(at_ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _usd(value: float | None) -> str:
    if value is None:
        return "unknown"
    return f"${value:,.2f}" if value >= 1 or value == 0 else f"${value:.4f}"


def _number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.0f}" if abs(value) >= 10 else f"{value:,.1f}"


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("agentwatch.http", "templates"),
        autoescape=True,  # every template, whatever its name: agent text is hostile
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        age=_age,
        when=_when,
        usd=_usd,
        number=_number,
        duration=format_duration,
        agent_url=agent_url,
        pretty=views.pretty,
    )
    env.globals.update(
        version=__version__,
        sparkline=charts.sparkline,
        chart=charts.chart,
        states=STATES,
        mute_choices=MUTE_CHOICES,
    )
    return env


_ENV: Final = environment()


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    server: Server = request.app.state.server
    partial = request.query_params.get("partial") == "1"
    html = _ENV.get_template(template).render(
        partial=partial,
        refresh_s=server.settings.http.refresh_s,
        actions=server.access.actions_enabled,
        signed_in=server.access.token is not None and server.access.allowed(request),
        path=request.url.path,
        **context,
    )
    return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)


def _int(text: str | None, default: int) -> int:
    try:
        return int(text or default)
    except ValueError:
        return default


async def fleet(request: Request) -> Response:
    server: Server = request.app.state.server
    params = request.query_params
    state = params.get("state", "")
    query = params.get("q", "")
    data = await run_in_threadpool(
        views.fleet_page,
        server,
        query=query,
        state=state if state in STATES else "",
        page=_int(params.get("page"), 1),
        size=server.settings.http.page_size,
    )

    def page_url(number: int) -> str:
        return "/?" + urlencode({k: v for k, v in (("q", query), ("state", state), ("page", number)) if v})

    return render(request, "fleet.html", data=data, query=query, state=state, page_url=page_url)


async def agent(request: Request) -> Response:
    server: Server = request.app.state.server
    name = request.path_params.get("name") or request.query_params.get("agent", "")
    try:
        codec.check_agent(name)
    except InvalidEntry as exc:
        return render(request, "missing.html", 404, name=name, why=str(exc))
    data = await run_in_threadpool(views.agent_page, server, name)
    if data is None:
        return render(request, "missing.html", 404, name=name, why="no such agent (or it was forgotten)")
    return render(request, "agent.html", data=data, name=name, markup=Markup)


async def alerts(request: Request) -> Response:
    server: Server = request.app.state.server
    data = await run_in_threadpool(views.alerts_page, server)
    return render(request, "alerts.html", data=data)


async def mute(request: Request) -> Response:
    server: Server = request.app.state.server
    form = await request.form()
    glob, detector = str(form.get("agent", "")), str(form.get("detector", "")) or None
    try:
        seconds = parse_duration(str(form.get("for", "")))
    except ValueError as exc:
        return Response(f"for: {exc}\n", status_code=400)
    problem = pattern_problem(glob) or reason_problem(str(form.get("reason", "")))
    if problem is not None:
        return Response(f"{problem}\n", status_code=400)
    if seconds <= 0:
        return Response("a duration above zero is needed\n", status_code=400)
    if detector is not None and detector not in known_detectors(server.settings.detectors):
        return Response(f"unknown detector {detector!r}\n", status_code=400)
    reason = str(form.get("reason", ""))[:200]
    mutes = Mutes(server.client, server.keys)
    await run_in_threadpool(
        lambda: mutes.add(glob, seconds, detector=detector, reason=reason, by=_who(request))
    )
    return _back(form.get("next"))


async def unmute(request: Request) -> Response:
    server: Server = request.app.state.server
    form = await request.form()
    glob, detector = str(form.get("agent", "")), str(form.get("detector", "")) or None
    if not glob:
        return Response("which mute? (agent glob)\n", status_code=400)
    mutes = Mutes(server.client, server.keys)
    await run_in_threadpool(mutes.remove, glob, detector)
    return _back(form.get("next"))


async def halt(request: Request) -> Response:
    server: Server = request.app.state.server
    form = await request.form()
    pattern, reason = str(form.get("agent", "")), str(form.get("reason", ""))
    problem = pattern_problem(pattern) or reason_problem(reason)
    if problem is not None:
        return Response(f"{problem}\n", status_code=400)
    lasting = str(form.get("for", ""))
    try:
        seconds = parse_duration(lasting) if lasting else None
    except ValueError as exc:
        return Response(f"for: {exc}\n", status_code=400)
    halts = Halts(server.client, server.keys, secret=server.settings.security.secret)
    await run_in_threadpool(lambda: halts.add(pattern, reason, by=_who(request), for_s=seconds))
    return _back(form.get("next"))


async def resume(request: Request) -> Response:
    server: Server = request.app.state.server
    form = await request.form()
    pattern = str(form.get("agent", ""))
    problem = pattern_problem(pattern)
    if problem is not None:
        return Response(f"{problem}\n", status_code=400)
    halts = Halts(server.client, server.keys, secret=server.settings.security.secret)
    await run_in_threadpool(lambda: halts.remove(pattern, by=_who(request)))
    return _back(form.get("next"))


def _who(request: Request) -> str:
    """Who did it, as mutes and halts record it: the dashboard, from which address."""
    return f"dashboard ({request.client.host})" if request.client else "dashboard"


def _back(target: Any) -> Response:
    """Back to the page the form was on: only a local path, never another site."""
    path = str(target or "/")
    if not path.startswith("/") or path.startswith("//") or "\\" in path:
        path = "/"
    return RedirectResponse(path, status_code=303)


async def login(request: Request) -> Response:
    server: Server = request.app.state.server
    if request.method == "GET":
        return render(
            request, "login.html", 200, failed=False, next_path=request.query_params.get("next", "/")
        )
    form = await request.form()
    value = server.access.check_login(str(form.get("token", "")))
    if value is None:
        server.metrics.denied()
        return render(request, "login.html", 401, failed=True, next_path=str(form.get("next", "/")))
    response = _back(form.get("next"))
    response.set_cookie(
        COOKIE,
        value,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        max_age=30 * 86400,
    )
    return response


async def logout(request: Request) -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE)
    return response


ACTIONS: Final = [
    Route("/actions/mute", mute, methods=["POST"]),
    Route("/actions/unmute", unmute, methods=["POST"]),
    Route("/actions/halt", halt, methods=["POST"]),
    Route("/actions/resume", resume, methods=["POST"]),
]
"""Routes that change state: access.py lets them through only with ``[http] token``."""

routes = [
    Route("/", fleet),
    Route("/agents", agent),
    Route("/agents/{name:path}", agent),
    Route("/alerts", alerts),
    Route("/login", login, methods=["GET", "POST"]),
    Route("/logout", logout, methods=["POST"]),
    *ACTIONS,
]
