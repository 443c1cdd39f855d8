"""``agentwatch up`` and ``worker`` as a user runs them: real processes, embedded Redis, signals."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from agentwatch import __version__
from agentwatch.embedded import EmbeddedRedis
from agentwatch.supervisor import ServerWatch

from conftest import free_port
from helpers import wait_for


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def read_until(process: subprocess.Popen[str], marker: str, timeout: float = 20.0) -> str:
    """Collect stdout lines until one contains ``marker`` (or fail after ``timeout``).

    Reads in a thread: select() on a buffered text pipe can miss lines already buffered.
    """
    assert process.stdout is not None
    stdout = process.stdout
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()
    seen = ""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        try:
            seen += lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(
                f"no {marker!r} within {timeout}s (exit {process.poll()}):\n{seen}"
            ) from None
    return seen


@pytest.fixture
def up_config(short_dir: Path) -> Path:
    path = short_dir / "pipeline.toml"
    path.write_text(
        f'[redis]\nurl = "embedded"\n[embedded]\nstate_dir = "{short_dir / "state"}"\nport = 0\n'
        '[worker]\ntick = "100ms"\n'
    )
    return path


@pytest.fixture
def up(up_config: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A running ``agentwatch up`` on an embedded server; yields (process, redis url)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "agentwatch", "up", "--config", str(up_config), "--log-level", "warning"],
        stdout=subprocess.PIPE, text=True, cwd=up_config.parent,
    )  # fmt: skip
    try:
        banner = read_until(process, "Ctrl-C to stop.")
        match = re.search(r"redis: embedded server at (\S+)", banner)
        assert match, banner
        yield process, match.group(1)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout:
            process.stdout.close()


def registered_workers(client: redis.Redis) -> dict[str, int]:
    """consumer name -> pid of every live worker."""
    names = [n.decode() for n in client.zrange("aw:workers", 0, -1)]
    pids = {name: client.hget(f"aw:worker:{name}", "pid") for name in names}
    return {name: int(pid) for name, pid in pids.items() if pid}


def test_version() -> None:
    result = subprocess.run([sys.executable, "-m", "agentwatch", "--version"], capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (0, f"agentwatch {__version__}\n")


def test_up_runs_workers_on_an_embedded_redis_and_stops_cleanly_on_sigterm(
    up: tuple[subprocess.Popen[str], str], up_config: Path
) -> None:
    process, url = up
    assert url.startswith("unix://") and url.endswith("redis.sock?db=0")
    client = redis.Redis.from_url(url)
    try:
        workers = wait_for(lambda: registered_workers(client), what="a detector worker to register")
        server_pid = int(client.info("server")["process_id"])
    finally:
        client.close()
    record = up_config.parent / "state" / "current-url"
    assert record.read_text().strip() == url  # other commands find the embedded server here
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0
    for pid in [server_pid, *workers.values()]:
        wait_for(lambda pid=pid: not alive(pid), timeout=5, what=f"pid {pid} to exit")
    assert not record.exists()


def test_the_embedded_data_is_kept_by_default_and_one_up_serves_it(
    up: tuple[subprocess.Popen[str], str], up_config: Path
) -> None:
    _, url = up
    data = up_config.parent / "state" / "data"  # with a state_dir; else ~/.local/state/agentwatch
    with redis.Redis.from_url(url) as client:
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("dir") == {"dir": str(data)}
    second = subprocess.run(
        [sys.executable, "-m", "agentwatch", "up", "--config", str(up_config), "--log-level", "warning"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert second.returncode == 1
    assert f"{data} holds the data of an embedded Redis that agentwatch (pid " in second.stderr


def test_up_restarts_a_worker_that_dies(up: tuple[subprocess.Popen[str], str]) -> None:
    _, url = up
    client = redis.Redis.from_url(url)
    try:
        ((first_name, first_pid),) = wait_for(lambda: registered_workers(client).items(), what="a worker")
        os.kill(first_pid, signal.SIGKILL)
        replacement = wait_for(
            lambda: {n: p for n, p in registered_workers(client).items() if p != first_pid},
            timeout=15, what="a replacement worker",
        )  # fmt: skip
    finally:
        client.close()
    assert first_name not in replacement


def test_nothing_outlives_a_sigkilled_up(up: tuple[subprocess.Popen[str], str]) -> None:
    process, url = up
    client = redis.Redis.from_url(url)
    try:
        workers = wait_for(lambda: registered_workers(client), what="a worker")
        server_pid = int(client.info("server")["process_id"])
    finally:
        client.close()
    process.kill()
    process.wait()
    for pid in [server_pid, *workers.values()]:
        wait_for(lambda pid=pid: not alive(pid), timeout=5, what=f"pid {pid} to die with up")


def test_the_embedded_server_also_listens_on_the_configured_tcp_port(short_dir: Path) -> None:
    port = free_port()
    config = short_dir / "pipeline.toml"
    config.write_text(
        f'[redis]\nurl = "embedded"\n[embedded]\nstate_dir = "{short_dir / "s"}"\nport = {port}\n'
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "agentwatch", "up", "--config", str(config), "--log-level", "warning"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        banner = read_until(process, "Ctrl-C to stop.")
        assert f"also at redis://127.0.0.1:{port}/0" in banner
        client = redis.Redis(port=port)
        assert client.ping()
        client.close()
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C
        code = process.wait(timeout=10)
        assert process.stdout is not None
        process.stdout.close()
    assert code == 0


def test_bad_usage_exits_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agentwatch", "worker", "painters"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "'painters' is not one of" in result.stderr


def in_append_only_file(client: redis.Redis, data: bytes) -> bool:
    """Whether ``data`` is in the server's append-only file(s) (written, if not yet fsynced)."""
    folder = Path(client.config_get("dir")["dir"]) / client.config_get("appenddirname")["appenddirname"]
    return any(data in path.read_bytes() for path in folder.glob("*.aof*"))


