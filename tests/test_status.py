"""``status`` states and figures, from records the real detector engine wrote (real Redis).

The engine is driven with hand-made batches at chosen Redis times (agents_detect.kit.Feed), so
every state is reached exactly, with no waiting: late (no beat, pulses only, and an extend()
that holds it off), stalled, down, exited, retired, muted, ok; and what status must leave out
(agents the detectors forgot). Plus the figures that go stale when an agent stops: tokens/min
and cost today (from local midnight in ``[report] timezone``), and the pipeline's own state
when no detector worker runs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
from agents_detect.kit import Feed, pipeline_for, worker_for

from agentwatch import config
from agentwatch.alerts import iso_ms
from agentwatch.cli.status import _board
from agentwatch.config import Pipeline
from agentwatch.facts import FactsRecorder
from agentwatch.fleet import fleet_status
from agentwatch.keys import Keys
from agentwatch.redisconn import server_time_ms
from agentwatch.rollups import Snapshotter, local_midnight_ms
from notifiers.routing import Mutes

SECOND = 1000
Message = tuple[bytes, dict[str, Any]]
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def states(document: dict[str, Any]) -> dict[str, str]:
    return {row["agent"]: row["state"] for row in document["agents"]}


def rows(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["agent"]: row for row in document["agents"]}


@pytest.fixture
def feed(redis_url: str, prefix: str, r: redis.Redis) -> Feed:
    """An engine on the test's prefix whose clock starts a minute ago (mutes use real time)."""
    pipeline = pipeline_for(prefix, redis_url, stall={"after": "1s"}, silence={"after": "2s"})
    worker = worker_for(pipeline, redis_url)
    feed = Feed(worker, t0_ms=server_time_ms(r) - 60 * SECOND)
    feed.pipeline = pipeline  # type: ignore[attr-defined]
    return feed


def beats(feed: Feed, agent: str, until_ms: int, every_ms: int = 100, **fields: Any) -> list[Message]:
    """Beats (with a pulse after each) from now until ``until_ms``, for :func:`play`."""
    batch = []
    while feed.now + every_ms <= until_ms:
        batch.append(feed.event(agent, "beat", at=feed.now + every_ms, **fields))
        batch.append(feed.event(agent, "pulse", at=feed.now + 1))
    return batch


def pulses(feed: Feed, agent: str, until_ms: int, every_ms: int = 100, **fields: Any) -> list[Message]:
    batch = []
    while feed.now + every_ms <= until_ms:
        batch.append(feed.event(agent, "pulse", at=feed.now + every_ms, **fields))
    return batch


def play(feed: Feed, *batches: list[Message], ticks: Sequence[int] = ()) -> None:
    """The events of several agents' ``batches`` as their shard's stream holds them: merged in
    time order (events of one millisecond get ids ``<ms>-0``, ``<ms>-1``...), applied with a
    timer check at each of ``ticks`` in between. The shard's owner applies its stream once, in
    order: an entry at or below the last one applied is a replay and is skipped, so each
    agent's events cannot be applied one agent after another."""
    events = sorted((m for batch in batches for m in batch), key=lambda m: int(m[0].split(b"-")[0]))
    ordered: list[Message] = []
    last_ms, n = -1, 0
    for entry_id, event in events:
        ms = int(entry_id.split(b"-")[0])
        n = n + 1 if ms == last_ms else 0
        last_ms = ms
        ordered.append((f"{ms}-{n}".encode(), event))
    if not feed.engine.shards:  # take the shard at the first event's time (not at feed.now)
        feed.tick(min([*ticks, *(int(m[0].split(b"-")[0]) for m in ordered[:1])], default=feed.now))
    for at in sorted(ticks):
        due = [m for m in ordered if int(m[0].split(b"-")[0]) <= at]
        if due:
            feed.apply(due)
            ordered = ordered[len(due) :]
        feed.tick(at)
    if ordered:
        feed.apply(ordered)


