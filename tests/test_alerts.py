"""Incidents against a real Redis: one firing, one resolved, however many workers race or crash."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from agentwatch.alerts import Alert, Incidents, decode_alert, iso_ms
from agentwatch.errors import InvalidEntry
from agentwatch.keys import Keys
from agentwatch.redisconn import server_time_ms

T0 = 1_795_000_000_000


def alerts_on_stream(r: redis.Redis, keys: Keys) -> list[Alert]:
    return [decode_alert(fields[b"d"]) for _, fields in r.xrange(keys.alerts)]


@pytest.fixture
def incidents(r: redis.Redis, keys: Keys) -> Iterator[Incidents]:
    yield Incidents(r, keys)


def test_one_firing_then_one_resolved_with_the_same_dedup_key(
    incidents: Incidents, r: redis.Redis, keys: Keys
) -> None:
    fired = incidents.fire(
        "my-bot", "silence", severity="critical", summary="gone", at_ms=T0, details={"a": 1}
    )
    assert fired is not None
    assert incidents.fire("my-bot", "silence", severity="critical", summary="gone", at_ms=T0 + 5) is None
    assert incidents.open("my-bot", "silence") == {
        "alert": fired.id, "since_ms": T0, "severity": "critical", "summary": "gone",
    }  # fmt: skip
    resolved = incidents.resolve("my-bot", "silence", summary="back", at_ms=T0 + 63_120)
    assert resolved is not None
    assert incidents.resolve("my-bot", "silence", summary="back", at_ms=T0 + 70_000) is None
    assert incidents.open("my-bot", "silence") is None

    first, second = alerts_on_stream(r, keys)
    assert first == fired and second == resolved
    assert (first.status, second.status) == ("firing", "resolved")
    assert first.dedup_key == second.dedup_key == "my-bot/silence"
    assert second.severity == "critical" and second.details == {"duration_s": 63.12}
    assert first.at == iso_ms(T0) == "2026-11-18T11:06:40.000Z"
    assert r.hlen(keys.outbox(0)) == 0


def test_alert_json_has_exactly_the_spec_fields(incidents: Incidents) -> None:
    fired = incidents.fire("my-bot", "stall", severity="error", summary="stuck", at_ms=T0 + 120)
    assert fired is not None
    data = json.loads(fired.to_json())
    assert list(data) == [
        "id",
        "agent",
        "detector",
        "status",
        "severity",
        "summary",
        "dedup_key",
        "at",
        "details",
    ]
    assert data["at"] == "2026-11-18T11:06:40.120Z"


def test_racing_workers_fire_exactly_once(redis_url: str, keys: Keys, r: redis.Redis) -> None:
    barrier = threading.Barrier(8)
    results: list[Any] = []

    def race() -> None:
        client = redis.Redis.from_url(redis_url)
        mine = Incidents(client, keys)
        barrier.wait()
        results.append(mine.fire("bot", "silence", severity="critical", summary="x", at_ms=T0))
        barrier.wait()
        results.append(mine.resolve("bot", "silence", summary="y", at_ms=T0 + 1))
        client.close()

    threads = [threading.Thread(target=race) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len([a for a in results if a is not None]) == 2
    assert [a.status for a in alerts_on_stream(r, keys)] == ["firing", "resolved"]


def test_an_alert_decided_by_a_worker_that_died_is_published_by_the_sweep(
    incidents: Incidents, r: redis.Redis, keys: Keys
) -> None:
    now = server_time_ms(r)
    # Simulate a worker that ran the FIRE script and died before publishing.
    orphan = Alert(
        id="0001", agent="bot", detector="exit", status="firing", severity="critical",
        summary="crashed", dedup_key="bot/exit", at=iso_ms(now),
    )  # fmt: skip
    r.hset(
        keys.incidents(0), "bot/exit", json.dumps({"alert": "0001", "since_ms": now, "severity": "critical"})
    )
    r.hset(keys.outbox(0), "0001", orphan.to_json())
    assert incidents.sweep(now) == 0  # too fresh: its own worker may still publish it
    assert incidents.sweep(now + 5_000) == 1
    assert alerts_on_stream(r, keys) == [orphan]
    assert r.hlen(keys.outbox(0)) == 0
    assert incidents.fire("bot", "exit", severity="critical", summary="again", at_ms=now) is None


def test_resolving_before_the_firing_was_published_keeps_their_order(
    incidents: Incidents, r: redis.Redis, keys: Keys
) -> None:
    firing = Alert(
        id="0002", agent="bot", detector="stall", status="firing", severity="error",
        summary="stuck", dedup_key="bot/stall", at=iso_ms(T0),
    )  # fmt: skip
    incident = json.dumps({"alert": "0002", "since_ms": T0, "severity": "error", "summary": "stuck"})
    r.hset(keys.incidents(0), "bot/stall", incident)
    r.hset(keys.outbox(0), "0002", firing.to_json())  # its worker died before publishing
    resolved = incidents.resolve("bot", "stall", summary="moving again", at_ms=T0 + 1000)
    assert [a.status for a in alerts_on_stream(r, keys)] == ["firing", "resolved"]
    assert resolved is not None and resolved.details["duration_s"] == 1.0
    assert r.hlen(keys.outbox(0)) == 0


def test_sharded_incidents_live_on_their_agents_shard(r: redis.Redis, prefix: str) -> None:
    keys = Keys(prefix, shards=4)
    incidents = Incidents(r, keys)
    agents = [f"agent-{i}" for i in range(12)]
    for agent in agents:
        incidents.fire(agent, "silence", severity="critical", summary="x", at_ms=T0)
    assert set(incidents.all_open()) == {f"{a}/silence" for a in agents}
    assert sum(r.hlen(keys.incidents(shard)) for shard in range(4)) == 12
    assert len([s for s in range(4) if r.hlen(keys.incidents(s))]) > 1  # spread over shards


def test_unknown_severity_is_a_programming_error(incidents: Incidents) -> None:
    with pytest.raises(ValueError, match="severity must be one of"):
        incidents.fire("bot", "x", severity="apocalyptic", summary="x", at_ms=T0)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "alert is not JSON"),
        (b"[1]", "not a JSON object but list"),
        (b'{"id": "1"}', "alert lacks agent, detector"),
        (json.dumps({"id": "1", "agent": "a", "detector": "d", "status": "maybe", "severity": "info",
                     "summary": "s", "dedup_key": "a/d", "at": "x", "details": {}}).encode(),
         "status must be firing or resolved"),
        (json.dumps({"id": 1, "agent": "a", "detector": "d", "status": "firing", "severity": "info",
                     "summary": "s", "dedup_key": "a/d", "at": "x", "details": {}}).encode(),
         "must be strings"),
    ],
)  # fmt: skip
def test_bad_alert_entries_are_refused(raw: bytes, reason: str) -> None:
    with pytest.raises(InvalidEntry, match=reason):
        decode_alert(raw)
