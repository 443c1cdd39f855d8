"""The worker runtime and incidents on a real 3-master Redis Cluster started on loopback.

Proves the key schema's promise: with sharded event streams spread over the nodes, the runtime
reads, dead-letters, reclaims and acknowledges, and the incident scripts (which touch several
keys) run because their keys share a hash tag.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from agentwatch import codec
from agentwatch.alerts import Incidents, decode_alert
from agentwatch.codec import Event
from agentwatch.embedded import SERVER_NAMES, find_server_binary
from agentwatch.errors import EmbeddedRedisError
from agentwatch.keys import Keys, shard_of
from agentwatch.redisconn import connect
from agentwatch.worker import Handler, Message, Worker

from conftest import free_port
from helpers import running, settings_for, wait_for

pytestmark = pytest.mark.cluster


def binaries() -> tuple[str, str] | None:
    try:
        server = find_server_binary()
    except EmbeddedRedisError:
        return None
    cli_name = "valkey-cli" if server.name.startswith("valkey") else "redis-cli"
    cli = shutil.which(cli_name) or (
        str(server.parent / cli_name) if (server.parent / cli_name).exists() else None
    )
    return (str(server), cli) if cli and server.name in SERVER_NAMES else None


@pytest.fixture(scope="module")
def cluster_url() -> Iterator[str]:
    found = binaries()
    if found is None:
        pytest.skip("no redis-server/redis-cli (or valkey) binaries to build a cluster with")
    server_bin, cli_bin = found
    root = Path(tempfile.mkdtemp(prefix="aw-cl-"))
    ports = [free_port() for _ in range(3)]
    processes = []
    try:
        for port in ports:
            node_dir = root / str(port)
            node_dir.mkdir()
            processes.append(
                subprocess.Popen(
                    [
                        server_bin,
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--dir",
                        str(node_dir),
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--logfile",
                        "node.log",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for port in ports:
            wait_for(lambda port=port: _pings(port), timeout=10, what=f"cluster node {port}")
        subprocess.run(
            [cli_bin, "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        wait_for(lambda: all(_cluster_ok(p) for p in ports), timeout=20, what="cluster_state:ok")
        yield f"redis://127.0.0.1:{ports[0]}/0"
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(5)
        shutil.rmtree(root, ignore_errors=True)


def _pings(port: int) -> bool:
    client = redis.Redis(port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _cluster_ok(port: int) -> bool:
    client = redis.Redis(port=port)
    try:
        return bool(client.cluster("info")["cluster_state"] == "ok")
    finally:
        client.close()


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
