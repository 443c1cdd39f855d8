"""Reports: scheduling (pure), rollup snapshots and the scheduled report through real webhooks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis
from agents_detect.kit import Agent, Feed, pipeline_for, worker_for

from agentwatch import config, loading, rollups
from agentwatch.alerts import Incidents, iso_ms
from agentwatch.config import Pipeline
from agentwatch.errors import ConfigError
from agentwatch.facts import FactsRecorder
from agentwatch.keys import Keys
from agentwatch.redisconn import server_time_ms
from agentwatch.report import _union_ms, build_report, due_slot, fleet_summary, render_text
from agentwatch.rollups import Base, Snapshotter, Totals, base_totals
from notifiers.reports import KEEP_SLOTS

from helpers import caught_up, running, wait_for
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
        loading.load(path)
    text = "\n".join(caught.value.problems)
    assert "[report] at: String should match pattern" in text
    assert "[report] timezone: unknown time zone 'Mars/Olympus'" in text


def test_a_notifier_that_cannot_carry_reports_refuses_them(tmp_path: Any) -> None:
    path = tmp_path / "pipeline.toml"
    path.write_text('[[notifiers]]\ntype = "pagerduty"\nrouting_key = "' + "a" * 32 + '"\nreports = true\n')
    with pytest.raises(ConfigError, match="a pagerduty notifier cannot deliver reports"):
        loading.load(path)


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
        wait_for(lambda: caught_up(r, keys), what="the detector group to apply every event")
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
    base = base_totals(r, fleet, following + 1, ["alpha", "beta", "ghost"])
    assert base == Base({"alpha": Totals(5, 500, 2.5), "beta": Totals(5, 35, 2.5)}, following, False)
    assert base_totals(r, fleet, now, ["alpha"]) == Base({}, current, False)  # the hour began before them
    assert 0 < r.pttl(fleet.snapshot(0, following)) <= 86_400_000
    # nothing that old: the earliest snapshot after it, flagged partial
    assert base_totals(r, fleet, current - 1, ["alpha"]) == Base({}, current, True)


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
    redis_url: str, prefix: str, r: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Twenty agents, not the two of `fleet`: HSCAN's COUNT is a hint, and which buckets two
    # entries land in depends on the server's random hash seed, so two may come back in one call.
    keys = Keys(prefix)
    names = [f"agent-{n:02}" for n in range(20)]
    worker = worker_for(pipeline_for(prefix, redis_url), redis_url)
    with running(worker):
        for name in names:
            agent = Agent(r, keys, name)
            agent.start(interval=1.0, host="h1", pid=42)
            agent.beat(tokens=10, cost=0.1)
        wait_for(lambda: caught_up(r, keys), what="the detector group to apply every event")
    worker.client.close()
    if r.object("encoding", keys.states(0)) != b"hashtable":  # a server with raised listpack limits
        pytest.skip("this server keeps the states hash as a listpack, which HSCAN returns whole")
    monkeypatch.setattr(rollups, "_SLICE", 1)  # HSCAN COUNT is a hint: one or a few per call
    snap = Snapshotter(r, keys, bucket_s=3600, retention_s=86400, owner="test")
    now = server_time_ms(r)
    following = now // 3_600_000 * 3_600_000 + 3_600_000
    calls = 1
    while not snap.advance(0, following, now):
        calls += 1
        assert r.zscore(keys.snapshots(0), following) is None  # not complete until the last slice
        assert calls < 100
    assert calls > 1  # records are larger than a listpack value: a real hash table, sliced
    assert set(base_totals(r, keys, following, names).totals) == set(names)


# -- spans, retention, resets and the alert history (the engine driven at chosen times) ----------


@pytest.fixture
def feed(redis_url: str, prefix: str, r: redis.Redis) -> Feed:
    """An engine on the test's prefix whose clock starts ten minutes ago; no worker runs, so
    no snapshot is taken unless the test takes it."""
    worker = worker_for(pipeline_for(prefix, redis_url), redis_url)
    feed = Feed(worker, t0_ms=server_time_ms(r) - 600_000)
    feed.pipeline = pipeline_for(prefix, redis_url)  # type: ignore[attr-defined]
    return feed


def beats(feed: Feed, agent: str, n: int, **fields: Any) -> None:
    feed.apply([feed.event(agent, "beat", **fields) for _ in range(n)])


def test_snapshots_past_the_retention_are_trimmed(feed: Feed, r: redis.Redis, keys: Keys) -> None:
    snap = Snapshotter(r, keys, bucket_s=60, retention_s=180, owner="test")
    b0 = feed.now // 60_000 * 60_000
    assert snap.advance(0, b0, b0 + 1)
    feed.apply([feed.event("bot", "start")])
    beats(feed, "bot", 3)
    later = b0 + 240_000  # four buckets on: b0 is older than the retention
    assert snap.advance(0, later, later + 1)
    assert r.zrange(keys.snapshots(0), 0, -1) == [str(later).encode()]
    assert 0 < r.pttl(keys.snapshot(0, later)) <= 180_000


def test_a_report_longer_than_the_rollups_is_clamped_and_says_so(
    feed: Feed, r: redis.Redis, keys: Keys
) -> None:
    snap = Snapshotter(r, keys, bucket_s=60, retention_s=180, owner="test")
    feed.apply([feed.event("bot", "start")])
    beats(feed, "bot", 10, tokens=10)
    first = (feed.now + 120_000) // 60_000 * 60_000  # the oldest snapshot the retention kept
    assert snap.advance(0, first, first + 1)
    feed.now = first + 1000
    beats(feed, "bot", 5, tokens=10)
    now = server_time_ms(r)

    report = build_report(r, feed.pipeline, since_s=660, now_ms=now)  # type: ignore[attr-defined]
    (row,) = report["agents"]
    assert (row["beats"], row["tokens"]) == (5, 50)  # not the 15 since the beginning
    assert report["partial"] is True
    assert (report["from"], report["requested_from"]) == (iso_ms(first), iso_ms(now - 660_000))
    assert report["period_s"] == round((now - first) / 1000, 3)
    assert f"note: covers only from {iso_ms(first)}, not from {iso_ms(now - 660_000)}" in render_text(report)

    # Asked for less than the rollups hold: the span starts at the snapshot before the start.
    report = build_report(r, feed.pipeline, since_s=(now - first) / 1000 - 5, now_ms=now)  # type: ignore[attr-defined]
    assert (report["partial"], report["from"], report["agents"][0]["beats"]) == (False, iso_ms(first), 5)
    assert "note:" not in render_text(report)


def test_counts_never_go_negative_and_forgotten_agents_are_left_out(
    feed: Feed, r: redis.Redis, keys: Keys
) -> None:
    snap = Snapshotter(r, keys, bucket_s=60, retention_s=3600, owner="test")
    starts = [feed.event("bot", "start"), feed.event("ghost", "start", pid=7, host="box")]
    feed.apply(starts)
    FactsRecorder(r, keys).on_batch(starts)  # its start facts outlive it (they did before forget did)
    beats(feed, "bot", 10, tokens=100, cost=0.5)
    beats(feed, "ghost", 4)
    bucket = (feed.now + 60_000) // 60_000 * 60_000
    assert snap.advance(0, bucket, bucket + 1)
    # Both are forgotten (their records deleted, as [detectors.silence] forget does); bot comes
    # back, and its totals count again from zero.
    r.hdel(keys.states(0), "bot", "ghost")
    feed.now = bucket + 1000
    feed.apply([feed.event("bot", "start", run="run-2")])
    beats(feed, "bot", 3, tokens=100, cost=0.5, run="run-2")

    report = build_report(r, feed.pipeline, since_s=30, now_ms=bucket + 40_000)  # type: ignore[attr-defined]
    assert [(row["agent"], row["beats"], row["tokens"], row["cost"]) for row in report["agents"]] == [
        ("bot", 3, 300, 1.5)
    ]


def test_from_period_and_uptime_are_one_span(feed: Feed, r: redis.Redis, keys: Keys) -> None:
    snap = Snapshotter(r, keys, bucket_s=60, retention_s=3600, owner="test")
    feed.apply([feed.event("bot", "start")])
    beats(feed, "bot", 2)
    bucket = (feed.now + 60_000) // 60_000 * 60_000
    assert snap.advance(0, bucket, bucket + 1)
    incidents = Incidents(r, keys)
    began, fired_at, back = bucket + 29_500, bucket + 30_000, bucket + 60_000
    incidents.fire("bot", "silence", severity="critical", summary="bot: gone", at_ms=fired_at,
                   details={"last_seen_ms": began})  # fmt: skip
    incidents.resolve("bot", "silence", summary="bot: back", at_ms=back)
    now = server_time_ms(r)  # after the alerts went out: the stream's ids are their publish times

    asked_s = (now - bucket) / 1000 - 30
    report = build_report(r, feed.pipeline, since_s=asked_s, now_ms=now)  # type: ignore[attr-defined]
    assert report["from"] == iso_ms(bucket) and report["to"] == iso_ms(now)
    assert report["period_s"] == round((now - bucket) / 1000, 3)  # the span counted, not the one asked
    assert report["requested_from"] == iso_ms(now - int(asked_s * 1000))
    (row,) = report["agents"]
    assert row["down_s"] == (back - began) / 1000
    assert row["uptime_pct"] == round(100 * (1 - (back - began) / (now - bucket)), 3)
    assert report["history_complete"] is True and report["history_from"] is None


def test_a_trimmed_alert_history_is_flagged_and_open_incidents_still_count(
    feed: Feed, r: redis.Redis, keys: Keys
) -> None:
    t0 = feed.now
    feed.apply([feed.event(name, "start") for name in ("early", "still", "later")])
    incidents = Incidents(r, keys)
    incidents.fire("early", "silence", severity="critical", summary="early: gone", at_ms=t0 + 10_000)
    incidents.resolve("early", "silence", summary="early: back", at_ms=t0 + 20_000)
    incidents.fire("still", "stall", severity="error", summary="still: stuck", at_ms=t0 + 60_000)
    kept = incidents.fire("later", "tokens", severity="error", summary="later: tokens", at_ms=t0 + 90_000)
    assert kept is not None
    ((last_id, _),) = r.xrevrange(keys.alerts, count=1)
    r.xtrim(keys.alerts, minid=last_id, approximate=False)  # a capped stream dropped the rest
    now = server_time_ms(r)

    report = build_report(r, feed.pipeline, since_s=300, now_ms=now)  # type: ignore[attr-defined]
    assert report["history_complete"] is False
    assert report["history_from"] == iso_ms(int(last_id.split(b"-")[0]))
    rows = {row["agent"]: row for row in report["agents"]}
    # The stall is still open: the incident hash keeps it, so its downtime counts anyway.
    assert rows["still"]["down_s"] == (now - (t0 + 60_000)) / 1000
    assert [(i["detector"], i["open"]) for i in rows["still"]["incidents"]] == [("stall", True)]
    assert "note: the alert history reaches back only to" in render_text(report)


def test_summaries_round_and_an_empty_fleet_reads_well(r: redis.Redis, redis_url: str, prefix: str) -> None:
    report = build_report(r, pipeline_for(prefix, redis_url), since_s=3600)
    assert fleet_summary(report) == "no agents were seen in this period"
    assert "fleet: no agents were seen in this period" in render_text(report)
    busy = {"fleet": {"agents": 3, "uptime_pct": 62.9351, "incidents": 1, "beats": 1234, "tokens": 5678,
                      "cost": 1.5}}  # fmt: skip
    assert fleet_summary(busy) == "3 agents, uptime 62.94%, 1 incident, 1,234 beats, 5,678 tokens, $1.50"


# -- scheduled reports end to end ---------------------------------------------------------------


def scheduled(pipeline: Pipeline, **report: Any) -> Pipeline:
    settings = pipeline.settings.model_copy(update={"report": report_section(**report)})
    return Pipeline(settings=settings, source="test", notifiers=pipeline.notifiers)


def test_a_daily_report_at_a_local_time_is_delivered_once_and_old_slots_are_forgotten(
    fleet: Keys, redis_url: str, prefix: str, r: redis.Redis
) -> None:
    # A deployment that has sent reports for weeks (so today's slot is not its first).
    r.hset(fleet.reports_sent, mapping={f"at:2026-01-{day:02d}": str(day) for day in range(1, 21)})
    with receiver() as hook:
        pipeline = scheduled(
            pipeline_with(prefix, redis_url, [{"type": "webhook", "url": hook.url, "reports": True}]),
            at="00:00", timezone="Asia/Kolkata", period="1h",
        )  # fmt: skip
        with notifier_running(pipeline, redis_url):
            (request,) = hook.wait_requests(1, timeout=10)
            today = datetime.now(tz=ZoneInfo("Asia/Kolkata")).date().isoformat()
            wait_for(lambda: r.hget(fleet.reports_sent, f"at:{today}") is not None, what="the slot recorded")
    assert request.headers["x-agentwatch-delivery"] == f"report-at:{today}"
    body = request.json()
    assert {row["agent"] for row in body["report"]["agents"]} == {"alpha", "beta"}
    assert body["text"].startswith("agentwatch report ")
    sent = r.hgetall(fleet.reports_sent)
    assert len(sent) == KEEP_SLOTS and f"at:{today}".encode() in sent
    assert b"at:2026-01-01" not in sent  # the oldest went first


@pytest.mark.apprise
def test_apprise_gets_the_report_as_text_with_a_rounded_summary_as_title(
    fleet: Keys, redis_url: str, prefix: str, r: redis.Redis
) -> None:
    r.hset(fleet.reports_sent, "at:2026-01-01", "1")
    with receiver() as hook:
        entry = {"type": "apprise", "urls": [hook.url.replace("http://", "json://")], "reports": True,
                 "backoff": "50ms", "timeout": "5s"}  # fmt: skip
        pipeline = scheduled(pipeline_with(prefix, redis_url, [entry]), at="00:00", period="1h")
        with notifier_running(pipeline, redis_url):
            (request,) = hook.wait_requests(1, timeout=10)
    body = request.json()
    assert body["title"] == (
        "agentwatch report, last 1h: 2 agents, uptime 100.00%, 0 incidents, 10 beats, 535 tokens, $5.00"
    )
    lines = body["message"].splitlines()
    assert lines[0].startswith("agentwatch report ")
    assert "fleet: 2 agents, uptime 100.00%, 0 incidents, 10 beats, 535 tokens, $5.00" in lines
    assert "- alpha: uptime 100.00%, 5 beats, 500 tokens, $2.50" in lines
    assert "- beta: uptime 100.00%, 5 beats, 35 tokens, $2.50" in lines
