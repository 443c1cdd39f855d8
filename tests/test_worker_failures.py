"""The worker runtime when things go wrong for real: SIGKILL, SIGTERM, Redis vanishing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis

from agentwatch import codec
from agentwatch.codec import Event
from agentwatch.embedded import EmbeddedRedis
from agentwatch.keys import Keys
from agentwatch.redisconn import connect
from agentwatch.worker import Handler, Message, Worker

from helpers import running, settings_for, wait_for

TESTS = Path(__file__).resolve().parent

EFFECTS_WORKER = """
import sys, time
sys.path.insert(0, {tests!r})
from agentwatch import codec
from agentwatch.keys import Keys
from agentwatch.redisconn import connect
from agentwatch.worker import Handler, Worker
from helpers import settings_for

prefix, url = sys.argv[1], sys.argv[2]
settings = settings_for(prefix, url, worker={{"batch": 50}})
client = connect(settings, url)

class Effects(Handler):
    name = "effects"
    def on_batch(self, messages):
        for _, event in messages:
            client.sadd(prefix + ":effects", event["seq"])
            if event["seq"] == 25:
                client.set(prefix + ":stuck", 1)
                time.sleep(3600)  # stuck mid-batch: the test SIGKILLs us here

Worker(client, settings, kind="detectors", streams=[Keys(prefix).events()], group="detectors",
       decode=codec.decode, handlers=[Effects()], retention_s=3600).run()
"""


def beat(seq: int) -> bytes:
    return codec.encode({"v": 1, "agent": "bot", "kind": "beat", "ts": 1.0, "run": "r1", "seq": seq})


class Effects(Handler[Event]):
    """Applies one idempotent effect per event: SADD of its seq."""

    name = "effects"

    def __init__(self, client: Any, prefix: str) -> None:
        self.client, self.key = client, f"{prefix}:effects"

    def on_batch(self, messages: Sequence[Message[Event]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for _, event in messages:
            pipe.sadd(self.key, event["seq"])
        pipe.execute()


def worker_for(client: Any, prefix: str, handlers: list[Handler[Event]], **worker: Any) -> Worker[Event]:
    settings = settings_for(prefix, worker={"tick": "50ms", **worker})
    return Worker(
        client, settings, kind="detectors", streams=[Keys(prefix).events()], group="detectors",
        decode=codec.decode, handlers=handlers, retention_s=3600,
    )  # fmt: skip


def test_a_worker_sigkilled_mid_batch_loses_nothing(redis_url: str, prefix: str, r: redis.Redis) -> None:
    keys = Keys(prefix)
    for seq in range(100):
        r.xadd(keys.events(), {"d": beat(seq)})
    victim = subprocess.Popen(
        [sys.executable, "-c", EFFECTS_WORKER.format(tests=str(TESTS)), prefix, redis_url],
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: r.exists(f"{prefix}:stuck"), timeout=20, what="the victim to get stuck mid-batch")
    finally:
        victim.kill()
        victim.wait()
    assert r.scard(f"{prefix}:effects") == 26  # seq 0..25 applied, then killed mid-batch
    assert r.xpending(keys.events(), "detectors")["pending"] == 50  # its whole batch, unacked

    client = connect(settings_for(prefix, redis_url), redis_url)
    try:
        rescuer = worker_for(client, prefix, [Effects(client, prefix)], claim_idle="200ms")
        with running(rescuer):
            wait_for(lambda: r.scard(f"{prefix}:effects") == 100, what="every event's effect")
            wait_for(lambda: r.xpending(keys.events(), "detectors")["pending"] == 0, what="nothing pending")
    finally:
        client.close()
    assert rescuer.stats.reclaimed == 50
    assert {int(x) for x in r.smembers(f"{prefix}:effects")} == set(range(100))


def test_redis_restarted_under_a_running_worker(
    spawn_redis: Callable[..., EmbeddedRedis], prefix: str
) -> None:
    server = spawn_redis()
    plain = redis.Redis.from_url(server.url)
    client = connect(settings_for(prefix, server.url), server.url)
    keys = Keys(prefix)
    seen: list[int] = []

    class Collect(Handler[Event]):
        name = "collect"

        def on_batch(self, messages: Sequence[Message[Event]]) -> None:
            seen.extend(event["seq"] for _, event in messages)

    worker = worker_for(client, prefix, [Collect()])
    try:
        with running(worker) as thread:
            plain.xadd(keys.events(), {"d": beat(1)})
            wait_for(lambda: seen == [1])
            server.kill()  # abrupt: no shutdown, all data gone (no persistence)
            time.sleep(0.3)  # the worker notices while Redis is really gone
            assert thread.is_alive()
            server.start()
            plain.xadd(keys.events(), {"d": beat(2)})
            wait_for(lambda: seen == [1, 2], timeout=15, what="events after the restart")
            assert thread.is_alive()
    finally:
        plain.close()
        client.close()


def test_a_worker_started_before_redis_waits_for_it(
    spawn_redis: Callable[..., EmbeddedRedis], prefix: str
) -> None:
    server = spawn_redis()
    server.stop()
    client = connect(settings_for(prefix, server.url), server.url)
    seen: list[int] = []

    class Collect(Handler[Event]):
        name = "collect"

        def on_batch(self, messages: Sequence[Message[Event]]) -> None:
            seen.extend(event["seq"] for _, event in messages)

    worker = worker_for(client, prefix, [Collect()])
    try:
        with running(worker) as thread:
            time.sleep(0.3)
            assert thread.is_alive() and seen == []
            server.start()
            plain = redis.Redis.from_url(server.url)
            plain.xadd(Keys(prefix).events(), {"d": beat(7)})
            plain.close()
            wait_for(lambda: seen == [7], timeout=15, what="the worker to connect and process")
    finally:
        client.close()


def test_sigterm_finishes_and_exits_0_within_2s(
    redis_url: str, prefix: str, r: redis.Redis, tmp_path: Path
) -> None:
    env = {**os.environ, "AGENTWATCH_REDIS__URL": redis_url, "AGENTWATCH_REDIS__PREFIX": prefix}
    process = subprocess.Popen(
        [sys.executable, "-m", "agentwatch", "worker", "detectors", "--log-level", "warning"],
        env=env, cwd=tmp_path, stderr=subprocess.PIPE,
    )  # fmt: skip
    keys = Keys(prefix)
    try:
        wait_for(lambda: r.zcard(keys.workers) == 1, timeout=20, what="the worker to register")
        r.xadd(keys.events(), {"d": beat(1)})
        wait_for(lambda: r.xinfo_groups(keys.events())[0]["pending"] == 0 and
                 r.xinfo_groups(keys.events())[0]["entries-read"] == 1)  # fmt: skip
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=5)
        elapsed = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stderr is not None
        stderr = process.stderr.read().decode()
        process.stderr.close()
    assert code == 0, stderr
    assert elapsed < 2.0
    assert r.zcard(keys.workers) == 0  # deregistered on the way out


def test_stop_returns_within_one_block(redis_url: str, prefix: str, r: redis.Redis) -> None:
    client = connect(settings_for(prefix, redis_url), redis_url)
    worker = worker_for(client, prefix, [], block="1s", tick="1s")
    thread = threading.Thread(target=worker.run, kwargs={"install_signals": False})
    thread.start()
    try:
        wait_for(lambda: r.zcard(Keys(prefix).workers) == 1, what="the worker to start")
        started = time.monotonic()
        worker.stop()
        thread.join(3)
        assert not thread.is_alive()
        assert time.monotonic() - started < 1.5  # bounded by one BLOCK
    finally:
        client.close()
