"""The HTTP server's shared fleet status (FleetCache): read once for every viewer, served stale
while one thread re-reads it, and never hiding a Redis outage behind old data."""

from __future__ import annotations

from typing import Any

import redis

from agentwatch.config import Pipeline
from agentwatch.http.server import Server

from helpers import settings_for, wait_for


def server_on(prefix: str, url: str, cache_s: float) -> Server:
    return Server(Pipeline(settings=settings_for(prefix, url), source="test"), url, cache_s=cache_s)


def test_one_read_serves_every_caller_until_it_is_old(prefix: str, redis_url: str) -> None:
    server = server_on(prefix, redis_url, cache_s=60)
    first = server.fleet.get()
    assert server.fleet.get() is first
    order: list[Any] = []
    _, built = server.fleet.derived("names", lambda status: order.append(1) or len(status["agents"]))
    _, again = server.fleet.derived("names", lambda status: order.append(2) or -1)
    assert (built, again, order) == (0, 0, [1])  # built once per status read
    server.client.close()


def test_an_old_status_is_served_while_it_is_read_again(prefix: str, redis_url: str) -> None:
    server = server_on(prefix, redis_url, cache_s=0.0)
    first = server.fleet.get()
    assert server.fleet.get() is first  # stale, served at once; a thread reads the next one
    wait_for(lambda: server.fleet.get() is not first, timeout=10, what="the background read")
    server.client.close()


def test_a_failed_read_reaches_the_next_caller(prefix: str, spawn_redis: Any) -> None:
    backend = spawn_redis()
    server = server_on(prefix, backend.url, cache_s=0.0)
    server.fleet.get()
    backend.stop()

    def raised() -> bool:
        try:
            server.fleet.get()  # the stale status, until the background read has failed
        except redis.ConnectionError:
            return True
        return False

    wait_for(raised, timeout=60, what="the outage to surface")
    backend.start()
    wait_for(lambda: _reads(server), timeout=60, what="recovery")
    server.client.close()


def _reads(server: Server) -> bool:
    try:
        return bool(server.fleet.get())
    except redis.ConnectionError:
        return False
