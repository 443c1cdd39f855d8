"""The built-ins' per-agent state against a real Redis: idempotent under redelivery, late batches
applied exactly once, runs ordered by Redis time, one record layout for Python and Lua, and the
memory budget of 1 KB per monitored agent."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis
from agents_detect.kit import Feed, pipeline_for, transitions, worker_for

from agentwatch.keys import Keys
from detectors import fold, layout, record, segments
from detectors.state import read_agents


@pytest.fixture
def feed(redis_url: str, prefix: str) -> Iterator[Feed]:
    pipeline = pipeline_for(prefix, redis_url, tokens={"warmup": 3, "min_tokens": 10})
    worker = worker_for(pipeline, redis_url)
    yield Feed(worker)
    worker.client.close()


def beats(feed: Feed, agent: str, count: int, tokens: int = 100, **extra: Any) -> list[Any]:
    return [feed.event(agent, "beat", tokens=tokens, **extra) for _ in range(count)]


def test_a_redelivered_batch_changes_nothing(feed: Feed, r: redis.Redis, keys: Keys) -> None:
    batch = [feed.event("bot", "start", interval=1.0), *beats(feed, "bot", 5, tokens=100)]
    feed.apply(batch)
    first = r.hget(keys.states(0), "bot")
    feed.apply(list(batch))  # the same entries again: a worker died before its XACK
    assert r.hget(keys.states(0), "bot") == first
    rec = read_agents(r, keys)["bot"]
    assert rec["tt"] == 500 and rec["hw"] == 5 and rec["tn"] == 5 and rec["bt"] == 5


def test_a_late_batch_fills_its_gap_exactly_once(feed: Feed, r: redis.Redis, keys: Keys) -> None:
    first = [feed.event("bot", "start"), *beats(feed, "bot", 4, tokens=1)]
    late = beats(feed, "bot", 5, tokens=10)  # seq 5..9: a batch a dead worker held
    last = beats(feed, "bot", 5, tokens=100)
    feed.apply(first)
    feed.apply(last)
    assert read_agents(r, keys)["bot"]["tt"] == 4 + 500
    feed.apply(late)  # reclaimed after its successors were applied
    assert read_agents(r, keys)["bot"]["tt"] == 4 + 50 + 500
    feed.apply(list(late))  # and delivered once more
    feed.apply(list(first))
    rec = read_agents(r, keys)["bot"]
    assert rec["tt"] == 554 and rec["hw"] == 14 and rec["bt"] == 14
    assert (rec["g1a"], rec["g1b"], rec["g2a"], rec["g2b"]) == (0, 0, 0, 0)


def test_a_new_start_begins_a_new_run_and_stale_events_only_prove_life(
    feed: Feed, r: redis.Redis, keys: Keys
) -> None:
    feed.apply([feed.event("bot", "start", interval=2.0), *beats(feed, "bot", 3)])
    feed.apply([feed.event("bot", "start", run="run-2", interval=5.0), *beats(feed, "bot", 2)])
    rec = read_agents(r, keys)["bot"]
    assert rec["run"] == segments.run_hash("run-2") and rec["prun"] == segments.run_hash("run-1")
    assert rec["iv"] == 5.0 and rec["hw"] == 2 and rec["tt"] == 500
    # An old-run beat processed late: no tokens counted (no marks to deduplicate it with).
    old = feed.event("bot", "beat", run="run-1", seq=99, tokens=1000)
    feed.apply([old])
    rec = read_agents(r, keys)["bot"]
    assert rec["tt"] == 500 and rec["seen"] == int(old[0].split(b"-")[0])
    assert rec["bt"] == 3 + 2  # beats of both runs, the stale one not counted


def test_a_forked_childs_start_does_not_take_over(feed: Feed, r: redis.Redis, keys: Keys) -> None:
    feed.apply([feed.event("bot", "start", interval=1.0), *beats(feed, "bot", 2)])
    child = feed.event("bot", "start", run="child", parent="run-1")
    feed.apply([child, feed.event("bot", "beat", run="child", tokens=7)])
    assert read_agents(r, keys)["bot"]["run"] == segments.run_hash("run-1")


def test_python_reads_what_lua_wrote(feed: Feed, r: redis.Redis, keys: Keys) -> None:
    batch = [
        feed.event("bot", "start", interval=0.5),
        feed.event("bot", "beat", tokens=40, cost=0.25),
        feed.event("bot", "pulse", rss=300 * 1024 * 1024),
    ]
    feed.apply(batch)
    rec = read_agents(r, keys)["bot"]
    ms = [int(entry_id.split(b"-")[0]) for entry_id, _ in batch]
    assert rec["ver"] == record.VERSION
    assert (rec["start"], rec["beat"], rec["pulse"], rec["seen"]) == (ms[0], ms[1], ms[2], ms[2])
    assert rec["sa"] == 60_000 and rec["ta"] == 120_000  # max(after, 3 x 0.5 s)
    assert rec["rl"] == 300 * 1024 and rec["tt"] == 40 and rec["ct"] == pytest.approx(0.25)
    assert rec["open"] == [] and not rec["retired"]
    assert r.zscore(keys.agents(0), "bot") == ms[2]
    assert r.zscore(keys.timers(0), "bot") == ms[2] + 60_000


def test_the_numpy_fold_equals_the_ewma_beat_by_beat() -> None:
    rng = np.random.default_rng(7)
    numbers = np.zeros((3, len(layout.SEGMENT_NUMBERS)))
    numbers[:, layout.S_PROFILE] = [1, 2, 1]
    seg_ids = rng.integers(0, 3, size=40)
    values = rng.integers(0, 1000, size=40).astype(float)
    alphas = [0.2, 0.05]
    fold.ewma_terms(numbers, seg_ids, values, layout.S_TN, alphas, low=layout.S_TMIN)
    for index, row in enumerate(numbers):
        alpha = alphas[int(row[layout.S_PROFILE]) - 1]
        xs = [v for s, v in zip(seg_ids.tolist(), values.tolist(), strict=True) if s == index]
        b, w = 123.0, 0.7  # whatever the record held before
        expected_b, expected_w = b, w
        for x in xs:
            expected_b = (1 - alpha) * expected_b + alpha * x
            expected_w = (1 - alpha) * expected_w + alpha
        n, total, top, folded = row[layout.S_TN : layout.S_TW + 1]
        decay = (1 - alpha) ** n
        assert (n, total, top) == (len(xs), sum(xs), max(xs))
        assert decay * b + folded == pytest.approx(expected_b)
        assert decay * w + 1 - decay == pytest.approx(expected_w)


def test_state_costs_under_1kb_per_agent(redis_url: str, prefix: str, r: redis.Redis, keys: Keys) -> None:
    pipeline = pipeline_for(prefix, redis_url, memory={"window": "1s", "points": 12})
    worker = worker_for(pipeline, redis_url)
    feed = Feed(worker)
    agents = [f"fleet-agent-{i:05d}" for i in range(2000)]
    for round_ in range(14):  # every agent: a start, beats with usage and fp, pulses closing buckets
        batch = []
        for name in agents:
            if round_ == 0:
                batch.append(feed.event(name, "start", interval=5.0))
            batch.append(feed.event(name, "beat", tokens=300, cost=0.01, fp=f"item-{round_}", model="gpt-x"))
            batch.append(feed.event(name, "pulse", rss=(200 + round_) * 1024 * 1024, at=feed.now + 100))
        feed.apply(batch)
    total = sum(int(r.memory_usage(key, samples=0) or 0) for key in r.scan_iter(f"{prefix}:{{*"))
    per_agent = total / len(agents)
    assert r.hlen(keys.rss(0)) == len(agents)
    print(f"{per_agent:.0f} bytes per agent")
    assert per_agent <= 1024, f"{per_agent:.0f} bytes per agent"
    worker.client.close()


def test_nothing_was_alerted_by_bookkeeping(feed: Feed, r: redis.Redis, keys: Keys) -> None:
    feed.apply([feed.event("bot", "start"), *beats(feed, "bot", 30)])
    feed.tick()
    assert transitions(r, keys) == []
