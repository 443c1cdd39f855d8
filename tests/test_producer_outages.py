"""Redis down, killed, hung, full or refusing us: the agent never notices, and the drops are told.

Every scenario runs a real agent process against a real (or deliberately broken) server.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from agents.testkit import (
    Echo,
    agent_env,
    assert_no_internal_errors,
    finish,
    hung_server,
    of_kind,
    read_events,
    run,
    spawn,
    wait_for,
)

from agentwatch.embedded import EmbeddedRedis

from conftest import free_port

pytestmark = pytest.mark.slow


def total_dropped(events: list[dict[str, Any]]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for event in events:
        for reason, number in event.get("dropped", {}).items():
            totals[reason] = totals.get(reason, 0) + number
    return totals


def test_redis_down_from_the_start_costs_the_agent_nothing(prefix: str, free_port_url: str) -> None:
    started = time.monotonic()
    code, _, err = run("scripted.py", agent_env(free_port_url, prefix, AW_BEATS=50), "exit")

    assert code == 0
    assert time.monotonic() - started < 5  # 50 x 10 ms of work, plus start-up; no waiting on Redis
    assert_no_internal_errors(err)
    assert "Traceback" not in err
    assert err.count("cannot deliver events to Redis") == 1  # one warning, not one per beat


def test_redis_killed_mid_run_then_back_beats_flow_again_with_drop_count(
    prefix: str, spawn_redis: Callable[..., EmbeddedRedis]
) -> None:
    server = spawn_redis()
    env = agent_env(server.url, prefix, AW_ECHO=1, AW_QUEUE_SIZE=20)
    echo = Echo(spawn("scripted.py", env, "forever"))
    client = redis.Redis.from_url(server.url)
    try:
        stream = f"{prefix}:events"
        wait_for(lambda: len(read_events(client, stream)) >= 5, what="beats before the outage")
        last_seq = read_events(client, stream)[-1]["seq"]

        server.kill()
        echo.wait_beats(60)  # the agent keeps working through the outage: 3x the queue
        server.start()  # same URL, empty server (no persistence)

        def recovered() -> list[dict[str, Any]]:
            events = read_events(client, stream)
            with_drops = [e for e in events if "dropped" in e]
            return events if with_drops and events[-1] is not with_drops[0] else []

        events = wait_for(recovered, what="beats with a drop count after the restart")
    finally:
        client.close()
        echo.process.send_signal(signal.SIGTERM)
        code, err = echo.finish()

    dropped = total_dropped(events)
    assert set(dropped) == {"redis_down"}  # named after the outage, not "queue full"
    assert dropped["redis_down"] >= 60 - 20 - 5  # beyond what the queue could hold
    beats = of_kind(events, "beat")
    assert beats[0]["seq"] > last_seq  # the same run carries on
    assert len(beats) >= 2
    assert code == -signal.SIGTERM
    assert_no_internal_errors(err)


def test_hung_redis_agent_keeps_its_pace_memory_and_exit_time(prefix: str) -> None:
    with hung_server() as hung:
        env = agent_env(hung.url, prefix, AW_CALLS=200_000, AW_RATE_S=0.5)
        process = spawn("timed.py", env)
        code, out, err = finish(process, timeout=30)
        exited = time.monotonic()
        assert hung.accepted, "the producer never even connected"

    lines = [json.loads(line) for line in out.splitlines()]
    stats, end = lines[0], lines[1]["end"]
    assert code == 0
    assert_no_internal_errors(err)
    assert stats["median_ns"] < 10_000  # microseconds, not a socket timeout
    assert stats["max_ns"] < 100_000_000  # a blocking client would take >= 1 s here
    assert stats["rate_with"] >= 0.8 * stats["rate_without"]
    assert stats["max_queue"] <= stats["queue_size"]
    assert stats["rss_growth"] < 30 * 2**20
    assert exited - end < 2.5  # the exit flush gives up after 2 s


def refused_then_fixed(
    prefix: str, url: str, client: redis.Redis, fix: Callable[[], None], **env_extra: Any
) -> tuple[list[dict[str, Any]], int, int, str]:
    """Run an agent while Redis refuses its writes, fix Redis, let the agent exit (SIGTERM).

    Returns the events, the beats the agent made, its return code and its stderr.
    """
    env = agent_env(url, prefix, AW_ECHO=1, AGENTWATCH_PULSE_INTERVAL=600, **env_extra)
    echo = Echo(spawn("scripted.py", env, "forever"))
    stream = f"{prefix}:events"
    try:
        echo.wait_beats(30)
        assert client.xlen(stream) == 0
        fix()
        wait_for(lambda: client.xlen(stream) > 0, what="events once Redis takes them")
    finally:
        echo.process.send_signal(signal.SIGTERM)
        code, err = echo.finish()
    return read_events(client, stream), echo.beats, code, err


def test_redis_out_of_memory_drops_are_counted_and_reported_when_it_recovers(
    prefix: str, spawn_redis: Callable[..., EmbeddedRedis]
) -> None:
    server = spawn_redis()
    with redis.Redis.from_url(server.url) as client:
        client.config_set("maxmemory", 1)  # every write is refused with OOM
        events, beats, code, err = refused_then_fixed(
            prefix, server.url, client, lambda: client.config_set("maxmemory", 0)
        )

    assert events[0]["kind"] == "start" and events[0]["seq"] == 0  # held back, sent again
    assert events[-1]["kind"] == "exit"
    dropped = total_dropped(events)
    assert set(dropped) == {"redis_oom"}
    # Nothing vanishes silently: every beat the agent made was delivered or counted as dropped.
    assert len(of_kind(events, "beat")) + dropped["redis_oom"] == beats
    assert dropped["redis_oom"] >= 15
    assert code == -signal.SIGTERM
    assert_no_internal_errors(err)
    assert "maxmemory" in err  # told once why events are refused


def test_auth_failure_never_raises_and_drops_are_reported_once_auth_works(
    prefix: str, spawn_redis: Callable[..., EmbeddedRedis]
) -> None:
    server = spawn_redis()
    with redis.Redis.from_url(server.url) as setup:
        setup.config_set("requirepass", "s3cret")
    bad_url = server.url.replace("unix://", "unix://:wrong-pass@", 1)
    with redis.Redis.from_url(server.url, password="s3cret") as client:
        # A small queue, so some beats overflow while Redis refuses us (events that fit
        # simply wait and are delivered late).
        events, beats, code, err = refused_then_fixed(
            prefix, bad_url, client, lambda: client.config_set("requirepass", ""), AW_QUEUE_SIZE=10
        )

    assert events[0]["kind"] == "start" and events[-1]["kind"] == "exit"
    dropped = total_dropped(events)
    assert set(dropped) == {"redis_auth"}
    assert len(of_kind(events, "beat")) + dropped["redis_auth"] == beats
    assert code == -signal.SIGTERM
    assert_no_internal_errors(err)
    assert "wrong-pass" not in err  # the warning names the server, never the secret
    assert "***" in err


@pytest.fixture
def free_port_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"
