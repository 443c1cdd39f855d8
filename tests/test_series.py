"""Chart series (agentwatch/series.py): per-bucket deltas of the detectors' totals, sampled on a
real Redis from records the real engine wrote; idempotent, bounded, forgetting forgotten agents."""

from __future__ import annotations

import redis
from agents_detect.kit import Feed, pipeline_for, worker_for

from agentwatch.keys import Keys
from agentwatch.rollups import Sample, Totals
from agentwatch.series import Series, SeriesRecorder, read_series, sample, unpack

BUCKET_MS = 300_000


def test_a_point_is_what_was_added_during_its_bucket() -> None:
    first = sample(None, 10, Sample(Totals(5, 100, 0.5), 1000), points=4)
    assert first is not None
    second = sample(first, 11, Sample(Totals(8, 160, 0.75), 2000), points=4)
    assert second is not None
    assert sample(second, 11, Sample(Totals(9, 999, 9.0), 3000), points=4) is None  # bucket taken
    series = unpack(second, BUCKET_MS, 4, now_ms=11 * BUCKET_MS + 5)
    assert series is not None
    assert [(p.start_ms // BUCKET_MS, p.beats, p.tokens, p.rss_kib) for p in series.points] == [
        (7, 0, 0, 0), (8, 0, 0, 0), (9, 0, 0, 0), (10, 3, 60, 2000),
    ]  # fmt: skip
    assert series.points[-1].cost == 0.25
    live = series.live(Totals(10, 200, 1.0))
    assert (live.start_ms, live.beats, live.tokens) == (11 * BUCKET_MS, 2, 40)


def test_missed_buckets_read_as_zero_and_old_points_leave_the_ring() -> None:
    raw = sample(None, 0, Sample(Totals(), 0), points=3)
    for bucket, beats in ((1, 1), (2, 3), (3, 6)):
        raw = sample(raw, bucket, Sample(Totals(beats, 0, 0), 0), points=3)
    raw = sample(raw, 7, Sample(Totals(10, 0, 0), 0), points=3)  # buckets 3-5 were not swept
    assert raw is not None
    series = unpack(raw, BUCKET_MS, 3, now_ms=7 * BUCKET_MS)
    assert series is not None
    assert [(p.start_ms // BUCKET_MS, p.beats) for p in series.points] == [(4, 0), (5, 0), (6, 4)]


def _series(r: redis.Redis, keys: Keys, agents: list[str], now_ms: int) -> dict[str, Series]:
    return read_series(r, keys, agents, bucket_s=300, span_s=3600, now_ms=now_ms)


def test_the_recorder_samples_the_engines_totals_once_per_bucket(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    worker = worker_for(pipeline_for(prefix, redis_url), redis_url)
    feed = Feed(worker)
    recorder = SeriesRecorder(r, keys, bucket_s=300, span_s=3600, owner="test")
    feed.apply([feed.event("bot", "start"), feed.event("bot", "beat", tokens=10, cost=0.1)])
    assert recorder.advance(0, 100)
    feed.apply([feed.event("bot", "beat", tokens=30), feed.event("bot", "beat", tokens=2)])
    assert recorder.advance(0, 101)
    feed.apply([feed.event("bot", "beat", tokens=1000)])
    assert recorder.advance(0, 101)  # again, as another worker would: nothing changes
    series = _series(r, keys, ["bot", "unknown"], now_ms=101 * BUCKET_MS + 1)
    assert series["unknown"].points[-1].tokens == 0 and series["unknown"].base == Totals()
    last = series["bot"].points[-1]
    assert (last.start_ms, last.beats, last.tokens) == (100 * BUCKET_MS, 2, 32)
    assert series["bot"].live(Totals(4, 1042, 0.1)).tokens == 1000
    worker.client.close()


def test_a_forgotten_agent_leaves_the_series(redis_url: str, prefix: str, r: redis.Redis, keys: Keys) -> None:
    worker = worker_for(pipeline_for(prefix, redis_url), redis_url)
    feed = Feed(worker)
    recorder = SeriesRecorder(r, keys, bucket_s=300, span_s=3600, owner="test")
    feed.apply([feed.event("a", "beat"), feed.event("b", "beat")])
    assert recorder.advance(0, 100)
    r.hdel(keys.states(0), "b")  # what forgetting does to the detectors' record
    assert recorder.advance(0, 101)
    assert sorted(r.hkeys(keys.series(0))) == [b"a"]
    worker.client.close()
