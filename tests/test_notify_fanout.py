"""Queueing a batch for every notifier in one round trip (notifiers/fanout.py, issue 17).

The fan-out must be an optimisation only: each notifier's queue, delivery chains, redelivery
marks, held alerts and delivery log come out exactly as the notifier's own ``on_batch`` leaves
them, for routed, filtered, resolved-but-not-sent, stale and redelivered alerts alike. These
tests feed the same stream entries to two sets of notifiers on one prefix, one behind the
fan-out and one without it, and compare their Redis state key by key. Real Redis throughout;
the last test runs a real worker with a real HTTP receiver.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import pytest
import redis

from agentwatch import plugins
from agentwatch.alerts import Alert
from agentwatch.config import Pipeline
from agentwatch.keys import Keys
from agentwatch.redisconn import connect
from agentwatch.worker import Worker
from agentwatch.workers import NOTIFIERS_GROUP, notifier_worker
from notifiers.base import Notifier
from notifiers.fanout import QueueFanout
from notifiers.routing import Mutes

from helpers import running, settings_for, wait_for
from notify_kit import FAST_DELIVERY, fire, notifier_running, now_ms, pipeline_with, receiver, resolve, stream

URL = "http://127.0.0.1:9/hook"  # never called: these workers' delivery threads are not started

ENTRIES: list[dict[str, Any]] = [
    {"name": "all"},
    {"name": "bots", "match": {"agents": ["bot*"]}},  # web's alerts: nothing, its resolve: a drop
    {"name": "quiet", "send_resolved": False},
    {"name": "short", "max_age": "10m"},  # the old alert is stale here: this batch is its own
]


def _worker(
    prefix: str, redis_url: str, tag: str, notifiers: list[dict[str, Any]], *, fanout: bool
) -> Worker[Alert]:
    """A notifier worker whose notifiers are ``notifiers`` named ``<tag>-<name>``; without
    ``fanout``, its notifiers queue every batch themselves. Not run: tests feed it batches."""
    entries = [{**e, "type": "webhook", "url": URL, "name": f"{tag}-{e['name']}"} for e in notifiers]
    loaded, problems = plugins.load_notifiers(entries)
    assert not problems, problems
    pipeline = Pipeline(settings=settings_for(prefix, redis_url), source="test", notifiers=loaded)
    worker = notifier_worker(pipeline, connect(pipeline.settings, redis_url))
    if not fanout:
        worker.handlers = [h for h in worker.handlers if not isinstance(h, QueueFanout)]
    return worker


@contextmanager
def _pair(
    prefix: str, redis_url: str, notifiers: list[dict[str, Any]] = ENTRIES
) -> Iterator[tuple[Worker[Alert], Worker[Alert]]]:
    fast = _worker(prefix, redis_url, "f", notifiers, fanout=True)
    own = _worker(prefix, redis_url, "o", notifiers, fanout=False)
    try:
        yield fast, own
    finally:
        fast.client.close()
        own.client.close()


def _batch(r: redis.Redis, keys: Keys) -> list[tuple[str, bytes, Any]]:
    """The alerts stream's new entries, read once, as the runtime hands them to ``process``."""
    with suppress(redis.ResponseError):
        r.xgroup_create(keys.alerts, NOTIFIERS_GROUP, id="0", mkstream=True)
    reply = r.xreadgroup(NOTIFIERS_GROUP, "test", {keys.alerts: ">"}, count=1000)
    return [(keys.alerts, entry_id, fields) for _, entries in reply for entry_id, fields in entries]


def _state(r: redis.Redis, keys: Keys, notifier: str) -> dict[str, Any]:
    """A notifier's Redis state, with what depends on the moment (due times, queue times) left out."""
    jobs = {k.decode(): v for k, v in r.hgetall(keys.notifier_jobs(notifier)).items()}
    for delivery_id, raw in jobs.items():
        job = json.loads(raw)
        job.pop("first_ms")
        jobs[delivery_id] = job
    log = [
        (e["outcome"], e["id"], "" if e["outcome"] == "stale" else e["detail"])  # stale: "<age>s old"
        for e in stream(r, keys.notify_log)
        if e["notifier"] == notifier
    ]
    return {
        "queue": sorted(m.decode() for m in r.zrange(keys.notifier_queue(notifier), 0, -1)),
        "jobs": jobs,
        "order": r.hgetall(keys.notifier_order(notifier)),
        "seen": sorted(r.zrange(keys.notifier_seen(notifier), 0, -1)),
        "held": r.hgetall(keys.notifier_held(notifier)),
        "log": log,
    }


