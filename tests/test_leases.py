"""Shard leases against a real Redis: one owner per shard, fair shares, takeover, fencing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from agentwatch.alerts import Incidents, decode_alert
from agentwatch.keys import Keys, shard_of
from agentwatch.redisconn import server_time_ms
from detectors.agent import Agent
from detectors.checkpoint import Checkpoints
from detectors.leases import ShardLeases, parse_lease

SHARDS = 8
ALL = set(range(SHARDS))


@pytest.fixture
def keys(prefix: str) -> Keys:
    return Keys(prefix=prefix, shards=SHARDS)


def refresh(r: redis.Redis, leases: ShardLeases) -> tuple[set[int], set[int]]:
    return leases.refresh(server_time_ms(r))


def agent_on(shard: int) -> str:
    """An agent name whose events go to ``shard``."""
    return next(name for name in (f"bot-{n}" for n in range(1000)) if shard_of(name, SHARDS) == shard)


def test_a_lone_worker_takes_every_shard(r: redis.Redis, keys: Keys) -> None:
    a = ShardLeases(r, keys, "a", 5000)
    assert refresh(r, a) == (ALL, set())
    assert refresh(r, a) == (set(), set())  # renewed, nothing changes
    owners = a.owners()
    assert set(owners) == ALL
    assert {o["owner"] for o in owners.values()} == {"a"}
    assert all(0 < o["ms_left"] <= 5000 for o in owners.values())
    assert {shard: o["token"] for shard, o in owners.items()} == a.held
    assert a.holds(3) and a.fence(3) == (keys.lease(3), str(a.held[3]))


def test_two_workers_share_fairly_and_rebalance_when_one_leaves(r: redis.Redis, keys: Keys) -> None:
    a = ShardLeases(r, keys, "a", 5000)
    b = ShardLeases(r, keys, "b", 5000)
    refresh(r, a)
    assert refresh(r, b) == (set(), set())  # everything is taken: wait for a to give some up
    gained, lost = refresh(r, a)
    assert gained == set() and len(lost) == SHARDS // 2 and len(a.held) == SHARDS // 2
    assert refresh(r, b) == (lost, set())  # b takes exactly what a gave up
    assert set(a.held) | set(b.held) == ALL and not set(a.held) & set(b.held)
    assert {shard: o["owner"] for shard, o in a.owners().items()} == {
        **dict.fromkeys(a.held, "a"), **dict.fromkeys(b.held, "b"),
    }  # fmt: skip
    # steady state: nobody moves
    assert refresh(r, a) == (set(), set()) and refresh(r, b) == (set(), set())

    a.release_all()
    assert a.held == {} and r.zscore(keys.engines, "a") is None
    gained, lost = refresh(r, b)  # at once, not after the lease runs out
    assert set(b.held) == ALL and lost == set() and len(gained) == SHARDS // 2


def test_three_workers_hold_three_three_two(r: redis.Redis, keys: Keys) -> None:
    workers = [ShardLeases(r, keys, name, 5000) for name in ("a", "b", "c")]
    for _ in range(4):
        for worker in workers:
            refresh(r, worker)
    assert sorted(len(w.held) for w in workers) == [2, 3, 3]
    assert set().union(*(set(w.held) for w in workers)) == ALL


def test_a_dead_workers_shards_are_taken_when_its_leases_expire(r: redis.Redis, keys: Keys) -> None:
    a = ShardLeases(r, keys, "a", 300)
    b = ShardLeases(r, keys, "b", 5000)
    refresh(r, a)
    refresh(r, b)
    refresh(r, a)
    refresh(r, b)
    assert len(a.held) == len(b.held) == SHARDS // 2
    # a dies: it refreshes no more
    assert refresh(r, b) == (set(), set())  # still alive as far as anyone knows
    deadline = time.monotonic() + 5
    while len(b.held) < SHARDS and time.monotonic() < deadline:
        time.sleep(0.05)
        refresh(r, b)
    assert set(b.held) == ALL
    assert r.zscore(keys.engines, "a") is None  # pruned


def test_every_acquisition_gets_a_higher_token(r: redis.Redis, keys: Keys) -> None:
    a = ShardLeases(r, keys, "a", 5000)
    refresh(r, a)
    first = dict(a.held)
    a.release_all()
    refresh(r, a)
    assert all(a.held[shard] > first[shard] for shard in ALL)


def test_a_frozen_holder_loses_its_shards_and_every_fenced_write_is_refused(
    r: redis.Redis, keys: Keys
) -> None:
    frozen = ShardLeases(r, keys, "frozen", 300)
    refresh(r, frozen)
    shard = 5
    name = agent_on(shard)
    stale_token = frozen.held[shard]
    stale_fence = frozen.fence(shard)
    assert stale_fence is not None
    time.sleep(0.4)  # as if SIGSTOPped past its lease: no renewal

    other = ShardLeases(r, keys, "other", 5000)
    assert refresh(r, other)[0] == ALL
    assert other.held[shard] > stale_token

    checkpoints = Checkpoints(r, keys)
    incidents = Incidents(r, keys)
    now = server_time_ms(r)
    # the frozen holder wakes and carries on where it was: none of its writes land
    saved = checkpoints.save(shard, stale_token, [Agent(name)], [], last_id="5-0", meta={}, decided=[b"op"])
    assert saved is False
    fired = incidents.fire(name, "silence", severity="critical", summary="x", at_ms=now, fence=stale_fence)
    assert fired is None
    assert incidents.escalate(
        name, "budget", rank=1, severity="warning", summary="x", at_ms=now, fence=stale_fence
    ) is None  # fmt: skip
    assert r.hlen(keys.incidents(shard)) == 0 and r.hlen(keys.outbox(shard)) == 0
    assert r.xlen(keys.alerts) == 0
    assert not r.exists(keys.states(shard), keys.checkpoint(shard), keys.decided(shard))
    # and its next refresh tells it so
    gained, lost = refresh(r, frozen)
    assert lost == ALL and gained == set() and frozen.held == {}
    assert {o["owner"] for o in other.owners().values()} == {"other"}

    # the new owner's fenced writes do land
    fence = other.fence(shard)
    fired = incidents.fire(name, "silence", severity="critical", summary="gone", at_ms=now, fence=fence)
    assert fired is not None
    # a resolve from the stale holder is refused too, and leaves the incident open
    assert incidents.resolve(name, "silence", summary="back", at_ms=now + 1, fence=stale_fence) is None
    assert incidents.open(name, "silence") is not None
    resolved = incidents.resolve(name, "silence", summary="back", at_ms=now + 2, fence=fence)
    assert resolved is not None
    assert statuses(r, keys) == ["firing", "resolved"]


def statuses(r: Any, keys: Keys) -> list[str]:
    return [decode_alert(fields[b"d"]).status for _, fields in r.xrange(keys.alerts)]


def test_a_fence_may_name_the_whole_lease_value_and_must_be_of_the_agents_shard(
    r: redis.Redis, keys: Keys
) -> None:
    a = ShardLeases(r, keys, "a", 5000)
    refresh(r, a)
    incidents = Incidents(r, keys)
    name = agent_on(2)
    value: Any = r.get(keys.lease(2))
    assert parse_lease(value) == (a.held[2], "a")
    assert value is not None
    whole = (keys.lease(2), value.decode())
    fired = incidents.fire(name, "stall", severity="error", summary="s", at_ms=1, fence=whole)
    assert fired is not None
    with pytest.raises(ValueError, match="same shard"):
        incidents.fire(name, "exit", severity="error", summary="s", at_ms=1, fence=(keys.lease(3), "1"))


def test_release_only_gives_up_what_is_still_ours(r: redis.Redis, keys: Keys) -> None:
    a = ShardLeases(r, keys, "a", 300)
    refresh(r, a)
    time.sleep(0.4)
    b = ShardLeases(r, keys, "b", 5000)
    refresh(r, b)
    a.release_all()  # its leases expired and are b's now: they must stay b's
    assert {o["owner"] for o in b.owners().values()} == {"b"} and len(b.owners()) == SHARDS


def test_before_release_is_called_while_the_shard_is_still_ours(r: redis.Redis, keys: Keys) -> None:
    a = ShardLeases(r, keys, "a", 5000)
    b = ShardLeases(r, keys, "b", 5000)
    refresh(r, a)
    refresh(r, b)
    checkpoints = Checkpoints(r, keys)
    saved: list[int] = []

    def last_checkpoint(shard: int, token: int) -> None:
        assert checkpoints.save(shard, token, [], [], last_id="9-0", meta={}, decided=[])
        saved.append(shard)

    _, lost = a.refresh(server_time_ms(r), before_release=last_checkpoint)
    assert sorted(saved) == sorted(lost) and len(lost) == SHARDS // 2


def test_an_owner_name_with_a_colon_is_refused(r: redis.Redis, keys: Keys) -> None:
    with pytest.raises(ValueError, match="':'"):
        ShardLeases(r, keys, "host:1", 1000)


FROZEN_HOLDER = """
import json, sys, time
import redis
from agentwatch.keys import Keys
from agentwatch.redisconn import server_time_ms
from detectors.agent import Agent
from detectors.checkpoint import Checkpoints
from detectors.leases import ShardLeases

