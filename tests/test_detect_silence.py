"""Silence against a real Redis and a running worker: fires once after max(after, 3 x interval),
names the cause, honours extend(), resolves when the agent is seen again, never for a retired
agent, and per-agent overrides apply."""

from __future__ import annotations

import json
import time

import pytest
import redis
from agents_detect.kit import Agent, fired, pipeline_for, resolved, transitions, worker_for

from agentwatch.codec import entry_ms
from agentwatch.keys import Keys
from agentwatch.redisconn import server_time_ms
from detectors.agent import read_agents

from helpers import running, wait_for

MB = 1024 * 1024


def watched_until(r: redis.Redis, keys: Keys) -> int:
    """The engine's last timer check as checkpointed (Redis ms; 0: none yet)."""
    meta = r.hget(keys.checkpoint(0), "meta")
    return int(json.loads(meta).get("tick_ms", 0)) if meta else 0


def test_fires_once_after_the_allowance_and_resolves_when_seen_again(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    worker = worker_for(pipeline_for(prefix, redis_url, silence={"after": "800ms"}), redis_url)
    bot = Agent(r, keys, "bot")
    with running(worker):
        bot.start(interval=0.1)
        last = bot.beat()
        alert = wait_for(lambda: fired(r, keys, "silence"), timeout=5, what="silence alert")[0]
        waited_ms = alert.at_ms - entry_ms(last)
        # Never before the allowance; soon after it, not a whole allowance late (the delay itself
        # is benchmarks/detectors_silence_delay.py's figure: a loaded box stretches the ticks).
        assert 800 <= waited_ms < 800 + 2_000, waited_ms
        assert alert.agent == "bot" and alert.severity == "critical" and alert.dedup_key == "bot/silence"
        assert alert.summary.startswith("bot: no heartbeat for ")
        assert alert.summary.endswith("process gone without a goodbye (SIGKILL, OOM, host loss)")
        time.sleep(0.3)  # more ticks: still one alert
        assert len(fired(r, keys, "silence")) == 1
        bot.beat()
        back = wait_for(lambda: resolved(r, keys, "silence"), timeout=5, what="resolved")[0]
        assert back.summary.startswith("bot: seen again after ")
    assert transitions(r, keys) == [("bot", "silence", "firing"), ("bot", "silence", "resolved")]


def test_the_allowance_is_three_declared_intervals_when_that_is_longer(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    worker = worker_for(pipeline_for(prefix, redis_url, silence={"after": "300ms"}), redis_url)
    slow = Agent(r, keys, "slow")
    with running(worker):
        slow.start(interval=0.5)
        last = slow.beat()
        alert = wait_for(lambda: fired(r, keys, "silence"), timeout=5, what="silence alert")[0]
    # Never before the allowance, and soon after it (generous: a loaded box stretches the
    # ticks); the allowance itself is in the details, exactly.
    assert 1500 <= alert.at_ms - entry_ms(last) < 1500 + 2_000
    assert alert.details["allowance_s"] == 1.5 and alert.details["interval_s"] == 0.5


def test_extend_holds_the_alert_off_until_the_step_should_be_over(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    worker = worker_for(pipeline_for(prefix, redis_url, silence={"after": "500ms"}), redis_url)
    bot = Agent(r, keys, "bot")
    with running(worker):
        bot.start()
        bot.beat()
        extended = bot.pulse(extend=1.0)  # "a long step starts now: wait 1 s longer"
        alert = wait_for(lambda: fired(r, keys, "silence"), timeout=5, what="silence alert")[0]
    assert alert.at_ms - entry_ms(extended) >= 1500


def test_a_beat_ends_an_extension_and_the_silence_counts_from_it_again(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    """PROTOCOL.md: a beat ends any extension announced before it. An agent that dies right after
    that beat is silent one allowance after it, not when the extension would have run out."""
    worker = worker_for(pipeline_for(prefix, redis_url, silence={"after": "500ms"}), redis_url)
    bot = Agent(r, keys, "bot")
    with running(worker):
        bot.start()
        extended = entry_ms(bot.pulse(extend=60.0))  # a long step...
        # (once the start's allowance was checked, the agent's next check is the extension's end)
        wait_for(lambda: watched_until(r, keys) > extended + 600, timeout=10, what="a check past the start's")
        last = bot.beat()  # ...that ended early; then the process dies
        alert = wait_for(lambda: fired(r, keys, "silence"), timeout=10, what="silence alert")[0]
    assert 500 <= alert.at_ms - entry_ms(last) < 500 + 5_000


def test_a_memory_climb_before_the_silence_is_named(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    worker = worker_for(pipeline_for(prefix, redis_url, silence={"after": "500ms"}), redis_url)
    leaky, steady = Agent(r, keys, "leaky"), Agent(r, keys, "steady")
    with running(worker):
        for agent in (leaky, steady):
            agent.start()
        for step in range(10):
            leaky.pulse(rss=(210 + 400 * step) * MB)
            steady.pulse(rss=(210 + step) * MB)
        wait_for(lambda: len(fired(r, keys, "silence")) == 2, timeout=5, what="two silence alerts")
    by_agent = {a.agent: a for a in fired(r, keys, "silence")}
    assert by_agent["leaky"].summary.endswith("likely killed for memory: RSS grew 220 MB -> 4.0 GB")
    assert by_agent["steady"].summary.endswith("process gone without a goodbye (SIGKILL, OOM, host loss)")


def test_a_retired_agent_is_never_silent_until_it_starts_again(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    worker = worker_for(pipeline_for(prefix, redis_url, silence={"after": "300ms"}), redis_url)
    bot = Agent(r, keys, "bot")
    with running(worker):
        bot.start()
        bot.beat()
        bot.exit("shutdown")
        quiet_until = server_time_ms(r) + 1200
        wait_for(lambda: server_time_ms(r) > quiet_until, timeout=5)
        assert transitions(r, keys) == []
        assert read_agents(r, keys)["bot"]["retired"]
        bot.start(run="run-2")
        wait_for(lambda: fired(r, keys, "silence"), timeout=5, what="silence after the restart")
    assert transitions(r, keys) == [("bot", "silence", "firing")]


def test_per_agent_overrides_by_glob(redis_url: str, prefix: str, r: redis.Redis, keys: Keys) -> None:
    pipeline = pipeline_for(
        prefix, redis_url, silence={"after": "300ms", "agents": {"batch-*": {"after": "1h"}}}
    )
    worker = worker_for(pipeline, redis_url)
    with running(worker):
        for name in ("batch-7", "chat-1"):
            agent = Agent(r, keys, name)
            agent.start()
            agent.beat()
        wait_for(lambda: fired(r, keys, "silence"), timeout=5, what="silence alert")
        time.sleep(0.5)
    assert transitions(r, keys) == [("chat-1", "silence", "firing")]
    watched = read_agents(r, keys)["batch-7"]  # still expected, with its own hour
    assert watched["seen_ms"] and not watched["retired"] and watched["open"] == []


def test_many_workers_one_alert_per_silent_agent(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    pipeline = pipeline_for(prefix, redis_url, silence={"after": "400ms"})
    workers = [worker_for(pipeline, redis_url, consumer=f"w{i}") for i in range(4)]
    agents = [Agent(r, keys, f"bot-{i}") for i in range(50)]
    with running(workers[0]), running(workers[1]), running(workers[2]), running(workers[3]):
        for agent in agents:
            agent.start()
            agent.beat()
        wait_for(lambda: len(fired(r, keys, "silence")) >= 50, timeout=8, what="50 silence alerts")
        time.sleep(0.4)
        for agent in agents:
            agent.beat()
            agent.exit("shutdown")  # no second silence while we count
        wait_for(lambda: len(resolved(r, keys, "silence")) >= 50, timeout=8, what="50 resolutions")
        time.sleep(0.5)
    seen = transitions(r, keys)
    assert sorted(seen) == sorted([(a.name, "silence", s) for a in agents for s in ("firing", "resolved")])


def test_a_lost_record_relearns_the_interval_from_the_next_pulse(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    """Interval 0.5 s, after 0.5 s: the allowance is 1.5 s, and the agent beats every 0.75 s.
    Its record is lost (Redis restarted without persistence, or a layout change): judged by
    ``after`` alone, silence would fire and resolve on every beat. Pulses repeat the interval,
    so the next one restores the allowance. (0.75 s of margin under the allowance: this
    thread's pace holds on a loaded box; 0.3 s of it did not always.)"""
    worker = worker_for(pipeline_for(prefix, redis_url, silence={"after": "500ms"}), redis_url)
    bot = Agent(r, keys, "bot")
    with running(worker):
        bot.start(interval=0.5)
        for step in range(5):
            if step == 1:
                wait_for(lambda: r.hexists(keys.states(0), "bot"), timeout=5, what="the record")
                r.hdel(keys.states(0), "bot")  # the record is gone
            if step % 2 == 1:
                bot.pulse(rss=100 * MB, interval=0.5)
            last = bot.beat(tokens=100)
            time.sleep(0.75)
        wait_for(lambda: read_agents(r, keys).get("bot", {}).get("beat_ms") == entry_ms(last), timeout=5)
        interval = read_agents(r, keys)["bot"]["interval_s"]
    assert transitions(r, keys) == []
    assert interval == pytest.approx(0.5)


def test_recover_after_needs_events_on_time_in_a_row(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    """``recover_after = 3``: an agent that comes back, falls silent again for longer than its
    allowance, and comes back again resolves only after three events on time in a row; an agent
    overridden to 1 resolves at its first event, as by default."""
    from agents_detect.kit import Feed  # noqa: PLC0415

    silence = {"after": "1s", "recover_after": 3, "agents": {"quick-*": {"recover_after": 1}}}
    worker = worker_for(pipeline_for(prefix, redis_url, silence=silence), redis_url)
    feed = Feed(worker)
    t0 = feed.now
    feed.apply([feed.event(a, "start", at=t0) for a in ("bot", "quick-1")])
    feed.tick(t0 + 100)
    feed.tick(t0 + 1200)
    assert sorted(a.agent for a in fired(r, keys, "silence")) == ["bot", "quick-1"]
    feed.apply([feed.event(a, "beat", at=t0 + 2000) for a in ("bot", "quick-1")])
    assert [a.agent for a in resolved(r, keys, "silence")] == ["quick-1"]
    feed.apply([feed.event("bot", "beat", at=t0 + 2500)])  # two on time...
    feed.apply([feed.event("bot", "beat", at=t0 + 4000)])  # ...then 1.5 s: late, the count restarts
    feed.apply([feed.event("bot", "pulse", at=t0 + 4500)])
    assert [a.agent for a in resolved(r, keys, "silence")] == ["quick-1"]
    feed.apply([feed.event("bot", "beat", at=t0 + 5000)])
    (back,) = resolved(r, keys, "silence", "bot")
    assert (
        back.at_ms == t0 + 5000
        and back.summary == "bot: seen again after 2s of silence; 3 events on time since"
    )
    assert transitions(r, keys).count(("bot", "silence", "firing")) == 1
    worker.client.close()
