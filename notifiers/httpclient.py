"""A lean HTTP/1.1 client for the webhook and PagerDuty notifiers: keep-alive connections to one
origin, every socket operation bounded by the attempt's deadline (notifiers/deadline.py).

Why not httpx: a notifier worker delivers on threads that share one GIL with its main thread,
and delivery CPU is what holds alerts back when the machine is busy (issue 17). One httpx POST
cost ~370 us of CPU on this project's benchmark machine, this client's ~90 us (``http.client``
builds and parses; a request goes out in one ``send``), and it makes fewer system calls per
request, each of which hands the GIL to another thread and waits to get it back. httpx stays for
a receiver behind a proxy from the environment (``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY``:
see :func:`proxied` and notifiers/http.py), which this client does not speak.

What it keeps from httpx: TLS verified against certifi's bundle (or ``SSL_CERT_FILE`` /
``SSL_CERT_DIR``, as httpx does), ``user:password@`` in the URL sent as Basic auth, redirects
not followed, a connection that served an answer reused, one that may have been closed while
idle checked first.
"""

from __future__ import annotations

import base64
import http.client
import io
import select
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from notifiers import deadline

READ_CAP = 8192
"""Bytes of an answer read at most: only a snippet is kept, for the failed-delivery record."""
_IDLE_CHECK_S = 0.5
"""A pooled connection idle for longer is checked (one poll) before reuse: the receiver may have
closed it. Within it the check is skipped: it costs a system call, i.e. a GIL hand-off."""
_SLACK_S = 0.05
"""How far a socket's timeout may be from what the deadline asks before it is set again: an
attempt may overrun its ``timeout`` by this much at most."""


class HttpError(Exception):
    """The request failed: refused, reset, DNS, TLS, a malformed answer... Its text starts with
    its kind, named as httpx names it (``ConnectError: [Errno 111] Connection refused``), which
    is what ``alerts`` and ``status`` show (docs/notifiers.md)."""

    def __init__(self, detail: str, kind: str | None = None) -> None:
        super().__init__(f"{kind or type(self).__name__}: {detail}")


class ConnectError(HttpError):
    """Connecting failed: refused, unreachable, DNS, the TLS handshake or certificate."""


class WriteError(HttpError):
    pass


class ReadError(HttpError):
    pass


class RemoteProtocolError(HttpError):
    """The receiver's answer is not HTTP, or it closed the connection without one."""


class HttpTimeout(HttpError):
    """A connect, write or read timed out, or the attempt's overall deadline ran out."""


class ConnectTimeout(HttpTimeout):
    pass


class WriteTimeout(HttpTimeout):
    pass


class ReadTimeout(HttpTimeout):
    pass


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    """Lower-case names."""
    body: str
    """The first :data:`READ_CAP` bytes, decoded leniently."""


def proxied(url: str) -> bool:
    """Whether the environment names a proxy for ``url``'s scheme (or ``ALL_PROXY``). Then the
    notifier keeps httpx, which applies ``NO_PROXY`` and the proxy exactly as it always did."""
    proxies = urllib.request.getproxies_environment()
    scheme = urllib.parse.urlsplit(url).scheme
    return bool(proxies.get(scheme) or proxies.get("all"))


def tls_context(verify: bool) -> ssl.SSLContext:
    """TLS as httpx sets it up: verified against certifi (or SSL_CERT_FILE / SSL_CERT_DIR)."""
    import httpx  # noqa: PLC0415 - only for https receivers: one definition of the trust store

    context = httpx.create_ssl_context(verify=verify)
    context.set_alpn_protocols(["http/1.1"])
    return context


class _Reader(io.RawIOBase):
    """The socket as ``http.client`` reads an answer from it: each read's timeout is cut to the
    time left before the attempt's deadline, so a receiver dribbling its status line, headers or
    body one byte at a time is cut off when the attempt's ``timeout`` runs out."""

    def __init__(self, conn: _Connection, sock: socket.socket) -> None:
        self.conn = conn
        self.sock = sock
        self.raw = sock.makefile("rb", buffering=0)  # keeps the socket open while we read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self.conn.bound(self.sock, ReadTimeout)
        with deadline.named(ReadTimeout):
            try:
                got = self.raw.readinto(buffer)
            except TimeoutError:
                got = None
            if got is None:  # None: "would block", which a socket with a timeout reports as one
                raise ReadTimeout("timed out reading the answer")
            return got

    def close(self) -> None:
        self.raw.close()
        super().close()


class _Sock:
    """What ``http.client.HTTPResponse`` gets instead of the socket: its ``makefile`` reads
    through :class:`_Reader`."""

    def __init__(self, conn: _Connection, sock: socket.socket) -> None:
        self.conn = conn
        self.sock = sock

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(_Reader(self.conn, self.sock))


