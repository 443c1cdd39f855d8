"""Memory: a robust trend over per-bucket minimum RSS fires before the limit is reached, ignores
spikes and sawtooth GC patterns, and resolves on restart or when the growth stops."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis
from agents_detect.kit import Feed, alerts, fired, pipeline_for, resolved, transitions, worker_for

from agentwatch.keys import Keys
from detectors.memory import MemoryConfig, format_bytes, parse_bytes, theil_sen

MB = 1024 * 1024
SETTINGS = {"window": "1s", "points": 10, "min_points": 5, "limit": "1GB", "horizon": "10s", "fire_after": 2}
NO_LAG = {"enabled": False}
"""These replays feed days of synthetic time through the engine while the lag detector judges the
pipeline on the real clock: its verdicts are no concern of the memory tests (on a loaded box one
fired before the leak did)."""


def test_theil_sen_shrugs_off_outliers() -> None:
    t = [float(k) for k in range(10)]
    clean = [5 + 2 * k for k in t]
    wild = list(clean)
    wild[3], wild[7] = 1000.0, -50.0  # two wild samples
    assert theil_sen(t, clean) == pytest.approx((2.0, 5.0, 1.0))
    slope, intercept, rising = theil_sen(t, wild)
    assert (slope, intercept) == pytest.approx((2.0, 5.0)) and rising > 0.7


@pytest.mark.parametrize(("text", "size"), [("4GB", 4 * 10**9), ("4GiB", 4 * 2**30), ("512MB", 512 * 10**6),
                                            ("1.5Gi", int(1.5 * 2**30)), (1024, 1024)])  # fmt: skip
def test_sizes_parse_with_units(text: Any, size: int) -> None:
    assert parse_bytes(text) == size
    assert MemoryConfig.model_validate({"limit": text}).limit == size


def test_sizes_read_like_people_write_them() -> None:
    assert (format_bytes(210 * 10**6), format_bytes(3.9e9), format_bytes(512)) == (
        "210 MB",
        "3.9 GB",
        "512 B",
    )


@pytest.fixture
def feed(redis_url: str, prefix: str) -> Iterator[Feed]:
    worker = worker_for(pipeline_for(prefix, redis_url, memory=SETTINGS, lag=NO_LAG), redis_url)
    feed = Feed(worker)
    feed.apply([feed.event("bot", "start")])
    yield feed
    worker.client.close()


def pulses(feed: Feed, rss_at: Any, seconds: float, every_ms: int = 20, agent: str = "bot") -> None:
    for _ in range(int(seconds * 1000 / every_ms)):
        feed.now += every_ms
        feed.apply([feed.event(agent, "pulse", rss=int(rss_at(feed.now)), at=feed.now)])


def test_a_leak_fires_before_the_limit_and_a_restart_resolves(feed: Feed, r: redis.Redis, keys: Keys) -> None:
    t0 = feed.now
    pulses(feed, lambda t: 200 * 10**6 + (t - t0) * 100 * 10**3, seconds=2.5)  # +100 MB/s
    (alert,) = alerts(r, keys)
    assert (alert.detector, alert.status, alert.severity) == ("memory", "firing", "warning")
    assert alert.summary.startswith("bot: RSS 202 MB -> ")  # the first pulse, 20 ms in
    assert "; 1.0 GB limit in ~" in alert.summary
    assert 0 < alert.details["eta_s"] <= 10 and alert.details["trend_per_h"] == pytest.approx(
        3.6e11, rel=0.05
    )
    feed.apply([feed.event("bot", "start", run="run-2")])
    assert transitions(r, keys) == [("bot", "memory", "firing"), ("bot", "memory", "resolved")]
    assert resolved(r, keys, "memory")[0].summary.startswith("bot: restarted (RSS was ")


def test_growth_that_stops_resolves(feed: Feed, r: redis.Redis, keys: Keys) -> None:
    t0 = feed.now
    pulses(feed, lambda t: 200 * 10**6 + (t - t0) * 100 * 10**3, seconds=2)
    assert fired(r, keys, "memory")
    pulses(feed, lambda t: 400 * 10**6, seconds=2)
    assert transitions(r, keys) == [("bot", "memory", "firing"), ("bot", "memory", "resolved")]


@pytest.mark.parametrize(
    "shape",
    [
        lambda t: 300 * MB + (150 * MB if (t // 50) % 7 == 0 else 0),  # flat with GC spikes
        lambda t: 300 * MB + (t % 400) * MB // 2,  # sawtooth: grows, collected, grows
        lambda t: 300 * MB + (t % 10_000) * 10,  # growing, but nowhere near 1 GB in 10 s
    ],
)
def test_spikes_sawtooth_and_slow_growth_stay_quiet(
    feed: Feed, r: redis.Redis, keys: Keys, shape: Any
) -> None:
    pulses(feed, shape, seconds=3)
    assert alerts(r, keys) == []


def test_a_noisy_leak_fires_once_and_stays_open_while_it_goes_on(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    """A replay: RSS grows linearly from 210 MB to 3.9 GB over 3 days (+51 MB/h), with 0.3%
    noise, default settings (limit 4 GB, horizon 6 h, window 1 h). Near the horizon the noisy
    projection wanders around it; with one test for hot and cool the incident resolved
    ("no longer on course") and fired again while the leak went on."""
    worker = worker_for(pipeline_for(prefix, redis_url, silence={"enabled": False}, lag=NO_LAG), redis_url)
    feed = Feed(worker)
    rng = np.random.default_rng(1)
    t0, every, steps = feed.now, 30_000, 3 * 86400 // 30
    feed.apply([feed.event("bot", "start", at=t0)])
    rss = (210e6 + (3.9e9 - 210e6) * np.arange(1, steps + 1) / steps) * (1 + rng.normal(0, 0.003, steps))
    for start in range(0, steps, 10):  # 5 minutes a batch: each bucket judged as it closes, as live
        feed.apply([feed.event("bot", "pulse", rss=int(rss[k]), at=t0 + (k + 1) * every)
                    for k in range(start, min(start + 10, steps))])  # fmt: skip
    assert transitions(r, keys) == [("bot", "memory", "firing")]
    alert = fired(r, keys, "memory")[0]
    assert 60 < (alert.at_ms - t0) / 3_600_000 < 70 and "4.0 GB limit in ~" in alert.summary
    worker.client.close()
