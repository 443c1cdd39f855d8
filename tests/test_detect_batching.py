"""Verdicts do not depend on how the stream is cut into batches.

"N workers produce exactly the alerts one worker would" needs more than atomic updates: a worker
catching up on a backlog folds many of an agent's beats into one segment, a live one sees them one
by one. The reference is one beat at a time in stream order; the same histories (a start, its
warm-up and a spike in one breath; a rate burst of normal-sized beats; a recovery interrupted by a
noisy beat; a cost spike; a loop) go through batches of 1, 5, 50 and 1,000 events, with the fast
path and with the update script alone, and must raise the same alerts in the same order.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from agents_detect.kit import Feed, pipeline_for, transitions, worker_for

from agentwatch.keys import Keys

TOKENS = {"warmup": 5, "window": "1s", "recover_after": 3, "repeat": 10, "min_cost": 0.5}
T0 = 1_795_000_000_000
Event = tuple[str, int, str, dict[str, Any]]  # agent, at (ms after T0), kind, fields


def history() -> list[Event]:
    rng = random.Random(3)
    out: list[Event] = []

    def beats(agent: str, start: int, count: int, every: int, tokens: int, **fields: Any) -> int:
        for k in range(count):
            out.append(
                (agent, start + k * every, "beat", {"tokens": int(tokens * rng.uniform(0.8, 1.2)), **fields})
            )
        return start + count * every

    for agent in ("early", "spiker", "burster", "coster", "looper", "noisy"):
        out.append((agent, 0, "start", {"interval": 0.1}))
    # a start, its warm-up and a spike close together: one segment when batched
    t = beats("early", 1, 6, 10, 100)
    out.append(("early", t, "beat", {"tokens": 9000}))
    beats("early", t + 10, 10, 100, 100)
    # warm, spike, the runaway goes on, calm
    t = beats("spiker", 3, 12, 100, 200)
    t = beats("spiker", t, 4, 100, 30_000)
    beats("spiker", t, 8, 100, 200)
    # ~1,000 tokens/s for 6 s, then 20x the rate in normal-sized beats for 3 s, then normal again
    t = beats("burster", 5, 60, 100, 100)
    t = beats("burster", t, 600, 5, 100)
    beats("burster", t, 40, 100, 100)
    # cost per beat: a spike, calm after
    for k in range(10):
        out.append(("coster", 7 + k * 100, "beat", {"cost": 0.01 * rng.uniform(0.8, 1.2)}))
    out.append(("coster", 1100, "beat", {"cost": 2.5}))
    for k in range(5):
        out.append(("coster", 1200 + k * 100, "beat", {"cost": 0.01}))
    # varied work items, one item 15 times, varied again
    t = 9
    for k in range(40):
        fp = "stuck-item" if 10 <= k < 25 else f"item-{k}"
        out.append(("looper", t, "beat", {"tokens": 100, "fp": fp}))
        t += 50
    # a spike; then calm, calm, a beat 3x the baseline (not anomalous, not calm), calm x3
    t = beats("noisy", 11, 10, 100, 100)
    out.append(("noisy", t, "beat", {"tokens": 5000}))
    for k, tokens in enumerate([100, 100, 300, 100, 100, 100, 100]):
        out.append(("noisy", t + 100 * (k + 1), "beat", {"tokens": tokens}))
    out.sort(key=lambda e: e[1])
    return out


EXPECTED = {
    "early": [("tokens", "firing"), ("tokens", "resolved")],
    "spiker": [("tokens", "firing"), ("tokens", "resolved")],
    "burster": [("tokens", "firing"), ("tokens", "resolved")],
    "coster": [("tokens", "firing"), ("tokens", "resolved")],
    "looper": [("loop", "firing"), ("loop", "resolved")],
    "noisy": [("tokens", "firing"), ("tokens", "resolved")],
}


@pytest.fixture
def make_feed(redis_url: str, prefix: str) -> Iterator[Any]:
    workers = []

    def make(fast: bool) -> Feed:
        worker = worker_for(
            pipeline_for(prefix, redis_url, tokens=TOKENS, memory={"enabled": False}), redis_url
        )
        workers.append(worker)
        feed = Feed(worker, t0_ms=T0)
        feed.engine.use_fast_path = fast
        return feed

    yield make
    for worker in workers:
        worker.client.close()


def by_agent(r: redis.Redis, keys: Keys) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for agent, detector, status in transitions(r, keys):
        out.setdefault(agent, []).append((detector, status))
    return out


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("size", [1, 5, 50, 1000])
def test_the_same_history_in_any_batches_raises_the_same_alerts(
    size: int, fast: bool, make_feed: Any, r: redis.Redis, keys: Keys
) -> None:
    feed = make_feed(fast)
    events = history()
    messages = [feed.event(agent, kind, at=T0 + at, **fields) for agent, at, kind, fields in events]
    for start in range(0, len(messages), size):
        feed.apply(messages[start : start + size])
    assert by_agent(r, keys) == EXPECTED
    burst = [a for a in transitions(r, keys) if a[0] == "burster"]
    assert len(burst) == 2  # one incident for the whole burst


def test_recovery_waits_for_the_rate_to_settle_not_for_a_window_to_start(
    make_feed: Any, r: redis.Redis, keys: Keys
) -> None:
    """A rate runaway is made of normal-sized beats: every new window starts with a few of them,
    which used to count as calm and resolved (then re-fired) the incident three times in 3 s."""
    from agents_detect.kit import resolved  # noqa: PLC0415

    feed = make_feed(True)
    events = [e for e in history() if e[0] == "burster"]
    burst_end = T0 + 5 + 60 * 100 + 600 * 5
    for agent, at, kind, fields in events:  # one event per batch, as a live worker sees them
        feed.apply([feed.event(agent, kind, at=T0 + at, **fields)])
    assert [t[1:] for t in transitions(r, keys)] == [("tokens", "firing"), ("tokens", "resolved")]
    (back,) = resolved(r, keys, "tokens")
    assert back.at_ms > burst_end
