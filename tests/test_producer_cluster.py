"""The producer on a real 3-master Redis Cluster, pointed at one node like any single URL."""

from __future__ import annotations

import uuid

import pytest
import redis
from agents.testkit import agent_env, assert_no_internal_errors, kinds, read_events, run
from redis.cluster import RedisCluster
from redis.crc import key_slot

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def owner(ports: list[int], key: str) -> int:
    client = redis.Redis(host="127.0.0.1", port=ports[0])
    try:
        slot = key_slot(key.encode())
        for start, end, primary, *_ in client.execute_command("CLUSTER SLOTS"):
            if start <= slot <= end:
                return int(primary[1])
    finally:
        client.close()
    raise AssertionError(f"no node owns slot {slot}")


def test_producer_pointed_at_one_node_follows_moved_to_the_stream_owner(
    cluster_ports: list[int],
) -> None:
    seed = cluster_ports[0]
    candidates = (f"c{uuid.uuid4().hex[:8]}" for _ in range(100))
    prefix = next(p for p in candidates if owner(cluster_ports, f"{p}:events") != seed)
    env = agent_env(f"redis://127.0.0.1:{seed}/0", prefix, "cluster-bot", AW_BEATS=20)

    code, _, err = run("scripted.py", env, "exit")

    client = RedisCluster(host="127.0.0.1", port=seed)
    try:
        events = read_events(client, f"{prefix}:events")  # type: ignore[arg-type]
    finally:
        client.close()
    assert code == 0
    assert_no_internal_errors(err)
    assert kinds(events) == ["start"] + ["beat"] * 20 + ["exit"]
    assert not [e for e in events if "dropped" in e]  # the redirect lost nothing
    assert "refused" not in err  # and following it is not worth a warning