def _same(r: redis.Redis, keys: Keys) -> None:
    for entry in ENTRIES:
        fast, own = _state(r, keys, f"f-{entry['name']}"), _state(r, keys, f"o-{entry['name']}")
        assert fast == own, entry["name"]


def test_the_fanout_leaves_every_notifier_as_its_own_on_batch_would(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    bot = fire(r, keys, "bot-1")
    fire(r, keys, "web-1")
    fire(r, keys, "bot-2", at_ms=now_ms(r) - 3_600_000)  # an hour old: stale for "short"
    resolve(r, keys, "bot-1")
    resolve(r, keys, "web-1")  # filtered out of "bots": what a mute held for it is dropped there
    r.hset(keys.notifier_held("f-bots"), "web-1/silence", '{"status": "firing"}')
    r.hset(keys.notifier_held("o-bots"), "web-1/silence", '{"status": "firing"}')
    batch = _batch(r, keys)
    with _pair(prefix, redis_url) as (fast, own):
        fast.process(batch)
        own.process(batch)
        _same(r, keys)
        assert not fast.stats.errors and not own.stats.errors
        # what the fan-out took, each notifier skipped; "short" queued its batch itself
        assert r.hexists(keys.notifier_jobs("f-all"), bot.id)
        assert r.hlen(keys.notifier_held("f-bots")) == 0
        assert [e["outcome"] for e in stream(r, keys.notify_log) if e["notifier"] == "f-short"] == ["stale"]
        # the same entries again (a worker died before acking them): queued once, logged once
        fast.process(batch)
        own.process(batch)
        _same(r, keys)
        # a mute: that batch is every notifier's own (held, recorded as muted), the next is fanned out
        Mutes(r, keys).add("web-*", 60)
        fire(r, keys, "web-2")
        fire(r, keys, "bot-3")
        batch = _batch(r, keys)
        fast.process(batch)
        own.process(batch)
        _same(r, keys)
        assert r.hexists(keys.notifier_held("f-all"), "web-2/silence")
        resolve(r, keys, "bot-3")
        batch = _batch(r, keys)
        fast.process(batch)
        own.process(batch)
        _same(r, keys)


def test_a_batch_for_four_notifiers_costs_the_main_thread_three_round_trips(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round trips, not time: clock and mutes, every notifier's enqueue scripts, the ack. The
    notifiers' own path would make 2 + 1 per alert per notifier (here 4 x 12 = 48)."""
    entries = [e for e in ENTRIES if e["name"] != "short"] + [{"name": "more"}]
    fire(r, keys, "warm-up")  # the first batch also reads the pipeline's secret, once
    warm_up = _batch(r, keys)
    for n in range(5):
        fire(r, keys, f"bot-{n}")
        resolve(r, keys, f"bot-{n}")
    batch = _batch(r, keys)
    assert len(batch) == 10
    trips: list[str] = []
    single, piped = redis.Redis.execute_command, redis.client.Pipeline.execute

    def counted_command(self: Any, *args: Any, **options: Any) -> Any:
        trips.append(str(args[0]))
        return single(self, *args, **options)

    def counted_pipeline(self: Any, *args: Any, **options: Any) -> Any:
        trips.append(f"pipeline of {len(self.command_stack)}")
        return piped(self, *args, **options)

    with _pair(prefix, redis_url, entries) as (fast, _):
        fast.handlers[0].on_start()  # the fan-out loads its script
        fast.process(warm_up)
        monkeypatch.setattr(redis.Redis, "execute_command", counted_command)
        monkeypatch.setattr(redis.client.Pipeline, "execute", counted_pipeline)
        fast.process(batch)
        monkeypatch.undo()
        # "quiet" does not send resolves: it drops what a mute might hold for them instead
        assert trips == ["pipeline of 3", "pipeline of 40", "pipeline of 1"]
        assert r.hlen(keys.notifier_jobs("f-all")) == 11
        assert r.hlen(keys.notifier_jobs("f-quiet")) == 6


def test_scripts_lost_by_redis_are_loaded_again(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    alert = fire(r, keys, "bot-1")
    batch = _batch(r, keys)
    with _pair(prefix, redis_url) as (fast, _):
        r.script_flush()  # as after a restart of Redis without persistence of scripts
        fast.process(batch)
        assert not fast.stats.errors
        for entry in ENTRIES:
            assert r.hexists(keys.notifier_jobs(f"f-{entry['name']}"), alert.id), entry["name"]


def test_a_notifier_that_raises_is_left_to_the_runtime_and_the_others_are_queued(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    alert = fire(r, keys, "bot-1")
    batch = _batch(r, keys)
    with _pair(prefix, redis_url) as (fast, _):
        broken = next(h for h in fast.handlers if isinstance(h, Notifier) and h.name == "f-bots")

        def route(*_: Any) -> None:
            raise RuntimeError("a bug in routing")

        broken.route = route  # type: ignore[method-assign]
        fast.process(batch)
        assert set(fast.stats.handler_errors) == {"f-bots"}  # its own on_batch raised, isolated
        assert r.xlen(keys.deadletter) == 1  # the entry it cannot handle, with its reason
        for name in ("f-all", "f-quiet", "f-short"):
            assert r.hexists(keys.notifier_jobs(name), alert.id), name


def test_deliveries_queued_by_the_fanout_go_out_at_once_and_are_logged(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    """The delivery threads poll every 60 s here, so only a wake-up gets each alert out within
    the 10 s allowed: none may be lost, whether a thread waits or is busy when its alert is
    queued. Each delivery's log entry goes with the thread's next claim, which follows at once."""
    with receiver() as hook:
        entries = [{"type": "webhook", "url": hook.url, **FAST_DELIVERY, "concurrency": 2}]
        client = connect(pipeline_with(prefix, redis_url, entries).settings, redis_url)
        worker = notifier_worker(pipeline_with(prefix, redis_url, entries), client)
        for handler in worker.handlers:
            if isinstance(handler, Notifier):
                handler.ctx = dataclasses.replace(handler.ctx, poll_s=60.0)
        try:
            with running(worker):
                for n in range(8):
                    alert = fire(r, keys, f"bot-{n}")
                    if n % 2:  # and one while a thread is busy with the one before
                        fire(r, keys, f"bot-{n}-b")
                    hook.wait_requests(n + 1 + (n + 1) // 2, timeout=10)
                    records = wait_for(
                        lambda a=alert: _records(r, keys, a.id), 10, what="its delivery record"
                    )
                    assert [e["outcome"] for e in records] == ["delivered"]
        finally:
            client.close()


def _records(r: redis.Redis, keys: Keys, alert_id: str) -> list[dict[str, str]]:
    return [e for e in stream(r, keys.notify_log) if e["id"] == alert_id]


def test_a_fault_in_the_fanout_dead_letters_nothing_the_notifiers_queue_the_batch(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    alert = fire(r, keys, "bot-1")
    batch = _batch(r, keys)
    with _pair(prefix, redis_url) as (fast, _):
        fanout = fast.handlers[0]
        assert isinstance(fanout, QueueFanout)

        def broken(*_: Any) -> None:
            raise RuntimeError("a bug in the fan-out")

        fanout._fan_out = broken  # type: ignore[method-assign]
        fast.process(batch)
        assert not fast.stats.errors
        assert r.xlen(keys.deadletter) == 0
        for entry in ENTRIES:
            assert r.hexists(keys.notifier_jobs(f"f-{entry['name']}"), alert.id), entry["name"]


def test_a_worker_stopped_right_after_a_delivery_leaves_it_logged_and_finished(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    """A delivery is logged and finished with the thread's next claim: a stop in between must
    still do both, or another worker would deliver it again."""
    with receiver() as hook:
        entries = [{"type": "webhook", "url": hook.url, **FAST_DELIVERY}]
        with notifier_running(pipeline_with(prefix, redis_url, entries), redis_url):
            alert = fire(r, keys)
            hook.wait_requests(1)
    assert [e["outcome"] for e in _records(r, keys, alert.id)] == ["delivered"]
    assert r.hlen(keys.notifier_jobs("webhook")) == 0
    assert r.zcard(keys.notifier_queue("webhook")) == 0