def test_late_is_judged_from_beats_and_starts_and_waits_for_an_extend(feed: Feed, r: redis.Redis) -> None:
    pipeline: Pipeline = feed.pipeline  # type: ignore[attr-defined]
    t0 = feed.now
    starts = [
        feed.event(name, "start", at=t0, interval=1.0) for name in ("steady", "lagging", "pulser", "extended")
    ]
    feed.now = t0
    steady = beats(feed, "steady", t0 + 10 * SECOND, every_ms=500)
    feed.now = t0
    lagging = [feed.event("lagging", "beat", at=t0 + 100)]
    lagging += pulses(feed, "lagging", t0 + 10 * SECOND)  # the process lives; its loop stopped beating
    feed.now = t0
    pulser = pulses(feed, "pulser", t0 + 10 * SECOND)  # has never beaten since it started
    feed.now = t0
    extended = [feed.event("extended", "beat", at=t0 + 300),
                feed.event("extended", "pulse", at=t0 + 400, extend=30.0)]  # fmt: skip
    extended += pulses(feed, "extended", t0 + 10 * SECOND)
    play(feed, starts, steady, lagging, pulser, extended)

    now = t0 + 10 * SECOND
    assert states(fleet_status(r, pipeline, now_ms=now)) == {
        "steady": "ok", "lagging": "late", "pulser": "late", "extended": "ok",
    }  # fmt: skip
    # Twice the interval after the extension ran out, it is late like any other.
    assert states(fleet_status(r, pipeline, now_ms=t0 + 30_400 + 1900))["extended"] == "ok"
    assert states(fleet_status(r, pipeline, now_ms=t0 + 30_400 + 2100))["extended"] == "late"


def test_stalled_down_exited_retired_and_muted(feed: Feed, r: redis.Redis, keys: Keys) -> None:
    pipeline: Pipeline = feed.pipeline  # type: ignore[attr-defined]
    t0 = feed.now
    starts = []
    for name in ("stuck", "gone", "crashed", "quitter", "muted-bot", "muted-gone"):
        starts += [feed.event(name, "start", at=t0, interval=0.1), feed.event(name, "beat", at=t0 + 10)]
    stuck = pulses(feed, "stuck", t0 + 3 * SECOND)  # pulses, no beats: stall after 1s
    ends = [feed.event("crashed", "exit", at=t0 + 20, reason="exception", code=1, error="ValueError: boom"),
            feed.event("quitter", "exit", at=t0 + 20, reason="shutdown", code=0)]  # fmt: skip
    feed.now = t0 + 10
    muted_bot = beats(feed, "muted-bot", t0 + 3 * SECOND)
    # the checks watch from t0 (they judge silence only from when they watch): silence for
    # "gone" and "muted-gone" (2s), stall for "stuck" (1s)
    play(feed, starts, stuck, ends, muted_bot, ticks=range(t0, t0 + 3 * SECOND + 1, 250))
    Mutes(r, keys).add("muted-*", 3600, reason="maintenance")

    document = fleet_status(r, pipeline, now_ms=t0 + 3 * SECOND)
    assert states(document) == {
        "stuck": "stalled", "gone": "down", "crashed": "exited", "quitter": "retired",
        "muted-bot": "muted", "muted-gone": "down",  # a muted agent that is down shows down
    }  # fmt: skip
    by_name = rows(document)
    assert [i["detector"] for i in by_name["stuck"]["incidents"]] == ["stall"]
    assert [i["detector"] for i in by_name["crashed"]["incidents"]] == ["exit"]
    assert "ValueError: boom" in by_name["crashed"]["incidents"][0]["summary"]
    assert by_name["muted-bot"]["muted"] is True and by_name["muted-gone"]["muted"] is True
    assert by_name["stuck"]["last_beat_age_s"] == pytest.approx(2.99)


def test_an_agent_the_detectors_forgot_is_not_shown(feed: Feed, r: redis.Redis, keys: Keys) -> None:
    pipeline: Pipeline = feed.pipeline  # type: ignore[attr-defined]
    t0 = feed.now
    start = {"v": 1, "agent": "ghost", "kind": "start", "ts": 0.0, "run": "r", "seq": 0, "pid": 7,
             "host": "box", "interval": 1.0}  # fmt: skip
    FactsRecorder(r, keys).on_batch([(f"{t0}-0".encode(), start)])  # facts, but no record (forgotten)
    feed.apply([feed.event("alive", "start", at=t0 + 1), feed.event("alive", "beat", at=t0 + 2)])
    document = fleet_status(r, pipeline, now_ms=t0 + 100)
    assert states(document) == {"alive": "ok"}


