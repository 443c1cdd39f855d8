"""What every subcommand shares: loading the config, connecting, logging, exit codes, options."""

from __future__ import annotations

import getpass
import logging
import os
import sys
import tomllib
import weakref
from pathlib import Path
from typing import Annotated, Any, NoReturn
from urllib.parse import parse_qs, urlsplit

import redis
import typer

from agentwatch import loading
from agentwatch.config import DEFAULT_REDIS_URL, EMBEDDED, Pipeline, parse_duration
from agentwatch.errors import ConfigError, RedisUnavailable
from agentwatch.redisconn import Client, answers, connect, describe, resolve_url, running_embedded_url

EXIT_RUNTIME = 1
EXIT_USAGE = 2
_URL_ENV = "AGENTWATCH_REDIS__URL"
_PRODUCER_URL_ENV = "AGENTWATCH_REDIS_URL"

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="pipeline.toml to use (default: ./pipeline.toml if it exists, else built-in defaults).",
        show_default=False,
    ),
]
LogLevel = Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")]


def fail(message: str, code: int = EXIT_RUNTIME) -> NoReturn:
    typer.echo(f"agentwatch: {message}", err=True)
    raise typer.Exit(code)


def _agent_glob(value: str | None) -> str | None:
    # `alerts --agent --json` would otherwise take "--json" as the glob, match nothing and
    # exit 0 with "no alerts": a silent wrong answer. No agent name starts with "-".
    if value is not None and value.startswith("-"):
        fail(
            f"--agent needs an agent name or glob, got the option {value!r} (e.g. --agent 'scraper-*')",
            EXIT_USAGE,
        )
    return value


AgentOption = Annotated[
    str | None,
    typer.Option("--agent", help='Only agents matching this glob, e.g. "scraper-*".', callback=_agent_glob),
]
"""``--agent GLOB``, the same in every command that has it."""


