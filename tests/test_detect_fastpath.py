"""The fast path (detectors/fastpath.py) against the update script alone, on random fleets.

Two engines on two prefixes of the same Redis get the same batches and the same ticks; one takes
the fast path where it can, the other sends every segment through the update script. After
every few batches their records, timers, fleet index, stacks, RSS windows, intents, clocks,
incidents and alerts must be equal, byte for byte. The fleet is built to make every detector
fire and resolve (token spikes, loops, leaks, stalls, silences, crashes, shutdowns, restarts)
between long stretches of "nothing happens", with redelivered and late batches, gaps longer than
the allowances, per-agent overrides (two profiles) and one or two shards.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import hiredis
import numpy as np
import pytest
import redis
from agents_detect.kit import Feed, alerts, pipeline_for, worker_for
from redis.cluster import RedisCluster

from agentwatch.keys import Keys
from detectors import fastpath, resp

SETTINGS: dict[str, dict[str, Any]] = {
    "silence": {"after": "4s", "recover_after": 2},
    "stall": {"after": "3s", "recover_after": 2},
    "tokens": {"warmup": 3, "min_tokens": 50, "repeat": 4, "recover_after": 2, "window": "5s",
               "agents": {"spiky-*": {"factor": 3.0, "min_tokens": 20}}},
    "memory": {"window": "30s", "points": 6, "min_points": 3, "horizon": "120s", "limit": "400MB",
               "fire_after": 1, "recover_after": 1},
}  # fmt: skip
PERSONAS = (
    "normal",
    "normal",
    "normal",
    "spiky",
    "looper",
    "leaker",
    "staller",
    "crasher",
    "quitter",
    "silent",
)


class Fleet:
    """Random agents with a temperament each; builds batches of their events."""

    def __init__(self, feed: Feed, rng: random.Random, size: int) -> None:
        self.feed, self.rng = feed, rng
        self.agents = [f"{PERSONAS[i % len(PERSONAS)]}-{i}" for i in range(size)]
        self.runs = {a: 1 for a in self.agents}
        self.rss = {a: 200 * 2**20 for a in self.agents}
        self.mood = dict.fromkeys(self.agents, "ok")

    def event(self, agent: str) -> Any:
        rng, feed = self.rng, self.feed
        kind = agent.split("-", maxsplit=1)[0]
        run = f"run-{self.runs[agent]}"
        at = feed.now + rng.choice([1, 5, 10, 20])
        odd = self.mood[agent] == "odd"
        if kind in ("crasher", "quitter") and rng.random() < 0.03:
            if rng.random() < 0.5:
                self.runs[agent] += 1
                run = f"run-{self.runs[agent]}"
                return feed.event(agent, "start", run=run, at=at, interval=rng.choice([0.5, 2]))
            if kind == "crasher":
                code = {"code": 1} if rng.random() < 0.7 else {}  # the producer may not know it
                return feed.event(agent, "exit", run=run, at=at, reason="exception", error="Boom", **code)
            return feed.event(agent, "exit", run=run, at=at, reason="shutdown")
        if rng.random() < 0.25 or (kind == "staller" and odd):
            if kind == "leaker":
                self.rss[agent] += rng.randrange(2, 12) * 2**20
            fields: dict[str, Any] = {"rss": self.rss[agent] + rng.randrange(2**20)}
            if kind == "staller" and odd:
                fields["stack"] = 'File "agent.py", line 3, in work'
            if rng.random() < 0.02:
                fields["extend"] = 2.0
            if rng.random() < 0.7:  # pulses repeat the declared interval (which may change)
                fields["interval"] = rng.choice([0.5, 1.0, 2.0])
            return feed.event(agent, "pulse", run=run, at=at, **fields)
        tokens = int(rng.gauss(100, 20))
        if kind == "spiky" and odd and rng.random() < 0.3:
            tokens *= 60
        fields = {"tokens": max(tokens, 0), "cost": tokens * 1e-5, "model": "m"}
        if rng.random() < 0.05:
            fields = {"tokens_in": 40, "tokens_out": 60}
        fp = f"job-{rng.randrange(10**6)}"
        if kind == "looper" and odd:
            fp = "the-same-job"
        elif rng.random() < 0.1:
            fp = "common"
        return feed.event(agent, "beat", run=run, at=at, fp=fp, **fields)

    def batch(self) -> list[Any]:
        rng = self.rng
        if rng.random() < 0.03:  # a pause longer than the allowances: retro gaps, silences
            self.feed.now += rng.choice([3500, 6000, 9000])
        for agent in self.agents:  # moods come and go; stallers stall for a while
            if rng.random() < 0.04:
                staller = agent.startswith("staller")
                self.mood[agent] = rng.choice(["ok", "odd"] if staller else ["ok", "ok", "ok", "odd"])
        size = rng.choice([1, 5, 30, 60, 120])
        chosen = self.agents if rng.random() < 0.7 else rng.sample(self.agents, rng.choice([1, 3, 10]))
        out = []
        for _ in range(size):
            agent = rng.choice(chosen)
            if not (agent.startswith("silent") and self.mood[agent] == "odd"):  # it says nothing now
                out.append(self.event(agent))
        return out


class Steady(Fleet):
    """A large healthy fleet's batches: every agent once, beats with usage, every 5th a pulse
    (the benchmark's shape: one event per agent per batch, the fast path's own case)."""

    def __init__(self, feed: Feed, rng: random.Random, size: int) -> None:
        super().__init__(feed, rng, size)
        self.agents = [f"agent-{i:04d}" for i in range(size)]
        self.rounds = 0
        self.rss = {a: 200 * 2**20 for a in self.agents}

    def batch(self) -> list[Any]:
        self.rounds += 1
        out = []
        for agent in self.agents:
            at = self.feed.now + self.rng.choice([0, 1, 2])
            if self.rounds % 5 == 0:
                rss = self.rss[agent] + self.rng.randrange(2**20)
                out.append(self.feed.event(agent, "pulse", at=at, rss=rss, interval=1.0))
            else:
                tokens = int(self.rng.gauss(100, 20)) * (40 if self.rng.random() < 0.002 else 1)
                out.append(self.feed.event(agent, "beat", at=at, tokens=max(tokens, 0), cost=tokens * 1e-5,
                                           fp=f"job-{self.rng.randrange(10**6)}"))  # fmt: skip
        return out


@pytest.fixture
def prefixes(r: redis.Redis) -> Iterator[tuple[str, str]]:
    names = (f"t{uuid.uuid4().hex[:10]}", f"t{uuid.uuid4().hex[:10]}")
    yield names
    for name in names:
        for key in r.scan_iter(match=f"{name}:*", count=1000):
            r.unlink(key)


def make_feed(prefix: str, url: str, shards: int, *, fast: bool, t0: int, cluster: bool = False) -> Feed:
    pipeline = pipeline_for(prefix, url, **SETTINGS)
    redis_settings = pipeline.settings.redis.model_copy(update={"shards": shards, "cluster": cluster})
    pipeline = type(pipeline)(settings=pipeline.settings.model_copy(update={"redis": redis_settings}),
                              source="test", detectors=pipeline.detectors)  # fmt: skip
    feed = Feed(worker_for(pipeline, url), t0_ms=t0)
    feed.engine.use_fast_path = fast
    return feed


def snapshot(r: Any, keys: Keys) -> dict[str, Any]:
    """Everything the detectors keep, with what differs by worker (leases, alert ids) left out."""
    out: dict[str, Any] = {}
    for shard in range(keys.shards):
        for name in ("states", "stacks", "rss", "clock", "incidents"):
            out[f"{name}{shard}"] = r.hgetall(getattr(keys, name)(shard))
        for name in ("timers", "agents"):
            out[f"{name}{shard}"] = r.zrange(getattr(keys, name)(shard), 0, -1, withscores=True)
        pending = {}
        for key, raw in r.hgetall(keys.intents(shard)).items():
            doc = json.loads(raw)
            pending[key] = (doc["ops"], doc["done"])
        out[f"intents{shard}"] = pending
    for name in list(out):
        if name.startswith("incidents"):
            out[name] = {k: _without(json.loads(v), "id", "alert") for k, v in out[name].items()}
    out["alerts"] = [_without(asdict(a), "id") for a in alerts(r, keys)]
    return out


def _without(doc: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k not in names}


@pytest.mark.parametrize(
    ("seed", "shards", "live"),
    [(1, 1, True), (2, 2, True), (3, 1, True), (4, 1, False), (5, 2, False), (6, 1, False)],
)
def test_the_fast_path_changes_nothing(
    seed: int, shards: int, live: bool, prefixes: tuple[str, str], r: redis.Redis, redis_url: str
) -> None:
    t0 = int(r.time()[0]) * 1000 + (0 if live else -86_400_000)  # live: the clock is fresh (not stale)
    fast, slow = (
        make_feed(p, redis_url, shards, fast=f, t0=t0) for p, f in zip(prefixes, (True, False), strict=True)
    )
    compare(r, fast, slow, [Keys(p, shards) for p in prefixes], random.Random(seed), batches=300)
    assert fast.engine.fast.applied > 500  # the fast path did much of the work...
    kinds = {(a["detector"], a["status"]) for a in snapshot(r, Keys(prefixes[0], shards))["alerts"]}
    for detector in ("tokens", "loop", "memory", "stall", "silence", "exit"):  # ...between incidents
        assert (detector, "firing") in kinds, detector


def test_a_large_healthy_fleet_takes_the_fast_path_unchanged(
    prefixes: tuple[str, str], r: redis.Redis, redis_url: str
) -> None:
    t0 = int(r.time()[0]) * 1000
    fast, slow = (
        make_feed(p, redis_url, 1, fast=f, t0=t0) for p, f in zip(prefixes, (True, False), strict=True)
    )
    rng = random.Random(11)
    compare(r, fast, slow, [Keys(p, 1) for p in prefixes], rng, batches=60, fleet=Steady(fast, rng, size=400))
    assert fast.engine.fast.applied > 0.8 * 60 * 400


@pytest.mark.parametrize("interfere", [1, 2])
def test_a_refused_transaction_is_tried_again_then_left_to_the_script(
    interfere: int, prefixes: tuple[str, str], r: redis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another worker writes the shard between our read and our write: Redis refuses the
    transaction; the fast path reads and plans again once, then leaves the batch to the script."""
    t0 = int(r.time()[0]) * 1000
    fast, slow = (
        make_feed(p, redis_url, 1, fast=f, t0=t0) for p, f in zip(prefixes, (True, False), strict=True)
    )
    rng = random.Random(5)
    fleet = Steady(fast, rng, size=50)
    keys = [Keys(p, 1) for p in prefixes]
    for _ in range(3):  # warm: records exist
        batch = fleet.batch()
        for feed in (fast, slow):
            feed.apply(batch)
    real, calls = fastpath.plan_batch, []

    def plan_under_a_concurrent_write(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) <= interfere:  # the other worker rewrites one record (same bytes: still a write)
            name, raw = next(iter(r.hgetall(keys[0].states(0)).items()))
            r.hset(keys[0].states(0), name, raw)
        return real(*args, **kwargs)

    monkeypatch.setattr(fastpath, "plan_batch", plan_under_a_concurrent_write)
    applied = fast.engine.fast.applied
    batch = fleet.batch()
    for feed in (fast, slow):
        feed.apply(batch)
    assert len(calls) == 2 and fast.engine.fast.refused == interfere
    assert (fast.engine.fast.applied > applied) == (interfere == 1)
    assert snapshot(r, keys[0]) == snapshot(r, keys[1])


