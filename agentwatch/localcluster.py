"""A throw-away Redis Cluster on loopback: N masters, no replicas, no persistence.

For the test suite's cluster fixture and the capacity benchmark (benchmarks/capacity.py), which
must run the detectors against a real cluster (keys on several nodes, MOVED, one slot per
script) without a second cluster builder each. Nodes are our own child processes built from the
same server binary as the embedded launcher (:func:`agentwatch.embedded.find_server_binary`);
``redis-cli --cluster create`` (or ``valkey-cli``) assigns the slots. Not for production: no
replicas, no persistence, loopback only.
"""

from __future__ import annotations

import functools
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import redis

from agentwatch.embedded import find_server_binary
from agentwatch.errors import EmbeddedRedisError


def node_port(taken: list[int]) -> int:
    """A free port whose cluster-bus port (port + 10000) is free and valid too."""
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


def node_answers(port: int, ready: bool = False) -> bool:
    """The node answers PING (``ready``: and its cluster is up). 127.0.0.1, not localhost (::1)."""
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        return bool(client.cluster("info")["cluster_state"] == "ok" if ready else client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def await_true(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until true; :class:`AssertionError` naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def cluster_cli(server: Path) -> Path:
    """The ``redis-cli``/``valkey-cli`` that matches ``server``; EmbeddedRedisError if none."""
    name = "valkey-cli" if server.name.startswith("valkey") else "redis-cli"
    found = shutil.which(name)
    if found:
        return Path(found)
    if (server.parent / name).exists():
        return server.parent / name
    raise EmbeddedRedisError(f"no {name} to create a cluster with")


class LocalCluster:
    """``masters`` Redis Cluster nodes under ``root`` (created; removed by :meth:`stop`)."""

    def __init__(self, root: Path, masters: int = 3, extra_args: tuple[str, ...] = ()) -> None:
        self.root = root
        self.masters = masters
        self.extra_args = extra_args
        self.ports: list[int] = []
        self.nodes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """A seed URL for the cluster client (any node will do)."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self) -> LocalCluster:
        """Start the nodes and create the cluster; raises EmbeddedRedisError when no binary."""
        server = find_server_binary()
        cli = cluster_cli(server)
        self.root.mkdir(parents=True, exist_ok=True)
        for _ in range(self.masters):
            self.ports.append(node_port(self.ports))
        try:
            for port in self.ports:
                (self.root / str(port)).mkdir()
                argv = [str(server), "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes"]
                argv += ["--dir", str(self.root / str(port)), "--save", "", "--appendonly", "no"]
                argv += list(self.extra_args)
                self.nodes.append(
                    subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                )
            for port in self.ports:
                await_true(functools.partial(node_answers, port), 10, f"cluster node {port}")
            create = [str(cli), "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports]]
            create += ["--cluster-replicas", "0", "--cluster-yes"]
            subprocess.run(create, check=True, capture_output=True, timeout=30)
            await_true(lambda: all(node_answers(p, ready=True) for p in self.ports), 20, "cluster_state:ok")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every node and delete their directories."""
        for node in self.nodes:
            node.terminate()
        for node in self.nodes:
            try:
                node.wait(5)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait(5)
        self.nodes = []
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
