"""Reports: scheduling (pure), rollup snapshots and the scheduled report through real webhooks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
from agents_detect.kit import Agent, pipeline_for, worker_for

from agentwatch import config, rollups
from agentwatch.errors import ConfigError
from agentwatch.keys import Keys
from agentwatch.redisconn import server_time_ms
from agentwatch.report import _union_ms, due_slot
from agentwatch.rollups import Snapshotter, Totals, totals_at

from helpers import running, wait_for
from notify_kit import notifier_running, pipeline_with, receiver


def report_section(**values: Any) -> config.ReportSection:
    return config.ReportSection.model_validate(values)


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


def test_every_slots_are_multiples_of_the_period() -> None:
    cfg = report_section(every="1h")
    assert due_slot(ms("2026-11-24T10:59:59"), cfg) == f"every:{ms('2026-11-24T10:00:00')}"
    assert due_slot(ms("2026-11-24T11:00:00"), cfg) == f"every:{ms('2026-11-24T11:00:00')}"
    assert due_slot(ms("2026-11-24T11:00:00"), report_section()) is None  # no schedule


def test_at_slots_are_local_days_due_from_that_time() -> None:
    cfg = report_section(at="09:00", timezone="Europe/Berlin")  # UTC+1 in November
    assert due_slot(ms("2026-11-24T07:59:00"), cfg) == "at:2026-11-23"  # 08:59 in Berlin
    assert due_slot(ms("2026-11-24T08:00:00"), cfg) == "at:2026-11-24"  # 09:00 in Berlin


def test_bad_report_settings_name_the_key(tmp_path: Any) -> None:
    path = tmp_path / "pipeline.toml"
    path.write_text('[report]\nevery = "1d"\nat = "9:00"\ntimezone = "Mars/Olympus"\n')
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    text = "\n".join(caught.value.problems)
    assert "[report] at: String should match pattern" in text
    assert "[report] timezone: unknown time zone 'Mars/Olympus'" in text


def test_a_notifier_that_cannot_carry_reports_refuses_them(tmp_path: Any) -> None:
    path = tmp_path / "pipeline.toml"
    path.write_text('[[notifiers]]\ntype = "pagerduty"\nrouting_key = "' + "a" * 32 + '"\nreports = true\n')
    with pytest.raises(ConfigError, match="a pagerduty notifier cannot deliver reports"):
        config.load(path)


def test_union_of_down_intervals_counts_overlaps_once() -> None:
    assert _union_ms([(0, 10), (5, 15), (20, 30)], 0, 100) == 25
    assert _union_ms([(0, 10), (5, 15)], 8, 12) == 4
    assert _union_ms([], 0, 100) == 0


@pytest.fixture
def fleet(redis_url: str, prefix: str, r: redis.Redis) -> Iterator[Keys]:
    """Two agents' events applied by a real detector worker."""
    keys = Keys(prefix)
    worker = worker_for(pipeline_for(prefix, redis_url), redis_url)
    with running(worker):
        for name, tokens in (("alpha", 100), ("beta", 7)):
            agent = Agent(r, keys, name)
            agent.start(interval=1.0, host="h1", pid=42)
            for _ in range(5):
                agent.beat(tokens=tokens, cost=0.5)
        wait_for(lambda: all(g["lag"] == 0 and g["pending"] == 0 for g in r.xinfo_groups(keys.events())))
    yield keys
    worker.client.close()


def test_snapshots_copy_every_agents_totals_in_slices(fleet: Keys, r: redis.Redis) -> None:
    # The worker already snapshotted the current hour as it began (before any event: zeros);
    # take the next hour's, as the first tick after the boundary would.
    snap = Snapshotter(r, fleet, bucket_s=3600, retention_s=86400, owner="test")
    now = server_time_ms(r)
    current = now // 3_600_000 * 3_600_000
    following = current + 3_600_000
    assert snap.advance(0, following, now) is True  # two agents: one slice
    totals, used = totals_at(r, fleet, following + 1, ["alpha", "beta", "ghost"])
    assert used == following
    assert totals == {"alpha": Totals(5, 500, 2.5), "beta": Totals(5, 35, 2.5)}
    assert totals_at(r, fleet, now, ["alpha"]) == ({}, current)  # the hour began before them
    assert 0 < r.pttl(fleet.snapshot(0, following)) <= 86_400_000
    assert totals_at(r, fleet, current - 1, ["alpha"]) == ({}, None)  # nothing that old


def test_the_scheduled_report_reaches_the_notifiers_that_opt_in_once_per_slot(
    fleet: Keys, redis_url: str, prefix: str, r: redis.Redis
) -> None:
    with receiver() as as_json, receiver() as as_slack, receiver() as not_opted:
        pipeline = pipeline_with(prefix, redis_url, [
            {"type": "webhook", "name": "json", "url": as_json.url, "reports": True},
            {"type": "webhook", "name": "slack", "url": as_slack.url, "format": "slack", "reports": True},
            {"type": "webhook", "name": "quiet", "url": not_opted.url},
        ])  # fmt: skip
        settings = pipeline.settings.model_copy(update={"report": report_section(every="2s", period="1h")})
        pipeline = pipeline.__class__(settings=settings, source="test", notifiers=pipeline.notifiers)
        with ExitStack() as stack:
            for _ in range(2):  # two notifier workers: still one report per slot
                stack.enter_context(notifier_running(pipeline, redis_url))
            requests = as_json.wait_requests(2, timeout=15)
            slack = as_slack.wait_requests(2, timeout=15)
    ids = [request.headers["x-agentwatch-delivery"] for request in requests]
    assert len(set(ids)) == len(ids) and all(i.startswith("report-every:") for i in ids)
    slots = {int(i.rsplit(":", 1)[1]) for i in ids}
    assert all(slot % 2000 == 0 for slot in slots)
    report = requests[0].json()["report"]
    assert {row["agent"]: (row["beats"], row["tokens"]) for row in report["agents"]} == {
        "alpha": (5, 500), "beta": (5, 35),
    }  # fmt: skip
    assert report["fleet"]["cost"] == 5.0 and report["fleet"]["uptime_pct"] == 100.0
    assert slack[0].json()["text"].startswith("agentwatch report ")
    assert "- alpha: uptime 100.00%, 5 beats, 500 tokens, $2.50" in slack[0].json()["text"]
    assert not_opted.requests == []
    first_slot = r.hgetall(fleet.reports_sent)
    assert any(value.startswith(b"skipped:") for value in first_slot.values())  # the start-up slot


def test_a_large_fleet_is_snapshotted_a_slice_per_tick(
    fleet: Keys, r: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rollups, "_SLICE", 1)  # HSCAN COUNT is a hint: one or a few per call
    snap = Snapshotter(r, fleet, bucket_s=3600, retention_s=86400, owner="test")
    now = server_time_ms(r)
    following = now // 3_600_000 * 3_600_000 + 3_600_000
    calls = 1
    while not snap.advance(0, following, now):
        calls += 1
        assert r.zscore(fleet.snapshots(0), following) is None  # not complete until the last slice
        assert calls < 50
    assert calls > 1  # records are larger than a listpack value: a real hash table, sliced
    totals, _ = totals_at(r, fleet, following, ["alpha", "beta"])
    assert set(totals) == {"alpha", "beta"}
