"""The worker runtime against a real Redis: batches, acks, dead letters, isolation, health, trimming."""

from __future__ import annotations

import io
import math
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import msgpack
import pytest
import redis
from agents_detect.kit import Agent, fired, pipeline_for, worker_for
from rich.console import Console

from agentwatch import codec
from agentwatch.cli.status import _render
from agentwatch.codec import Event
from agentwatch.fleet import fleet_status
from agentwatch.keys import Keys
from agentwatch.redisconn import connect, server_time_ms
from agentwatch.worker import Handler, Message, Worker
from detectors.base import Detector, DetectorConfig

from helpers import events_worker, running, settings_for, wait_for


class Recorder(Handler[Event]):
    """Remembers every event it was given (by agent and seq)."""

    def __init__(self, name: str = "recorder") -> None:
        self.name = name
        self.seen: list[tuple[str, int]] = []
        self.ticks = 0
        self.lock = threading.Lock()

    def on_batch(self, messages: Sequence[Message[Event]]) -> None:
        with self.lock:
            self.seen += [(event["agent"], event["seq"]) for _, event in messages]

    def on_tick(self, now_ms: int) -> None:
        self.ticks += 1


class Explodes(Handler[Event]):
    """Raises on events whose agent is ``boom``, and on every tick."""

    name = "explodes"

    def __init__(self) -> None:
        self.calls = 0

    def on_batch(self, messages: Sequence[Message[Event]]) -> None:
        self.calls += 1
        if any(event["agent"] == "boom" for _, event in messages):
            raise RuntimeError("cannot handle boom")

    def on_tick(self, now_ms: int) -> None:
        raise ValueError("tick bug")


def beat(agent: str = "bot", seq: int = 0, **extra: Any) -> bytes:
    return codec.encode({"v": 1, "agent": agent, "kind": "beat", "ts": 1.0, "run": "r1", "seq": seq, **extra})


@pytest.fixture
def client(redis_url: str, prefix: str) -> Iterator[Any]:
    settings = settings_for(prefix, redis_url)
    c = connect(settings, redis_url)
    yield c
    c.close()


def test_a_batch_is_processed_then_acknowledged(client: Any, r: redis.Redis, keys: Keys, prefix: str) -> None:
    for seq in range(50):
        r.xadd(keys.events(), {"d": beat(seq=seq)})
    recorder = Recorder()
    worker = events_worker(client, prefix, [recorder])
    with running(worker):
        wait_for(lambda: len(recorder.seen) == 50, what="50 events handled")
        wait_for(lambda: r.xpending(keys.events(), "detectors")["pending"] == 0, what="all acked")
    assert recorder.seen == [("bot", seq) for seq in range(50)]
    assert worker.stats.processed == 50
    assert recorder.ticks > 0


BAD_INPUTS = [
    ("undecodable bytes", b"\xc1\xc1\xc1", "not msgpack"),
    ("msgpack non-map", msgpack.packb([1, 2, 3]), "not a msgpack map but list"),
    ("1 MiB entry", beat(blob="x" * (1 << 20)), "over the 8192-byte cap"),
    ("deeply nested meta", beat(meta={"a": {"b": {"c": {"d": {"e": 1}}}}}), "nested deeper than 4"),
    ("NaN tokens", beat(tokens=math.nan), "'tokens' must be an integer >= 0"),
    ("negative tokens", beat(tokens=-5), "'tokens' must be an integer >= 0"),
    ("agent with spaces", beat(agent="my bot"), "characters outside"),
    ("agent with newline", beat(agent="bot\nrm"), "characters outside"),
    ("agent with shell metacharacters", beat(agent="bot;$(reboot)&`x`|y>z"), "characters outside"),
    ("agent of 256 chars", beat(agent="a" * 256), "must be 1-128 chars, got 256"),
    ("unknown kind", codec.encode({"v": 1, "agent": "bot", "kind": "nap", "ts": 1.0, "run": "r", "seq": 0}),
     "unknown kind 'nap'"),
]  # fmt: skip


