"""Status badges: ``/badge/<agent>.svg`` (shields style) and ``/badge/<agent>.json`` (the
shields.io endpoint format, for a badge styled by shields itself).

The message is what a README reader needs: ``up``, ``late``, ``stalled``, ``down`` (silent, or
exited), ``retired`` (stopped on purpose), ``unknown`` (no such agent: 404, still an image).
Public unless ``[http] public_badges = false``; a badge shows the agent's name and that word,
nothing else. Cached by clients for 30 s at most.
"""

from __future__ import annotations

from typing import Final

from markupsafe import escape
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agentwatch import codec
from agentwatch.errors import InvalidEntry
from agentwatch.http.server import Server

WORDS: Final = {
    "ok": "up",
    "muted": "up",
    "late": "late",
    "stalled": "stalled",
    "down": "down",
    "exited": "down",
    "retired": "retired",
}
COLORS: Final = {
    "up": "#3fb950",
    "late": "#d29922",
    "stalled": "#db6d28",
    "down": "#e5534b",
    "retired": "#8b949e",
    "unknown": "#8b949e",
}
_SHIELDS: Final = {
    "up": "brightgreen",
    "late": "yellow",
    "stalled": "orange",
    "down": "red",
    "retired": "lightgrey",
    "unknown": "lightgrey",
}
_CACHE: Final = {"Cache-Control": "max-age=30, must-revalidate"}


def text_width(text: str) -> int:
    """Approximate width in px of ``text`` in 11px Verdana (shields' font): enough to size a box."""
    wide, narrow = set("mwMW@%"), set("fijlrtI!.,:;'|()[] ")
    return int(sum(10 if c in wide else 4 if c in narrow else 7 for c in text)) + 10


def svg(label: str, message: str) -> str:
    """A flat shields-style badge; ``label`` is agent-supplied, so it is escaped for XML."""
    left, right = text_width(label), text_width(message)
    color = COLORS.get(message, COLORS["unknown"])
    safe_label, safe_message = escape(label), escape(message)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + right}" height="20" role="img" '
        f'aria-label="{safe_label}: {safe_message}"><title>{safe_label}: {safe_message}</title>'
        f'<rect width="{left}" height="20" fill="#555"/>'
        f'<rect x="{left}" width="{right}" height="20" fill="{color}"/>'
        '<g fill="#fff" text-anchor="middle" font-family="Verdana,Geneva,DejaVu Sans,sans-serif" '
        'font-size="11">'
        f'<text x="{left / 2}" y="14">{safe_label}</text>'
        f'<text x="{left + right / 2}" y="14">{safe_message}</text></g></svg>'
    )


async def badge(request: Request) -> Response:
    server: Server = request.app.state.server
    name, _, suffix = request.path_params["name"].rpartition(".")
    if suffix not in ("svg", "json") or not name:
        return Response("badges are /badge/<agent>.svg or /badge/<agent>.json\n", status_code=404)
    try:
        codec.check_agent(name)
        status = await run_in_threadpool(server.agent_status, name)
    except InvalidEntry:
        status = None
    word = WORDS.get(status["state"], "unknown") if status else "unknown"
    code = 200 if status else 404
    if suffix == "json":
        payload = {"schemaVersion": 1, "label": name, "message": word, "color": _SHIELDS[word]}
        return JSONResponse(payload, status_code=code, headers=_CACHE)
    return Response(svg(name, word), status_code=code, media_type="image/svg+xml", headers=_CACHE)


routes = [Route("/badge/{name:path}", badge)]
