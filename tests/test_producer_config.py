"""Zero setup, environment configuration and import hygiene, each in a fresh interpreter."""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable

import pytest
import redis
from agents.testkit import agent_env, assert_no_internal_errors, kinds, read_events, run

from agentwatch import codec
from agentwatch.embedded import EmbeddedRedis, tcp_port_free
from producers import _guard
from producers._config import resolve

HEAVY = ("numpy", "typer", "pydantic", "pydantic_settings", "rich", "httpx", "detectors",
         "notifiers", "psutil", "openai", "anthropic")  # fmt: skip
ALLOWED_AGENTWATCH = {
    "agentwatch", "agentwatch.codec", "agentwatch.keys", "agentwatch.errors", "agentwatch.urls",
    "agentwatch.signing", "agentwatch.runfile", "agentwatch.labels",
}  # fmt: skip


def test_import_is_light_and_starts_nothing(redis_url: str, prefix: str) -> None:
    # redis-py imports the OpenTelemetry SDK (and through it psutil) whenever the SDK is installed,
    # as it is in the test environment for the OTLP tests: redis-py's choice, not the producer's.
    # An agent without the SDK is what this checks, so the SDK is made unimportable first.
    code = f"""
import json, sys, threading
sys.modules["opentelemetry.sdk"] = None
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


def test_default_redis_url_is_local_6379(prefix: str, spawn_redis: Callable[..., EmbeddedRedis]) -> None:
    # A private server on 6379, never one that answers there already (another program's).
    if not tcp_port_free(6379):
        # test_a_malformed_redis_url_names_the_variable_and_the_fallback still checks the default.
        pytest.skip("port 6379 is taken by another server; this needs its own there")
    server = spawn_redis(port=6379)
    env = agent_env(server.url, prefix, AW_BEATS=1)
    del env["AGENTWATCH_REDIS_URL"]
    exit_code, _, _ = run("scripted.py", env, "exit")

    assert exit_code == 0
    client = redis.Redis.from_url(server.url)
    assert kinds(read_events(client, f"{prefix}:events")) == ["start", "beat", "exit"]
    client.close()


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
    for needle in (
        "AGENTWATCH_AGENT: agent name 'my bot!'",
        "AGENTWATCH_INTERVAL='soon'",
        "AGENTWATCH_PULSE_INTERVAL='-1'",
        "AGENTWATCH_SHARDS='zero'",
    ):
        assert err.count(needle) == 1, (needle, err)


def test_invalid_redis_url_warns_and_uses_the_default(redis_url: str, prefix: str) -> None:
    env = agent_env("http://example.invalid:80", prefix, AW_BEATS=1)
    exit_code, _, err = run("scripted.py", env, "exit")

    assert exit_code == 0
    assert_no_internal_errors(err)
    assert err.count("AGENTWATCH_REDIS_URL='http://example.invalid:80' is not a usable Redis URL") == 1
    assert "events go to the default redis://127.0.0.1:6379/0 instead" in err


BAD_URLS = {
    "redis://:6379/0": "no host name",  # redis-py would quietly use localhost
    "redis://": "no host name",
    "redis://cache.internal:6379/abc": "database 'abc' is not a number",  # redis-py: database 0
    "redis://cache.internal:99999/0": "Port out of range",
    "redis://cache.internal:6379/0?db=x": "Invalid value for 'db'",
    "redis://cache.internal/-1": "database '-1' is not a number",
    "unix://": "no socket path",
    "localhost:6379": "expected redis://host",
    "": "expected redis://host",  # set but empty: a deployment template with a hole in it
}


@pytest.mark.parametrize(("url", "problem"), BAD_URLS.items(), ids=list(BAD_URLS))
def test_a_malformed_redis_url_names_the_variable_and_the_fallback(
    url: str, problem: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_guard, "_warned", set())
    monkeypatch.setenv("AGENTWATCH_REDIS_URL", url)
    settings = resolve()
    resolve()  # once per process, not once per producer

    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    (message,) = [rec.getMessage() for rec in caplog.records if rec.name == "agentwatch.producer"]
    assert message.startswith(f"agentwatch: AGENTWATCH_REDIS_URL={url!r} is not a usable Redis URL")
    assert problem in message
    assert message.endswith("events go to the default redis://127.0.0.1:6379/0 instead")


def test_good_redis_urls_are_taken_as_given() -> None:
    for url in ("redis://cache.internal:6380/2", "rediss://u:p@cache.internal", "unix:///run/redis.sock?db=1",
                "redis://[::1]:6379", "redis://cache.internal/"):  # fmt: skip
        assert resolve(redis_url=url).redis_url == url


@pytest.mark.parametrize("prefix", ["", "my prefix", "aw:prod", "x" * 33, "é"])
def test_a_prefix_no_pipeline_can_use_names_the_variable_and_the_fallback(
    prefix: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_guard, "_warned", set())
    monkeypatch.setenv("AGENTWATCH_PREFIX", prefix)

    assert resolve().prefix == "aw"
    (message,) = [rec.getMessage() for rec in caplog.records if rec.name == "agentwatch.producer"]
    assert message.startswith(f"agentwatch: AGENTWATCH_PREFIX={prefix!r} is not a key prefix")
    assert message.endswith("events go to the default prefix 'aw' instead")


@pytest.mark.parametrize(
    ("given", "sent"),
    [("../evil", "__/evil"), ("-oProxyCommand=x", "_oProxyCommand_x"), ("team/./bot", "team/_/bot"),
     ("ok/..", "ok/__"), ("fine-name", "fine-name")],
)  # fmt: skip
def test_agent_names_that_could_climb_a_path_or_pass_as_an_option_are_rewritten(
    given: str, sent: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_guard, "_warned", set())
    name = resolve(agent=given).agent
    assert name == sent
    assert codec.name_problem(name) is None
    warned = [rec.getMessage() for rec in caplog.records if rec.name == "agentwatch.producer"]
    assert warned == ([] if given == sent else [f"agentwatch: agent: agent name {codec.name_problem(given)}; "
                                                f"reporting as {sent!r}"])  # fmt: skip


def test_an_explicit_argument_is_named_as_such(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_guard, "_warned", set())
    assert resolve(prefix="a b").prefix == "aw"
    assert any(rec.getMessage().startswith("agentwatch: prefix='a b'") for rec in caplog.records)


def test_maxlen_and_the_caps_on_periods(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_guard, "_warned", set())
    monkeypatch.delenv("AGENTWATCH_MAXLEN", raising=False)
    assert resolve().maxlen == 1_000_000
    monkeypatch.setenv("AGENTWATCH_MAXLEN", "250000")
    assert resolve().maxlen == 250_000
    assert resolve(maxlen=5000).maxlen == 5000  # an explicit argument wins
    assert resolve(interval=31_536_000).interval == 31_536_000  # 365 days: the protocol's cap
    assert resolve(interval=31_536_001).interval is None  # beyond it: rejected like any bad value
    assert resolve(pulse_interval=1e308).pulse_interval == 5.0
    assert sum("interval=31536001 is not a number from 0.01 to 31536000" in rec.getMessage()
               for rec in caplog.records) == 1  # fmt: skip


def test_maxlen_caps_the_stream(redis_url: str, prefix: str, r: redis.Redis) -> None:
    code = "from producers import heartbeat\nfor n in range(3000):\n    heartbeat(tokens=n)\n"
    exit_code, _, err = run(code, agent_env(redis_url, prefix, AGENTWATCH_MAXLEN=500))

    assert exit_code == 0
    assert_no_internal_errors(err)
    stream = f"{prefix}:events"
    assert r.xinfo_stream(stream)["entries-added"] == 3002  # all written (start, beats, exit)...
    assert 500 <= r.xlen(stream) < 1000  # ...and trimmed to about MAXLEN ~ 500 (whole nodes)


def test_shards_route_the_agent_to_its_crc32_shard(redis_url: str, prefix: str, r: redis.Redis) -> None:
    env = agent_env(redis_url, prefix, "sharded-bot", AGENTWATCH_SHARDS=4, AW_BEATS=2)
    exit_code, _, _ = run("scripted.py", env, "exit")

    shard = zlib.crc32(b"sharded-bot") % 4
    assert exit_code == 0
    assert kinds(read_events(r, f"{prefix}:events:{shard}")) == ["start", "beat", "beat", "exit"]
    assert r.exists(f"{prefix}:events") == 0
