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
from collections.abc import Sequence
from contextlib import suppress
from typing import Any

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError


class _Replies(asyncio.Protocol):
    """Replies as they arrive, handed in order to the batches waiting for them."""

    def __init__(self, conn: AbstractConnection, transport: asyncio.Transport) -> None:
        self.conn = conn
        """Kept: redis-py closes its connection's transport when the object is collected."""
        self.transport = transport
        self.reader = hiredis.Reader(protocolError=InvalidResponse, replyError=BaseParser.parse_error)
        self.waiting: deque[tuple[int, list[Any], asyncio.Future[list[Any]]]] = deque()
        self.lost: Exception | None = None

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiting = self.waiting
        while waiting:
            count, replies, future = waiting[0]
            while len(replies) < count:
                reply = self.reader.gets()
                if reply is False:
                    return
                replies.append(reply)
            waiting.popleft()
            if not future.done():
                future.set_result(replies)

    def eof_received(self) -> bool:
        return False  # close: a server that stops sending takes no more commands

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost is None:
            self.lost = RedisConnectionError(f"the connection to Redis was closed ({exc or 'by the server'})")
        self.fail(self.lost)

    def fail(self, error: Exception) -> None:
        for _, _, future in self.waiting:
            if not future.done():
                future.set_exception(error)
        self.waiting.clear()


class Link:
    """One connection, opened on first use and again after any error; replies come back in the
    order the commands went. One caller at a time (the writer's batches run one after the
    other): two callers opening a connection at once would each open one."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self._replies: _Replies | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def execute(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` (tuples of str, bytes, int or float) in one write and wait for their
        replies, in order; a command's own error (NOSCRIPT, say) is its reply, an exception
        instance. A lost connection or a reply later than the socket timeout is raised (redis-py's
        ConnectionError, TimeoutError), and the link reconnects on its next use.

        A connection that had been idle and turns out closed before any reply came (Redis
        restarted, or dropped it: ``timeout``, ``CLIENT KILL``) is replaced and the commands sent
        once more, as redis-py's own retry did on the threaded path: a connection closed while
        idle has, as far as the client can tell, not read them. Should Redis have run them all the
        same, the events are written twice, the second time numbered after the first (the write
        script's compare-and-set keeps seqs in order), as with redis-py's retry."""
        payload = b"".join([hiredis.pack_command(command) for command in commands])
        replies, fresh = await self._connection()
        got: list[Any] = []
        try:
            return await self._round_trip(replies, payload, len(commands), got)
        except RedisConnectionError:
            if fresh or got:
                raise
        replies, _ = await self._connection()
        return await self._round_trip(replies, payload, len(commands), [])

    async def _round_trip(self, replies: _Replies, payload: bytes, count: int, got: list[Any]) -> list[Any]:
        loop = self._loop
        assert loop is not None
        future: asyncio.Future[list[Any]] = loop.create_future()
        replies.waiting.append((count, got, future))
        replies.transport.write(payload)
        timeout = self.pool.connection_kwargs.get("socket_timeout")
        timer = None if timeout is None else loop.call_later(timeout, self._late, replies, future)
        try:
            return await future
        finally:
            if timer is not None:
                timer.cancel()

    def _late(self, replies: _Replies, future: asyncio.Future[list[Any]]) -> None:
        if not future.done():  # the replies left are now out of step: a new connection
            replies.lost = RedisTimeoutError("Redis did not answer in time")
            replies.fail(replies.lost)
            replies.transport.close()

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
        replies = _Replies(conn, transport)  # type: ignore[arg-type]
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
