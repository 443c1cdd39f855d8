"""Cost in the pipeline and ``[[budgets]]``: beats priced once, exact window totals, a warning
then an exceeded alert, pace, and the budget's halt.

Real Redis and a real detector worker; events written the way a producer writes them (the kit's
simulated agents), so each test controls exactly what was spent.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import msgpack
import pytest
import redis
from agents_detect.kit import Agent, pipeline_for, worker_for

from agentwatch.alerts import Incidents
from agentwatch.config import Budget, Pipeline
from agentwatch.halts import Halts
from agentwatch.keys import Keys
from agentwatch.redisconn import server_time_ms
from agentwatch.report import build_report, render_text
from agentwatch.spend import Ledger, Spent, Tally, Window, pack_tally, unpack_tally, window_of
from detectors.agent import Agent as AgentState
from detectors.agent import pack
from detectors.budgets import EXCEEDED, WARNING, judge

from helpers import caught_up, running, wait_for

UTC = ZoneInfo("UTC")


def with_budgets(pipeline: Pipeline, *budgets: dict[str, Any], **prices: dict[str, float]) -> Pipeline:
    updates: dict[str, Any] = {"budgets": [Budget.model_validate(b) for b in budgets]}
    if prices:
        from agentwatch.config import ModelRates  # noqa: PLC0415

        updates["prices"] = {name: ModelRates.model_validate(rates) for name, rates in prices.items()}
    settings = pipeline.settings.model_copy(update=updates)
    return Pipeline(settings=settings, source="test", detectors=pipeline.detectors)


def budget_alerts(r: redis.Redis, keys: Keys) -> list[dict[str, Any]]:
    found = [json.loads(fields[b"d"]) for _, fields in r.xrange(keys.alerts)]
    return [alert for alert in found if alert["detector"] == "budget"]


def today(r: redis.Redis, keys: Keys, agent: str) -> Any:
    ledger = Ledger(r, keys, UTC)
    wid = window_of("day", server_time_ms(r), UTC).id
    return ledger.read([agent]).get(agent, {}).get(wid)


def test_a_beat_without_cost_is_priced_and_an_unknown_model_is_counted_not_zero(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    rates = {"my-finetune": {"input": 3.0, "output": 15.0}}
    pipeline = with_budgets(pipeline_for(prefix, redis_url), **rates)
    bot = Agent(r, keys, "priced")
    bot.start(interval=1.0)
    bot.beat(tokens_in=1_000_000, tokens_out=100_000, model="my-finetune")  # $3 + $1.50
    bot.beat(tokens_in=10, tokens_out=10, model="no-such-model-anywhere")
    bot.beat(cost=0.25)  # the agent's own figure wins
    bot.beat()  # a bare heartbeat spends nothing
    with running(worker_for(pipeline, redis_url)):
        wait_for(lambda: caught_up(r, keys), what="worker caught up")
    spent = today(r, keys, "priced")
    assert spent.cost == pytest.approx(4.75)
    assert (spent.unpriced, spent.beats) == (1, 2)


def test_warning_then_exceeded_then_halt_once_with_exact_totals(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    pipeline = with_budgets(
        pipeline_for(prefix, redis_url), {"agents": "spender-*", "per": "day", "limit": 1.0, "halt": True}
    )
    bot = Agent(r, keys, "spender-1")
    bot.start(interval=0.1)
    costs = [0.3, 0.3, 0.3, 0.3, 0.3]
    with running(worker_for(pipeline, redis_url)), running(worker_for(pipeline, redis_url)):
        for cost in costs:
            bot.beat(cost=cost)
            wait_for(lambda: caught_up(r, keys), what="workers caught up")
        wait_for(lambda: len(budget_alerts(r, keys)) >= 2, what="warning and exceeded")
    alerts = budget_alerts(r, keys)
    assert [(a["status"], a["severity"]) for a in alerts] == [("firing", "warning"), ("firing", "critical")]
    assert {a["dedup_key"] for a in alerts} == {"spender-1/budget"}
    assert alerts[1]["details"]["spent"] == pytest.approx(1.2)
    assert today(r, keys, "spender-1").cost == pytest.approx(sum(costs))
    halts = Halts(r, keys).halting("spender-1")
    assert [h.by for h in halts] == ["budget"]


def test_together_sums_the_glob_across_agents(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    pipeline = with_budgets(
        pipeline_for(prefix, redis_url),
        {"agents": "crew-*", "per": "month", "limit": 1.0, "scope": "together", "warn_at": 0.9},
    )
    with running(worker_for(pipeline, redis_url)):
        for name in ("crew-a", "crew-b", "crew-c"):
            Agent(r, keys, name).beat(cost=0.4)
        # A batch may bring two of the three beats first: a warning (pace, or warn_at) may come
        # before the exceeded one, so wait for the critical one itself.
        exceeded = lambda: [a for a in budget_alerts(r, keys) if a["severity"] == "critical"]  # noqa: E731
        wait_for(exceeded, what="exceeded together")
    (alert,) = exceeded()
    assert alert["dedup_key"] == "budget:crew-*"
    assert alert["details"]["spent"] == pytest.approx(1.2)


def utc_ms(text: str) -> int:
    return round(datetime.fromisoformat(text).replace(tzinfo=ZoneInfo("UTC")).timestamp() * 1000)


def test_windows_are_calendar_hours_days_and_months_in_the_report_time_zone() -> None:
    """SPEC section 7: budgets count per local calendar window. Berlin is UTC+1 in December, and
    2026-10-25 has 25 hours there (DST ends at 03:00, the hour 02:00-03:00 comes twice)."""
    berlin = ZoneInfo("Europe/Berlin")
    at = utc_ms("2026-12-31T23:30:00")  # 00:30 on New Year's Day in Berlin
    assert window_of("hour", at, berlin) == Window(
        "h2027010100", utc_ms("2026-12-31T23:00:00"), at + 1_800_000
    )
    assert window_of("day", at, berlin) == Window(
        "d20270101", utc_ms("2026-12-31T23:00:00"), utc_ms("2027-01-01T23:00:00")
    )
    assert window_of("month", at, berlin) == Window(
        "m202701", utc_ms("2026-12-31T23:00:00"), utc_ms("2027-01-31T23:00:00")
    )
    assert window_of("month", at - 3_600_000, berlin).id == "m202612"  # 23:30 on Dec 31 in Berlin
    long_day = window_of("day", utc_ms("2026-10-25T12:00:00"), berlin)
    assert long_day.end_ms - long_day.start_ms == 25 * 3_600_000
    first, again = (window_of("hour", utc_ms(t), berlin) for t in ("2026-10-25T00:30", "2026-10-25T01:30"))
    assert first.id != again.id and sorted([again.id, first.id]) == [first.id, again.id]
    assert (first.end_ms, again.end_ms) == (again.start_ms, again.start_ms + 3_600_000)
    with pytest.raises(ValueError, match="hour, day or month"):
        window_of("week", at, berlin)


def test_judge_pace_floor() -> None:
    budget = Budget(limit=10.0, per="day")
    day = window_of("day", 1_765_000_000_000, UTC)
    at = day.start_ms + (day.end_ms - day.start_ms) // 20  # 5 % of the day gone
    assert judge(budget, 1.0, day, at).rank is None  # too early to project
    at = day.start_ms + (day.end_ms - day.start_ms) // 5  # 20 % gone, 3.00 spent: on pace for 15
    verdict = judge(budget, 3.0, day, at)
    assert (verdict.rank, verdict.why) == (WARNING, "pace")
    assert verdict.projected == pytest.approx(15.0)
    assert judge(budget, 0.4, day, at).rank is None  # under 5 % of the limit: no projection
    assert judge(budget, 8.0, day, at).why == "warn_at"
    assert judge(budget, 10.0, day, at).rank == EXCEEDED


def test_a_tally_keeps_the_newest_windows_of_each_kind_and_reads_the_earlier_ledger() -> None:
    """40 days, 3 hours, 3 months per agent (and per glob for ``together`` shares); a ledger
    record written before the engine kept the spend (with its per-run seq marks) still reads."""
    tally = Tally()
    for day in range(1, 46):
        tally.add(f"d202612{day:02d}" if day <= 31 else f"d202701{day - 31:02d}", 0.5, 0, 1)
    for hour in range(5):
        tally.add(f"h20261207{hour:02d}", 0.1, 1, 0)
    days = sorted(k for k in tally.windows if k[0] == "d")
    assert len(days) == 40 and days[0] == "d20261206" and days[-1] == "d20270114"
    assert sorted(k for k in tally.windows if k[0] == "h") == ["h2026120702", "h2026120703", "h2026120704"]
    assert tally.spent("h2026120704") == Spent(0.1, 1, 0)
    assert unpack_tally(pack_tally(tally)) == tally
    shares = Tally()
    for month in range(1, 6):
        shares.add(f"crew-*|m2026{month:02d}", 1.0, 0, 1)
        shares.add(f"ops-*|m2026{month:02d}", 2.0, 0, 1)
    assert sorted(shares.windows) == [f"{g}|m2026{m:02d}" for g in ("crew-*", "ops-*") for m in (3, 4, 5)]
    earlier = msgpack.packb({"r": {"run-1": [7, 1_765_000_000_000]}, "w": {"d20261207": [1.25, 2, 3]}})
    assert unpack_tally(earlier).spent("d20261207") == Spent(1.25, 2, 3)
    assert unpack_tally(b"\xc1 damaged") == Tally()


@pytest.mark.parametrize(
    ("entry", "named"),
    [
        ("limit = 0", "budgets.0] limit"),
        ("limit = -5.0", "budgets.0] limit"),
        ('limit = 5.0\nper = "week"', "budgets.0] per"),
        ('limit = 5.0\nscope = "all"', "budgets.0] scope"),
        ("limit = 5.0\nwarn_at = 1.5", "budgets.0] warn_at"),
        ('limit = "5"', "budgets.0] limit"),
        ('per = "day"', "budgets.0] limit"),
    ],
)
def test_check_config_names_the_bad_budget_key(tmp_path: Any, entry: str, named: str) -> None:
    from typer.testing import CliRunner  # noqa: PLC0415

    from agentwatch.cli import app  # noqa: PLC0415

    path = tmp_path / "pipeline.toml"
    path.write_text(f"[[budgets]]\n{entry}\n")
    result = CliRunner().invoke(app, ["check-config", str(path)])
    assert result.exit_code == 2, result.output
    assert named in result.output


def test_a_glob_matching_no_agent_is_a_warning(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    from detectors.budgets import BudgetKeeper  # noqa: PLC0415

    r.hset(keys.states(0), "scraper-1", pack(AgentState("scraper-1")))  # a checkpointed agent
    pipeline = with_budgets(pipeline_for(prefix, redis_url), {"agents": "scrapper-*", "limit": 5.0})
    keeper = BudgetKeeper(r, keys, pipeline.settings, Incidents(r, keys), Halts(r, keys))
    with caplog.at_level("WARNING", logger="agentwatch.detectors.budget"):
        keeper.on_start()
    assert "[budgets.0] agents = 'scrapper-*' matches none of the 1 agents" in caplog.text


def test_bad_costs_are_dead_lettered_and_never_reach_a_total(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    pipeline = with_budgets(pipeline_for(prefix, redis_url), {"limit": 100.0})
    bot = Agent(r, keys, "sloppy")
    bot.start(interval=1.0)
    for bad in (-1.0, float("nan"), float("inf"), 1e12):
        bot.beat(cost=bad)
    bot.beat(cost=0.5)
    with running(worker_for(pipeline, redis_url)):
        wait_for(lambda: caught_up(r, keys), what="worker caught up")
    assert r.xlen(keys.deadletter) == 4
    spent = today(r, keys, "sloppy")
    assert (spent.cost, spent.beats) == (0.5, 1)
    assert budget_alerts(r, keys) == []


def test_a_runaway_with_tokens_halt_halts_itself(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    pipeline = pipeline_for(prefix, redis_url, tokens={"warmup": 5, "halt": True})
    bot = Agent(r, keys, "runaway")
    bot.start(interval=0.1)
    for _ in range(10):
        bot.beat(tokens=200)
    bot.beat(tokens=40_000)
    with running(worker_for(pipeline, redis_url)):
        halts = wait_for(lambda: Halts(r, keys).halting("runaway"), what="the tokens detector's halt")
    assert [h.by for h in halts] == ["tokens"]
    assert "40,000" in halts[0].reason or "40000" in halts[0].reason


def test_the_report_gives_cost_per_agent_unknown_never_zero_and_budget_incidents(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    """``report`` (issue 13, views): each agent's cost, ``unknown`` for tokens nobody could price
    (JSON ``null`` and the count of unpriced beats, never $0.00), and a budget over several agents
    as an incident of its glob, in the JSON and in the text."""
    pipeline = with_budgets(
        pipeline_for(prefix, redis_url),
        {"agents": "crew-*", "per": "month", "limit": 1.0, "scope": "together"},
    )
    for name in ("crew-a", "crew-b"):
        crew = Agent(r, keys, name)
        crew.start(interval=1.0)
        crew.beat(cost=0.6)
    mystery = Agent(r, keys, "mystery")
    mystery.start(interval=1.0)
    mystery.beat(tokens_in=10, tokens_out=10, model="no-such-model-anywhere")
    with running(worker_for(pipeline, redis_url)):
        wait_for(lambda: caught_up(r, keys) and budget_alerts(r, keys), what="the crew's budget exceeded")
    report = build_report(r, pipeline, since_s=3600)
    rows = {row["agent"]: row for row in report["agents"]}
    assert rows["crew-a"]["cost"] == pytest.approx(0.6) and rows["crew-b"]["cost"] == pytest.approx(0.6)
    assert (rows["mystery"]["cost"], rows["mystery"]["unpriced_beats"]) == (None, 1)
    (incident,) = report["budget_incidents"]
    assert (incident["agents"], incident["detector"], incident["open"]) == ("crew-*", "budget", True)
    text = render_text(report)
    assert "- mystery: " in text and "unknown (1 unpriced beats)" in text and "$0.00" not in text
    assert f"budget of crew-* (still open): {incident['summary']}" in text


def test_pace_warns_end_to_end_before_the_spend_reaches_warn_at(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    """A real worker, one beat whose cost is below warn_at but, for the part of the window gone
    by, on pace to pass the limit: one warning naming the projection, no exceeded alert."""
    now = server_time_ms(r)
    # A report timezone where it is about noon now (Etc/GMT-N is UTC+N): the day is about half
    # gone, whatever the hour the test runs at (pace needs 10 %, and room below warn_at).
    offset = 12 - int(now // 3_600_000 % 24)
    zone = f"Etc/GMT{-offset:+d}"
    per, gone = "day", window_of("day", now, ZoneInfo(zone)).elapsed(now)
    assert 0.4 < gone < 0.6
    cost = round(gone * 1.1 * 10.0, 4)  # spent / gone > limit; below 0.99 x limit
    pipeline = with_budgets(
        pipeline_for(prefix, redis_url), {"agents": "pacer", "per": per, "limit": 10.0, "warn_at": 0.99}
    )
    report = pipeline.settings.report.model_copy(update={"timezone": zone})
    settings = pipeline.settings.model_copy(update={"report": report})
    pipeline = Pipeline(settings=settings, source="test", detectors=pipeline.detectors)
    with running(worker_for(pipeline, redis_url)):
        Agent(r, keys, "pacer").beat(cost=cost)
        (alert,) = wait_for(lambda: budget_alerts(r, keys), what="the pace warning")
        wait_for(lambda: caught_up(r, keys), what="the beat applied")
    assert (alert["severity"], alert["details"]["why"]) == ("warning", "pace")
    assert alert["details"]["projected"] > 10.0
    assert (
        f"pacer: on pace to spend ${alert['details']['projected']:,.2f} against the budget of $10.00/{per}"
        in (alert["summary"])
    )
    assert len(budget_alerts(r, keys)) == 1