client = redis.Redis.from_url(sys.argv[1])
keys = Keys(prefix=sys.argv[2], shards=int(sys.argv[3]))
leases = ShardLeases(client, keys, "frozen", 300)
checkpoints = Checkpoints(client, keys)
tokens = {}  # the last token it had of every shard it ever held: it keeps trying with them
while True:
    # as an engine would: checkpoint what it believes it holds, then renew
    saved = {shard: checkpoints.save(shard, token, [Agent("from-frozen")], [], last_id="1-0",
                                     meta={"by": "frozen"}, decided=[])
             for shard, token in sorted(tokens.items())}
    gained, lost = leases.refresh(server_time_ms(client))
    tokens.update((shard, leases.held[shard]) for shard in gained)
    line = {"saved": list(saved.values()), "lost": sorted(lost), "held": sorted(leases.held)}
    print(json.dumps(line), flush=True)
    time.sleep(0.05)
"""


def test_a_sigstopped_holder_wakes_to_refused_saves_and_lost_leases(
    r: redis.Redis, keys: Keys, redis_url: str
) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", FROZEN_HOLDER, redis_url, keys.prefix, str(SHARDS)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    try:
        assert child.stdout is not None
        while json.loads(child.stdout.readline())["held"] != sorted(ALL):
            pass
        child.send_signal(signal.SIGSTOP)
        time.sleep(0.5)  # past its 300 ms lease
        other = ShardLeases(r, keys, "other", 5000)
        assert refresh(r, other)[0] == ALL
        checkpoints = Checkpoints(r, keys)
        for shard, token in other.held.items():
            assert checkpoints.save(shard, token, [], [], last_id="2-0", meta={"by": "other"}, decided=[])
        child.send_signal(signal.SIGCONT)
        while not (line := json.loads(child.stdout.readline()))["lost"]:
            assert line["saved"] in ([True] * SHARDS, [])  # printed before the stop
        assert line["lost"] == sorted(ALL) and line["held"] == []
        line = json.loads(child.stdout.readline())  # its saves after waking up
        assert line == {"saved": [False] * SHARDS, "lost": [], "held": []}
        assert all(checkpoints.load(shard, {}).meta == {"by": "other"} for shard in ALL)
        assert {o["owner"] for o in other.owners().values()} == {"other"}
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()


@pytest.mark.cluster
def test_leases_checkpoints_and_fences_on_a_three_master_cluster(cluster_ports: list[int]) -> None:
    client: Any = RedisCluster.from_url(f"redis://127.0.0.1:{cluster_ports[0]}/0")
    keys = Keys(f"lc{os.urandom(4).hex()}", shards=SHARDS)
    try:
        # 1.5 s, renewed before each shard's writes as a worker renews at its tick: on a loaded
        # box the writes of all shards, a cluster round trip each, took over 1.5 s in all.
        a = ShardLeases(client, keys, "a", 1500)
        a.refresh(server_time_ms(client))
        assert set(a.held) == ALL and set(a.owners()) == ALL
        checkpoints = Checkpoints(client, keys)
        incidents = Incidents(client, keys)
        tokens = dict(a.held)
        for shard, token in tokens.items():
            assert a.refresh(server_time_ms(client)) == (set(), set()) and a.held == tokens  # renewed
            assert checkpoints.save(
                shard, token, [Agent(agent_on(shard))], [], last_id="1-0", meta={}, decided=[b"d"]
            )
            assert checkpoints.pop_decided(shard, token, 1)
            name = agent_on(shard)
            assert incidents.fire(
                name, "silence", severity="critical", summary="s", at_ms=1, fence=a.fence(shard)
            )
        stale = dict(a.held)
        time.sleep(1.6)  # a's leases run out: nothing to await but the clock
        b = ShardLeases(client, keys, "b", 5000)
        assert b.refresh(server_time_ms(client))[0] == ALL
        for shard, token in stale.items():
            assert not checkpoints.save(shard, token, [Agent("x")], [], last_id="2-0", meta={}, decided=[])
            fence = (keys.lease(shard), str(token))
            assert incidents.resolve(agent_on(shard), "silence", summary="s", at_ms=2, fence=fence) is None
        for shard in ALL:
            loaded = checkpoints.load(shard, {})
            assert (
                set(loaded.agents) == {agent_on(shard)} and loaded.decided == [] and loaded.last_id == "1-0"
            )
        assert a.refresh(server_time_ms(client))[1] == ALL
        b.release_all()
        a.release_all()
    finally:
        for key in client.scan_iter(match=f"{keys.prefix}:*"):
            client.delete(key)
        client.close()


def test_a_lease_that_ran_out_and_is_taken_again_is_both_lost_and_gained(r: redis.Redis, keys: Keys) -> None:
    a = ShardLeases(r, keys, "a", 300)
    refresh(r, a)
    first = dict(a.held)
    time.sleep(0.4)  # frozen past the lease; meanwhile another owner could have come and gone
    gained, lost = refresh(r, a)
    assert gained == lost == ALL  # drop what is in memory, load the checkpoint again
    assert all(a.held[shard] > first[shard] for shard in ALL)
