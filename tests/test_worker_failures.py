"""The worker runtime when things go wrong for real: SIGKILL, SIGTERM, Redis vanishing."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
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
from agentwatch.worker import Handler, Message

from helpers import events_worker, running, settings_for, wait_for

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
        rescuer = events_worker(client, prefix, [Effects(client, prefix)], claim_idle="200ms")
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

    worker = events_worker(client, prefix, [Collect()])
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

    worker = events_worker(client, prefix, [Collect()])
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
    worker = events_worker(client, prefix, [], block="1s", tick="1s")
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


SLOW_WORKER = """
import sys, time
sys.path.insert(0, {tests!r})
from agentwatch import codec
from agentwatch.keys import Keys
from agentwatch.redisconn import connect
from agentwatch.worker import Handler, Worker
from helpers import settings_for

prefix, url = sys.argv[1], sys.argv[2]
settings = settings_for(prefix, url, worker={{"batch": 10}})
client = connect(settings, url)

class Slow(Handler):
    name = "slow"
    def on_batch(self, messages):
        client.set(prefix + ":in-batch", 1)
        for _, event in messages:
            time.sleep(0.05)
            client.sadd(prefix + ":effects", event["seq"])

Worker(client, settings, kind="detectors", streams=[Keys(prefix).events()], group="detectors",
       decode=codec.decode, handlers=[Slow()], retention_s=3600).run()
