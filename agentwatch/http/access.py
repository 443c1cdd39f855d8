"""Who may see and do what on the HTTP server (``[http] token``), decided in one place.

* Bound to loopback with no token: everything is open to whoever can reach the machine's own
  loopback, except actions (mute, unmute): those change what pages people get, so they need a
  token even there.
* Any other bind address without a token is refused at start (:func:`check_bind`): a dashboard
  of agent names, hosts and stacks must never be open to a network by accident.
* With a token, every route but the public ones needs it: ``Authorization: Bearer <token>``
  (scripts, Prometheus' ``authorization`` scrape setting), or the session cookie the login form
  sets (browsers). The cookie holds an HMAC of the token, not the token, is ``HttpOnly`` and
  ``SameSite=Strict`` (so another site cannot make a browser post a mute), and dies when the
  token changes. Public: ``/healthz``, ``/ping/...`` (its own key), ``/static/...``, the login
  form, and badges unless ``[http] public_badges = false``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from typing import Final

from starlette.requests import HTTPConnection

from agentwatch.config import HttpSection
from agentwatch.errors import ConfigError

COOKIE: Final = "agentwatch_session"
_PUBLIC_PREFIXES: Final = ("/ping/", "/static/")
_PUBLIC_PATHS: Final = frozenset({"/healthz", "/login", "/favicon.ico"})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_bind(http: HttpSection, bind: str | None = None, source: str = "[http]") -> None:
    """Refuse a non-loopback address without a token, naming the fix (ConfigError: exit 2)."""
    address = bind or http.bind
    host = address.rpartition(":")[0].strip("[]")
    if not is_loopback(host) and not http.token:
        raise ConfigError(
            source,
            [
                f"[http] bind: {address!r} is not a loopback address, and [http] token is not set: "
                "anyone who can reach it would see every agent; set [http] token "
                "(AGENTWATCH_HTTP__TOKEN), or bind to 127.0.0.1"
            ],
        )


def session_value(token: str) -> str:
    """What the session cookie holds: derived from the token, useless without it."""
    return hmac.new(token.encode(), b"agentwatch-dashboard-session", hashlib.sha256).hexdigest()


def same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


class Access:
    """The access rules of one server (see the module docstring)."""

    def __init__(self, http: HttpSection) -> None:
        self.token = http.token
        self.public_badges = http.public_badges
        self._session = session_value(http.token) if http.token else None

    @property
    def actions_enabled(self) -> bool:
        """Mute and unmute (later halt and resume) exist only with a token."""
        return self.token is not None

    def is_public(self, path: str) -> bool:
        if path in _PUBLIC_PATHS or path.startswith(_PUBLIC_PREFIXES):
            return True
        return self.public_badges and path.startswith("/badge/")

    def allowed(self, conn: HTTPConnection) -> bool:
        """Whether this request may see a protected route."""
        if self.token is None:
            return True
        header = conn.headers.get("authorization", "")
        scheme, _, credential = header.partition(" ")
        if scheme.lower() == "bearer" and same(credential.strip(), self.token):
            return True
        cookie = conn.cookies.get(COOKIE, "")
        return bool(cookie) and self._session is not None and same(cookie, self._session)

    def check_login(self, given: str) -> str | None:
        """The cookie value for a correct token, else None."""
        if self.token is None or self._session is None or not same(given, self.token):
            return None
        return self._session
