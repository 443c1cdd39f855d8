"""The HTTP server's own connection to Redis for the writes of the ping API, owned by its event loop.

Why not redis-py's synchronous client in a worker thread, as before: per ping, the hop to the
thread and back cost ~17 us of CPU and redis-py's pipeline ~20 us of Python packing and parsing,
together more than the bare HTTP server spends on a whole request. Here the writes that
:class:`~agentwatch.ingest_records.Batches` gathered (usually one script call, joined by
:func:`~agentwatch.ingest_records.merged`) are packed by hiredis in one C call, sent in one
write, and their replies parsed by hiredis as the bytes arrive, in an asyncio protocol: no
thread, no pipeline, no stream reader, and a slow Redis still never blocks the loop.

redis-py's asyncio connection does the handshake (TLS, AUTH, SELECT, the client name) with the
same options as every other client of the server (:func:`agentwatch.redisconn.async_pool`);
then its transport is handed to :class:`_Replies`, so this module knows nothing of the
handshake. Reply errors are redis-py's own classes (its parser's table, with agentwatch's
additions: agentwatch/redisconn.py), so a Redis that refuses writes is answered as before. A
Redis Cluster keeps the threaded path (its pipelines route and redirect commands; this does not).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from contextlib import suppress
from typing import Any

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

Deliver = Callable[[list[Any] | Exception], None]
"""What takes a write's replies, or the exception that ended them; called once, from the event loop."""


class _Sent:
    """One write's commands, waiting for their replies."""

    __slots__ = ("count", "deadline", "deliver", "may_retry", "payload", "replies")

    def __init__(self, count: int, deliver: Deliver, payload: bytes, may_retry: bool) -> None:
        self.count = count
        self.deliver = deliver
        self.payload = payload
        """Kept for the one retry of a write whose connection was found closed (:meth:`Link.send`)."""
        self.may_retry = may_retry
        self.replies: list[Any] = []
        self.deadline = 0.0


class _Replies(asyncio.Protocol):
    """Replies as they arrive, handed in order to the writes waiting for them; one timer watches
    the oldest write's deadline (a timer per write cost more than the rest of its round trip)."""

    def __init__(self, link: Link, conn: AbstractConnection, transport: asyncio.Transport,
                 loop: asyncio.AbstractEventLoop) -> None:  # fmt: skip
        self.link = link
        self.conn = conn
        """Kept: redis-py closes its connection's transport when the object is collected."""
        self.transport = transport
        self.loop = loop
        self.reader = hiredis.Reader(protocolError=InvalidResponse, replyError=BaseParser.parse_error)
        self.waiting: deque[_Sent] = deque()
        self.lost: Exception | None = None
        self.timer: asyncio.TimerHandle | None = None

    def post(self, sent: _Sent, timeout: float | None) -> None:
        """Send ``sent``'s commands; it is delivered their replies, or the error that ended them."""
        if timeout is not None:
            sent.deadline = self.loop.time() + timeout
            if self.timer is None:
                self.timer = self.loop.call_at(sent.deadline, self._watch)
        self.waiting.append(sent)
        self.transport.write(sent.payload)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiting = self.waiting
        while waiting:
            sent = waiting[0]
            replies = sent.replies
            while len(replies) < sent.count:
                reply = self.reader.gets()
                if reply is False:
                    return
                replies.append(reply)
            waiting.popleft()
            sent.deliver(replies)

    def _watch(self) -> None:
        """The oldest write's deadline: past it, a late reply (a new connection, since the replies
        left are now out of step); else wait for it, or for the next write's."""
        self.timer = None
        if not self.waiting or self.lost is not None:
            return
        deadline = self.waiting[0].deadline
        if deadline - self.loop.time() > _EARLY_S:
            self.timer = self.loop.call_at(deadline, self._watch)
            return
        self.lost = RedisTimeoutError("Redis did not answer in time")
        self.fail(self.lost)
        self.transport.close()

    def eof_received(self) -> bool:
        return False  # close: a server that stops sending takes no more commands

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost is None:
            self.lost = RedisConnectionError(f"the connection to Redis was closed ({exc or 'by the server'})")
        self.fail(self.lost)

    def fail(self, error: Exception) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        waiting, self.waiting = self.waiting, deque()
        for sent in waiting:
            if isinstance(error, RedisConnectionError) and sent.may_retry and not sent.replies:
                self.link.retry(sent, self.loop)
            else:
                sent.deliver(error)


