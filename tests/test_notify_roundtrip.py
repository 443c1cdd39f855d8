"""``notifiers.queue.roundtrip``: the delivery threads' one round trip per delivery, packed by
hiredis instead of redis-py's pipeline, against a real Redis. It must answer exactly as the
pipeline does (an error reply returned in its place, not raised), take the pipeline when it
cannot pack (a cluster client, redis-py without hiredis), and survive a connection Redis
closed while it sat in the pool, as the pipeline does."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from agentwatch.keys import Keys
from notifiers import queue


def commands(keys: Keys) -> list[tuple[Any, ...]]:
    log = f"{keys.prefix}:rt:log"
    return [
        ("XADD", log, "MAXLEN", "~", 1000, "*", "id", "a1", "attempts", 2, "cost", 0.5),
        ("HINCRBY", f"{keys.prefix}:rt:stats", "hook:delivered", 1),
        ("HINCRBY", log, "x", 1),  # WRONGTYPE: an error reply in the middle
        ("EVALSHA", "0" * 40, 0),  # NOSCRIPT
        ("GET", f"{keys.prefix}:rt:missing"),
        ("ECHO", "ünïcode"),
    ]


def check(replies: list[Any], stats: int) -> None:
    assert isinstance(replies[0], bytes) and b"-" in replies[0]
    assert replies[1] == stats
    assert isinstance(replies[2], redis.ResponseError) and "WRONGTYPE" in str(replies[2])
    assert isinstance(replies[3], redis.exceptions.NoScriptError)
    assert replies[4] is None
    assert replies[5] == "ünïcode".encode()


def test_replies_match_the_pipeline_errors_included(
    r: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert queue._pack is not None  # the dev install has hiredis: the fast path is under test
    check(queue.roundtrip(r, commands(keys)), 1)
    monkeypatch.setattr(queue, "_pack", None)  # what a cluster client or no hiredis takes
    check(queue.roundtrip(r, commands(keys)), 2)
    (_, fields), _ = r.xrange(f"{keys.prefix}:rt:log")
    assert fields == {b"id": b"a1", b"attempts": b"2", b"cost": b"0.5"}


def test_a_connection_redis_closed_is_replaced(r: redis.Redis, keys: Keys) -> None:
    queue.roundtrip(r, [("PING",)])
    conn = r.connection_pool.get_connection()
    conn.send_command("CLIENT", "ID")
    own_id = conn.read_response()
    r.connection_pool.release(conn)
    helper = redis.Redis(connection_pool=redis.ConnectionPool.from_url(_url(r)))
    assert helper.client_kill_filter(_id=own_id) == 1  # the pooled connection is dead now
    helper.close()
    check(queue.roundtrip(r, commands(keys)), 1)


def _url(r: redis.Redis) -> str:
    kwargs = r.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    return f"redis://{kwargs.get('host', '127.0.0.1')}:{kwargs.get('port', 6379)}"
