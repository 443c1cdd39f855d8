"""The worker runtime when Redis is up but refuses writes: full (maxmemory + noeviction) or a
read-only replica. Nothing may be acknowledged that was neither applied nor dead-lettered, and
the worker waits instead of crashing. Private servers only (spawn_redis)."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis

from agentwatch import codec
from agentwatch.codec import Event
from agentwatch.embedded import EmbeddedRedis
from agentwatch.keys import Keys
from agentwatch.redisconn import connect
from agentwatch.worker import Handler, Message, Worker

from conftest import free_port
from helpers import running, settings_for, wait_for


def beat(seq: int) -> bytes:
    return codec.encode({"v": 1, "agent": "bot", "kind": "beat", "ts": 1.0, "run": "r1", "seq": seq})


def oom_errors(admin: redis.Redis) -> int:
    """How many commands the server refused for memory so far."""
    return int(admin.info("errorstats").get("errorstat_OOM", {}).get("count", 0))


@pytest.fixture
def server(spawn_redis: Callable[..., EmbeddedRedis]) -> EmbeddedRedis:
    return spawn_redis()


@pytest.fixture
def admin(server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(server.url)
    client.config_set("maxmemory-policy", "noeviction")
    yield client
    client.close()


def make_worker(client: Any, prefix: str, handlers: list[Handler[Event]], **worker: Any) -> Worker[Event]:
    settings = settings_for(prefix, worker={"tick": "50ms", **worker})
    return Worker(
        client, settings, kind="detectors", streams=[Keys(prefix).events()], group="detectors",
        decode=codec.decode, handlers=handlers, retention_s=3600,
    )  # fmt: skip


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

    worker = make_worker(client, prefix, [Effects()], batch=100)
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
    worker = make_worker(client, prefix, [])
    try:
        with running(worker) as thread:
            wait_for(lambda: admin.exists(keys.events()) and admin.xinfo_groups(keys.events()), what="group")
            # Queued before Redis is full, executed at once: the worker reads the bad entry
            # from a Redis that takes reads and acks but no XADD.
            pipe = admin.pipeline(transaction=True)
            pipe.xadd(keys.events(), {"d": b"\xc1"})
            pipe.config_set("maxmemory", 1)
            bad_id = pipe.execute()[0]
            wait_for(lambda: oom_errors(admin) >= 2, what="the dead letter to be refused (and retried)")
            assert admin.xpending(keys.events(), "detectors")["pending"] == 1  # kept, not acked
            assert admin.xlen(keys.deadletter) == 0
            admin.config_set("maxmemory", 0)
            wait_for(lambda: admin.xlen(keys.deadletter) == 1, what="the dead letter written")
            wait_for(lambda: admin.xpending(keys.events(), "detectors")["pending"] == 0, what="then acked")
            assert thread.is_alive()
    finally:
        client.close()
    ((_, letter),) = admin.xrange(keys.deadletter)
    assert letter[b"id"] == bad_id and letter[b"reason"].startswith(b"not msgpack")


def test_a_dead_letter_write_that_fails_for_another_reason_is_not_acknowledged_either(
    redis_url: str, r: redis.Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    r.set(keys.deadletter, "not a stream")  # every XADD to it fails with WRONGTYPE
    bad_id = r.xadd(keys.events(), {"d": b"\xc1"})
    good_id = r.xadd(keys.events(), {"d": beat(1)})
    client = connect(settings_for(prefix, redis_url), redis_url)
    worker = make_worker(client, prefix, [])
    try:
        with running(worker) as thread:
            wait_for(lambda: worker.stats.errors >= 1, what="the refused dead letter counted as an error")
            pending = r.xpending_range(keys.events(), "detectors", "-", "+", 10)
            assert [p["message_id"] for p in pending] == [bad_id]  # the good one acked, the bad kept
            assert worker.stats.deadlettered == 0 and worker.stats.processed == 1
            r.delete(keys.deadletter)
            wait_for(lambda: r.xlen(keys.deadletter) == 1, what="the dead letter written on a retry")
            wait_for(lambda: r.xpending(keys.events(), "detectors")["pending"] == 0, what="then acked")
            assert thread.is_alive()
    finally:
        client.close()
    ((_, letter),) = r.xrange(keys.deadletter)
    assert letter[b"id"] == bad_id != good_id


def _stderr_lines(process: subprocess.Popen[str]) -> tuple[queue.Queue[str], threading.Thread]:
    """Lines of the process's stderr as they come (read in a thread that ends at EOF)."""
    assert process.stderr is not None
    lines: queue.Queue[str] = queue.Queue()
    stderr = process.stderr
    reader = threading.Thread(target=lambda: [lines.put(line) for line in stderr], daemon=True)
    reader.start()
    return lines, reader


def _await_line(lines: queue.Queue[str], marker: str, timeout: float = 15.0) -> str:
    seen = ""
    try:
        while marker not in seen:
            seen += lines.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"no {marker!r} within {timeout}s in:\n{seen}") from None
    return seen


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
    tmp_path: Path,
    refuse: tuple[str, Any, Any],
    allow: tuple[str, Any, Any],
    message: str,
) -> None:
    name, *args = refuse
    getattr(admin, name)(*[free_port() if a == "PORT" else a for a in args])
    env = {**os.environ, "AGENTWATCH_REDIS__URL": server.url, "AGENTWATCH_REDIS__PREFIX": prefix}
    process = subprocess.Popen(
        [sys.executable, "-m", "agentwatch", "worker", "detectors", "--log-level", "info"],
        env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines, reader = _stderr_lines(process)
    try:
        log = _await_line(lines, message)
        assert "retrying with backoff" in log
        assert process.poll() is None
        name, *args = allow
        getattr(admin, name)(*args)
        _await_line(lines, "Redis is back after")
        wait_for(lambda: admin.zcard(Keys(prefix).workers) == 1, timeout=15, what="the worker to register")
        assert process.poll() is None
    finally:
        process.terminate()
        code = process.wait(timeout=10)
        reader.join(5)
        assert process.stderr is not None
        process.stderr.close()
    assert code == 0
