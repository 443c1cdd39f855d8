"""The ping API (SPEC section 8): cron jobs, shell scripts and any language beat over HTTP.

    GET|POST /ping/<ping_key>/<agent>              a beat (JSON body: tokens, cost, model, ...)
    GET|POST /ping/<ping_key>/<agent>/start        a new run (?interval=300 or ?interval=5m)
    GET|POST /ping/<ping_key>/<agent>/fail         the run failed: an exit alert
    GET|POST /ping/<ping_key>/<agent>/<exit code>  0: a beat (success); 1-255: failed with that code
    GET|POST /ping/<ping_key>/<agent>?kind=<beat|start|fail|exit code>   the same, unambiguously

The key is ``[http] ping_key``, which writes for every agent ``[http] ping_accept`` matches, or,
with ``[security] agent_keys``, the agent's own key (``agentwatch agent-key``), which writes for
that agent alone (docs/security.md). Every call becomes protocol events through the one
server-side writer (agentwatch/ingest.py), so the detectors cannot tell a ``curl`` agent from one
running the producer. Answers: 200 ``OK``; 404 for a wrong key (or no key at all: the API is
off) without saying which; 403 for an agent outside ``ping_accept``; 400 naming the rule that
was broken; 413 over ``[http] max_body_bytes``; 429 with
``Retry-After`` when one agent floods; 503 with ``Retry-After`` while Redis is away. Each
outcome is counted (``agentwatch_http_pings_total{outcome=...}`` on ``/metrics``).

An agent name may hold ``/``: a last path segment ``start``, ``fail`` or a number is read as the
command. With ``?kind=`` the whole path is the agent's name and the query the command, so an
agent named ``backup/start`` or ``shards/3`` is pinged as ``/ping/<key>/shards/3?kind=beat``
(docs/http.md).
"""

from __future__ import annotations

import hmac
import json
import math
from typing import Any, Final
from urllib.parse import parse_qsl

from starlette._utils import get_route_path
from starlette.requests import ClientDisconnect
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from agentwatch.codec import TOKEN_CLASSES
from agentwatch.config import parse_duration
from agentwatch.errors import InvalidEntry
from agentwatch.http.access import same
from agentwatch.http.server import UNAVAILABLE, BodyTooLarge, Server, receive_body, unavailable
from agentwatch.ingest import Flooded, Kind
from agentwatch.signing import agent_key

BEAT_KEYS: Final = ("tokens", "tokens_in", "tokens_out", *TOKEN_CLASSES, "cost", "model", "fp")
"""What a JSON body may carry (SPEC section 8, and the token classes the pipeline prices by:
PROTOCOL.md); an exit also takes ``error``."""
EXIT_KEYS: Final = (*BEAT_KEYS, "error")
_MAX_EXIT_CODE: Final = 255
_decode: Final = json.JSONDecoder().decode
"""``json.loads`` without its type checks and encoding detection (a ping's body is UTF-8 JSON)."""


class BadPing(Exception):
    """A request the ping API refuses with 400; the message says why."""


COMMANDS: Final = ("beat", "start", "fail")
"""What ``?kind=`` takes, besides an exit code (0-255)."""


def parse_command(rest: str, kind: str | None = None) -> tuple[str, str]:
    """``"nightly/backup/start"`` -> ("nightly/backup", "start"); a bare name is a beat. With
    ``kind`` (the ``?kind=`` query) the whole path is the agent and ``kind`` the command."""
    if kind is not None:
        if kind not in COMMANDS and not (kind.isascii() and kind.isdigit()):
            words = ", ".join(COMMANDS)
            raise BadPing(f"kind must be one of {words} or an exit code (0-255), got {kind[:20]!r}")
        return rest, kind
    agent, sep, last = rest.rpartition("/")
    if sep and agent and (last in ("start", "fail") or (last.isascii() and last.isdigit())):
        return agent, last
    return rest, "beat"


def parse_interval(text: str | None) -> float | None:
    """``?interval=300`` (seconds) or ``?interval=5m``."""
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        try:
            value = parse_duration(text)
        except ValueError as exc:
            raise BadPing(f"interval: {exc} (or a number of seconds)") from None
    if not math.isfinite(value) or value <= 0:
        raise BadPing(f"interval must be a number of seconds above 0, got {text!r}")
    return value


def parse_fields(body: bytes, allowed: tuple[str, ...]) -> dict[str, Any]:
    """The JSON object of a ping's body (empty: none). Unknown keys are refused, not ignored: a
    ``token`` meant as ``tokens`` would otherwise lose the usage without a word."""
    if not body.strip():
        return {}
    try:
        if body[:1] == b"{" and body[1:2] != b"\x00":  # what json.loads would decode as UTF-8
            data = _decode(body.decode("utf-8", "surrogatepass"))
        else:  # UTF-16 or -32, a BOM, or not an object at all: json.loads decides
            data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadPing('the body must be a JSON object, e.g. {"tokens": 1200, "model": "gpt-4o"}') from None
    if not isinstance(data, dict):
        raise BadPing(f"the body must be a JSON object, got {type(data).__name__}")
    unknown = [key for key in data if key not in allowed]
    if unknown:
        unknown.sort()
        raise BadPing(f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}")
    if None in data.values():
        return {key: value for key, value in data.items() if value is not None}
    return data