def test_tokens_per_min_is_right_from_the_first_seconds_and_decays_to_zero_after_death(
    feed: Feed, r: redis.Redis
) -> None:
    pipeline: Pipeline = feed.pipeline  # type: ignore[attr-defined]
    # 60 s wall-clock windows; the agent starts 17 s into one, so its 20 s of life straddle
    # no boundary in a way that would help: the rate must not be taken since the boundary.
    t0 = (feed.now - 300 * SECOND) // 60_000 * 60_000 + 17 * SECOND
    feed.now = t0
    starts = [feed.event("spender", "start", at=t0), feed.event("crasher", "start", at=t0)]
    spend = [feed.event("spender", "beat", at=t0 + SECOND * i, tokens=595) for i in range(1, 21)]
    spend += [feed.event("crasher", "beat", at=t0 + SECOND * i + 1, tokens=595) for i in range(1, 6)]
    crash = [feed.event("crasher", "exit", reason="signal", code=137, at=t0 + 6000)]
    play(feed, starts, spend, crash)  # 595 tokens a second: 35,700 a minute, for 20 s
    last = t0 + 20 * SECOND

    def rate(at: int) -> Any:
        return rows(fleet_status(r, pipeline, now_ms=at))["spender"]["tokens_per_min"]

    assert rate(t0 + 10 * SECOND + 1) == pytest.approx(35_700, rel=0.1)  # first seconds of life
    assert rate(last) == pytest.approx(35_700, rel=0.1)
    assert rate(last + 2 * SECOND) == pytest.approx(11_900 / 22 * 60, rel=0.01)  # over its age
    decaying = [rate(last + s * SECOND) for s in (40, 45, 50, 55)]
    assert decaying == sorted(decaying, reverse=True) and 0 < decaying[-1] < decaying[0]
    assert rate(last + 60 * SECOND + 1) == 0.0  # a window-length after its last event
    assert rate(last + 200 * SECOND) == 0.0
    assert rows(fleet_status(r, pipeline, now_ms=last))["crasher"]["tokens_per_min"] is None


def test_tokens_per_min_of_a_steady_agent_holds_across_window_boundaries(feed: Feed, r: redis.Redis) -> None:
    pipeline: Pipeline = feed.pipeline  # type: ignore[attr-defined]
    t0 = (feed.now - 400 * SECOND) // 60_000 * 60_000 + 41 * SECOND
    feed.now = t0
    feed.apply([feed.event("steady", "start", at=t0)])
    # 100 tokens a second for 180 s: 6,000 a minute, whatever the time is in its window.
    for at in range(t0 + 6 * SECOND, t0 + 180 * SECOND + 1, 7 * SECOND):
        beats = range(feed.now + 500, at + 1, 500)
        feed.apply([feed.event("steady", "beat", at=b, tokens=50) for b in beats])
        got = rows(fleet_status(r, pipeline, now_ms=at))["steady"]["tokens_per_min"]
        assert got == pytest.approx(6000, rel=0.1), at - t0


def test_tokens_per_min_after_a_restart_never_reads_high(feed: Feed, r: redis.Redis) -> None:
    pipeline: Pipeline = feed.pipeline  # type: ignore[attr-defined]
    t0 = (feed.now - 300 * SECOND) // 60_000 * 60_000 + 5 * SECOND
    feed.now = t0
    feed.apply([feed.event("phoenix", "start", at=t0)])
    feed.apply([feed.event("phoenix", "beat", at=t0 + SECOND * i, tokens=100) for i in range(1, 31)])
    restart = t0 + 35 * SECOND  # the previous run spent 6,000 a minute until 5 s ago
    feed.apply([feed.event("phoenix", "start", run="run-2", at=restart)])
    feed.apply([feed.event("phoenix", "beat", run="run-2", at=restart + SECOND * i, tokens=100)
                for i in range(1, 11)])  # fmt: skip
    got = rows(fleet_status(r, pipeline, now_ms=restart + 10 * SECOND))["phoenix"]["tokens_per_min"]
    assert 0 < got <= 6000 * 1.1


