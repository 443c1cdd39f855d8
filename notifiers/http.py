"""What the HTTP notifiers share: a pooled HTTP client each, timeouts, and answer handling.

The client is the lean one of notifiers/httpclient.py (a quarter of httpx's CPU per request, on
delivery threads that share the worker's GIL), or httpx when the environment sets a proxy for
the receiver's URL.

Timeouts: ``connect_timeout`` to open a connection, ``read_timeout`` for each wait on the
receiver, and ``timeout`` for the whole attempt. A receiver that accepts and never answers is
cut off by the read timeout; one that dribbles its status line, headers or body is cut off by the
overall deadline, which caps every socket operation of the attempt (notifiers/deadline.py), so an
attempt never outlives the lease ``timeout`` sizes. Redirects are not followed: a POST that is
redirected is almost always a wrong URL, and we say so rather than guess.

Answers: 2xx delivered; 429 retried after ``Retry-After`` (and the whole notifier waits, since
every other request would be refused too); 408, 425 and 5xx retried with backoff (503 honours
``Retry-After``); any other 4xx and 3xx fail for good, with the status and a body snippet.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import ClassVar, TypeVar

import httpx
from pydantic import Field, field_validator, model_validator

from agentwatch import __version__
from agentwatch.config import Seconds
from notifiers import deadline, httpclient
from notifiers.base import Notifier, NotifierConfig
from notifiers.delivery import Delivered, Delivery, Failed, Outcome, Retry
from notifiers.journal import BODY_SNIPPET

_CONNECT_TIMEOUT_S = 3.0
RETRYABLE_4XX = frozenset({408, 425, 429})
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
"""An HTTP field name: a token (RFC 9110 section 5.1)."""
_FRAMING = frozenset({"host", "content-length", "transfer-encoding", "connection"})
"""Headers the HTTP client owns: set by hand they would corrupt the request's framing."""
_NAMED = {"\r": "a carriage return (CR)", "\n": "a line feed (LF)"}


def header_problem(name: str, value: str) -> str | None:
    """What makes one configured header unusable, or ``None``. Checked at start-up: a CR or LF
    (say, from a ``${VAR}`` read from a file with its newline) would otherwise make every
    delivery fail inside the HTTP client, retried for a day, or split the request."""
    if not _HEADER_NAME.fullmatch(name):
        return f"{name!r} is not an HTTP header name (letters, digits and !#$%&'*+-.^_`|~ only)"
    if name.lower() in _FRAMING:
        return f"{name!r} is set by the HTTP client itself and cannot be configured"
    for char in value:
        if char != "\t" and not " " <= char <= "~":
            what = _NAMED.get(char, f"the character {char!r}")
            return (f"the value of {name!r} holds {what}: header values may hold printable ASCII and "
                    "tabs only (an unset variable, or one read from a file with its newline?)")  # fmt: skip
    return None


def check_url(value: str) -> str:
    """An absolute http(s) URL with a host, or a ValueError that says what is wrong with it."""
    try:
        url = httpx.URL(value)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ValueError(f"not a URL: {exc}") from None
    if url.scheme not in ("http", "https"):
        raise ValueError("URL must start with http:// or https://")
    if not url.host:
        raise ValueError("URL has no host")
    return value


class HttpConfig(NotifierConfig):
    url: str
    timeout_s: Seconds = Field(10.0, alias="timeout", gt=0, description="whole attempt")
    connect_timeout_s: Seconds | None = Field(None, alias="connect_timeout", gt=0, description="default: 3s")
    read_timeout_s: Seconds | None = Field(None, alias="read_timeout", gt=0, description="default: timeout")
    headers: dict[str, str] = Field(default_factory=dict, description="extra request headers")
    verify_tls: bool = True

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_url(value)

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            problem = header_problem(name, text)
            if problem is not None:
                raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _timeouts_fit(self) -> HttpConfig:
        if self.connect_timeout_s is not None and self.connect_timeout_s > self.timeout_s:
            raise ValueError("connect_timeout must not exceed timeout")
        if self.read_timeout_s is not None and self.read_timeout_s > self.timeout_s:
            raise ValueError("read_timeout must not exceed timeout")
        return self


H = TypeVar("H", bound=HttpConfig)