def test_every_bad_input_is_dead_lettered_with_its_reason_and_the_worker_goes_on(
    client: Any, r: redis.Redis, keys: Keys, prefix: str
) -> None:
    ids = {}
    for index, (name, raw, _) in enumerate(BAD_INPUTS):
        r.xadd(keys.events(), {"d": beat(agent="good", seq=index)})
        ids[name] = r.xadd(keys.events(), {"d": raw})
    r.xadd(keys.events(), {"wrong": b"field"})
    r.xadd(keys.events(), {"d": beat(agent="good", seq=99)})
    recorder = Recorder()
    worker = events_worker(client, prefix, [recorder])
    with running(worker):
        wait_for(lambda: ("good", 99) in recorder.seen, what="the event after all bad ones")
        wait_for(lambda: r.xlen(keys.deadletter) == len(BAD_INPUTS) + 1)
        wait_for(lambda: r.hget(keys.stats, "detectors:deadlettered") == str(len(BAD_INPUTS) + 1).encode())
    assert len(recorder.seen) == len(BAD_INPUTS) + 1  # every good event, no bad one
    letters = {fields[b"id"]: fields for _, fields in r.xrange(keys.deadletter)}
    for name, raw, reason in BAD_INPUTS:
        letter = letters[ids[name]]
        assert reason in letter[b"reason"].decode(), name
        assert letter[b"stream"] == keys.events().encode()
        assert int(letter[b"size"]) == len(raw)
        cap = 16_384  # [streams] deadletter_max_bytes default
        assert letter[b"d"] == raw[:cap]  # the original bytes are kept, up to the cap
        assert letter.get(b"truncated") == (b"1" if len(raw) > cap else None)
    (no_d,) = [f for f in letters.values() if b"no 'd' field" in f[b"reason"]]
    assert no_d[b"reason"] == b"entry has no 'd' field (fields: 'wrong')"
    assert worker.stats.deadlettered == len(BAD_INPUTS) + 1
    assert r.xpending(keys.events(), "detectors")["pending"] == 0


def test_dead_letters_keep_at_most_the_configured_bytes(
    client: Any, r: redis.Redis, keys: Keys, prefix: str
) -> None:
    settings = settings_for(prefix, streams={"deadletter_max_bytes": 2048}, worker={"tick": "50ms"})
    worker: Worker[Event] = Worker(
        client, settings, kind="detectors", streams=[keys.events()], group="detectors",
        decode=codec.decode, handlers=[], retention_s=3600,
    )  # fmt: skip
    r.xadd(keys.events(), {"d": b"\xc1" * 10_000})
    with running(worker):
        wait_for(lambda: r.xlen(keys.deadletter) == 1)
    ((_, letter),) = r.xrange(keys.deadletter)
    assert (len(letter[b"d"]), letter[b"size"], letter[b"truncated"]) == (2048, b"10000", b"1")


def test_a_raising_handler_is_isolated_and_its_poison_entry_dead_lettered(
    client: Any, r: redis.Redis, keys: Keys, prefix: str
) -> None:
    r.xadd(keys.events(), {"d": beat(agent="fine", seq=1)})
    poison_id = r.xadd(keys.events(), {"d": beat(agent="boom", seq=2)})
    r.xadd(keys.events(), {"d": beat(agent="fine", seq=3)})
    recorder, explodes = Recorder(), Explodes()
    worker = events_worker(client, prefix, [explodes, recorder], max_attempts=3)
    with running(worker):
        wait_for(lambda: r.xlen(keys.deadletter) == 1, what="the poison entry dead-lettered")
        wait_for(lambda: worker.stats.handler_errors.get("explodes", 0) >= 3, what="tick errors counted")
    assert recorder.seen == [("fine", 1), ("boom", 2), ("fine", 3)]  # the other handler saw everything
    ((_, letter),) = r.xrange(keys.deadletter)
    assert letter[b"id"] == poison_id
    assert letter[b"reason"] == b"handler 'explodes' raised RuntimeError: cannot handle boom (3 attempts)"
    assert explodes.calls == 1 + 1 + 3 + 1  # the batch, then each entry alone; boom 3 times
    assert r.xpending(keys.events(), "detectors")["pending"] == 0


