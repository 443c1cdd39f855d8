"""Checkpoints against a real Redis: round trip, fenced saves, damaged records, decided ops."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
import redis

from agentwatch.keys import Keys
from agentwatch.redisconn import server_time_ms
from detectors.agent import Agent, ChildRun, pack
from detectors.checkpoint import START_ID, Checkpoints
from detectors.leases import ShardLeases

SHARDS = 2


@dataclass
class WatchState:
    """A detector state with every kind of field a State may have."""

    fired_ms: int = 0
    ratio: float = 0.0
    reason: str = ""
    armed: bool = False
    window: list[int] = field(default_factory=list)
    by_run: dict[str, int] = field(default_factory=dict)


@dataclass
class OtherState:
    count: int = 0


STATES: dict[str, type[Any]] = {"watch": WatchState, "other": OtherState}


@pytest.fixture
def keys(prefix: str) -> Keys:
    return Keys(prefix=prefix, shards=SHARDS)


@pytest.fixture
def leases(r: redis.Redis, keys: Keys) -> ShardLeases:
    leases = ShardLeases(r, keys, "me", 5000)
    leases.refresh(server_time_ms(r))
    assert set(leases.held) == set(range(SHARDS))
    return leases


def full_agent(name: str) -> Agent:
    agent = Agent(
        name,
        run="r2",
        prev_run="r1",
        last_seq=41,
        started_ms=1000,
        seen_ms=5000,
        beat_ms=4900,
        pulse_ms=4990,
        pulse_period_ms=1000,
        interval_s=2.5,
        clocks_from_ms=900,
        open={"silence", "tokens"},
        beats=12,
        tokens=3.5,
        cost=0.25,
        rss_first=10,
        rss_first_ms=1001,
        rss_last=20,
        rss_peak=30,
        stack="File x, line 1",
        stack_ms=4000,
    )
    agent.children["c1"] = ChildRun(
        "r2", started_ms=1100, last_seq=3, seen_ms=4500, interval_s=1.0, pid=77, host="h"
    )
    agent.states["watch"] = WatchState(4000, 0.5, "why", True, [1, 2, 3], {"r2": 7})
    agent.states["other"] = OtherState(9)
    return agent


def test_a_checkpoint_round_trips_agents_with_their_detector_states(
    r: redis.Redis, keys: Keys, leases: ShardLeases
) -> None:
    checkpoints = Checkpoints(r, keys)
    agents = [full_agent("bot-a"), Agent("bot-b"), full_agent("bot-ü")]
    before = server_time_ms(r)
    saved = checkpoints.save(
        1,
        leases.held[1],
        agents,
        [],
        last_id=b"1700-3",
        meta={"tick_ms": 123, "sight_ms": 99},
        decided=[b'["bot-a","silence",{}]', b"second"],
    )
    assert saved is True

    loaded = checkpoints.load(1, STATES)
    assert loaded.agents == {agent.name: agent for agent in agents}
    assert loaded.last_id == "1700-3"
    assert loaded.meta == {"tick_ms": 123, "sight_ms": 99}
    assert loaded.decided == [b'["bot-a","silence",{}]', b"second"]
    assert loaded.token == leases.held[1] and loaded.saved_at >= before and loaded.skipped == 0
    # the other shard is untouched
    assert checkpoints.load(0, STATES).agents == {}


def test_a_shard_never_checkpointed_starts_from_the_beginning(r: redis.Redis, keys: Keys) -> None:
    loaded = Checkpoints(r, keys).load(0, STATES)
    assert (loaded.agents, loaded.last_id, loaded.meta, loaded.decided) == ({}, START_ID, {}, [])
    assert loaded.saved_at == loaded.token == 0


def test_later_saves_update_changed_agents_and_delete_removed_ones(
    r: redis.Redis, keys: Keys, leases: ShardLeases
) -> None:
    checkpoints = Checkpoints(r, keys)
    token = leases.held[0]
    assert checkpoints.save(
        0, token, [full_agent("a"), full_agent("b"), Agent("c")], [], last_id="1-0", meta={}, decided=[b"one"]
    )
    changed = full_agent("a")
    changed.last_seq = 99
    changed.states["watch"].window.append(4)
    assert checkpoints.save(0, token, [changed], ["b"], last_id="2-0", meta={"n": 2}, decided=[b"two"])
    loaded = checkpoints.load(0, STATES)
    assert loaded.agents == {"a": changed, "c": Agent("c")}
    assert (loaded.last_id, loaded.meta, loaded.decided) == ("2-0", {"n": 2}, [b"one", b"two"])


def test_a_save_under_a_stale_token_writes_nothing(r: redis.Redis, keys: Keys) -> None:
    old = ShardLeases(r, keys, "old", 200)
    old.refresh(server_time_ms(r))
    checkpoints = Checkpoints(r, keys)
    stale = old.held[0]
    assert checkpoints.save(0, stale, [Agent("a")], [], last_id="1-0", meta={"by": "old"}, decided=[b"x"])
    time.sleep(0.3)  # old is frozen past its lease
    new = ShardLeases(r, keys, "new", 5000)
    new.refresh(server_time_ms(r))
    assert new.held[0] > stale
    assert checkpoints.save(
        0, new.held[0], [full_agent("a")], [], last_id="2-0", meta={"by": "new"}, decided=[]
    )
    snapshot = dump(r, keys, 0)

    assert not checkpoints.save(
        0, stale, [Agent("a"), Agent("z")], ["a"], last_id="1-5", meta={"by": "old"}, decided=[b"late"]
    )
    assert not checkpoints.pop_decided(0, stale, 1)
    assert dump(r, keys, 0) == snapshot
    loaded = checkpoints.load(0, STATES)
    assert (
        loaded.meta == {"by": "new"} and loaded.agents == {"a": full_agent("a")} and loaded.decided == [b"x"]
    )


def test_a_save_without_any_lease_writes_nothing(r: redis.Redis, keys: Keys) -> None:
    checkpoints = Checkpoints(r, keys)
    assert not checkpoints.save(0, 1, [Agent("a")], [], last_id="1-0", meta={}, decided=[b"x"])
    assert not r.exists(keys.states(0), keys.checkpoint(0), keys.decided(0))


def dump(r: redis.Redis, keys: Keys, shard: int) -> tuple[Any, ...]:
    return (
        r.hgetall(keys.states(shard)),
        r.hgetall(keys.checkpoint(shard)),
        r.lrange(keys.decided(shard), 0, -1),
    )


def test_published_decided_ops_are_dropped_oldest_first(
    r: redis.Redis, keys: Keys, leases: ShardLeases
) -> None:
    checkpoints = Checkpoints(r, keys)
    token = leases.held[1]
    assert checkpoints.save(1, token, [], [], last_id="1-0", meta={}, decided=[b"1", b"2", b"3"])
    assert checkpoints.pop_decided(1, token, 2)
    assert checkpoints.load(1, STATES).decided == [b"3"]
    assert checkpoints.pop_decided(1, token, 0)
    assert checkpoints.pop_decided(1, token, 5)
    assert checkpoints.load(1, STATES).decided == []


def test_unreadable_records_are_skipped_and_counted(r: redis.Redis, keys: Keys, leases: ShardLeases) -> None:
    checkpoints = Checkpoints(r, keys)
    assert checkpoints.save(
        0, leases.held[0], [full_agent("good"), Agent("fine")], [], last_id="3-0", meta={}, decided=[]
    )
    r.hset(keys.states(0), "garbage", b"\xc1\xff not msgpack")
    r.hset(keys.states(0), "truncated", pack(full_agent("truncated"))[:-7])
    r.hset(keys.states(0), "old-layout", msgpack.packb([0, [1, 2, 3], {}, {}]))
    wrong_type = msgpack.unpackb(pack(full_agent("wrong")))
    wrong_type[2] = {"c1": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}  # a child run of another shape
    r.hset(keys.states(0), "wrong", msgpack.packb(wrong_type))
    odd_state = msgpack.unpackb(pack(full_agent("odd")))
    odd_state[3]["watch"] = [1, 2]  # a state of another shape: that detector starts afresh
    r.hset(keys.states(0), "odd", msgpack.packb(odd_state))
    loaded = checkpoints.load(0, STATES)
    assert loaded.skipped == 4
    odd = full_agent("odd")
    odd.states["watch"] = WatchState()
    assert loaded.agents == {"good": full_agent("good"), "fine": Agent("fine"), "odd": odd}


def test_states_of_unknown_or_changed_detectors_are_dropped_or_fresh(
    r: redis.Redis, keys: Keys, leases: ShardLeases
) -> None:
    checkpoints = Checkpoints(r, keys)
    assert checkpoints.save(0, leases.held[0], [full_agent("a")], [], last_id="1-0", meta={}, decided=[])

    @dataclass
    class WatchStateV2:
        fired_ms: int = 0
        extra: int = 5

    loaded = checkpoints.load(0, {"watch": WatchStateV2})
    assert loaded.agents["a"].states == {"watch": WatchStateV2()}


def test_big_saves_are_chunked_and_load_back_whole(r: redis.Redis, keys: Keys, leases: ShardLeases) -> None:
    checkpoints = Checkpoints(r, keys)
    agents = [full_agent(f"bot-{n}") for n in range(4321)]
    assert checkpoints.save(1, leases.held[1], agents, [], last_id="9-9", meta={}, decided=[])
    assert r.hlen(keys.states(1)) == 4321
    loaded = checkpoints.load(1, STATES)
    assert len(loaded.agents) == 4321 and loaded.agents["bot-4000"] == full_agent("bot-4000")
    assert checkpoints.save(
        1, leases.held[1], [], [f"bot-{n}" for n in range(4000)], last_id="9-10", meta={}, decided=[]
    )
    assert r.hlen(keys.states(1)) == 321
