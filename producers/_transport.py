"""One Redis connection that XADDs batches of pre-encoded events, and names every failure.

Why the commands are packed here rather than by a redis-py ``Pipeline``: a flooding agent and
the sender share one GIL, so every microsecond of per-event work on the sender is a microsecond
the agent cannot run. Packing RESP for one fixed command shape costs a fraction of redis-py's
generic path; redis-py still owns the connection (URL forms, TLS, AUTH, Unix sockets) and
parses the replies.

Redis Cluster: every event of a producer goes to one key, hence one slot and one node. Pointed
at any node, the transport follows the first ``MOVED`` reply to the owner of that slot and stays
there; after a connection failure it starts again from the configured node.

Timeouts are short and there are no inline retries: the sender decides when to try again, so a
Redis that accepts connections and never answers costs one socket timeout per attempt, on the
sender thread only. The socket of a connection whose replies timed out (the handshake's
included) is kept open, unread (:attr:`stalled`), for the sender to :meth:`watch`: a paused Redis
answers on it the moment it resumes, and waiting on it is one blocking call, where each reconnect
costs the agent's thread several GIL hand-overs.
"""

from __future__ import annotations

import contextlib

# Imported here, at ``import producers`` time, because the first connection would otherwise
# import them on the sender thread (redis-py's ConnectionPool imports ``secrets``; resolving a
# host name loads the IDNA codec): imports hold the GIL for milliseconds, and the agent's
# thread would stall that long in whatever it was doing, ``heartbeat()`` included.
import encodings.idna  # noqa: F401
import functools
import secrets  # noqa: F401
import select
import socket
from dataclasses import dataclass, field
from typing import Any, Final

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError
from redis.retry import Retry

from agentwatch.urls import connection_options
from producers._guard import warn_once

_PING: Final = b"*1\r\n$4\r\nPING\r\n"


@dataclass
class Replies:
    """What happened to one batch of ``count`` commands."""

    count: int
    refused: dict[int, str] = field(default_factory=dict)
    """Commands Redis answered with an error (index -> drop reason); the others went through."""
    cut: int = -1
    """Commands from this index on got no reply (``-1``: all did)."""
    sent: bool = True
    """The whole batch went out: commands without a reply may have been executed."""
    error: BaseException | None = None
    """The transport error behind ``cut``, if any."""
    also: Any = None
    """The reply to the extra command sent after the batch (an exception if Redis refused it)."""

    @property
    def cut_reason(self) -> str:
        return reason_for(self.error) if self.error is not None else ""

    def delivered(self, index: int) -> bool:
        return index not in self.refused and (self.cut < 0 or index < self.cut)