_EARLY_S = 0.001
"""How early the event loop may run a timer (its clock's resolution, and more): not yet late."""


class Link:
    """One connection, opened on first use and again after any error; replies come back in the
    order the commands went. One caller at a time (the writer's batches run one after the
    other): two callers opening a connection at once would each open one."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.timeout: float | None = pool.connection_kwargs.get("socket_timeout")
        self._replies: _Replies | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def execute(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` and wait for their replies (:meth:`send` from a coroutine)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()

        def deliver(outcome: list[Any] | Exception) -> None:
            if future.done():  # the caller was cancelled
                return
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

        self.send(commands, loop, deliver)
        return await future

    def send(
        self, commands: Sequence[tuple[Any, ...]], loop: asyncio.AbstractEventLoop, deliver: Deliver
    ) -> None:
        """Send ``commands`` (tuples of str, bytes, int or float) in one write; ``deliver`` is
        called, from ``loop`` (the running one), with their replies, in order, a command's own
        error (NOSCRIPT, say) being its reply, an exception instance; or with the exception that
        ended them: a lost connection or a reply later than the socket timeout (redis-py's
        ConnectionError, TimeoutError), after which the link reconnects on its next use.

        A callback, not a future: the ping API's batches (agentwatch/ingest_records.py
        :class:`Batches`) hand out their replies as they are read, and send the next batch,
        without a task or a future's callback to schedule (each an extra turn of the event loop
        per round trip). On an open connection the commands go at once.

        A connection that had been idle and turns out closed before any reply came (Redis
        restarted, or dropped it: ``timeout``, ``CLIENT KILL``) is replaced and the commands sent
        once more, as redis-py's own retry did on the threaded path: a connection closed while
        idle has, as far as the client can tell, not read them. Should Redis have run them all the
        same, the events are written twice, the second time numbered after the first (the write
        script's compare-and-set keeps seqs in order), as with redis-py's retry."""
        payload = b"".join([hiredis.pack_command(command) for command in commands])
        sent = _Sent(len(commands), deliver, payload, may_retry=True)
        replies = self._replies
        if replies is not None and replies.lost is None and self._loop is loop:
            replies.post(sent, self.timeout)
        else:
            self._spawn(self._connect_and_post(sent), loop)

    def retry(self, sent: _Sent, loop: asyncio.AbstractEventLoop) -> None:
        """Send ``sent`` once more, on a new connection (see :meth:`send`)."""
        self._spawn(
            self._connect_and_post(_Sent(sent.count, sent.deliver, sent.payload, may_retry=False)), loop
        )

    def _spawn(self, opening: Coroutine[Any, Any, None], loop: asyncio.AbstractEventLoop) -> None:
        """Run ``opening`` (a connection to open, then a write) as a task, kept until it ends."""
        task = loop.create_task(opening)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect_and_post(self, sent: _Sent) -> None:
        try:
            replies, fresh = await self._connection()
        except Exception as exc:  # the connection's own error (refused, AUTH...): the write's
            sent.deliver(exc)
            return
        sent.may_retry = sent.may_retry and not fresh  # a connection opened just now was not idle
        replies.post(sent, self.timeout)

    async def _connection(self) -> tuple[_Replies, bool]:
        """The connection, and whether it was opened just now."""
        loop = asyncio.get_running_loop()
        replies = self._replies
        if replies is not None:
            if replies.lost is None and self._loop is loop:
                return replies, False
            await self._discard(replies)
        conn: AbstractConnection = self.pool.make_connection()  # type: ignore[no-untyped-call]
        await conn.connect()  # type: ignore[no-untyped-call]
        transport = conn._writer.transport  # type: ignore[union-attr]  # the handshake is done: ours now
        replies = _Replies(self, conn, transport, loop)  # type: ignore[arg-type]
        transport.set_protocol(replies)
        self._replies, self._loop = replies, loop
        return replies, True

    async def _discard(self, replies: _Replies) -> None:
        """Close a connection that was lost, timed out, or belongs to an event loop that has
        ended (a test client makes one per request: nothing can be done with that one)."""
        self._replies = None
        if self._loop is asyncio.get_running_loop():
            with suppress(RedisError, OSError):
                await replies.conn.disconnect(nowait=True)

    async def close(self) -> None:
        """Close the connection (the server's shutdown); a later use opens a new one."""
        if self._replies is not None:
            await self._discard(self._replies)
