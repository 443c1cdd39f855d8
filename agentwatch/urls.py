"""URLs: the one check of a Redis URL, and the one way to print any URL without its secrets.

Both sides use them: the pipeline's config (``[redis] url``) and the producer inside the agent
(``AGENTWATCH_REDIS_URL``), so a URL a worker accepts is one the agents accept too, and each
says the same thing about it. Standard library and redis-py only: the producer imports this.

TLS is ``rediss://``, configured in the URL's query, the same for agents, workers and the CLI:
``?ssl_ca_certs=/etc/agentwatch/ca.pem`` (the CA to trust; default: the system's),
``&ssl_certfile=...&ssl_keyfile=...`` (a client certificate, for ``tls-auth-clients yes``).
The server's certificate is always verified, host name included (:func:`connection_options`),
unless the URL itself says ``ssl_cert_reqs=none`` or ``ssl_check_hostname=false``.
"""

from __future__ import annotations

import os
import re
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import redis

_DB_PATH: Final = re.compile(r"/?(\d*)")
_TLS_FILES: Final = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_ca_path")
_VERIFIED: Final = {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
"""What a ``rediss://`` connection checks unless its URL says otherwise: redis-py before 6
did not check the host name by default."""


def connection_options(url: str) -> dict[str, Any]:
    """Keyword arguments for redis-py's ``from_url`` that every connection to ``url`` gets:
    certificate and host-name verification for TLS (the URL's own query still wins)."""
    return dict(_VERIFIED) if url.startswith("rediss://") else {}


def redis_url_problem(value: Any) -> str | None:
    """What is wrong with a Redis URL, or ``None``. Stricter than redis-py, which reads
    ``redis://:6379`` as localhost and ``redis://host/abc`` as database 0 without a word."""
    if not isinstance(value, str):
        return f"not a string but {type(value).__name__}"
    try:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            return "expected redis://host[:port][/db], rediss://... (TLS) or unix:///path"
        parts = urlsplit(value)
        if parts.scheme == "unix":
            if not parts.path:
                return "no socket path, e.g. unix:///run/redis/redis.sock"
        else:
            host = parts.hostname
            if not host or any(char.isspace() for char in host):
                return "no host name" if not host else "blank in the host name"
            if parts.port == 0:
                return "port 0"
            if _DB_PATH.fullmatch(parts.path) is None:
                return f"database {parts.path[1:]!r} is not a number"
        pool = redis.ConnectionPool.from_url(value)  # parses only; connects on first use
    except (ValueError, TypeError) as exc:
        return str(exc) or type(exc).__name__
    if int(pool.connection_kwargs.get("db") or 0) < 0:
        return "negative database number"
    return _options_problem(value, pool)


def _options_problem(url: str, pool: Any) -> str | None:
    """An option in the URL's query that no connection would take, or a TLS file that is not there:
    said now, not as a TypeError or an SSL error on every connection attempt."""
    names = set(parse_qs(urlsplit(url).query))
    tls = sorted(name for name in names if name.startswith("ssl_"))
    if tls and not url.startswith("rediss://"):
        return f"{', '.join(tls)} need a TLS URL: rediss://..."
    try:
        pool.connection_class(**pool.connection_kwargs)  # builds the object only: no I/O
    except TypeError as exc:
        unknown = re.search(r"argument '(\w+)'", str(exc))
        return f"unknown option {unknown.group(1)!r} in the URL's query" if unknown else f"bad option ({exc})"
    for name in _TLS_FILES:
        path = pool.connection_kwargs.get(name)
        if path and not os.path.exists(path):
            return f"{name}: no such file or directory: {path}"
    return None


def mask_url(url: str, *, path: bool = True) -> str:
    """A URL safe to print. Userinfo (a password, or a user alone: it may be a token) is always
    masked. With ``path`` masked (notifier URLs: a Slack or PagerDuty webhook's path *is* the
    secret), http(s) URLs keep only scheme and host, and other schemes (apprise's
    ``tgram://BOTTOKEN/CHAT``: the host is the token) only the scheme."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, tail = rest.partition("/")
    userinfo, at, host = netloc.rpartition("@")
    if at or userinfo:
        netloc = f"***@{host}"
    if not path:
        return f"{scheme}://{netloc}{slash}{tail}"
    if scheme.lower() not in ("http", "https"):
        return f"{scheme}://***"
    try:
        parts = urlsplit(url)
    except ValueError:
        return f"{scheme}://***"
    hidden = "/***" if (parts.path not in ("", "/") or parts.query or parts.fragment) else ""
    return f"{scheme}://{netloc}{hidden}"


def display_url(url: str) -> str:
    """A Redis URL for logs and summaries: the password masked, host and database kept."""
    return mask_url(url, path=False)