def test_entries_left_by_a_dead_consumer_are_reclaimed(
    client: Any, r: redis.Redis, keys: Keys, prefix: str
) -> None:
    client.xgroup_create(keys.events(), "detectors", id="0", mkstream=True)
    for seq in range(5):
        r.xadd(keys.events(), {"d": beat(seq=seq)})
    r.xreadgroup("detectors", "dead-consumer", {keys.events(): ">"}, count=5)  # read, never acked
    recorder = Recorder()
    worker = events_worker(client, prefix, [recorder], claim_idle="100ms")
    with running(worker):
        wait_for(lambda: len(recorder.seen) == 5, what="reclaimed entries processed")
        wait_for(lambda: r.xpending(keys.events(), "detectors")["pending"] == 0)
    assert worker.stats.reclaimed == 5


def test_an_entry_that_keeps_killing_workers_is_dead_lettered_on_reclaim(
    client: Any, r: redis.Redis, keys: Keys, prefix: str
) -> None:
    client.xgroup_create(keys.events(), "detectors", id="0", mkstream=True)
    killer = r.xadd(keys.events(), {"d": beat(seq=1)})
    r.xreadgroup("detectors", "crashed-1", {keys.events(): ">"}, count=1)
    r.xclaim(keys.events(), "detectors", "crashed-3", 0, [killer], retrycount=3)  # delivered 3 times
    recorder = Recorder()
    worker = events_worker(client, prefix, [recorder], claim_idle="100ms", max_attempts=3)
    with running(worker):
        wait_for(lambda: r.xlen(keys.deadletter) == 1)
    ((_, letter),) = r.xrange(keys.deadletter)
    assert letter[b"reason"] == b"delivered 4 times without an ack (it may crash workers)"
    assert recorder.seen == []


def test_health_key_and_counters_are_published(client: Any, r: redis.Redis, keys: Keys, prefix: str) -> None:
    r.xadd(keys.events(), {"d": beat()})
    worker = events_worker(client, prefix, [Recorder()], health_ttl="5s")
    with running(worker):
        wait_for(lambda: r.hget(keys.worker(worker.consumer), "processed") == b"1")
        health = r.hgetall(keys.worker(worker.consumer))
        ttl_ms = r.pttl(keys.worker(worker.consumer))
        registered = r.zscore(keys.workers, worker.consumer)
    assert health[b"kind"] == b"detectors" and health[b"state"] == b"running"
    assert {b"processed", b"deadlettered", b"reclaimed", b"errors", b"lag", b"pending"} <= set(health)
    assert 0 < ttl_ms <= 5000
    assert registered is not None
    # a graceful stop removes the worker from the registry at once (it does not wait for the TTL)
    assert r.zscore(keys.workers, worker.consumer) is None
    assert not r.exists(keys.worker(worker.consumer))


def test_trimming_never_drops_what_a_group_has_not_read(
    client: Any, r: redis.Redis, keys: Keys, prefix: str
) -> None:
    stream = keys.events()
    client.xgroup_create(stream, "detectors", id="0", mkstream=True)
    client.xgroup_create(stream, "slow-group", id="0")
    for seq in range(300):
        r.xadd(stream, {"d": beat(seq=seq)})
    worker = events_worker(client, prefix, [Recorder()])
    worker.retention_s = 0.001  # everything is "old"
    while worker.run_once():
        pass
    worker.trim(server_time_ms(client) + 10)
    assert r.xlen(stream) == 300  # slow-group has read nothing yet
    r.xreadgroup("slow-group", "c", {stream: ">"}, count=300)
    worker.trim(server_time_ms(client) + 10)
    assert r.xlen(stream) == 300  # read but still pending in slow-group
    last_id = r.xrevrange(stream, count=1)[0][0]
    r.xack(stream, "slow-group", *[e[0] for e in r.xrange(stream)])
    r.xadd(stream, {"d": beat(seq=300)})  # unread by both groups: must survive
    worker.trim(server_time_ms(client) + 10)
    remaining = r.xrange(stream)
    assert len(remaining) < 301  # trimming happened (MINID ~ trims whole nodes)
    assert remaining[-1][0] > last_id  # the unread entry survived