def test_up_restarts_its_embedded_redis_at_the_same_url(up_config: Path) -> None:
    log = up_config.parent / "up.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "agentwatch", "up", "--config", str(up_config), "--log-level", "warning"],
            stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=up_config.parent,
        )  # fmt: skip
    try:
        banner = read_until(process, "Ctrl-C to stop.")
        match = re.search(r"redis: embedded server at (\S+)", banner)
        assert match, banner
        url = match.group(1)
        client = redis.Redis.from_url(url, socket_timeout=2)
        try:
            wait_for(lambda: registered_workers(client), what="a worker")
            first_pid = int(client.info("server")["process_id"])
            # Persisted by default: what reached the append-only file survives a SIGKILL. (With
            # appendfsync everysec Redis may answer before it writes the file while a slow fsync
            # is pending, as on a loaded box: up to ~2 s of writes can be lost. Not this one.)
            client.xadd("aw:events", {"d": b"kept"})
            wait_for(lambda: in_append_only_file(client, b"kept"), what="the entry in the AOF")
            groups = client.xinfo_groups("aw:events")
            os.kill(first_pid, signal.SIGKILL)

            def new_server() -> bool:
                try:
                    return int(client.info("server")["process_id"]) != first_pid
                except redis.RedisError:
                    return False

            wait_for(new_server, timeout=10, what="a new server at the same URL")

            def workers_back() -> dict[str, int]:
                try:
                    return registered_workers(client)
                except redis.BusyLoadingError:  # INFO answers while the new server still loads
                    return {}

            wait_for(workers_back, timeout=15, what="the workers back on it")
            assert [f[b"d"] for _, f in client.xrange("aw:events")][-1:] == [b"kept"]
            assert [g["name"] for g in client.xinfo_groups("aw:events")] == [g["name"] for g in groups]
            assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        finally:
            client.close()
        assert process.poll() is None
        # The workers' registry survived the restart (persisted): the log line may come later.
        wait_for(lambda: "embedded Redis restarted (pid " in log.read_text(), what="the restart logged")
        text = log.read_text()
        assert f"the embedded Redis was killed by SIGKILL; restarting it at {url} in 0s" in text
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout:
            process.stdout.close()


def test_an_embedded_redis_that_keeps_dying_is_given_up_on(short_dir: Path) -> None:
    server = EmbeddedRedis(short_dir / "s").start()
    watch = ServerWatch(server, burst=2, window_s=60, backoff_s=0.05)
    try:
        outcomes = []
        for _ in range(3):
            server.kill()
            now = time.monotonic()
            outcomes.append(watch.check(now))
            while watch.restart_at is not None:  # the backoff: 0 s, then 0.05 s
                time.sleep(watch.restart_at - now)
                now = time.monotonic()
                watch.check(now)
            if outcomes[-1]:
                assert server.process is not None and server.process.poll() is None
                with redis.Redis.from_url(server.url) as probe:
                    assert probe.ping()
    finally:
        server.cleanup()
    assert outcomes == [True, True, False]
