"""The shard owner's per-agent state against a real Redis: a replayed batch changes nothing, runs
are told apart (a new start, the previous run's late events, a forked child), a gap in the checks
neither hangs the owner nor judges time nobody watched, and the memory budget of 1 KB per
monitored agent (every built-in detector's state, checkpointed) holds."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from agents_detect.kit import Feed, fired, pipeline_for, transitions, worker_for

from agentwatch import codec
from agentwatch.keys import Keys
from detectors.agent import read_agents
from detectors.memory import MemoryState
from detectors.tokens import TokenState

from helpers import caught_up, running, wait_for

STATES: dict[str, type[Any]] = {"tokens": TokenState, "memory": MemoryState}


@pytest.fixture
def feed(redis_url: str, prefix: str) -> Iterator[Feed]:
    pipeline = pipeline_for(prefix, redis_url, tokens={"warmup": 3, "min_tokens": 10})
    worker = worker_for(pipeline, redis_url)
    yield Feed(worker)
    worker.client.close()


def beats(feed: Feed, agent: str, count: int, tokens: int = 100, **extra: Any) -> list[Any]:
    return [feed.event(agent, "beat", tokens=tokens, **extra) for _ in range(count)]


def view(r: redis.Redis, keys: Keys, agent: str = "bot") -> dict[str, Any]:
    """The checkpointed agent as views read it."""
    return read_agents(r, keys, [agent], states=STATES)[agent]


def at_ms(message: tuple[bytes, Any]) -> int:
    return int(message[0].split(b"-")[0])


def test_a_replayed_batch_changes_nothing(feed: Feed, r: redis.Redis, keys: Keys) -> None:
    batch = [feed.event("bot", "start", interval=1.0), *beats(feed, "bot", 5, tokens=100)]
    feed.apply(batch)
    first = r.hget(keys.states(0), "bot")
    feed.apply(list(batch))  # the same entries again: a worker died before its XACK
    feed.apply(list(batch[2:4]))
    assert r.hget(keys.states(0), "bot") == first
    rec = view(r, keys)
    assert (rec["tokens"], rec["last_seq"], rec["beats"]) == (500, 5, 5)
    assert rec["states"]["tokens"]["learned"] == 5
    assert rec["seen_ms"] == rec["beat_ms"] == at_ms(batch[-1])
    assert transitions(r, keys) == []


def test_a_new_start_begins_a_new_run_and_events_of_the_previous_run_only_prove_life(
    feed: Feed, r: redis.Redis, keys: Keys
) -> None:
    feed.apply([feed.event("bot", "start", interval=2.0), *beats(feed, "bot", 3)])
    second = [feed.event("bot", "start", run="run-2", interval=5.0), *beats(feed, "bot", 2)]
    feed.apply(second)
    rec = view(r, keys)
    assert (rec["run"], rec["prev_run"]) == ("run-2", "run-1")
    assert (rec["interval_s"], rec["last_seq"], rec["tokens"]) == (5.0, 2, 500)
    assert rec["started_ms"] == at_ms(second[0])
    # A beat of the old run applied after the new run began: a sign of life, nothing more.
    old = feed.event("bot", "beat", run="run-1", seq=99, tokens=1000)
    feed.apply([old])
    rec = view(r, keys)
    assert rec["seen_ms"] == at_ms(old)
    assert rec["beat_ms"] == at_ms(second[-1])  # not a beat of the current run
    assert (rec["run"], rec["last_seq"]) == ("run-2", 2)
    assert (rec["tokens"], rec["beats"]) == (500, 3 + 2)  # beats of both runs, the stale one not counted
    assert transitions(r, keys) == []


def test_a_forked_childs_start_does_not_take_over(feed: Feed, r: redis.Redis, keys: Keys) -> None:
    feed.apply([feed.event("bot", "start", interval=1.0), *beats(feed, "bot", 2)])
    child = feed.event("bot", "start", run="child", parent="run-1")
    feed.apply([child, feed.event("bot", "beat", run="child", tokens=7)])
    rec = view(r, keys)
    assert (rec["run"], rec["last_seq"], rec["interval_s"]) == ("run-1", 2, 1.0)
    assert rec["children"]["child"]["parent"] == "run-1"
    assert (rec["tokens"], rec["beats"]) == (207, 3)  # a worker process's usage is the agent's
    assert transitions(r, keys) == []


def test_after_a_gap_in_the_checks_silence_counts_from_its_end(
    feed: Feed, r: redis.Redis, keys: Keys
) -> None:
    """Workers were down for 30 s: the agent's allowance (60 s) is counted from the end of that
    gap, and the checks in between, which find it due but not yet judgeable, return (they once
    asked the same agent again and again within one check: the worker hung)."""
    feed.apply([feed.event("bot", "start"), feed.event("bot", "beat")])
    t0 = feed.now
    feed.tick(t0 + 30_000)  # the first check after the gap
    for second in range(31, 89):
        feed.tick(t0 + second * 1000)
    assert transitions(r, keys) == []
    feed.tick(t0 + 90_000)
    (alert,) = fired(r, keys, "silence", "bot")
    assert alert.summary.startswith("bot: no heartbeat for 1m30s; ")


def test_state_costs_under_1kb_per_agent(redis_url: str, prefix: str, r: redis.Redis, keys: Keys) -> None:
    """A real worker applies a backlog of 1,000 agents (each: a start, beats with tokens, cost and
    a fingerprint, pulses with RSS closing memory buckets); what it checkpoints for them, every
    built-in detector's state included, costs under 1 KB each in Redis."""
    agents = [f"fleet-agent-{i:04d}" for i in range(1000)]
    rounds = 14
    base = int(r.time()[0]) * 1000 - 60_000
    pipe = r.pipeline(transaction=False)
    for round_ in range(rounds):
        ms = base + round_ * 100  # a memory bucket closes every round (1 s window, 12 points)
        for index, name in enumerate(agents):
            events: list[dict[str, Any]] = []
            seq = round_ * 3
            if round_ == 0:
                events.append({"kind": "start", "interval": 5.0})
            events.append(
                {"kind": "beat", "tokens": 300, "cost": 0.01, "fp": f"item-{round_}", "model": "gpt-x"}
            )
            events.append({"kind": "pulse", "rss": (200 + round_) * 1024 * 1024, "interval": 5.0})
            for k, fields in enumerate(events):
                event = {"v": 1, "agent": name, "ts": 0.0, "run": "run-1", "seq": seq + k, **fields}
                pipe.xadd(keys.events_for(name), {"d": codec.encode(event)}, id=f"{ms}-{index * 3 + k}")
    pipe.execute()
    pipeline = pipeline_for(prefix, redis_url, memory={"window": "1s", "points": 12})
    last_seq = (rounds - 1) * 3 + 1
    with running(worker_for(pipeline, redis_url)):
        wait_for(lambda: caught_up(r, keys), timeout=60, what="the backlog applied")
        wait_for(
            lambda: all(a["last_seq"] == last_seq for a in read_agents(r, keys, agents).values()),
            timeout=10,
            what="every agent checkpointed",
        )
    recs = read_agents(r, keys, agents, states=STATES)
    assert len(recs) == len(agents)
    sample = recs[agents[0]]
    assert (sample["beats"], sample["tokens"]) == (rounds, rounds * 300)
    assert sample["states"]["tokens"]["fp_hash"] and sample["states"]["tokens"]["learned"] == rounds
    assert len(sample["states"]["memory"]["closed"]) >= 10
    per_agent = int(r.memory_usage(keys.states(0), samples=0) or 0) / len(agents)
    print(f"{per_agent:.0f} bytes per agent")
    assert per_agent <= 1024, f"{per_agent:.0f} bytes per agent"


def test_nothing_was_alerted_by_bookkeeping(feed: Feed, r: redis.Redis, keys: Keys) -> None:
    feed.apply([feed.event("bot", "start"), *beats(feed, "bot", 30)])
    feed.tick()
    feed.apply(list(beats(feed, "bot", 5)))
    feed.tick(feed.now + 1000)
    assert transitions(r, keys) == []