class HttpNotifier(Notifier[H]):
    """Base of notifiers that POST one request per alert; subclasses build the request."""

    Config: ClassVar[type[NotifierConfig]] = HttpConfig
    client: httpclient.Client | None = None
    """The lean client (notifiers/httpclient.py), for a receiver reached directly."""
    http: httpx.Client | None = None
    """httpx, for a receiver behind a proxy from the environment (:func:`httpclient.proxied`)."""

    def render(self, delivery: Delivery) -> tuple[bytes, dict[str, str]]:
        """The body and headers to POST for this delivery."""
        raise NotImplementedError

    def classify(self, status: int, headers: Mapping[str, str], body: str) -> Outcome:
        """Map the receiver's answer to an outcome (see the module docstring); ``headers`` have
        lower-case names."""
        if 200 <= status < 300:
            return Delivered(status)
        snippet = body[:BODY_SNIPPET]
        if status == 429:
            after = retry_after_s(headers.get("retry-after"))
            return Retry(f"HTTP 429 (rate limited{_after_text(after)})", status, snippet, after, pause=True)
        if status >= 500 or status in RETRYABLE_4XX:
            after = retry_after_s(headers.get("retry-after")) if status == 503 else None
            return Retry(f"HTTP {status}", status, snippet, after)
        if 300 <= status < 400:
            where = headers.get("location", "?")
            return Failed(f"HTTP {status} redirect to {where}: fix the notifier's url", status, snippet)
        return Failed(f"HTTP {status}", status, snippet)

    @property
    def attempt_budget_s(self) -> float:
        return self.config.timeout_s

    def open(self) -> None:
        cfg = self.config
        read = cfg.read_timeout_s or cfg.timeout_s
        connect = cfg.connect_timeout_s or min(_CONNECT_TIMEOUT_S, cfg.timeout_s)
        agent = {"User-Agent": f"agentwatch/{__version__}"}
        if not httpclient.proxied(cfg.url):
            self.client = httpclient.Client(
                cfg.url,
                connect_s=connect,
                read_s=read,
                verify_tls=cfg.verify_tls,
                size=cfg.concurrency,
                headers=agent,
            )
            return
        self.http = httpx.Client(
            timeout=httpx.Timeout(cfg.timeout_s, connect=connect, read=read, pool=cfg.timeout_s),
            limits=httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency),
            follow_redirects=False,
            verify=cfg.verify_tls,
            headers=agent,
        )
        deadline.install(self.http)
        self._url = httpx.URL(cfg.url)  # parsed once: parsing it per request costs ~40 us of GIL

    def close(self) -> None:
        for transport in (self.client, self.http):
            if transport is not None:
                transport.close()

    def deliver(self, delivery: Delivery) -> Outcome:
        body, headers = self.render(delivery)
        try:
            answer = self.post(body, {**headers, **self.config.headers})
        except httpclient.HttpTimeout as exc:
            return Retry(f"timed out ({exc})"[:300])
        except httpclient.HttpError as exc:  # refused, reset, DNS, TLS, a malformed answer...
            return Retry(str(exc)[:300])
        return self.classify(answer.status, answer.headers, answer.body)

    def post(self, body: bytes, headers: dict[str, str]) -> httpclient.Answer:
        """POST within the overall deadline (``timeout``), by whichever transport :meth:`open`
        chose. Raises :class:`~notifiers.httpclient.HttpTimeout` or ``HttpError``."""
        with deadline.attempt(self.config.timeout_s):
            if self.client is not None:
                return self.client.post(body, headers)
            try:
                return self._post_httpx(body, headers)
            except httpx.TimeoutException as exc:
                raise httpclient.HttpTimeout(str(exc), type(exc).__name__) from None
            except httpx.HTTPError as exc:
                raise httpclient.HttpError(str(exc), type(exc).__name__) from None

    def _post_httpx(self, body: bytes, headers: dict[str, str]) -> httpclient.Answer:
        assert self.http is not None
        with self.http.stream("POST", self._url, content=body, headers=headers) as response:
            chunks: list[bytes] = []
            size = 0
            try:
                for chunk in response.iter_raw():
                    chunks.append(chunk)
                    size += len(chunk)
                    if size >= httpclient.READ_CAP:
                        break
            except httpx.TimeoutException:
                # A 2xx whose body dribbles past the deadline was still accepted: the body is
                # only a snippet for the failed-delivery record. Anything else is a timeout.
                if not 200 <= response.status_code < 300:
                    raise
            text = b"".join(chunks)[: httpclient.READ_CAP].decode(errors="replace")
            return httpclient.Answer(response.status_code, dict(response.headers.items()), text)


def retry_after_s(value: str | None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date (RFC 9110)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


def _after_text(after: float | None) -> str:
    return f", Retry-After {after:g}s" if after is not None else ""
