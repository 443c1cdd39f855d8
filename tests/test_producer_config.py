"""Zero setup, environment configuration and import hygiene, each in a fresh interpreter."""

from __future__ import annotations

import json
import zlib

import pytest
import redis
from agents.testkit import agent_env, assert_no_internal_errors, kinds, read_events, run

HEAVY = ("numpy", "typer", "pydantic", "pydantic_settings", "rich", "httpx", "detectors",
         "notifiers", "psutil", "openai", "anthropic")  # fmt: skip
ALLOWED_AGENTWATCH = {"agentwatch", "agentwatch.codec", "agentwatch.keys", "agentwatch.errors"}


def test_import_is_light_and_starts_nothing(redis_url: str, prefix: str) -> None:
    code = f"""
import json, sys, threading
import producers
def report():
    return {{
        "heavy": sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r}),
        "agentwatch": sorted(m for m in sys.modules if m.split(".")[0] == "agentwatch"),
        "threads": threading.active_count(),
    }}
after_import = report()
producers.heartbeat(tokens=1)  # first use: the sender thread starts, Redis is written
producers.shutdown()
print(json.dumps({{"import": after_import, "use": report()}}))
"""
    exit_code, out, err = run(code, agent_env(redis_url, prefix))

    result = json.loads(out)
    assert exit_code == 0
    assert_no_internal_errors(err)
    for stage in ("import", "use"):
        assert result[stage]["heavy"] == []
        assert set(result[stage]["agentwatch"]) <= ALLOWED_AGENTWATCH
    assert result["import"]["threads"] == 1  # importing starts no thread and opens no socket


def test_zero_setup_from_environment(redis_url: str, prefix: str, r: redis.Redis) -> None:
    code = "from producers import heartbeat\nheartbeat(tokens=7)\n"
    env = agent_env(redis_url, prefix, "env-bot", AGENTWATCH_INTERVAL="2.5")
    exit_code, _, err = run(code, env)

    events = read_events(r, f"{prefix}:events")
    assert exit_code == 0
    assert_no_internal_errors(err)
    assert kinds(events) == ["start", "beat", "exit"]
    assert {e["agent"] for e in events} == {"env-bot"}
    assert events[0]["interval"] == 2.5
    assert events[1]["tokens"] == 7


def test_agent_name_defaults_to_the_script_name(redis_url: str, prefix: str, r: redis.Redis) -> None:
    env = agent_env(redis_url, prefix, AW_BEATS=1)
    del env["AGENTWATCH_AGENT"]
    exit_code, _, _ = run("scripted.py", env, "exit")

    assert exit_code == 0
    assert {e["agent"] for e in read_events(r, f"{prefix}:events")} == {"scripted"}


def test_default_redis_url_is_local_6379(redis_url: str, prefix: str, r: redis.Redis) -> None:
    if redis_url != "redis://127.0.0.1:6379/0":
        pytest.skip("the session's Redis is not at the default URL")
    env = agent_env(redis_url, prefix, AW_BEATS=1)
    del env["AGENTWATCH_REDIS_URL"]
    exit_code, _, _ = run("scripted.py", env, "exit")

    assert exit_code == 0
    assert kinds(read_events(r, f"{prefix}:events")) == ["start", "beat", "exit"]


def test_invalid_environment_values_warn_once_and_fall_back(
    redis_url: str, prefix: str, r: redis.Redis
) -> None:
    env = agent_env(
        redis_url,
        prefix,
        "my bot!",
        AGENTWATCH_INTERVAL="soon",
        AGENTWATCH_PULSE_INTERVAL="-1",
        AGENTWATCH_SHARDS="zero",
        AW_BEATS=3,
    )
    exit_code, _, err = run("scripted.py", env, "exit")

    events = read_events(r, f"{prefix}:events")  # shards fell back to 1: the plain stream
    assert exit_code == 0
    assert_no_internal_errors(err)
    assert kinds(events) == ["start", "beat", "beat", "beat", "exit"]
    assert {e["agent"] for e in events} == {"my_bot_"}
    assert "interval" not in events[0]
    for needle in ("agent name 'my bot!'", "interval='soon'", "pulse_interval='-1'", "shards='zero'"):
        assert err.count(needle) == 1, (needle, err)


def test_invalid_redis_url_warns_and_uses_the_default(redis_url: str, prefix: str) -> None:
    env = agent_env("http://example.invalid:80", prefix, AW_BEATS=1)
    exit_code, _, err = run("scripted.py", env, "exit")

    assert exit_code == 0
    assert_no_internal_errors(err)
    assert err.count("invalid Redis URL 'http://example.invalid:80'") == 1


def test_shards_route_the_agent_to_its_crc32_shard(redis_url: str, prefix: str, r: redis.Redis) -> None:
    env = agent_env(redis_url, prefix, "sharded-bot", AGENTWATCH_SHARDS=4, AW_BEATS=2)
    exit_code, _, _ = run("scripted.py", env, "exit")

    shard = zlib.crc32(b"sharded-bot") % 4
    assert exit_code == 0
    assert kinds(read_events(r, f"{prefix}:events:{shard}")) == ["start", "beat", "beat", "exit"]
    assert r.exists(f"{prefix}:events") == 0
