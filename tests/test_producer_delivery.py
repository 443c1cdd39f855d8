"""What reaches the stream, in what order, and what a flood costs: a Producer in this process."""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from agents.testkit import kinds, of_kind, read_events, wait_for

import producers
from producers import Producer, _guard
from producers._sender import Sender


@pytest.fixture(autouse=True)
def strict(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_guard, "RAISE_INTERNAL", True)
    monkeypatch.setattr(_guard, "_warned", set())


@pytest.fixture
def make(redis_url: str, prefix: str) -> Iterator[Callable[..., Producer]]:
    made: list[Producer] = []

    def factory(agent: str = "bot", **options: Any) -> Producer:
        options.setdefault("flush_interval", 0.01)
        producer = Producer(agent, redis_url=redis_url, prefix=prefix, **options)
        made.append(producer)
        return producer

    yield factory
    for producer in made:
        producer.close()


def events(r: redis.Redis, prefix: str) -> list[dict[str, Any]]:
    return read_events(r, f"{prefix}:events")


def test_nothing_happens_before_first_use(make: Callable[..., Producer], r: redis.Redis, prefix: str) -> None:
    threads = threading.active_count()
    producer = make()

    assert threading.active_count() == threads
    assert producer.run == ""
    assert r.exists(f"{prefix}:events") == 0


def test_events_arrive_in_order_with_consecutive_seq(
    make: Callable[..., Producer], r: redis.Redis, prefix: str
) -> None:
    producer = make(interval=1.5)
    for n in range(2000):
        producer.heartbeat(tokens=n)
    producer.close()

    got = events(r, prefix)
    assert kinds(got) == ["start"] + ["beat"] * 2000 + ["exit"]
    assert [e["seq"] for e in got] == list(range(2002))
    assert [e["tokens"] for e in of_kind(got, "beat")] == list(range(2000))
    assert got[0]["interval"] == 1.5
    assert {e["run"] for e in got} == {producer.run}
    assert all(a["ts"] <= b["ts"] for a, b in itertools.pairwise(got))
    assert abs(got[-1]["ts"] - time.time()) < 5  # wall-clock seconds, not monotonic


def test_pulses_prove_the_process_lives_without_beats(
    make: Callable[..., Producer], r: redis.Redis, prefix: str
) -> None:
    producer = make(pulse_interval=0.05)
    producer.heartbeat()

    pulses = wait_for(lambda: len(p := of_kind(events(r, prefix), "pulse")) >= 3 and p, what="3 pulses")
    assert all(p["rss"] > 1_000_000 for p in pulses)
    assert len(of_kind(events(r, prefix), "beat")) == 1  # a pulse never stands in for a beat


def test_extend_is_sent_at_once_on_a_pulse(
    make: Callable[..., Producer], r: redis.Redis, prefix: str
) -> None:
    producer = make(pulse_interval=600, flush_interval=600)  # only an immediate send can show it
    producer.heartbeat()
    producer.extend(90)

    pulse = wait_for(lambda: of_kind(events(r, prefix), "pulse"), what="the extend pulse")[0]
    assert pulse["extend"] == 90.0
    assert kinds(events(r, prefix)) == ["start", "beat", "pulse"]


def test_pulses_repeat_the_declared_interval(
    make: Callable[..., Producer], r: redis.Redis, prefix: str
) -> None:
    # So a pipeline that lost the agent's record (Redis restarted empty) relearns it at once.
    declared, undeclared = (
        make("declared", interval=2.5, pulse_interval=0.05),
        make("free", pulse_interval=0.05),
    )
    declared.heartbeat()
    undeclared.heartbeat()

    def pulses(agent: str) -> list[dict[str, Any]]:
        return [e for e in of_kind(events(r, prefix), "pulse") if e["agent"] == agent]

    wait_for(lambda: len(pulses("declared")) >= 2 and len(pulses("free")) >= 2, what="pulses of both")
    assert all(p["interval"] == 2.5 for p in pulses("declared"))
    assert not any("interval" in p for p in pulses("free"))


