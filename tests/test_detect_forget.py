"""Forgetting agents (``[detectors.silence] forget``) with incidents of every kind still open:
each one resolves once, nothing is left behind (no state, no pending decision, no start facts),
and a decision that cannot be worded or published never holds back the others."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from agents_detect.kit import Feed, fired, pipeline_for, resolved, transitions, worker_for

from agentwatch.alerts import PIPELINE_AGENT
from agentwatch.facts import FactsRecorder, read_facts
from agentwatch.keys import Keys
from agentwatch.worker import Worker
from detectors.agent import read_agents

MB = 1 << 20
SETTINGS: dict[str, Any] = {
    "silence": {"after": "1s", "forget": "1h"},
    "stall": {"after": "1s"},
    "tokens": {"warmup": 5, "repeat": 10},
    "memory": {
        "window": "1s",
        "points": 10,
        "min_points": 5,
        "limit": "1GB",
        "horizon": "10s",
        "fire_after": 1,
    },
}
KINDS = {
    "spiky": "tokens",
    "loopy": "loop",
    "leaky": "memory",
    "crashy": "exit",
    "stuck": "stall",
    "gone": "silence",
}


@pytest.fixture
def worker(redis_url: str, prefix: str) -> Iterator[Worker[Any]]:
    worker = worker_for(pipeline_for(prefix, redis_url, **SETTINGS), redis_url)
    yield worker
    worker.client.close()


def open_one_of_each(feed: Feed, facts: FactsRecorder) -> None:
    """Six agents, each with one kind of incident open."""
    starts = [feed.event(agent, "start", interval=0.1, pid=100 + n) for n, agent in enumerate(KINDS)]
    feed.apply(starts)
    facts.on_batch(starts)
    feed.apply([feed.event(a, "beat", tokens=100, fp=f"{a}-{k}") for k in range(8) for a in KINDS])
    feed.apply([feed.event("spiky", "beat", tokens=90_000)])
    feed.apply([feed.event("loopy", "beat", tokens=100, fp="same") for _ in range(10)])
    for k in range(120):  # +100 MB/s for 1.2 s
        feed.apply([feed.event("leaky", "pulse", rss=200 * MB + k * 10 * MB, at=feed.now + 10)])
    feed.apply([feed.event("crashy", "exit", reason="exception", code=1, error="ValueError: x")])
    # stuck: pulses, no beats; gone: nothing at all; the others keep at it
    for _ in range(15):
        feed.now += 100
        batch = [feed.event("stuck", "pulse", stack='  File "/app/w.py", line 3, in work\n')]
        batch += [
            feed.event("spiky", "beat", tokens=90_000, fp=f"x{feed.now}"),  # the runaway goes on
            feed.event("loopy", "beat", tokens=100, fp="same"),
            feed.event("leaky", "beat", tokens=100, fp=f"y{feed.now}"),
        ]
        feed.apply(batch)
        feed.tick()
    for agent, kind in KINDS.items():
        assert fired(feed.engine.client, feed.engine.keys, kind, agent), (agent, kind)


def test_forgetting_resolves_every_open_incident_once_and_leaves_nothing(
    worker: Worker[Any], r: redis.Redis, keys: Keys
) -> None:
    feed = Feed(worker)
    facts = next(h for h in worker.handlers if isinstance(h, FactsRecorder))
    open_one_of_each(feed, facts)
    assert set(read_facts(r, keys)) == set(KINDS)
    before = len(transitions(r, keys))
    feed.engine.forget(feed.now + 2 * 3_600_000)  # two hours later: all forgotten
    after = transitions(r, keys)[before:]
    assert sorted(after) == sorted((agent, kind, "resolved") for agent, kind in KINDS.items())
    for agent, kind in KINDS.items():
        (alert,) = resolved(r, keys, kind, agent)
        assert alert.summary.startswith(f"{agent}: forgotten after ") and alert.details["forgotten"] is True
    assert r.llen(keys.decided(0)) == 0 and r.hlen(keys.incidents(0)) == 0
    assert read_agents(r, keys) == {} and read_facts(r, keys) == {}
    assert set(r.hkeys(keys.states(0))) <= {PIPELINE_AGENT.encode()}  # the monitor's own lag state
    assert set(feed.engine.shards[0].agents) <= {PIPELINE_AGENT} and feed.engine.shards[0].armed == {}
    assert worker.stats.handler_errors == {}


def test_a_decision_that_cannot_be_worded_is_published_plainly_and_holds_back_nothing(
    worker: Worker[Any], r: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    feed = Feed(worker)
    exit_detector = feed.engine.get("Exit")
    assert exit_detector is not None
    real = exit_detector.render

    def broken(agent: str, kind: str, op: dict[str, Any]) -> Any:
        if agent == "a":
            raise KeyError("base")  # a renderer bug, or facts from another version
        return real(agent, kind, op)

    monkeypatch.setattr(exit_detector, "render", broken)
    feed.apply([feed.event(a, "start") for a in "abc"])
    feed.apply([feed.event(a, "exit", reason="exception", code=1, error="E") for a in "abc"])
    alerts = {a.agent: a for a in fired(r, keys, "exit")}
    assert sorted(alerts) == ["a", "b", "c"]
    assert alerts["a"].summary == "a: exit incident started" and alerts["a"].severity == "critical"
    assert alerts["b"].summary == "b: crashed with E"
    assert worker.stats.handler_errors == {"exit": 1}
    assert r.llen(keys.decided(0)) == 0


def test_a_publishing_failure_is_counted_and_the_others_still_go_out(
    worker: Worker[Any], r: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    feed = Feed(worker)
    incidents = feed.engine.ctx.incidents
    real = incidents.fire

    def failing(agent: str, *args: Any, **kwargs: Any) -> Any:
        if agent == "b":
            raise ValueError("a bug while publishing")
        return real(agent, *args, **kwargs)

    monkeypatch.setattr(incidents, "fire", failing)
    feed.apply([feed.event(a, "start") for a in "abc"])
    feed.apply([feed.event(a, "exit", reason="signal", code=137) for a in "abc"])
    assert sorted(a.agent for a in fired(r, keys, "exit")) == ["a", "c"]
    assert set(worker.stats.handler_errors) == {"publish"}  # counted at each try (each checkpoint)
    assert [json.loads(raw)[:2] for raw in r.lrange(keys.decided(0), 0, -1)] == [["b", "exit"]]  # kept
    monkeypatch.setattr(incidents, "fire", real)
    feed.apply([feed.event("a", "start", run="run-2")])  # the next checkpoint tries it again
    assert sorted(a.agent for a in fired(r, keys, "exit")) == ["a", "b", "c"]
    assert r.llen(keys.decided(0)) == 0