class AlwaysFails(Handler[Event]):
    """Raises on everything until ``fixed``."""

    name = "broken"

    def __init__(self) -> None:
        self.calls = 0
        self.fixed = False
        self.seen = 0

    def on_batch(self, messages: Sequence[Message[Event]]) -> None:
        self.calls += 1
        if not self.fixed:
            raise KeyError("config_missing")
        self.seen += len(messages)


def test_a_broken_handler_leaves_a_handful_of_dead_letters_and_skips_the_rest_until_it_works(
    client: Any, r: redis.Redis, keys: Keys, prefix: str
) -> None:
    for seq in range(50):
        r.xadd(keys.events(), {"d": beat(seq=seq)})
    broken, recorder = AlwaysFails(), Recorder()
    worker = events_worker(client, prefix, [broken, recorder], batch=100, max_attempts=3)
    health = keys.worker(worker.consumer)

    def publish() -> None:  # what the worker's tick does every second
        worker.upkeep.refresh_health(server_time_ms(client))

    worker._setup()
    worker.run_once()
    assert worker.stats.processed == 45  # acked without the broken handler, not dead-lettered
    assert r.xlen(keys.deadletter) == 5  # the entries that judged it broken, no more
    assert broken.calls == 1 + 5 * 3  # the batch, then five entries alone, then no more calls
    publish()
    assert (r.hget(health, "skipped:broken"), r.hget(health, "broken")) == (b"45", b"broken")
    for seq in range(50, 70):  # later batches while it stays broken: one probe each, no letters
        r.xadd(keys.events(), {"d": beat(seq=seq)})
        worker.run_once()
    assert worker.stats.processed == 65 and r.xlen(keys.deadletter) == 5
    assert worker.stats.handler_skipped == {"broken": 65}
    assert broken.calls == 16 + 20 * 2
    broken.fixed = True
    r.xadd(keys.events(), {"d": beat(seq=70)})
    worker.run_once()
    assert broken.seen == 1  # the mended handler is fed again
    publish()
    assert r.hget(health, "broken") == b"" and r.hget(keys.stats, "detectors:skipped") == b"65"
    assert len(recorder.seen) == 71  # the other handler saw every entry
    reasons = [fields[b"reason"].decode() for _, fields in r.xrange(keys.deadletter)]
    assert reasons == ["handler 'broken' raised KeyError: 'config_missing' (3 attempts)"] * 5
    assert worker.stats.processed == 66 and worker.stats.deadlettered == 5
    assert r.xpending(keys.events(), "detectors")["pending"] == 0


def test_a_broken_handler_is_judged_across_batches(
    client: Any, r: redis.Redis, keys: Keys, prefix: str
) -> None:
    """One entry per batch (a quiet fleet) must not dead-letter every event either."""
    for seq in range(12):
        r.xadd(keys.events(), {"d": beat(seq=seq)})
    worker = events_worker(client, prefix, [AlwaysFails()], batch=1, max_attempts=2)
    with running(worker):
        wait_for(lambda: worker.stats.processed + worker.stats.deadlettered == 12, what="all acked")
    assert r.xlen(keys.deadletter) == 5
    assert worker.stats.handler_skipped == {"broken": 7}


def test_health_is_stamped_with_redis_time_and_dead_workers_are_pruned(
    client: Any, r: redis.Redis, keys: Keys, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)  # this host's clock is an hour fast
    now_ms = server_time_ms(client)
    r.zadd(keys.workers, {"sigkilled": now_ms - 60_000, "slow-but-alive": now_ms - 60_000})
    r.hset(keys.worker("slow-but-alive"), "kind", "detectors")  # its health key has not expired
    worker = events_worker(client, prefix, [Recorder()], health_ttl="5s")
    with running(worker):
        wait_for(lambda: r.zscore(keys.workers, "sigkilled") is None, what="the dead worker pruned")
        score = r.zscore(keys.workers, worker.consumer)
        seen = int(r.hget(keys.worker(worker.consumer), "seen_ms") or 0)
        started = int(r.hget(keys.worker(worker.consumer), "started_ms") or 0)
        assert r.zscore(keys.workers, "slow-but-alive") is not None
    assert score is not None and abs(score - server_time_ms(client)) < 5000
    assert abs(seen - server_time_ms(client)) < 5000
    assert abs(started - now_ms) < 5000