def test_extend_beyond_a_year_is_clamped_to_the_protocol_cap(
    make: Callable[..., Producer], r: redis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    producer = make(pulse_interval=600)
    producer.extend(1e308)  # would crash a detector's int(): dead-lettered pulses
    producer.extend(10**9)

    got = wait_for(lambda: len(p := of_kind(events(r, prefix), "pulse")) >= 2 and p, what="extend pulses")
    assert [p["extend"] for p in got] == [31_536_000.0, 31_536_000.0]
    assert sum("over 365 days" in rec.getMessage() for rec in caplog.records) == 1


def test_extend_with_a_bad_value_is_ignored(
    make: Callable[..., Producer], r: redis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    producer = make()
    producer.extend(float("nan"))
    producer.extend(-3)
    producer.close()

    assert r.exists(f"{prefix}:events") == 0  # not even a start: nothing was used
    assert len([rec for rec in caplog.records if "extend" in rec.getMessage()]) == 1


def test_an_idle_sender_sleeps_and_still_delivers_the_next_beat_promptly(
    make: Callable[..., Producer], r: redis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps: list[float] = []
    original = Sender._step

    def counted(self: Sender) -> None:
        steps.append(time.monotonic())
        original(self)

    monkeypatch.setattr(Sender, "_step", counted)
    producer = make(flush_interval=0.02, pulse_interval=600)
    producer.heartbeat(tokens=1)
    wait_for(lambda: producer._sender is not None and producer._sender.idle, what="the sender to idle")
    before = len(steps)
    deadline = time.monotonic() + 0.5
    wait_for(lambda: time.monotonic() >= deadline, what="half a second of idling")
    assert len(steps) - before <= 1  # asleep, not ticking every 20 ms

    sent = time.monotonic()
    producer.heartbeat(tokens=2)  # the first event wakes it
    wait_for(lambda: len(of_kind(events(r, prefix), "beat")) == 2, what="the second beat")
    assert time.monotonic() - sent < 0.5


def test_a_flood_is_bounded_and_every_beat_is_delivered_or_counted(
    make: Callable[..., Producer], r: redis.Redis, prefix: str
) -> None:
    producer = make(queue_size=100, pulse_interval=600)
    longest = 0
    for n in range(50_000):
        producer.heartbeat(tokens=n)
        if n % 100 == 0:
            longest = max(longest, len(producer._queue))
    producer.close()

    got = events(r, prefix)
    dropped: dict[str, int] = {}
    for event in got:
        for reason, number in event.get("dropped", {}).items():
            dropped[reason] = dropped.get(reason, 0) + number
    assert longest <= 100  # memory stays bounded whatever the agent does
    assert set(dropped) == {"queue_full"}
    assert len(of_kind(got, "beat")) + dropped["queue_full"] == 50_000  # nothing vanishes


def test_heartbeat_never_waits_for_redis(make: Callable[..., Producer]) -> None:
    """The hot path only queues: not one call waits for a round trip. Counted, not timed (the
    microseconds are benchmarks/producer_heartbeat.py's figure): while the sender thread is held
    inside a delivery, every heartbeat() still returns."""
    producer = make(pulse_interval=600)
    producer.heartbeat()  # starts the sender
    sender = producer._sender
    assert sender is not None
    entered, release = threading.Event(), threading.Event()
    original = sender._step

    def held() -> None:
        entered.set()
        release.wait(30)
        original()

    sender._step = held  # type: ignore[method-assign]
    try:
        sender.wake.set()
        assert entered.wait(10), "the sender never ran"
        done = threading.Event()

        def beat_many() -> None:
            for _ in range(2_000):
                producer.heartbeat()
            done.set()

        threading.Thread(target=beat_many, daemon=True).start()
        assert done.wait(30), "heartbeat() waited for the sender"
    finally:
        release.set()


def test_no_sender_thread_means_no_retry_on_every_beat(
    make: Callable[..., Producer], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    attempts = []

    def refuse(self: Sender) -> None:
        attempts.append(self)
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(Sender, "start", refuse)
    producer = make(queue_size=500)
    for _ in range(1000):
        producer.heartbeat()

    assert len(attempts) == 1
    assert len(producer._queue) == 500  # bounded, even with nobody draining it
    assert sum("cannot start the sender thread" in rec.getMessage() for rec in caplog.records) == 1


def test_after_close_beats_are_ignored(make: Callable[..., Producer], r: redis.Redis, prefix: str) -> None:
    producer = make()
    producer.heartbeat()
    producer.close()
    producer.close()  # idempotent
    producer.heartbeat()
    producer.extend(5)

    assert kinds(events(r, prefix)) == ["start", "beat", "exit"]


def test_several_producers_in_one_process(make: Callable[..., Producer], r: redis.Redis, prefix: str) -> None:
    first, second = make("agent-one"), make("agent-two")
    first.heartbeat(tokens=1)
    second.heartbeat(tokens=2)
    first.close()
    second.close()

    got = events(r, prefix)
    assert {e["agent"]: e["tokens"] for e in of_kind(got, "beat")} == {"agent-one": 1, "agent-two": 2}
    assert len({e["run"] for e in got}) == 2


def test_unknown_init_option_is_reported_not_raised(
    redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    try:
        producers.init("opt-bot", redis_url=redis_url, prefix=prefix, pulse_intervall=1.0)
    finally:
        producers.shutdown()
        os.environ.pop("_AGENTWATCH_INIT", None)

    assert any("unknown option(s) pulse_intervall" in rec.getMessage() for rec in caplog.records)


def test_init_is_idempotent_and_reconfiguring_retires_the_old_run(
    redis_url: str, prefix: str, r: redis.Redis
) -> None:
    try:
        first = producers.init("init-a", redis_url=redis_url, prefix=prefix, flush_interval=0.01)
        run_a = first.run
        again = producers.init("init-a", redis_url=redis_url, prefix=prefix, flush_interval=0.01)
        assert again.run == run_a
        producers.heartbeat(tokens=1)
        producers.init("init-b", redis_url=redis_url, prefix=prefix, flush_interval=0.01)
        producers.heartbeat(tokens=2)
    finally:
        producers.shutdown()
        os.environ.pop("_AGENTWATCH_INIT", None)  # init() leaves it for multiprocessing workers
    producers.heartbeat(tokens=3)  # after shutdown: ignored until init() again

    got = events(r, prefix)
    by_agent = {name: [e for e in got if e["agent"] == name] for name in ("init-a", "init-b")}
    assert kinds(by_agent["init-a"]) == ["start", "beat", "exit"]
    assert by_agent["init-a"][-1]["reason"] == "shutdown"
    assert kinds(by_agent["init-b"]) == ["start", "beat", "exit"]
    assert by_agent["init-b"][1]["tokens"] == 2