def test_cost_today_starts_at_local_midnight_in_the_report_time_zone(
    feed: Feed, r: redis.Redis, keys: Keys
) -> None:
    zone = "Asia/Kolkata"  # UTC+5:30: hourly UTC buckets start 30 minutes before its midnight
    base: Pipeline = feed.pipeline  # type: ignore[attr-defined]
    report = config.ReportSection.model_validate({"timezone": zone, "bucket": "1h"})
    pipeline = Pipeline(settings=base.settings.model_copy(update={"report": report}), source="test",
                        detectors=base.detectors)  # fmt: skip
    now_real = server_time_ms(r)
    midnight = local_midnight_ms(now_real, report.zone)
    snapper = Snapshotter(r, keys, bucket_s=3600, retention_s=86400, owner="test", timezone=zone)
    assert snapper.boundary(midnight + 20 * 60 * SECOND) == midnight  # not the UTC hour before it

    feed.now = midnight - 20 * 60 * SECOND  # yesterday, local time: after the last UTC hour began
    feed.apply([feed.event("bot", "start")] + [feed.event("bot", "beat", cost=1.0) for _ in range(3)])
    assert snapper.advance(0, snapper.boundary(midnight + 1), midnight + 1) is True
    feed.now = midnight + 10 * SECOND
    feed.apply([feed.event("bot", "beat", cost=0.25) for _ in range(2)])

    document = fleet_status(r, pipeline, now_ms=midnight + 30 * 60 * SECOND)
    row = rows(document)["bot"]
    assert (row["cost_today"], row["cost_total"]) == (0.5, 3.5)
    assert document["today_from"] == iso_ms(midnight)


@pytest.mark.parametrize(
    ("zone", "bucket", "now", "boundary"),
    [
        ("Europe/Berlin", "1d", "2026-11-23T23:30:00", "2026-11-23T23:00:00"),  # midnight, not 00:00 UTC
        ("Europe/Berlin", "1d", "2026-11-24T00:30:00", "2026-11-24T00:00:00"),  # then the UTC day
        ("Asia/Kolkata", "1h", "2026-11-23T18:40:00", "2026-11-23T18:30:00"),
        ("Asia/Kolkata", "1h", "2026-11-23T19:10:00", "2026-11-23T19:00:00"),
        ("UTC", "1h", "2026-11-23T19:10:00", "2026-11-23T19:00:00"),
    ],
)
def test_snapshot_boundaries_are_buckets_and_local_midnights(
    r: redis.Redis, keys: Keys, zone: str, bucket: str, now: str, boundary: str
) -> None:
    def ms(text: str) -> int:
        return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)

    snapper = Snapshotter(r, keys, bucket_s=config.parse_duration(bucket), retention_s=86400, owner="t",
                          timezone=zone)  # fmt: skip
    assert snapper.boundary(ms(now)) == ms(boundary)