@pytest.mark.cluster
def test_the_fast_path_changes_nothing_on_a_cluster(cluster_ports: list[int]) -> None:
    url = f"redis://127.0.0.1:{cluster_ports[0]}/0"
    r = RedisCluster.from_url(url)
    prefixes = (f"t{uuid.uuid4().hex[:10]}", f"t{uuid.uuid4().hex[:10]}")
    try:
        t0 = int(r.time()[0]) * 1000
        fast, slow = (make_feed(p, url, 3, fast=f, t0=t0, cluster=True)
                      for p, f in zip(prefixes, (True, False), strict=True))  # fmt: skip
        compare(r, fast, slow, [Keys(p, 3) for p in prefixes], random.Random(7), batches=120)
        assert fast.engine.fast.applied > 100
    finally:
        for prefix in prefixes:
            for key in r.scan_iter(match=f"{prefix}:*", target_nodes=RedisCluster.ALL_NODES):
                r.delete(key)
        r.close()


def compare(
    r: Any,
    fast: Feed,
    slow: Feed,
    keys: list[Keys],
    rng: random.Random,
    batches: int,
    fleet: Fleet | None = None,
) -> None:
    """Feed both engines the same batches and ticks; compare everything every 20 batches."""
    fleet = fleet or Fleet(fast, rng, size=30)
    sent: list[list[Any]] = []
    for number in range(batches):
        batch = fleet.batch()
        held = None
        if rng.random() < 0.08 and len(batch) > 4:  # a worker dies holding the first half: late batch
            cut = len(batch) // 2
            held, batch = batch[:cut], batch[cut:]
        for feed in (fast, slow):
            feed.apply(batch)
        if held is not None:
            for feed in (fast, slow):
                feed.apply(held)
        sent.append(batch)
        if rng.random() < 0.08:  # redelivery of an earlier batch
            again = rng.choice(sent)
            for feed in (fast, slow):
                feed.apply(list(again))
        if rng.random() < 0.3:
            if rng.random() < 0.1:  # the whole fleet pauses: silences and stalls for the checks
                fleet.feed.now += 5000
            for feed in (fast, slow):
                feed.tick(fleet.feed.now)
        if number % 20 == 19:
            assert snapshot(r, keys[0]) == snapshot(r, keys[1]), f"after batch {number}"
    assert snapshot(r, keys[0]) == snapshot(r, keys[1])
    assert fast.engine.fast_errors == 0 and slow.engine.fast is None


