"""The producer on a real 3-master Redis Cluster, pointed at one node like any single URL."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from agents.testkit import agent_env, assert_no_internal_errors, kinds, read_events, run, wait_for
from redis.cluster import RedisCluster
from redis.crc import key_slot

from agentwatch.embedded import find_server_binary
from agentwatch.errors import EmbeddedRedisError

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _answers(port: int, ready: bool = False) -> bool:
    """The node answers PING (``ready``: and the cluster it belongs to is up)."""
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        return bool(client.cluster("info")["cluster_state"] == "ok" if ready else client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def node_port(taken: list[int]) -> int:
    """A free port whose cluster-bus port (port + 10000) is free too, and below 65536.

    conftest's free_port() hands out ephemeral ports up to ~61000, whose bus port would not
    exist: the node then refuses to start.
    """
    while True:
        port = random.randrange(20_000, 45_000)
        if port in taken:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10_000))
        except OSError:
            continue
        return port


@pytest.fixture(scope="module")
def cluster_ports() -> Iterator[list[int]]:
    try:
        server = find_server_binary()
    except EmbeddedRedisError:
        pytest.skip("no Redis server binary")
    cli = shutil.which("valkey-cli" if server.name.startswith("valkey") else "redis-cli")
    if cli is None:
        pytest.skip("no redis-cli to create a cluster with")
    root = Path(tempfile.mkdtemp(prefix="aw-pc-"))
    ports: list[int] = []
    for _ in range(3):
        ports.append(node_port(ports))
    nodes = []
    try:
        for port in ports:
            (root / str(port)).mkdir()
            nodes.append(subprocess.Popen(
                [str(server), "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--dir", str(root / str(port)), "--save", "", "--appendonly", "no"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))  # fmt: skip
        for port in ports:
            wait_for(lambda port=port: _answers(port), what=f"node {port}")
        subprocess.run(
            [cli, "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports], "--cluster-yes"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        wait_for(
            lambda: all(_answers(port, ready=True) for port in ports),
            timeout=20,
            what="cluster_state:ok",
        )
        yield ports
    finally:
        for node in nodes:
            node.terminate()
        for node in nodes:
            node.wait(5)
        shutil.rmtree(root, ignore_errors=True)


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