"""


def _sigterm(process: subprocess.Popen[bytes]) -> tuple[int, float, str]:
    """SIGTERM ``process``; (exit code, seconds until it exited, its stderr)."""
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    elapsed = time.monotonic() - started
    assert process.stderr is not None
    stderr = process.stderr.read().decode()
    process.stderr.close()
    return code, elapsed, stderr


def test_sigterm_mid_batch_finishes_the_batch_acks_it_and_exits_0_within_2s(
    redis_url: str, prefix: str, r: redis.Redis
) -> None:
    keys = Keys(prefix)
    for seq in range(10):
        r.xadd(keys.events(), {"d": beat(seq)})
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_WORKER.format(tests=str(TESTS)), prefix, redis_url],
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: r.exists(f"{prefix}:in-batch"), timeout=20, what="the worker inside its batch")
    finally:
        code, elapsed, stderr = _sigterm(process)
    assert code == 0, stderr
    assert elapsed < 2.0
    assert r.scard(f"{prefix}:effects") == 10  # the signal landed at the first entry; all applied
    assert r.xpending(keys.events(), "detectors")["pending"] == 0


class Mute:
    """A TCP server that accepts connections and reads requests but never answers: a hung Redis."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.received = 0
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                self.conns.append(conn)
                threading.Thread(target=self._swallow, args=(conn,), daemon=True).start()

    def _swallow(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := conn.recv(4096):
                self.received += len(chunk)

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


def _cli_worker(url: str, prefix: str, cwd: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "AGENTWATCH_REDIS__URL": url, "AGENTWATCH_REDIS__PREFIX": prefix}
    return subprocess.Popen(
        [sys.executable, "-m", "agentwatch", "worker", "detectors", "--log-level", "warning"],
        env=env, cwd=cwd, stderr=subprocess.PIPE,
    )  # fmt: skip


def test_sigterm_exits_0_within_2s_when_redis_accepts_but_never_answers(prefix: str, tmp_path: Path) -> None:
    mute = Mute()
    try:
        process = _cli_worker(f"redis://127.0.0.1:{mute.port}/0", prefix, tmp_path)
        try:
            wait_for(lambda: mute.received > 0, timeout=20, what="the worker to wait for a reply")
        finally:
            code, elapsed, stderr = _sigterm(process)
    finally:
        mute.close()
    assert code == 0, stderr
    assert elapsed < 2.5  # 2 s + margin for the interpreter's exit
    assert "Redis does not answer while the worker stops" in stderr


def test_sigterm_exits_0_within_2s_when_redis_is_sigstopped(
    spawn_redis: Callable[..., EmbeddedRedis], prefix: str, tmp_path: Path
) -> None:
    server = spawn_redis()
    admin = redis.Redis.from_url(server.url)
    process = _cli_worker(server.url, prefix, tmp_path)
    assert server.process is not None
    try:
        wait_for(lambda: admin.zcard(Keys(prefix).workers) == 1, timeout=20, what="the worker to register")
        os.kill(server.process.pid, signal.SIGSTOP)  # hangs whatever the worker asks next, or now
        code, elapsed, stderr = _sigterm(process)
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
        admin.close()
    assert code == 0, stderr
    assert elapsed < 2.5


def test_redis_restarted_with_persistence_during_a_batch_loses_nothing(
    spawn_redis: Callable[..., EmbeddedRedis], prefix: str
) -> None:
    server = spawn_redis(persist=True)
    admin = redis.Redis.from_url(server.url)
    admin.config_set("appendfsync", "always")  # what was acknowledged survives a SIGKILL
    keys = Keys(prefix)
    for seq in range(200):
        admin.xadd(keys.events(), {"d": beat(seq)})
    client = connect(settings_for(prefix, server.url), server.url)
    reached, released = threading.Event(), threading.Event()

    class Counted(Handler[Event]):
        """Counts each application of each event's effect (idempotent: a set of seqs)."""

        name = "counted"

        def on_batch(self, messages: Sequence[Message[Event]]) -> None:
            for _, event in messages:
                if event["seq"] == 50 and not reached.is_set():
                    reached.set()
                    released.wait(10)  # the server is killed and restarted right here
                client.hincrby(f"{prefix}:applied", str(event["seq"]), 1)

    worker = events_worker(client, prefix, [Counted()], batch=100)
    try:
        with running(worker) as thread:
            assert reached.wait(10)
            server.kill()
            released.set()
            server.start()  # same socket, the append-only file replayed
            wait_for(lambda: admin.hlen(f"{prefix}:applied") == 200, timeout=15, what="every event applied")
            wait_for(lambda: admin.xpending(keys.events(), "detectors")["pending"] == 0, what="all acked")
            assert thread.is_alive()
    finally:
        client.close()
        admin.close()
    admin = redis.Redis.from_url(server.url)
    applied = {int(k): int(v) for k, v in admin.hgetall(f"{prefix}:applied").items()}
    admin.close()
    assert set(applied) == set(range(200))
    assert all(count >= 1 for count in applied.values())
    assert max(applied[seq] for seq in range(50)) == 2  # the interrupted batch was processed again


def test_a_slow_handler_on_a_healthy_redis_is_not_cut_off_by_the_stop(
    redis_url: str, prefix: str, r: redis.Redis
) -> None:
    """The stop watchdog cuts only a Redis that does not answer: a batch that takes longer than
    the probe delay still finishes and is acknowledged."""
    keys = Keys(prefix)
    for seq in range(4):
        r.xadd(keys.events(), {"d": beat(seq)})
    client = connect(settings_for(prefix, redis_url), redis_url)
    inside = threading.Event()

    class Slow(Handler[Event]):
        name = "slow"

        def on_batch(self, messages: Sequence[Message[Event]]) -> None:
            inside.set()
            for _, event in messages:
                time.sleep(0.2)
                client.sadd(f"{prefix}:effects", event["seq"])

    worker = events_worker(client, prefix, [Slow()])
    try:
        with running(worker):
            assert inside.wait(10)
            worker.stop()  # 0.8 s of batch left: past the first probe, and Redis answers it
    finally:
        client.close()
    assert r.scard(f"{prefix}:effects") == 4
    assert r.xpending(keys.events(), "detectors")["pending"] == 0
    assert r.zscore(keys.workers, worker.consumer) is None  # the final writes went through too