@pytest.mark.parametrize("names", [["a", "bb", "ccc", "a2", "dddd"], [f"agent-{i:04d}" for i in range(50)]])
def test_the_packer_writes_what_hiredis_would(names: list[str]) -> None:
    rng = np.random.default_rng(5)
    packer = resp.Packer()
    values = rng.integers(0, 256, (len(names), 263)).astype(np.uint8)
    scores = 1_795_000_000_000.0 + rng.integers(0, 10**6, len(names))
    packer.begin()
    commands = [
        packer.pairs(("HSET", "k"), names, values, name_first=True),
        packer.pairs(("ZADD", "z", "GT"), names, resp.score_digits(scores), name_first=False),  # type: ignore[arg-type]
        packer.names(("HMGET", "k"), names),
    ]
    reader = hiredis.Reader()
    reader.feed(b"".join(bytes(piece) for command in commands for piece in command))
    hset, zadd, hmget = reader.gets(), reader.gets(), reader.gets()
    encoded = [n.encode() for n in names]
    assert hset[:2] == [b"HSET", b"k"] and len(hset) == 2 + 2 * len(names)
    assert dict(zip(hset[2::2], hset[3::2], strict=True)) == dict(
        zip(encoded, map(bytes, values), strict=True)
    )
    assert zadd[:3] == [b"ZADD", b"z", b"GT"]
    assert dict(zip(zadd[4::2], zadd[3::2], strict=True)) == {
        n: str(int(s)).encode() for n, s in zip(encoded, scores, strict=True)
    }
    assert hmget == [b"HMGET", b"k", *encoded]
    assert resp.score_digits(np.array([1.5e12 + 0.5])) is None and resp.score_digits(np.array([12.0])) is None
