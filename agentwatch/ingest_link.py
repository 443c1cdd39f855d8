"""The HTTP server's own connection to Redis for the writes of the ping API, owned by its event loop.

Why not redis-py's synchronous client in a worker thread, as before: per ping, the hop to the
thread and back cost ~17 us of CPU and redis-py's pipeline ~20 us of Python packing and parsing,
together more than the bare HTTP server spends on a whole request. Here the writes that
:class:`~agentwatch.ingest_records.Batches` gathered (usually one script call, joined by
:func:`~agentwatch.ingest_records.merged`) are packed by hiredis in one C call, sent in one
write and their replies parsed by redis-py's hiredis parser, on a connection the event loop
reads itself: no thread, no pipeline object, and a slow Redis still never blocks the loop.

redis-py's asyncio connection does the handshake (AUTH, SELECT, TLS, the client name) with the
same options as every other client of the server (:func:`agentwatch.redisconn.async_pool`), so
this module knows nothing of it. A Redis Cluster keeps the threaded path (its pipelines route
and redirect commands; this link does not).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import hiredis
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ResponseError


class Link:
    """One connection, opened on first use and again after any error. One caller at a time
    (the writer's batches run one after the other), so replies come back in order."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self._conn: AbstractConnection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def execute(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` (tuples of str, bytes, int or float) in one write and read their
        replies in order; a command's own error (NOSCRIPT, say) is its reply. A connection
        error or timeout is raised (the link reconnects on its next use)."""
        conn = await self._connection()
        try:
            await conn.send_packed_command(b"".join([hiredis.pack_command(c) for c in commands]), False)
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await conn.read_response())
                except ResponseError as exc:
                    replies.append(exc)
        except BaseException:  # the connection's state is unknown (half a reply read): a new one
            self._conn = None
            await conn.disconnect(nowait=True)
            raise
        return replies

    async def _connection(self) -> AbstractConnection:
        loop = asyncio.get_running_loop()
        if self._conn is not None and self._loop is loop:
            return self._conn
        # none yet, or one made by an event loop that has ended (a test client makes one per
        # request): that loop's transport cannot be used from this one
        conn: AbstractConnection = self.pool.make_connection()  # type: ignore[no-untyped-call]
        await conn.connect()  # type: ignore[no-untyped-call]
        self._conn, self._loop = conn, loop
        return conn

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._loop is asyncio.get_running_loop():
            await conn.disconnect()