def test_without_a_detector_worker_status_says_so_and_does_not_call_healthy_agents_late(
    feed: Feed, r: redis.Redis, keys: Keys
) -> None:
    pipeline: Pipeline = feed.pipeline  # type: ignore[attr-defined]
    t0 = feed.now
    feed.apply([feed.event("bot", "start", at=t0, interval=1.0), feed.event("bot", "beat", at=t0 + 2000)])
    now = t0 + 20 * SECOND

    # Nothing was ever sent on the stream: the record is simply old, and nobody is detecting.
    document = fleet_status(r, pipeline, now_ms=now)
    assert states(document) == {"bot": "late"}
    health = document["pipeline"]
    assert (health["detecting"], health["lag"], health["pending"]) == (False, 0, 0)
    assert health["detecting_reason"].startswith("no detector worker is running")

    # Events wait on the stream that the detector group has not read (the engine that wrote
    # the record created it when it took the shard, then stopped): every one of them is lag,
    # and the agent is judged as of the oldest of them (its next beat may be right there).
    r.xadd(keys.events(), {"d": b"x"}, id=f"{t0 + 2500}-0")
    r.xadd(keys.events(), {"d": b"x"}, id=f"{t0 + 3000}-0")
    document = fleet_status(r, pipeline, now_ms=now)
    health = document["pipeline"]
    assert states(document) == {"bot": "ok"}
    assert (health["lag"], health["applied_until"]) == (2, iso_ms(t0 + 2500))
    assert "2 events wait unread" in health["detecting_reason"]
    assert "none has ever read" not in health["detecting_reason"]

    # No detector group at all (a prefix no detector worker ever ran on): status says so.
    r.xgroup_destroy(keys.events(), "detectors")
    document = fleet_status(r, pipeline, now_ms=now)
    health = document["pipeline"]
    assert states(document) == {"bot": "ok"}
    assert (health["lag"], health["applied_until"]) == (2, iso_ms(t0 + 2500))
    assert (
        "none has ever read" in health["detecting_reason"]
        and "2 events wait unread" in health["detecting_reason"]
    )

    # A group that read one entry and never acknowledged it (its worker died): lag and pending
    # come from Redis itself, not from a worker's last health report.
    r.xgroup_create(keys.events(), "detectors", id="0")
    r.xreadgroup("detectors", "dead-worker", {keys.events(): ">"}, count=1)
    health = fleet_status(r, pipeline, now_ms=now)["pipeline"]
    assert (health["lag"], health["pending"]) == (1, 1)
    assert health["oldest_pending_s"] == pytest.approx((now - t0 - 2500) / 1000)
    assert health["applied_until"] == iso_ms(t0 + 2500) and health["detecting"] is False


@pytest.mark.parametrize("width", [80, 120, 250])
def test_the_board_fits_the_terminal_without_cutting_agent_names_or_causes(
    feed: Feed, r: redis.Redis, width: int
) -> None:
    pipeline: Pipeline = feed.pipeline  # type: ignore[attr-defined]
    t0 = feed.now
    names = ["exited-worker-03", "stalled-scraper-7", "ok"]
    starts = []
    for name in names:
        starts += [feed.event(name, "start", at=t0, interval=0.1), feed.event(name, "beat", at=t0 + 10)]
    error = "RuntimeError: the upstream API kept answering 503 for ten minutes\x1b[2J"
    exit_ = [feed.event("exited-worker-03", "exit", at=t0 + 20, reason="exception", code=1, error=error)]
    feed.now = t0 + 10
    stalled = pulses(feed, "stalled-scraper-7", t0 + 3 * SECOND)
    feed.now = t0 + 10
    ok = beats(feed, "ok", t0 + 3 * SECOND)
    play(feed, starts, exit_, stalled, ok, ticks=range(t0, t0 + 3 * SECOND + 1, 250))
    lines = [ANSI.sub("", line) for line in _board(fleet_status(r, pipeline, now_ms=t0 + 3 * SECOND), width)]
    cause = "exit: exited-worker-03: crashed with RuntimeError: the upstream API kept answering 503 for ten"
    causes = [line for line in lines if cause in line]
    assert len(causes) == 1 and "minutes\\x1b[2J" in causes[0]  # whole, and the escape as text
    assert [line for line in lines if len(line) > width and line not in causes] == []
    header = next(line for line in lines if line.startswith("agent "))
    inline = width > 200
    assert header.split() == ["agent", "state", "beat", "pulse", "every", "tok/min", "today",
                              *(["incidents"] if inline else [])]  # fmt: skip
    for name in names:
        assert any(line.startswith(f"{name} ") for line in lines), (name, lines)
    exited = lines.index(next(line for line in lines if line.startswith("exited-worker-03 ")))
    if inline:  # every cause fits in the last column
        assert cause in lines[exited]
    else:  # under its agent, indented, whole
        assert "exit:" not in lines[exited] and lines[exited + 1] == "    " + causes[0].strip()
    footer = lines[lines.index(next(line for line in lines if line.startswith("workers alive"))) :]
    assert "failed deliveries: 0" in " ".join(footer)
