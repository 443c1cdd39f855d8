"""Token anomalies and loops, driven through the engine with explicit Redis times: a spike fires,
the floor keeps small numbers quiet, a burst of normal beats trips the window rate, the baseline
never learns the runaway, recovery takes recover_after calm beats, and a repeated fp is a loop."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from functools import partial
from typing import Any

import numpy as np
import pytest
import redis
from agents_detect.kit import Feed, alerts, fired, pipeline_for, resolved, transitions, worker_for

from agentwatch import codec
from agentwatch.keys import Keys
from detectors.agent import read_agents
from detectors.tokens import TokenState


@pytest.fixture
def make_feed(redis_url: str, prefix: str) -> Iterator[Any]:
    workers = []

    def make(**tokens: Any) -> Feed:
        worker = worker_for(pipeline_for(prefix, redis_url, tokens=tokens), redis_url)
        workers.append(worker)
        return Feed(worker)

    yield make
    for worker in workers:
        worker.client.close()


def agent_view(r: redis.Redis, keys: Keys, agent: str = "bot") -> dict[str, Any]:
    """The checkpointed agent as views read it, its tokens state by field name."""
    return read_agents(r, keys, states={"tokens": TokenState})[agent]


def warm(feed: Feed, agent: str = "bot", beats: int = 20, tokens: int = 200, gap_ms: int = 1000) -> None:
    rng = np.random.default_rng(1)
    batch = [feed.event(agent, "start")]
    for _ in range(beats):
        batch.append(
            feed.event(agent, "beat", tokens=int(tokens * rng.uniform(0.7, 1.3)), at=feed.now + gap_ms)
        )
    feed.apply(batch)


def test_a_spike_fires_the_baseline_holds_and_calm_beats_resolve(
    make_feed: Any, r: redis.Redis, keys: Keys
) -> None:
    feed = make_feed(recover_after=3)
    warm(feed)
    baseline = agent_view(r, keys)["states"]["tokens"]
    feed.apply([feed.event("bot", "beat", tokens=40_000, at=feed.now + 1000)])
    (alert,) = alerts(r, keys)
    assert (alert.detector, alert.status, alert.severity) == ("tokens", "firing", "error")
    assert alert.summary.startswith("bot: token use 40,000 in one beat, ")
    assert "x its baseline of " in alert.summary and alert.details["why"] == "beat"
    for _ in range(5):  # the runaway goes on: still one incident, and nothing learned from it
        feed.apply([feed.event("bot", "beat", tokens=30_000, at=feed.now + 1000)])
    during = agent_view(r, keys)["states"]["tokens"]
    learned = ("tokens_num", "tokens_weight")
    assert [during[k] for k in learned] == [baseline[k] for k in learned]
    feed.apply([feed.event("bot", "beat", tokens=210, at=feed.now + 1000) for _ in range(2)])
    assert not resolved(r, keys, "tokens")
    feed.apply([feed.event("bot", "beat", tokens=190, at=feed.now + 1000)])
    assert transitions(r, keys) == [("bot", "tokens", "firing"), ("bot", "tokens", "resolved")]
    assert resolved(r, keys, "tokens")[0].summary.startswith("bot: token use back near its baseline of ")


def test_the_floor_keeps_small_numbers_quiet(make_feed: Any, r: redis.Redis, keys: Keys) -> None:
    feed = make_feed(min_tokens=500)
    warm(feed, tokens=2)
    feed.apply([feed.event("bot", "beat", tokens=40, at=feed.now + 1000)])  # 20x, but tiny
    assert alerts(r, keys) == []
    feed.apply([feed.event("bot", "beat", tokens=5000, at=feed.now + 1000)])
    assert [a.detector for a in alerts(r, keys)] == ["tokens"]


def test_nothing_is_judged_during_warm_up(make_feed: Any, r: redis.Redis, keys: Keys) -> None:
    feed = make_feed(warmup=20)
    warm(feed, beats=5)
    feed.apply([feed.event("bot", "beat", tokens=90_000, at=feed.now + 1000)])
    assert alerts(r, keys) == []


def test_many_normal_beats_in_a_short_window_trip_the_rate(
    make_feed: Any, r: redis.Redis, keys: Keys
) -> None:
    feed = make_feed(warmup=5, window="1s", factor=10)
    warm(feed, beats=40, tokens=100, gap_ms=100)  # ~1,000 tokens per second over 4 windows
    burst = [feed.event("bot", "beat", tokens=100, at=feed.now + 2) for _ in range(150)]
    feed.apply(burst)
    (alert,) = fired(r, keys, "tokens")
    assert alert.details["why"] == "rate"
    assert "tokens in under 1s, over 10x the usual" in alert.summary


def test_cost_per_beat_is_judged_too(make_feed: Any, r: redis.Redis, keys: Keys) -> None:
    feed = make_feed(warmup=5, min_cost=0.5)
    batch = [feed.event("bot", "start")]
    batch += [feed.event("bot", "beat", cost=0.01, at=feed.now + 1000) for _ in range(10)]
    feed.apply(batch)
    feed.apply([feed.event("bot", "beat", cost=2.5, at=feed.now + 1000)])
    (alert,) = alerts(r, keys)
    assert alert.details["why"] == "cost" and alert.summary.startswith("bot: $2.50 in one beat, ")


def test_the_same_fp_repeat_times_in_a_row_is_a_loop(make_feed: Any, r: redis.Redis, keys: Keys) -> None:
    feed = make_feed(repeat=20, recover_after=3)
    feed.apply([feed.event("bot", "start"), *[feed.event("bot", "beat", fp=f"job-{i}") for i in range(30)]])
    feed.apply([feed.event("bot", "beat", fp="job-42") for _ in range(19)])
    assert alerts(r, keys) == []
    feed.apply([feed.event("bot", "beat", fp="job-42")])
    (alert,) = alerts(r, keys)
    assert (alert.detector, alert.dedup_key) == ("loop", "bot/loop")
    assert alert.summary == "bot: work loop: the same work item (fp 'job-42') 20 beats in a row"
    feed.apply([feed.event("bot", "beat", fp="job-42") for _ in range(100)])
    feed.apply([feed.event("bot", "beat", fp=f"job-{i}") for i in range(43, 46)])
    assert transitions(r, keys) == [("bot", "loop", "firing"), ("bot", "loop", "resolved")]


def test_a_loop_split_across_batches_and_interleaved_with_others_is_counted_whole(
    make_feed: Any, r: redis.Redis, keys: Keys
) -> None:
    feed = make_feed(repeat=10)
    feed.apply([feed.event("a", "start"), feed.event("b", "start")])
    for _ in range(4):
        feed.apply(
            [m for _ in range(3) for m in (feed.event("a", "beat", fp="x"), feed.event("b", "beat", fp="y"))]
        )
    assert sorted(a.agent for a in fired(r, keys, "loop")) == ["a", "b"]


def test_redelivered_beats_are_not_counted_twice(make_feed: Any, r: redis.Redis, keys: Keys) -> None:
    feed = make_feed(warmup=3)
    warm(feed, beats=10, tokens=100)
    spike = [feed.event("bot", "beat", tokens=5000, at=feed.now + 1000)]
    feed.apply(spike)
    before = agent_view(r, keys)
    feed.apply(list(spike))
    assert agent_view(r, keys) == before
    assert transitions(r, keys) == [("bot", "tokens", "firing")]


def rate_per_min(rec: dict[str, Any]) -> float:
    """Tokens per minute as `agentwatch status` shows it (the rate baseline)."""
    state = rec["states"]["tokens"]
    return float(state["rate_num"]) / float(state["rate_weight"]) * 60


def test_replayed_beats_leave_the_rate_as_it_was(make_feed: Any, r: redis.Redis, keys: Keys) -> None:
    """A worker dies after its checkpoint but before its XACK: its successor is handed the same
    entries again. (They used to be applied late, out of order, and left out of the rate: 4,700-
    10,800 tokens/min shown for an agent using 18,000.) Replayed or not, the rate is the same."""
    rates = []
    feed = make_feed(window="60s")
    for replayed in (False, True):
        agent = f"bot-{replayed}"
        feed.apply([feed.event(agent, "start", at=feed.now)])
        batches = [[feed.event(agent, "beat", tokens=300, at=feed.now + 1000) for _ in range(25)]
                   for _ in range(24)]  # fmt: skip
        for k in range(0, len(batches), 2):  # 10 minutes of beats, 25 s per batch
            first, second = batches[k : k + 2]
            feed.apply(first)
            feed.apply(second)
            if replayed:
                feed.apply(list(first))  # delivered again after its successor
                feed.apply(list(second))
        rates.append(rate_per_min(agent_view(r, keys, agent)))
    assert rates[0] == pytest.approx(18_000, rel=0.1)  # (the first window was partial)
    assert rates[1] == pytest.approx(rates[0], rel=1e-6)


def applied(r: redis.Redis, keys: Keys, seq: int) -> bool:
    """Whether the checkpointed agent "bot" has applied its event ``seq``."""
    return int(read_agents(r, keys, ["bot"]).get("bot", {}).get("last_seq", -1)) >= seq


def test_two_workers_see_the_rate_one_worker_sees(redis_url: str, prefix: str, r: redis.Redis) -> None:
    """A backlog (10 minutes of an agent beating 300 tokens a second) consumed in small batches
    by one worker, and by two workers on a copy of the stream (they share its shard by lease)."""
    from helpers import running, wait_for  # noqa: PLC0415

    solo, duo = Keys(prefix), Keys(prefix + "x")
    now = int(r.time()[0]) * 1000
    for keys in (solo, duo):
        pipe = r.pipeline(transaction=False)
        for k in range(601):
            event = {"v": 1, "agent": "bot", "kind": "start" if k == 0 else "beat", "ts": 0.0, "run": "r1",
                     "seq": k, **({"interval": 1.0} if k == 0 else {"tokens": 300})}  # fmt: skip
            pipe.xadd(keys.events(), {"d": codec.encode(event)}, id=f"{now - 700_000 + k * 1000}-0")
        pipe.execute()
    try:
        for keys, count in ((solo, 1), (duo, 2)):
            pipeline = pipeline_for(keys.prefix, redis_url, worker={"batch": 7})
            workers = [worker_for(pipeline, redis_url, consumer=f"w{i}") for i in range(count)]
            with running(workers[0]), running(workers[1]) if count == 2 else nullcontext():
                wait_for(partial(applied, r, keys, 600), timeout=20)
        rates = [rate_per_min(agent_view(r, keys)) for keys in (solo, duo)]
    finally:
        for key in r.scan_iter(f"{duo.prefix}:*"):
            r.delete(key)
    assert rates[0] == pytest.approx(18_000, rel=0.1)  # (the first window was partial)
    assert rates[1] == pytest.approx(rates[0], rel=1e-6)


def test_a_replayed_spike_does_not_fire_twice_and_an_unsaved_one_fires_once(
    make_feed: Any, r: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A runaway fires and its calm beats resolve it; the same entries delivered again (a worker
    died before its XACK) are skipped: no second incident. A spike applied by an owner that died
    before its checkpoint was told of nowhere: the successor applies it again and fires, once."""
    feed = make_feed(warmup=5, recover_after=3)
    warm(feed, beats=10, tokens=100)
    spike = [feed.event("bot", "beat", tokens=9000, at=feed.now + 100) for _ in range(2)]
    calm = [feed.event("bot", "beat", tokens=100, at=feed.now + 100) for _ in range(4)]
    for batch in (spike, calm, spike, calm):
        feed.apply(list(batch))
    assert transitions(r, keys) == [("bot", "tokens", "firing"), ("bot", "tokens", "resolved")]
    warm(feed, agent="other", beats=10, tokens=100)
    held = [feed.event("other", "beat", tokens=9000, at=feed.now + 100)]
    monkeypatch.setattr(feed.engine, "checkpoint", lambda shard: None)  # dies before saving
    feed.apply(held)
    assert transitions(r, keys)[2:] == []  # decided, but neither saved nor published
    r.delete(keys.lease(0))  # its lease runs out
    successor = make_feed(warmup=5, recover_after=3)
    successor.now = feed.now
    successor.apply(list(held))  # claimed from the dead worker: after the checkpoint, so applied
    successor.apply(list(held))
    assert transitions(r, keys)[2:] == [("other", "tokens", "firing")]
