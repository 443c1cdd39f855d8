"""The detectors on a real 3-master Redis Cluster with 3 event shards: every script's keys share
one shard's hash tag, so silence, exit and tokens work when the shards live on different nodes."""

from __future__ import annotations

import time
from typing import Any

import pytest
from agents_detect.kit import pipeline_for, worker_for
from redis.cluster import RedisCluster

from agentwatch import codec
from agentwatch.alerts import decode_alert
from agentwatch.keys import Keys, shard_of

from helpers import running, wait_for

pytestmark = pytest.mark.cluster


def test_detectors_on_a_three_master_cluster(cluster_ports: list[int]) -> None:
    url = f"redis://127.0.0.1:{cluster_ports[0]}/0"
    prefix = f"dc{int(time.time() * 1000) % 10**8}"
    pipeline = pipeline_for(
        prefix, url, worker={"tick": "50ms"}, silence={"after": "600ms"}, tokens={"warmup": 3}
    )
    pipeline = type(pipeline)(
        settings=pipeline.settings.model_copy(
            update={"redis": pipeline.settings.redis.model_copy(update={"cluster": True, "shards": 3})}
        ),
        source="test",
        detectors=pipeline.detectors,
    )
    keys = Keys(prefix, shards=3)
    worker = worker_for(pipeline, url)
    client: Any = worker.client
    assert isinstance(client, RedisCluster)
    agents = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]
    assert len({shard_of(a, 3) for a in agents}) == 3
    seqs = dict.fromkeys(agents, 0)

    def send(agent: str, kind: str, **fields: Any) -> None:
        event = {"v": 1, "agent": agent, "kind": kind, "ts": 0.0, "run": "r1", "seq": seqs[agent], **fields}
        seqs[agent] += 1
        client.xadd(keys.events_for(agent), {"d": codec.encode(event)})

    def transitions() -> set[tuple[str, str, str]]:
        alerts = [decode_alert(f[b"d"]) for _, f in client.xrange(keys.alerts)]
        return {(a.agent, a.detector, a.status) for a in alerts}

    try:
        with running(worker):
            for agent in agents:
                send(agent, "start", interval=0.1)
            for _ in range(5):
                for agent in agents:
                    send(agent, "beat", tokens=100)
            wait_for(lambda: worker.stats.processed >= 36, timeout=10, what="the warm-up applied")
            send("bravo", "exit", reason="exception", code=1, error="KeyError: 'x'")
            send("charlie", "beat", tokens=90_000)
            expected = {("bravo", "exit", "firing"), ("charlie", "tokens", "firing")}
            expected |= {(a, "silence", "firing") for a in agents if a != "bravo"}
            wait_for(lambda: transitions() >= expected, timeout=15, what="alerts from every shard")
            send("alpha", "beat")
            wait_for(lambda: ("alpha", "silence", "resolved") in transitions(), timeout=10, what="resolved")
        assert {(a, d) for a, d, s in transitions() if s == "firing"} == {(a, d) for a, d, _ in expected}
    finally:
        for key in client.scan_iter(match=f"{prefix}:*", target_nodes=RedisCluster.ALL_NODES):
            client.delete(key)
        client.close()