class Transport:
    """XADD batches to one stream over one lazily made connection."""

    def __init__(self, url: str, stream: str, socket_timeout: float, maxlen: int) -> None:
        self._url = url
        self._timeout = socket_timeout
        self._conn: Any = None
        self._redirected = False
        self._kwargs: dict[str, Any] = {}
        key = stream.encode()
        command = (
            b"$4\r\nXADD\r\n$%d\r\n%s\r\n$6\r\nMAXLEN\r\n$1\r\n~\r\n$%d\r\n%d\r\n"
            b"$1\r\n*\r\n$1\r\nd\r\n" % (len(key), key, len(str(maxlen)), maxlen)
        )
        self._head = b"*8\r\n" + command
        self._head_signed = b"*10\r\n" + command  # ... d <event> s <signature>
        self.proven = False
        """The current connection has carried a batch (or a PING): big batches are safe."""
        self._silent: socket.socket | None = None
        """The socket of the last connection whose replies timed out, taken from redis-py and
        kept open, unread, only to be watched (:meth:`watch`); closed on the next attempt."""

    def send(
        self,
        payloads: list[bytes],
        signatures: list[bytes] | None = None,
        *,
        also: bytes = b"",
        redirected: bool = False,
    ) -> Replies:
        """XADD each payload as ``d`` (and its signature as ``s``, when signing); ``also`` (one
        packed command, e.g. the halt poll) rides at the end of the same write, its reply in
        :attr:`Replies.also`."""
        if signatures is None:
            head = self._head
            buffer = b"".join([head + b"$%d\r\n" % len(p) + p + b"\r\n" for p in payloads]) + also
        else:
            head, mark = self._head_signed, b"\r\n$1\r\ns\r\n"
            buffer = b"".join([head + b"$%d\r\n" % len(p) + p + mark + b"$%d\r\n" % len(s) + s + b"\r\n"
                               for p, s in zip(payloads, signatures, strict=True)]) + also  # fmt: skip
        count = len(payloads)
        conn = self._connection()
        # A connection idle for a while may have been closed by the server or a proxy: one
        # immediate resend on a fresh connection before anything counts as lost.
        attempts = 2 if conn.is_connected else 1
        for attempt in range(attempts):
            try:
                conn.send_packed_command([buffer], check_health=False)
                break
            except (RedisError, OSError) as exc:
                self._broken(conn)
                if attempt + 1 == attempts:
                    return Replies(count, cut=0, sent=False, error=exc)
        replies = Replies(count)
        moved = ""
        for index in range(count):
            try:
                conn.read_response(disconnect_on_error=False)
            except ResponseError as exc:  # one command refused (OOM, WRONGTYPE...): go on
                replies.refused[index] = reason_for(exc)
                target = _moved_to(exc)
                if target and not redirected:
                    moved = target  # followed below: not a refusal the user must hear about
                else:
                    warn_once(f"reply:{replies.refused[index]}", "agentwatch: Redis refused an "
                              "event (%s); such events are dropped and counted", exc)  # fmt: skip
            except (RedisError, OSError) as exc:
                self._failed(conn, exc)
                replies.cut, replies.error = index, exc
                return replies
        if also:
            try:
                replies.also = conn.read_response(disconnect_on_error=False)
            except ResponseError as exc:  # refused (an ACL, say): the batch still went through
                replies.also = exc
            except (RedisError, OSError) as exc:
                self._broken(conn)
                replies.also = exc  # every XADD was answered: nothing of the batch is lost
                return replies
        if moved and len(replies.refused) == count and not redirected:
            self._redirect(moved)  # nothing was written: send it all to the slot's owner
            return self.send(payloads, signatures, also=also, redirected=True)
        self.proven = True
        return replies

    def call(self, commands: list[bytes]) -> list[Any] | BaseException:
        """Send packed commands in one write; their replies (an error reply in its place), or
        the transport error. For the halt reads: the batches' own path stays :meth:`send`."""
        conn = self._connection()
        try:
            conn.send_packed_command([b"".join(commands)], check_health=False)
        except (RedisError, OSError) as exc:
            self._broken(conn)
            return exc
        out: list[Any] = []
        for _ in commands:
            try:
                out.append(conn.read_response(disconnect_on_error=False))
            except ResponseError as exc:
                out.append(exc)
            except (RedisError, OSError) as exc:
                self._failed(conn, exc)
                return exc
        return out

    def ping(self) -> BaseException | None:
        """PING (on a new connection if need be); the error, or ``None`` if Redis answered."""
        conn = self._connection()
        try:
            conn.send_packed_command([_PING], check_health=False)
        except (RedisError, OSError) as exc:
            self._broken(conn)
            return exc
        try:
            conn.read_response(disconnect_on_error=False)
        except (RedisError, OSError) as exc:
            self._failed(conn, exc)
            return exc
        self.proven = True
        return None

    @property
    def stalled(self) -> bool:
        """The last attempt timed out waiting for Redis, and its socket is kept to :meth:`watch`."""
        return self._silent is not None

    def watch(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the :attr:`stalled` connection to show a sign of life (a
        late reply, or the server closing it); True if it did: time to try Redis again.

        One blocking ``poll()`` with the GIL released for the whole wait. Sleeping and then
        reconnecting instead wakes the sender twice per try (the sleep's end, the timeout), each
        time for a burst of socket calls (name lookup, connect, send, close) during which the
        agent's thread, ``heartbeat()`` included, waits for the GIL. The late replies are never
        parsed: the connection is replaced, and what it carried is already counted
        (``unconfirmed``).
        """
        if self._silent is None:
            return False
        try:
            poller = select.poll()
            poller.register(self._silent, select.POLLIN)  # POLLHUP and POLLERR come anyway
            return bool(poller.poll(max(timeout, 0.0) * 1000))
        except (OSError, ValueError):  # not pollable any more: count it as a change
            return True

    def interrupt(self) -> None:
        """End a :meth:`watch` now, from another thread: the exit flush must not wait for it.

        Shuts the silent socket down (one system call, safe in a signal handler); the watch then
        sees it hang up and the sender tries Redis once more before giving up.
        """
        sock = self._silent
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._drop_silent()
        if self._conn is not None:
            with contextlib.suppress(Exception):  # the process is ending or the socket is gone
                self._conn.disconnect()

    def _failed(self, conn: Any, exc: BaseException) -> None:
        """A read failed: the connection is done for; after a timeout, its socket is kept."""
        if isinstance(exc, redis.exceptions.TimeoutError):
            self._keep_silent(conn)
        self._broken(conn)

    def _keep_silent(self, conn: Any) -> None:
        """Take the socket of a connection that timed out away from redis-py (which then drops
        the connection without closing it), to :meth:`watch` it."""
        sock = getattr(conn, "_sock", None)
        if isinstance(sock, socket.socket):
            self._drop_silent()
            conn._sock = None
            self._silent = sock

    def _drop_silent(self) -> None:
        if self._silent is not None:
            with contextlib.suppress(OSError):
                self._silent.close()
            self._silent = None

    def _broken(self, conn: Any) -> None:
        self.proven = False
        with contextlib.suppress(Exception):
            conn.disconnect()
        if self._redirected:  # the cluster may have moved on: ask the configured node again
            self._conn, self._redirected = None, False

    def _redirect(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        kwargs = dict(self._kwargs, host=host, port=int(port))
        with contextlib.suppress(Exception):
            self._conn.disconnect()
        self._conn = self._conn.__class__(**kwargs)
        self._redirected = True

    def _sized_then_handshake(self, conn: Any) -> None:
        """Connect hook: give the socket room for a whole batch, then redis-py's own handshake
        (HELLO), whose socket is kept to watch if Redis accepted the connection but never answers.

        Every socket call hands the GIL over and must win it back from the agent's thread, which
        a flooding agent holds for up to a switch interval (5 ms) at a time: with the default
        buffers a batch took ~10 writes and reads, and delivery was bounded by those waits
        (~120k events/s here), not by work. The kernel caps both at ``wmem_max``/``rmem_max``.
        """
        with contextlib.suppress(OSError, AttributeError):  # a socket that refuses keeps its defaults
            conn._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            conn._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
        # redis-py closes a connection whose handshake read times out; reading without that
        # (an instance attribute shadows the method for the handshake only) keeps the socket.
        try:
            conn.read_response = functools.partial(conn.read_response, disconnect_on_error=False)
        except AttributeError:  # a redis-py that forbids it: such a hung server is reconnected
            conn.on_connect()
            return
        try:
            conn.on_connect()
        except redis.exceptions.TimeoutError:
            self._keep_silent(conn)
            raise
        finally:
            del conn.read_response

    def _connection(self) -> Any:
        self._drop_silent()  # a new attempt: the old silent connection has had its chance
        if self._conn is None:
            options: dict[str, Any] = {
                "socket_timeout": self._timeout,
                "socket_connect_timeout": self._timeout,
                "retry": Retry(NoBackoff(), 0),  # the sender retries on its own schedule
                "health_check_interval": 0,
                "socket_read_size": 256 * 1024,
                "redis_connect_func": self._sized_then_handshake,
                **connection_options(self._url),  # TLS: the server's certificate is verified
            }
            # No CLIENT SETINFO on connect: the producer needs only XADD and PING, so an ACL
            # user limited to those works. redis-py >= 7 spells it driver_info, older lib_name.
            try:
                pool = redis.ConnectionPool.from_url(self._url, driver_info=None, **options)
                self._conn = pool.make_connection()
            except TypeError:
                pool = redis.ConnectionPool.from_url(self._url, lib_name=None, lib_version=None, **options)
                self._conn = pool.make_connection()
            self._kwargs = dict(pool.connection_kwargs)
        return self._conn


SEND_BUFFER: Final = 2 << 20
"""SO_SNDBUF asked for: a whole batch (10,000 beats, ~0.7 MB) goes out in one write."""
RECV_BUFFER: Final = 1 << 20
"""SO_RCVBUF asked for: a whole batch's replies (~220 KB) arrive in one read."""


def reason_for(exc: BaseException) -> str:
    """A short, stable drop reason for a Redis failure (what ``dropped`` is keyed by)."""
    errors = redis.exceptions
    text = str(exc)
    # redis-py maps an error reply's code (OOM, NOAUTH...) to a class and strips it from the
    # message; older versions keep it in the text. Check both.
    if isinstance(exc, errors.AuthenticationError | errors.AuthorizationError):
        return "redis_auth"
    if isinstance(exc, errors.NoPermissionError) or text.startswith(("NOAUTH", "WRONGPASS", "NOPERM")):
        return "redis_auth"
    if isinstance(exc, errors.OutOfMemoryError) or text.startswith("OOM"):
        return "redis_oom"
    if isinstance(exc, errors.ReadOnlyError) or text.startswith("READONLY"):
        return "redis_readonly"
    cluster = (errors.AskError, errors.ClusterDownError, errors.TryAgainError)  # AskError: MOVED too
    if isinstance(exc, cluster) or text.startswith(("MOVED", "ASK", "CLUSTERDOWN", "TRYAGAIN")):
        return "redis_cluster"
    if isinstance(exc, errors.TimeoutError | TimeoutError):
        return "redis_timeout"
    if isinstance(exc, errors.ConnectionError | OSError):
        return "redis_down"
    return "redis_error"


def _moved_to(exc: BaseException) -> str:
    """``host:port`` of a ``MOVED`` reply (redis-py's MovedError, or the raw text), else ''."""
    if isinstance(exc, redis.exceptions.MovedError):
        return f"{exc.host}:{exc.port}"
    text = str(exc)
    return text.rsplit(" ", 1)[-1] if text.startswith("MOVED ") else ""
