"""Least privilege: ``agentwatch acl --apply`` makes one Redis user per role on a real (private)
Redis 7; real agents, workers and CLI commands each run as their role's user and do their job,
and each role is refused what it has no business doing."""

from __future__ import annotations

import inspect
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from agents.testkit import agent_env, run

from agentwatch import acl
from agentwatch.embedded import EmbeddedRedis
from agentwatch.keys import Keys

from conftest import free_port
from helpers import wait_for
from notify_kit import receiver

PREFIX = "aw"


def cli(config: Path, *args: str, url: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTWATCH_")}
    if url is not None:
        env["AGENTWATCH_REDIS__URL"] = url
    return subprocess.run([sys.executable, "-m", "agentwatch", *args, "--config", str(config)],
                          capture_output=True, text=True, env=env, timeout=60)  # fmt: skip


@pytest.fixture
def server(spawn_redis: Callable[..., EmbeddedRedis]) -> EmbeddedRedis:
    return spawn_redis(port=free_port())  # ACL users are server-wide: never on the shared Redis


@pytest.fixture
def admin(server: EmbeddedRedis) -> Iterator[redis.Redis]:
    assert server.tcp_url is not None
    client = redis.Redis.from_url(server.tcp_url)
    yield client
    client.close()


PING_KEY = "ping-key-for-the-acl-test"
TOKEN = "dashboard-token-for-the-acl-test"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def config_for(tmp_path: Path, server: EmbeddedRedis, hook_url: str, http_port: int = 0) -> Path:
    path = tmp_path / "pipeline.toml"
    path.write_text(
        f'[redis]\nurl = "{server.tcp_url}"\nprefix = "{PREFIX}"\n'
        '[worker]\ntick = "50ms"\nblock = "100ms"\n'
        f'[http]\nbind = "127.0.0.1:{http_port or free_port()}"\nping_key = "{PING_KEY}"\ntoken = "{TOKEN}"\n'
        f'[[notifiers]]\ntype = "webhook"\nurl = "{hook_url}"\nbackoff = "50ms"\n'
    )
    return path


def test_every_key_of_keys_py_has_a_row_in_the_access_table() -> None:
    members = {name for name, _ in inspect.getmembers(Keys) if not name.startswith("_")}
    members -= acl.HELPERS
    assert sorted(members - set(acl.ACCESS)) == [], "a key without a role: add its row to agentwatch/acl.py"
    assert sorted(set(acl.ACCESS) - members) == []
    assert all(
        set(row) <= set(acl.ROLES) and set(row.values()) <= {acl.R, acl.RW} for row in acl.ACCESS.values()
    )


def test_patterns_come_from_the_key_schema_in_both_spellings() -> None:
    keys = Keys("aw")
    assert acl.patterns(keys, "events") == ["aw:events", "aw:events:*"]
    assert acl.patterns(keys, "states") == ["aw:{*}:states"]
    assert acl.patterns(keys, "snapshot") == ["aw:{*}:snap:*"]
    assert acl.patterns(keys, "notifier_queue") == ["aw:{n:*}:queue"]
    assert acl.patterns(keys, "halts") == ["aw:halt:{aw:events:*}", "aw:halt:{aw:events}"]


def test_the_printed_commands_are_what_redis_accepts(
    tmp_path: Path, server: EmbeddedRedis, admin: redis.Redis
) -> None:
    printed = cli(config_for(tmp_path, server, "http://127.0.0.1:9/hook"), "acl")
    assert printed.returncode == 0, printed.stderr
    lines = [line for line in printed.stdout.splitlines() if line.startswith("ACL SETUSER")]
    assert len(lines) == len(acl.ROLES)
    for line in lines:
        assert admin.execute_command(*shlex.split(line)) == b"OK"
    assert sorted(admin.acl_users()) == sorted(["default", *(f"aw-{r}" for r in acl.ROLES)])


def _get(url: str) -> int:
    try:
        return httpx.get(url, timeout=5, headers=AUTH).status_code
    except httpx.HTTPError:
        return 0


def _text(url: str) -> str:
    try:
        return httpx.get(url, timeout=5, headers=AUTH).text
    except httpx.HTTPError:
        return ""


def refused(client: redis.Redis, *command: Any) -> bool:
    try:
        client.execute_command(*command)
    except redis.exceptions.NoPermissionError:
        return True
    except redis.ResponseError as exc:
        return str(exc).startswith("NOPERM")
    return False


def test_each_role_does_its_job_as_its_own_user_and_is_refused_the_rest(
    tmp_path: Path, server: EmbeddedRedis, admin: redis.Redis
) -> None:
    port = free_port()
    with receiver() as hook:
        config = config_for(tmp_path, server, hook.url, port)
        applied = cli(config, "acl", "--apply")
        assert applied.returncode == 0, applied.stderr
        urls = dict(re.findall(r"^(\w+)\s+(redis://\S+)$", applied.stdout, re.M))
        assert sorted(urls) == sorted(acl.ROLES)
        assert "kept in memory only" in applied.stderr  # a private server without an ACL file

        # An agent, as the producer: its events arrive, then it dies of an exception.
        code, _, err = run("scripted.py", agent_env(urls["producer"], PREFIX, "acl-bot", AW_BEATS=2), "raise")
        assert code == 1 and "Traceback" in err and "NOPERM" not in err
        assert admin.xlen("aw:events") == 4  # start, two beats, exit
        # The workers, each as its own user: the exit alert reaches the receiver.
        # ... and the HTTP server as its own: the ping API writes events, the pages read.
        commands = (
            (["worker", "detectors"], "detector"),
            (["worker", "notifiers"], "notifier"),
            (["serve"], "http"),
        )
        workers = [
            subprocess.Popen(
                [sys.executable, "-m", "agentwatch", *command, "--config", str(config)],
                env={**os.environ, "AGENTWATCH_REDIS__URL": urls[role]},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for command, role in commands
        ]
        try:
            request = hook.wait_requests(1, timeout=30)[0]
            base = f"http://127.0.0.1:{port}"
            wait_for(lambda: _get(f"{base}/healthz") == 200, 60, what="the HTTP server")
            assert _get(f"{base}/ping/{PING_KEY}/acl-ping-bot/start?interval=60") == 200
            assert _get(f"{base}/ping/{PING_KEY}/acl-ping-bot") == 200
            wait_for(
                lambda: "acl-ping-bot" in _text(f"{base}/api/status"), 30, what="the pinged agent in status"
            )
            assert _get(f"{base}/") == 200 and _get(f"{base}/metrics") == 200
            # A halt from the dashboard: its alert is signed by the server and delivered.
            form = {"agent": "acl-ping-bot", "reason": "acl test"}
            halted = httpx.post(f"{base}/actions/halt", data=form, headers=AUTH)
            assert halted.status_code == 303, halted.text
            wait_for(lambda: any(json.loads(q.body)["detector"] == "halt" for q in hook.requests), 30,
                     what="the halt alert delivered")  # fmt: skip
            # a second pass of their timers and upkeep, then their health says whether anything failed
            wait_for(lambda: len(admin.zrange("aw:workers", 0, -1)) == 2, what="both workers registered")
            healths = [
                admin.hgetall(f"aw:worker:{name.decode()}") for name in admin.zrange("aw:workers", 0, -1)
            ]
        finally:
            for worker in workers:
                worker.terminate()
            logs = [worker.communicate(timeout=15)[1] for worker in workers]
        assert json.loads(request.body)["detector"] == "exit"
        assert all(h[b"errors"] == b"0" for h in healths), healths
        assert not any("NOPERM" in log or "Traceback" in log or "no permission" in log for log in logs), logs

    # The operator's views work, read-only.
    status = cli(config, "status", "--json", url=urls["operator"])
    assert status.returncode == 0, status.stderr
    assert [a["agent"] for a in json.loads(status.stdout)["agents"]] == ["acl-bot", "acl-ping-bot"]
    alerts = cli(config, "alerts", "--json", url=urls["operator"])
    assert alerts.returncode == 0 and '"detector":"exit"' in alerts.stdout.replace(" ", ""), alerts.stderr

    as_role = {role: redis.Redis.from_url(url) for role, url in urls.items()}
    try:
        producer, detector, notifier, operator, http = (as_role[r] for r in acl.ROLES)
        forged_alert = ("XADD", "aw:alerts", "*", "d", "{}")
        # The producer: XADD events and read halts, nothing else.
        assert producer.xadd("aw:events", {"d": b"x"})
        assert b"acl-ping-bot" in producer.hgetall("aw:halt:{aw:events}")  # the dashboard's halt
        for command in (("XRANGE", "aw:events", "-", "+"), forged_alert, ("GET", "aw:secret"),
                        ("HSET", "aw:mutes", "*|*", "{}"), ("DEL", "aw:events"),
                        ("XTRIM", "aw:events", "MAXLEN", 0), ("HSET", "aw:halt:{aw:events}", "x", "y"),
                        ("GET", "aw:halt:{aw:events}"), ("SCAN", 0),
                        ("FLUSHALL",), ("CONFIG", "GET", "*"),
                        ("XADD", "other:events", "*", "d", "x")):  # fmt: skip
            assert refused(producer, *command), command
        # The operator reads everything but the secret, writes nothing.
        assert operator.xlen("aw:alerts") >= 1 and operator.hgetall("aw:mutes") == {}
        for command in (("XADD", "aw:events", "*", "d", "x"), forged_alert, ("HSET", "aw:mutes", "*|*", "{}"),
                        ("GET", "aw:secret"), ("DEL", "aw:alerts")):  # fmt: skip
            assert refused(operator, *command), command
        # Workers: no FLUSHALL, no CONFIG, no one else's keys; detectors do not mute, notifiers
        # do not write events.
        for worker in (detector, notifier):
            for command in (("FLUSHALL",), ("CONFIG", "SET", "appendonly", "no"), ("KEYS", "*"),
                            ("HSET", "aw:mutes", "*|*", "{}"), ("SET", "unrelated:key", "x"),
                            ("FUNCTION", "FLUSH")):  # fmt: skip
                assert refused(worker, *command), command
        assert refused(notifier, "XADD", "aw:events", "*", "d", "x")
        assert refused(detector, "HSET", "aw:{n:webhook}:jobs", "x", "{}")
        assert detector.get("aw:secret") == notifier.get("aw:secret") is not None
        # The HTTP server writes events and mutes (and its own alerts); never worker state.
        assert http.xadd("aw:events", {"d": b"x"}) and http.hset("aw:mutes", "x|*", "{}") == 1
        for command in (("HSET", "aw:{n:webhook}:jobs", "x", "{}"), ("HSET", "aw:{0}:states", "x", "y"),
                        ("DEL", "aw:workers"), ("XTRIM", "aw:deadletter", "MAXLEN", 0)):  # fmt: skip
            assert refused(http, *command), command
    finally:
        for client in as_role.values():
            client.close()


def test_apply_keeps_passwords_unless_rotated(tmp_path: Path, server: EmbeddedRedis) -> None:
    config = config_for(tmp_path, server, "http://127.0.0.1:9/hook")
    first = cli(config, "acl", "--apply", "--role", "producer")
    (url,) = re.findall(r"^producer\s+(redis://\S+)$", first.stdout, re.M)
    again = cli(config, "acl", "--apply", "--role", "producer")
    assert "producer  aw-producer: rules updated, password kept (--rotate for a new one)" in again.stdout
    with redis.Redis.from_url(url) as client:
        assert client.ping()
    rotated = cli(config, "acl", "--apply", "--role", "producer", "--rotate")
    (new_url,) = re.findall(r"^producer\s+(redis://\S+)$", rotated.stdout, re.M)
    assert new_url != url
    with redis.Redis.from_url(url) as old, pytest.raises(redis.AuthenticationError):
        old.ping()
    bad = cli(config, "acl", "--role", "admin")
    assert bad.returncode == 2 and "unknown role 'admin'" in bad.stderr
