"""The worker runtime when Redis is up but refuses writes: full (maxmemory + noeviction) or a
read-only replica. Nothing may be acknowledged that was neither applied nor dead-lettered, and
the worker waits instead of crashing (before this, a worker started on a full Redis exited 1,
and under ``up`` six such exits in a minute stopped the pipeline). Private servers only
(spawn_redis)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import redis

from agentwatch import codec
from agentwatch.codec import Event
from agentwatch.embedded import EmbeddedRedis
from agentwatch.keys import Keys
from agentwatch.redisconn import connect
from agentwatch.worker import Handler, Message

from conftest import free_port
from helpers import events_worker, running, settings_for, wait_for


def beat(seq: int) -> bytes:
    return codec.encode({"v": 1, "agent": "bot", "kind": "beat", "ts": 1.0, "run": "r1", "seq": seq})


def oom_errors(admin: redis.Redis) -> int:
    """How many commands the server refused for memory so far."""
    return int(admin.info("errorstats").get("errorstat_OOM", {}).get("count", 0))


def blocked_in_read(admin: redis.Redis) -> bool:
    """Whether a client of this server is blocked in XREADGROUP right now."""
    return any(c.get("cmd") == "xreadgroup" and "b" in c.get("flags", "") for c in admin.client_list())


@pytest.fixture
def server(spawn_redis: Callable[..., EmbeddedRedis]) -> EmbeddedRedis:
    return spawn_redis()


@pytest.fixture
def admin(server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(server.url)
    client.config_set("maxmemory-policy", "noeviction")
    yield client
    client.close()


def test_redis_filling_up_mid_batch_loses_nothing(
    server: EmbeddedRedis, admin: redis.Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    good_ids, bad_ids = set(), set()
    for seq in range(30):
        if seq % 7 == 3:  # bad input in the same batches: its dead letter is refused too
            bad_ids.add(admin.xadd(keys.events(), {"d": b"\xc1 not msgpack"}))
        good_ids.add(admin.xadd(keys.events(), {"d": beat(seq)}))
    client = connect(settings_for(prefix, server.url), server.url)

    class Effects(Handler[Event]):
        """One write per event; Redis fills up while it is at seq 10 of the first batch."""

        name = "effects"

        def on_batch(self, messages: Sequence[Message[Event]]) -> None:
            for _, event in messages:
                if event["seq"] == 10 and not admin.exists(f"{prefix}:filled"):
                    admin.set(f"{prefix}:filled", 1)
                    admin.config_set("maxmemory", 1)  # every write refused from now on
                client.sadd(f"{prefix}:effects", event["seq"])

    worker = events_worker(client, prefix, [Effects()], batch=100)
    try:
        with running(worker) as thread:
            wait_for(lambda: oom_errors(admin) >= 3, what="the worker to retry against the full Redis")
            assert thread.is_alive()
            assert admin.xpending(keys.events(), "detectors")["pending"] == len(good_ids | bad_ids)
            assert admin.xlen(keys.deadletter) == 0
            admin.config_set("maxmemory", 0)  # room made
            wait_for(lambda: admin.scard(f"{prefix}:effects") == 30, what="every event applied")
            wait_for(lambda: admin.xpending(keys.events(), "detectors")["pending"] == 0, what="all acked")
            assert thread.is_alive()
    finally:
        client.close()
    assert {int(x) for x in admin.smembers(f"{prefix}:effects")} == set(range(30))
    lettered = {fields[b"id"] for _, fields in admin.xrange(keys.deadletter)}
    assert lettered == bad_ids
    assert worker.stats.processed == 30 and worker.stats.deadlettered == len(bad_ids)


def test_a_dead_letter_refused_by_a_full_redis_is_not_acknowledged(
    server: EmbeddedRedis, admin: redis.Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    client = connect(settings_for(prefix, server.url), server.url)
    # Slow ticks, long reads: the worker spends its time blocked in XREADGROUP. (A tick refused
    # first would wait for a writable Redis before reading anything: not this test's case.)
    worker = events_worker(client, prefix, [], tick="1.5s", block="1.5s")
    try:
        with running(worker) as thread:
            wait_for(lambda: admin.exists(keys.events()) and admin.xinfo_groups(keys.events()), what="group")
            # Queued before Redis is full, executed at once while the worker waits in its read:
            # it reads the bad entry from a Redis that takes reads and acks but no XADD.
            wait_for(lambda: blocked_in_read(admin), what="the worker waiting in XREADGROUP")
            pipe = admin.pipeline(transaction=True)
            pipe.xadd(keys.events(), {"d": b"\xc1"})
            pipe.config_set("maxmemory", 1)
            bad_id = pipe.execute()[0]
            # Other writes (the worker's health) are refused too: first the entry read and held,
            # then refusals enough that its dead letter was among them, and still not acked.
            pending = lambda: admin.xpending(keys.events(), "detectors")["pending"]  # noqa: E731
            wait_for(lambda: pending() == 1, what="the bad entry read")
            refused = oom_errors(admin)
            wait_for(lambda: oom_errors(admin) >= refused + 2, what="the dead letter refused (and retried)")
            assert pending() == 1  # kept, not acked
            assert admin.xlen(keys.deadletter) == 0
            admin.config_set("maxmemory", 0)
            wait_for(lambda: admin.xlen(keys.deadletter) == 1, what="the dead letter written")
            wait_for(lambda: admin.xpending(keys.events(), "detectors")["pending"] == 0, what="then acked")
            assert thread.is_alive()
    finally:
        client.close()
    ((_, letter),) = admin.xrange(keys.deadletter)
    assert letter[b"id"] == bad_id and letter[b"reason"].startswith(b"not msgpack")


def test_a_dead_letter_refused_for_good_is_logged_and_acked_so_the_worker_goes_on(
    redis_url: str, r: redis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """WRONGTYPE (or an ACL) will refuse every retry: holding the entry back would wedge the
    worker on it forever, so it is acked, logged with its reason, and counted as an error."""
    keys = Keys(prefix)
    r.set(keys.deadletter, "not a stream")  # every XADD to it fails with WRONGTYPE
    bad_id = r.xadd(keys.events(), {"d": b"\xc1"})
    r.xadd(keys.events(), {"d": beat(1)})
    client = connect(settings_for(prefix, redis_url), redis_url)
    worker = events_worker(client, prefix, [])
    try:
        worker._setup()
        with caplog.at_level(logging.ERROR, logger="agentwatch.worker"):
            worker.run_once()
        assert r.xpending(keys.events(), "detectors")["pending"] == 0  # both acked
        assert (worker.stats.deadlettered, worker.stats.processed, worker.stats.errors) == (0, 1, 1)
        (record,) = [rec for rec in caplog.records if "cannot dead-letter" in rec.getMessage()]
        assert bad_id.decode() in record.getMessage() and "not msgpack" in record.getMessage()
        r.xadd(keys.events(), {"d": beat(2)})
        worker.run_once()  # and it goes on with what comes next
        assert worker.stats.processed == 2
    finally:
        client.close()


@pytest.mark.parametrize(
    ("refuse", "allow", "message"),
    [
        (("config_set", "maxmemory", 1), ("config_set", "maxmemory", 0),
         "Redis refuses writes: out of memory (maxmemory reached)"),
        (("replicaof", "127.0.0.1", "PORT"), ("replicaof", "NO", "ONE"),
         "Redis refuses writes: it is a read-only replica"),
    ],
    ids=["full", "read-only"],
)  # fmt: skip
def test_a_worker_started_on_a_redis_that_refuses_writes_waits_for_it(
    server: EmbeddedRedis,
    admin: redis.Redis,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
    refuse: tuple[str, Any, Any],
    allow: tuple[str, Any, Any],
    message: str,
) -> None:
    name, *args = refuse
    getattr(admin, name)(*[free_port() if a == "PORT" else a for a in args])
    client = connect(settings_for(prefix, server.url), server.url)
    worker = events_worker(client, prefix, [])
    caplog.set_level(logging.INFO, logger="agentwatch.worker")
    try:
        with running(worker) as thread:
            wait_for(lambda: message in caplog.text, what="the log line saying why it waits")
            assert "retrying with backoff" in caplog.text
            assert thread.is_alive() and admin.zcard(Keys(prefix).workers) == 0
            name, *args = allow
            getattr(admin, name)(*args)
            wait_for(lambda: admin.zcard(Keys(prefix).workers) == 1, what="the worker to start for real")
            assert "Redis is back after" in caplog.text
    finally:
        client.close()
