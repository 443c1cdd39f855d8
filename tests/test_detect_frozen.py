"""A frozen process (SIGSTOP: a suspended VM, a debugger, a swapped-out host) is silent, never
stalled (issue 11, the chaos matrix).

Stall means "the process is alive, its work loop is not": pulses keep coming while beats do not,
for the whole stall allowance. A frozen process sends nothing at all, pulses included; when it
resumes, its pulse thread may well send before its work loop beats. That pulse proves the process
alive from then on, not for the time it was frozen: the stall clock starts again there. Real
agent process, real detector worker, real Redis.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest
import redis
from agents_detect.kit import Feed, fired, pipeline_for, resolved, transitions, worker_for
from test_detect_e2e import Agents, statuses

from agentwatch.keys import Keys

from helpers import running, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def agents(redis_url: str, prefix: str) -> Iterator[Agents]:
    started = Agents(redis_url, prefix)
    yield started
    started.stop_all()


def test_a_frozen_agent_is_silence_and_comes_back_without_a_stall(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys, agents: Agents
) -> None:
    # Pulses 4x as often as beats: when frozen, the newest event is almost surely a pulse after
    # the last beat, and on resuming the pulse thread often sends first.
    pipeline = pipeline_for(prefix, redis_url, silence={"after": "1s"}, stall={"after": "1500ms"})
    worker = worker_for(pipeline, redis_url)
    with running(worker):
        bot = agents.start("frozen", "steady", AGENTWATCH_INTERVAL="0.2", AGENTWATCH_PULSE_INTERVAL="0.05")
        wait_for(lambda: r.hexists(keys.states(0), "frozen"), timeout=20, what="the agent seen")
        time.sleep(0.5)  # beating and pulsing steadily
        bot.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: fired(r, keys, "silence", "frozen"), timeout=10, what="silence while frozen")
            time.sleep(1.5)  # frozen for longer than the stall allowance, beat and pulse alike
        finally:
            bot.send_signal(signal.SIGCONT)
        wait_for(lambda: resolved(r, keys, "silence", "frozen"), timeout=10, what="silence resolved")
        time.sleep(2.0)  # long enough for a (false) stall to fire: 1.5 s after the last beat
        assert bot.poll() is None
    assert statuses(r, keys, "frozen") == [("silence", "firing"), ("silence", "resolved")]


def test_the_stall_clock_restarts_after_a_gap_that_proved_nothing(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    """The same, event by event: the gap, then a pulse before the next beat, in one batch or
    apart, then a work loop that really is stuck after resuming: the stall fires one allowance
    after the resumption, not at once."""
    pipeline = pipeline_for(prefix, redis_url, silence={"after": "1s"}, stall={"after": "1500ms"})
    worker = worker_for(pipeline, redis_url)
    feed = Feed(worker)
    t0 = feed.now
    feed.apply([feed.event("bot", "start", at=t0)])
    at = t0
    for k in range(1, 6):  # a beat every 200 ms, pulses every 50 ms
        for j in range(4):
            at = t0 + 200 * k + 50 * j
            feed.apply([feed.event("bot", "beat" if j == 0 else "pulse", at=at)])
        feed.tick(at)
    feed.tick(at + 1100)  # frozen: silence
    assert fired(r, keys, "silence") and not fired(r, keys, "stall")
    back = at + 3000
    # a pulse and a beat after it, in one batch: no stall counted over the frozen time
    feed.apply([feed.event("bot", "pulse", at=back), feed.event("bot", "beat", at=back + 5)])
    feed.tick(back + 10)
    assert resolved(r, keys, "silence") and not fired(r, keys, "stall")
    # frozen again; back with pulses only, apart: the stall waits for its whole allowance
    again = back + 3000
    feed.tick(back + 1200)
    for k in range(20):
        feed.apply([feed.event("bot", "pulse", at=again + 50 * k)])
        feed.tick(again + 50 * k + 1)
    assert not fired(r, keys, "stall")  # 950 ms of pulses since resuming: not stuck yet
    for k in range(20, 40):
        feed.apply([feed.event("bot", "pulse", at=again + 50 * k)])
        feed.tick(again + 50 * k + 1)
    (stall,) = fired(r, keys, "stall")
    assert again + 1500 <= stall.at_ms <= again + 1600
    assert [kind for _, kind, status in transitions(r, keys) if status == "firing"] == [
        "silence",
        "silence",
        "stall",
    ]
    worker.client.close()


def test_pulses_that_thin_out_still_prove_life(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    """Pulses every 50 ms, then (the work loop stuck) only every 600 ms, as an OTel agent's metrics
    exports are sparser than its spans: gaps under half the stall allowance restart nothing, and
    the stall fires one allowance after the last beat."""
    pipeline = pipeline_for(prefix, redis_url, silence={"after": "5s"}, stall={"after": "1500ms"})
    worker = worker_for(pipeline, redis_url)
    feed = Feed(worker)
    t0 = feed.now
    feed.apply([feed.event("bot", "start", at=t0)])
    for k in range(1, 10):
        feed.apply([feed.event("bot", "beat" if k % 4 == 0 else "pulse", at=t0 + 50 * k)])
        feed.tick(t0 + 50 * k)
    last_beat = t0 + 400
    for k in range(1, 5):
        at = t0 + 450 + 600 * k
        feed.apply([feed.event("bot", "pulse", at=at)])
        feed.tick(at + 1)
    (stall,) = fired(r, keys, "stall")
    assert stall.at_ms - last_beat <= 1500 + 600
    worker.client.close()
