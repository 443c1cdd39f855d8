"""The worker runtime and incidents on a real 3-master Redis Cluster started on loopback.

Proves the key schema's promise: with sharded event streams spread over the nodes, the runtime
reads, dead-letters, reclaims and acknowledges, and the incident scripts and the ingest scripts
of the ping API and OTLP receiver (which touch several keys) run because their keys share a hash
tag.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import pytest
from redis.cluster import RedisCluster

from agentwatch import codec
from agentwatch.alerts import Incidents, decode_alert
from agentwatch.codec import Event
from agentwatch.config import OtlpSection
from agentwatch.ingest import EventWriter, FloodLimit
from agentwatch.keys import Keys, shard_of
from agentwatch.otlp.receiver import Receiver
from agentwatch.redisconn import connect
from agentwatch.worker import Handler, Message, Worker

from helpers import running, settings_for, wait_for
from otlp_build import llm_call, tool_call, traces

pytestmark = pytest.mark.cluster


@pytest.fixture
def cluster_url(cluster_ports: list[int]) -> str:
    return f"redis://127.0.0.1:{cluster_ports[0]}/0"


class Collect(Handler[Event]):
    name = "collect"

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def on_batch(self, messages: Sequence[Message[Event]]) -> None:
        self.seen += [(event["agent"], event["seq"]) for _, event in messages]


def beat(agent: str, seq: int) -> bytes:
    return codec.encode({"v": 1, "agent": agent, "kind": "beat", "ts": time.time(), "run": "r1", "seq": seq})


def test_worker_runtime_on_a_three_master_cluster(cluster_url: str) -> None:
    prefix = f"c{int(time.time() * 1000) % 10**8}"
    settings = settings_for(
        prefix,
        cluster_url,
        redis={"cluster": True, "shards": 3},
        worker={"tick": "50ms", "claim_idle": "200ms"},
    )
    keys = Keys(prefix, shards=3)
    client: Any = connect(settings, cluster_url)
    assert isinstance(client, RedisCluster)
    try:
        slots = {client.keyslot(stream) for stream in keys.event_streams()}
        nodes = {client.get_node_from_key(stream).name for stream in keys.event_streams()}
        assert len(slots) == 3 and len(nodes) >= 2  # the shards really are spread over nodes

        agents = [f"agent-{i}" for i in range(9)]
        expected = set()
        for seq in range(3):
            for agent in agents:
                client.xadd(keys.events_for(agent), {"d": beat(agent, seq)})
                expected.add((agent, seq))
        client.xadd(keys.events(1), {"d": b"\xc1 not msgpack"})
        # entries a dead consumer read and never acknowledged, on another shard
        for stream in keys.event_streams():
            client.xgroup_create(stream, "detectors", id="0", mkstream=True)
        dead_stream = keys.events_for("orphan")
        client.xadd(dead_stream, {"d": beat("orphan", 0)})
        client.xreadgroup("detectors", "dead-consumer", {dead_stream: ">"}, count=100)
        expected.add(("orphan", 0))

        collect = Collect()
        worker: Worker[Event] = Worker(
            client, settings, kind="detectors", streams=keys.event_streams(), group="detectors",
            decode=codec.decode, handlers=[collect], retention_s=3600,
        )  # fmt: skip
        with running(worker):
            wait_for(lambda: set(collect.seen) >= expected, timeout=20, what="every event on every shard")
            wait_for(lambda: client.xlen(keys.deadletter) == 1, what="the bad entry dead-lettered")
            wait_for(
                lambda: all(client.xpending(s, "detectors")["pending"] == 0 for s in keys.event_streams())
            )
        assert worker.stats.reclaimed >= 1
        ((_, letter),) = client.xrange(keys.deadletter)
        assert letter[b"reason"].startswith(b"not msgpack")

        # incidents: the Lua scripts touch several keys of one shard, all under its hash tag
        incidents = Incidents(client, keys)
        for agent in agents:
            tag = keys.tag_for(agent)
            assert client.keyslot(keys.incidents(shard_of(agent, 3))) == client.keyslot(
                keys.outbox(shard_of(agent, 3))
            )
            assert keys.incidents(shard_of(agent, 3)).startswith(tag)
            assert incidents.fire(agent, "silence", severity="critical", summary="gone", at_ms=1) is not None
            assert incidents.fire(agent, "silence", severity="critical", summary="gone", at_ms=2) is None
            assert incidents.resolve(agent, "silence", summary="back", at_ms=3) is not None
        statuses = [decode_alert(fields[b"d"]).status for _, fields in client.xrange(keys.alerts)]
        assert statuses == ["firing", "resolved"] * len(agents)
    finally:
        for key in client.scan_iter(match=f"{prefix}:*", target_nodes=RedisCluster.ALL_NODES):
            client.delete(key)
        client.close()


def test_a_short_wait_shared_over_shards_never_becomes_block_0(cluster_url: str) -> None:
    """Reading three shards one by one with a 2 ms wait left before the next tick: 2 // 3 would
    be BLOCK 0, which waits for ever on idle shards (and silence checks with it)."""
    prefix = f"cb{int(time.time() * 1000) % 10**8}"
    settings = settings_for(prefix, cluster_url, redis={"cluster": True, "shards": 3})
    keys = Keys(prefix, shards=3)
    client: Any = connect(settings, cluster_url)
    worker: Worker[Event] = Worker(
        client, settings, kind="detectors", streams=keys.event_streams(), group="detectors",
        decode=codec.decode, handlers=[], retention_s=3600,
    )  # fmt: skip
    try:
        worker._setup()
        started = time.monotonic()
        assert worker._read(">", block_ms=2) == []
        assert time.monotonic() - started < 1.0
    finally:
        for key in client.scan_iter(match=f"{prefix}:*", target_nodes=RedisCluster.ALL_NODES):
            client.delete(key)
        client.close()


def test_pings_and_otlp_exports_write_their_bucketed_records_on_a_cluster(cluster_url: str) -> None:
    """The ingest scripts touch a stream, its count and one bucket per agent and per process
    (agentwatch/keys.py): all one slot, the stream's tag, on whichever node holds it."""
    prefix = f"c{int(time.time() * 1000) % 10**8}"
    settings = settings_for(prefix, cluster_url, redis={"cluster": True, "shards": 3})
    keys = Keys(prefix, shards=3)
    client: Any = connect(settings, cluster_url)
    assert isinstance(client, RedisCluster)
    rec = None
    try:
        writer = EventWriter(client, keys, limit=FloodLimit(rate_per_s=1000.0, burst=1000), run_ttl_s=1.0)
        agents = [f"cron-{n}" for n in range(24)]
        for agent in agents:
            writer.write(agent, "beat")
        rec = Receiver(client, keys, OtlpSection(forget="1s", interval="0.1s"), writer)
        bots = [f"bot-{n}" for n in range(6)]
        calls = [tool_call(), llm_call()]
        request = traces(*[({"service.name": bot, "service.instance.id": "i-1"}, calls) for bot in bots])
        body = request.SerializeToString()
        outcome = asyncio.run(rec.export("traces", body, "application/x-protobuf", None))
        assert outcome.rejected == 0 and outcome.problems == []
        for agent in [*agents, *bots]:
            stream = [codec.decode(f[b"d"]) for _, f in client.xrange(keys.events_for(agent))]
            assert [e["kind"] for e in stream if e["agent"] == agent] == ["start", "beat"]
            assert client.hexists(keys.ingest_for(agent), agent)
        assert writer.counted() == len(bots)

        def swept() -> bool:  # (the pings' records and the exports' each expire on their own clock)
            writer.sweep()
            return writer.counted() == 0 and not any(
                client.hexists(keys.ingest_for(agent), agent) for agent in [*agents, *bots]
            )

        wait_for(swept, timeout=20, what="records swept")
    finally:
        if rec is not None:
            rec.close()
        for key in client.scan_iter(match=f"{prefix}:*"):
            client.delete(key)
        client.close()