def who() -> str:
    """The operator's user name, for the record of a mute or a halt ('' when unknown)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


def duration_flag(flag: str, text: str) -> float:
    """A duration given on the command line, in seconds; exit 2 unless it is valid and > 0."""
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        fail(f"{flag}: {exc}", EXIT_USAGE)
    if seconds <= 0:
        fail(f"{flag} must be longer than zero, got {text!r}", EXIT_USAGE)
    return seconds


def load_pipeline(path: Path | None, *, plugins: bool = True) -> Pipeline:
    """The validated pipeline, or exit 2 with every bad key named."""
    try:
        return loading.load(path, plugins=plugins)
    except ConfigError as exc:
        typer.echo(exc.render(), err=True)
        raise typer.Exit(EXIT_USAGE) from None


def setup_logging(level: str) -> None:
    numeric = getattr(logging, level.upper(), None)
    if not isinstance(numeric, int):
        fail(f"unknown log level {level!r}: use debug, info, warning or error", EXIT_USAGE)
    logging.basicConfig(
        level=numeric,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    # httpx logs every request with its full URL at INFO: for Slack, ntfy or a webhook with a
    # token in its path that URL is the secret. Our notifiers log deliveries themselves.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


def worker_url(pipeline: Pipeline) -> str:
    """For long-running workers: the configured URL, a running embedded server, or the default.

    No ping here: a worker started before Redis waits for it with backoff (and says so).
    """
    configured = pipeline.settings.redis.url
    if configured and configured != EMBEDDED:
        return configured
    if configured is None and answers(DEFAULT_REDIS_URL):
        return DEFAULT_REDIS_URL
    return running_embedded_url(pipeline.settings) or DEFAULT_REDIS_URL


def client_for(pipeline: Pipeline, *, name: str = "agentwatch-cli") -> Client:
    """A connected client for one-shot commands, or exit saying which URL failed and why:
    1 when Redis does not answer (it may later), 2 when the URL itself is wrong (not a Redis
    URL, a password the server refuses, a database number it does not have)."""
    try:
        url = resolve_url(pipeline.settings)
    except RedisUnavailable as exc:
        fail(str(exc))
    shown = describe(url)
    source = url_source(pipeline, url)
    where = _fix_in(source)
    client: Client | None = None
    try:
        client = connect(pipeline.settings, url, name=name)
        client.ping()
    except ValueError as exc:
        fail(
            f"{where}: {shown!r} is not a Redis URL ({exc}); use redis://host:port/db, "
            "rediss://host:port/db (TLS) or unix:///path/to/redis.sock",
            EXIT_USAGE,
        )
    except redis.AuthenticationError:
        _close(client)
        fail(f"Redis at {shown} refused the credentials: authentication failed; check the user and "
             f"password in {where}", EXIT_USAGE)  # fmt: skip
    except redis.ResponseError as exc:
        _close(client)
        text = str(exc)
        if "DB index is out of range" in text:
            fail(f"Redis at {shown} has no database {_db_of(url)}: {_databases(pipeline, url)}; fix the "
                 f"number at the end of {where}", EXIT_USAGE)  # fmt: skip
        if text.startswith(("NOAUTH", "WRONGPASS")):
            fail(f"Redis at {shown} requires a password ({text}); put it in {where} "
                 "(redis://:PASSWORD@host:port/db)", EXIT_USAGE)  # fmt: skip
        fail(f"Redis at {shown} refused the connection: {text}")
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        _close(client)
        if "CERTIFICATE_VERIFY_FAILED" in str(exc):
            fail(f"TLS: Redis at {shown} presented a certificate that does not verify ({exc}); set "
                 f"ssl_ca_certs=<the CA that signed it> in the query of {where}, and connect by a name "
                 "the certificate holds", EXIT_USAGE)  # fmt: skip
        if url.startswith("rediss://"):
            fail(f"Redis does not answer at {shown} ({exc}); is it running, and does the server ask for "
                 f"a client certificate (ssl_certfile, ssl_keyfile in the query of {where})?")  # fmt: skip
        fail(f"Redis does not answer at {shown} (from {source}); is it running? ({exc}) "
             f"{_hint(pipeline, where)}")  # fmt: skip
    _ORIGINS[client] = (url, source)
    return client


_ORIGINS: weakref.WeakKeyDictionary[Any, tuple[str, str]] = weakref.WeakKeyDictionary()


def origin_of(client: Client) -> tuple[str, str] | None:
    """The URL a client from :func:`client_for` uses and which setting gave it (:func:`url_source`)."""
    return _ORIGINS.get(client)


def url_source(pipeline: Pipeline, url: str) -> str:
    """Which setting gave the Redis URL in use, named as the user would look for it.

    The producer's ``AGENTWATCH_REDIS_URL`` fills in for a missing ``[redis] url`` (config.py),
    so a shell that still exports it for an agent silently points the CLI elsewhere: every
    message about the URL says where it came from, so the user fixes the right place.
    """
    configured = pipeline.settings.redis.url
    if configured and configured != EMBEDDED and configured == url:
        if os.environ.get(_URL_ENV):
            return _URL_ENV
        if _file_sets_url(pipeline.source):
            return f"[redis] url in {pipeline.source}"
        if os.environ.get(_PRODUCER_URL_ENV):
            return f"{_PRODUCER_URL_ENV}, the producer's variable"
        return "[redis] url"
    if url == DEFAULT_REDIS_URL:
        return "the default: nothing configured, and a server answers there"
    return "the embedded server a running `agentwatch up` recorded"


def _file_sets_url(source: str) -> bool:
    """Whether the pipeline file itself has ``[redis] url`` (not an override, not a fallback)."""
    if source.startswith("built-in"):
        return False
    try:
        with open(source, "rb") as handle:
            raw = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError):
        return False
    section = raw.get("redis")
    return isinstance(section, dict) and "url" in section


def _fix_in(source: str) -> str:
    """The place to fix a bad URL: the setting itself, without the explanation."""
    if source.startswith(_PRODUCER_URL_ENV):
        return _PRODUCER_URL_ENV
    return source if source.startswith(("[redis]", _URL_ENV)) else "[redis] url"


def _hint(pipeline: Pipeline, where: str) -> str:
    configured = pipeline.settings.redis.url
    if configured and configured != EMBEDDED:
        # `agentwatch up` does not embed a server when a URL is configured: say what does help.
        if where == _PRODUCER_URL_ENV:
            undo = f"unset {where} in this shell (the agents' variable: the CLI only falls back on it)"
        elif where == _URL_ENV:
            undo = f"unset {where} (or set it to embedded)"
        else:
            undo = 'remove [redis] url (or set url = "embedded")'

        return f"Start Redis at that URL, or {undo} so that `agentwatch up` runs an embedded one."
    return "`agentwatch up` embeds one."


def _db_of(url: str) -> str:
    """The database number a URL names (path ``/N`` or ``?db=N``), for the error message."""
    parts = urlsplit(url)
    return (parse_qs(parts.query).get("db") or [parts.path.strip("/") or "0"])[0]


def _databases(pipeline: Pipeline, url: str) -> str:
    """How many databases the server has (database 0 always exists), for the error message."""
    parts = urlsplit(url)
    probe: Client | None = None
    try:
        probe = connect(
            pipeline.settings, parts._replace(path="/0", query="").geturl(), name="agentwatch-cli"
        )
        reply: Any = probe.config_get("databases")
        count = int(reply.get("databases") or 0)
    except (redis.RedisError, OSError, ValueError):
        count = 0
    finally:
        _close(probe)
    if count:
        return f"it has {count} (0 to {count - 1}; its `databases` setting)"
    return "its `databases` setting allows 0 to N-1 (16 by default)"


def _close(client: Client | None) -> None:
    if client is not None:
        client.close()