def test_redis_replies_that_mean_cannot_write_now_are_recoverable(r: redis.Redis, prefix: str) -> None:
    """MISCONF, NOREPLICAS and BUSY arrive as bare ResponseErrors unless registered."""
    from agentwatch.redisconn import RECOVERABLE  # noqa: PLC0415

    for reply in (
        "MISCONF Errors writing to the AOF file",
        "NOREPLICAS Not enough good replicas",
        "BUSY Redis is busy running a script",
    ):
        with pytest.raises(RECOVERABLE):
            r.eval(f"return redis.error_reply('{reply}')", 0)
    with pytest.raises(redis.ResponseError) as caught:
        r.eval("return redis.error_reply('BUSYGROUP Consumer Group name already exists')", 0)
    assert not isinstance(caught.value, RECOVERABLE)


class RaisesOnEverything(Detector[DetectorConfig]):
    """A plugin with a bug: every batch and every entry raises."""

    def on_batch(self, messages: Sequence[Message[Event]]) -> None:
        raise RuntimeError("plugin bug")


def test_a_plugin_that_raises_on_everything_cannot_flood_the_dead_letters(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    pipeline = pipeline_for(prefix, redis_url, buggy={"class": "test_worker:RaisesOnEverything"})
    worker = worker_for(pipeline, redis_url)
    with running(worker):
        bots = [Agent(r, keys, f"bot-{i}") for i in range(3)]
        for bot in bots:
            bot.start(interval=30.0)
        for _ in range(9):
            for bot in bots:
                bot.beat(tokens=100)
        bots[0].exit("exception", 1, error="KeyError: 'x'")  # 31 healthy events in all
        wait_for(lambda: fired(r, keys, "exit"), timeout=10, what="the built-in exit alert")
        wait_for(lambda: worker.stats.processed + worker.stats.deadlettered == 31, what="every event acked")
        health = keys.worker(worker.consumer)
        wait_for(lambda: r.hget(health, "skipped:buggy") == b"26", what="the skips in the health hash")
        assert r.hget(health, "broken") == b"buggy"
        assert int(r.hget(health, "errors:buggy") or 0) >= 1
        document = fleet_status(r, pipeline)  # what `status` shows
        (shown,) = document["pipeline"]["workers"]
        assert (shown["broken"], shown["skipped"]) == (["buggy"], 26)
        board = io.StringIO()
        Console(file=board, width=120).print(_render(document, 120))
        line = f"{worker.consumer}: handler 'buggy' is broken (26 entries acked without it)"
        assert line in board.getvalue()
    assert r.xlen(keys.deadletter) == 5  # the entries that judged it broken
    assert worker.stats.processed == 26
    assert r.xpending(keys.events(), "detectors")["pending"] == 0


class Flaky(Handler[Event]):
    """Raises on everything while ``broken``; afterwards only on seq 666 (one poison entry)."""

    name = "flaky"

    def __init__(self) -> None:
        self.broken = True
        self.seen: list[int] = []

    def on_batch(self, messages: Sequence[Message[Event]]) -> None:
        if self.broken or any(event["seq"] == 666 for _, event in messages):
            raise RuntimeError("flaky")
        self.seen += [event["seq"] for _, event in messages]


def test_a_recovered_handler_is_fed_again_even_when_a_bad_entry_leads_the_batch(
    client: Any, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    flaky = Flaky()
    worker = events_worker(client, prefix, [flaky], max_attempts=1)
    worker._setup()
    for seq in range(6):
        r.xadd(keys.events(), {"d": beat(seq=seq)})
    worker.run_once()
    assert worker.stats.broken == ["flaky"]  # five failed alone: its breaker opened
    flaky.broken = False  # fixed, but the next batch starts with a poison entry
    for seq in (666, 10, 11, 12):
        r.xadd(keys.events(), {"d": beat(seq=seq)})
    worker.run_once()
    assert worker.stats.broken == [] and flaky.seen == [10, 11, 12]  # fed, in order, not skipped
    dead = [fields[b"reason"].decode() for _, fields in r.xrange(keys.deadletter)]
    assert dead[-1].startswith("handler 'flaky' raised RuntimeError")  # seq 666, dead-lettered