class _Connection(http.client.HTTPConnection):
    """One keep-alive connection (HTTPS when ``context`` is given) whose connect, writes and
    reads all honour the attempt's deadline."""

    def __init__(self, host: str, port: int, connect_s: float, read_s: float,
                 context: ssl.SSLContext | None) -> None:  # fmt: skip
        super().__init__(host, port, timeout=connect_s)
        self.connect_s = connect_s
        self.read_s = read_s
        self.context = context
        self.timeout_now: float | None = None
        """The socket's timeout as last set (see :meth:`bound`)."""
        self.used_at = 0.0

    def connect(self) -> None:
        timeout = deadline.cap(self.connect_s, ConnectTimeout)
        with deadline.named(ConnectTimeout):
            raw: socket.socket | None = None
            try:
                raw = socket.create_connection((self.host, self.port), timeout)
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                tls = self.context
                sock = raw if tls is None else tls.wrap_socket(raw, server_hostname=self.host)
            except OSError as exc:  # refused, unreachable, DNS, TLS, or timed out
                if raw is not None:
                    raw.close()
                if isinstance(exc, TimeoutError):
                    raise ConnectTimeout(f"timed out connecting to {self.host}:{self.port}") from None
                raise ConnectError(str(exc)) from None
        self.sock = sock
        self.timeout_now = timeout

    def bound(self, sock: socket.socket, error: type[HttpTimeout]) -> None:
        """Set ``sock``'s timeout for the next operation: ``read_timeout``, cut to the time left
        before the deadline (``error`` once it has passed). A ``settimeout`` is a system call,
        i.e. a GIL hand-off, so the timeout is left as it is when within :data:`_SLACK_S` of
        what it should be: requests answered at once change nothing."""
        wanted = deadline.cap(self.read_s, error)
        if self.timeout_now is None or abs(self.timeout_now - wanted) > _SLACK_S:
            sock.settimeout(wanted)
            self.timeout_now = wanted

    def send(self, data: Any) -> None:
        if self.sock is None:
            self.connect()
        assert self.sock is not None
        self.bound(self.sock, WriteTimeout)
        with deadline.named(WriteTimeout):
            try:
                super().send(data)
            except TimeoutError:
                raise WriteTimeout("timed out sending the request") from None

    def response_class(self, sock: Any, method: str | None = None) -> http.client.HTTPResponse:  # type: ignore[override]
        return http.client.HTTPResponse(_Sock(self, sock), method=method)  # type: ignore[arg-type]

    def stale(self) -> bool:
        """A pooled connection the receiver closed (or wrote to unasked) while it was idle."""
        if self.sock is None:
            return False
        if time.monotonic() - self.used_at < _IDLE_CHECK_S:
            return False
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)


class Client:
    """Keep-alive connections to the origin of one URL, for a notifier's delivery threads."""

    def __init__(self, url: str, *, connect_s: float, read_s: float, verify_tls: bool, size: int,
                 headers: Mapping[str, str]) -> None:  # fmt: skip
        parts = urllib.parse.urlsplit(url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.https else 80)
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.headers = dict(headers)
        if parts.username is not None:  # as httpx: credentials in the URL are Basic auth
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"
        self.connect_s = connect_s
        self.read_s = read_s
        self.context = tls_context(verify_tls) if self.https else None
        self.size = size
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()

    def post(self, body: bytes, headers: Mapping[str, str]) -> Answer:
        """POST ``body``; call within :func:`notifiers.deadline.attempt`. Raises
        :class:`HttpTimeout` or :class:`HttpError`."""
        conn = self._take()
        failed: type[HttpError] = WriteError
        try:
            conn.request("POST", self.target, body=body, headers={**self.headers, **headers})
            failed = ReadError
            response = conn.getresponse()
            try:
                text = response.read(READ_CAP)
            except HttpTimeout:
                # A 2xx whose body dribbles past the deadline was still accepted: the body is
                # only a snippet for the failed-delivery record. Anything else is a timeout.
                if not 200 <= response.status < 300:
                    raise
                text = b""
            answer = Answer(response.status, {k.lower(): v for k, v in response.getheaders()},
                            text.decode(errors="replace"))  # fmt: skip
            if response.isclosed() and not response.will_close:
                conn.used_at = time.monotonic()
                self._give_back(conn)
            else:  # the answer was longer than we read, or the receiver closes: not reusable
                conn.close()
            return answer
        except HttpError:
            conn.close()
            raise
        except http.client.HTTPException as exc:  # not HTTP, or closed without an answer
            conn.close()
            raise RemoteProtocolError(str(exc) or type(exc).__name__) from None
        except TimeoutError:
            conn.close()
            raise ReadTimeout("timed out") from None
        except OSError as exc:  # reset, broken pipe, TLS
            conn.close()
            raise failed(str(exc) or type(exc).__name__) from None

    def _take(self) -> _Connection:
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if not conn.stale():
                    return conn
                conn.close()
        return _Connection(self.host, self.port, self.connect_s, self.read_s, self.context)

    def _give_back(self, conn: _Connection) -> None:
        with self._lock:
            if len(self._idle) < self.size:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