def event_of(command: str, fields: dict[str, Any]) -> tuple[Kind, dict[str, Any]]:
    """The protocol event one command writes."""
    if command in ("beat", "start", "0"):
        return ("start" if command == "start" else "beat"), fields
    usage = {key: value for key, value in fields.items() if key != "error"}
    if usage:
        raise BadPing(f"/{command} takes only 'error' in its body; send usage with a beat")
    if command == "fail":
        return "exit", {"reason": "exit", "error": str(fields.get("error") or "reported as failed (/fail)")}
    code = int(command)
    if code > _MAX_EXIT_CODE:
        raise BadPing(f"an exit code is 0-255, got {command}")
    exit_fields: dict[str, Any] = {"reason": "exit", "code": code}
    if fields.get("error"):
        exit_fields["error"] = fields["error"]
    return "exit", exit_fields


def authorised(server: Server, key: str, agent: str) -> bool | None:
    """Whether ``key`` may write for ``agent``: the ping key may for every agent ``[http]
    ping_accept`` matches (False: a valid key, an agent outside the glob); with ``[security]
    agent_keys``, an agent's own key (``agentwatch agent-key``) may for that agent alone. None: no
    such key (the caller is told nothing more than "not found")."""
    if server.ping_key is not None and hmac.compare_digest(key.encode(), server.ping_key):
        return server.ping_accepts(agent) is not None
    security = server.settings.security
    if security.agent_keys and security.secret is not None and same(key, agent_key(security.secret, agent)):
        return True
    return None


async def answer(server: Server, scope: Scope, receive: Receive, send: Send, path: tuple[str, str]) -> None:
    """Answer one ping (``path``: the key and the rest, :func:`match`): the only place that
    decides what a ping does. Plain ASGI, not a Starlette endpoint: the ping API is the route
    called most, and Starlette's request, response and routing objects cost more CPU than the
    ping's own work (benchmarks/NOTES.md ``## http_ping``)."""
    count = server.metrics.ping
    key, rest = path
    raw_query = scope["query_string"]
    query = dict(parse_qsl(raw_query.decode("latin-1"), keep_blank_values=True)) if raw_query else {}
    try:
        agent, command = parse_command(rest, query.get("kind"))
        problem: BadPing | None = None
    except BadPing as exc:
        agent, command, problem = rest, "beat", exc
    allowed_here = authorised(server, key, agent)
    if allowed_here is None:
        count("bad_key")
        return await PlainTextResponse("not found\n", status_code=404)(scope, receive, send)
    if not allowed_here:
        count("not_accepted")
        glob = server.settings.http.ping_accept
        why = f"this ping key may not write for {agent!r} ([http] ping_accept = {glob!r})\n"
        return await PlainTextResponse(why, status_code=403)(scope, receive, send)
    refusal: Response
    try:
        if problem is not None:
            raise problem
        body = await receive_body(scope, receive, server.settings.http.max_body_bytes)
        allowed = BEAT_KEYS if command in ("beat", "start", "0") else EXIT_KEYS
        kind, fields = event_of(command, parse_fields(body, allowed))
        interval = parse_interval(query.get("interval"))
        client = scope.get("client")
        facts = {"host": client[0]} if client else {}
        written = await server.writer.awrite(agent, kind, fields, interval_s=interval, start_facts=facts)
    except ClientDisconnect:
        return None  # nobody to answer; nothing was written
    except BodyTooLarge as exc:
        count("too_large")
        refusal = PlainTextResponse(f"{exc}\n", status_code=413)
    except (BadPing, InvalidEntry) as exc:
        count("bad_request")
        refusal = PlainTextResponse(f"bad request: {exc}\n", status_code=400)
    except Flooded as exc:
        count("flooded")
        retry = max(1, math.ceil(exc.retry_after_s))
        refusal = PlainTextResponse(
            f"too many pings for {agent}; retry in {retry}s\n",
            status_code=429,
            headers={"Retry-After": str(retry)},
        )
    except UNAVAILABLE as exc:
        count("unavailable")
        refusal = unavailable(exc)
    else:
        count("ok")
        run, seq = written.run.encode(), b"%d" % written.seq
        headers = [(b"x-agentwatch-run", run), (b"x-agentwatch-seq", seq), *_OK]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        return await send({"type": "http.response.body", "body": b"OK\n"})
    return await refusal(scope, receive, send)


_OK: Final = ((b"content-length", b"3"), (b"content-type", b"text/plain; charset=utf-8"))
"""The headers of every 200 but the run's and the seq's (PlainTextResponse's, built once)."""


async def _routed(scope: Scope, receive: Receive, send: Send) -> None:
    """The route's endpoint: a ping that reached Starlette's router (see :func:`match`)."""
    params = scope["path_params"]
    await answer(scope["app"].state.server, scope, receive, send, (params["key"], params["rest"]))


route = Route("/ping/{key}/{rest:path}", _routed, methods=["GET", "POST"])
routes = [route]


def match(scope: Scope) -> tuple[str, str] | None:
    """The ping key and the rest of the path of a ping request, for the application to call
    :func:`answer` before Starlette's middleware and router (agentwatch/http/app.py); None for
    any other request. The route's own pattern and methods, so both ways in take the same
    requests; other methods reach the router, which answers 405."""
    if scope["method"] not in route.methods:  # type: ignore[operator]
        return None
    found = route.path_regex.match(get_route_path(scope))
    return None if found is None else (found["key"], found["rest"])
