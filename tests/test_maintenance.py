"""Maintenance windows: nothing pages for the agents a window covers while it lasts; at its end
they get a fresh allowance, so what came back on time never pages and what is still down pages
once. Recurring windows (``[[maintenance]]``, a cron schedule in ``[report] timezone``) and ad-hoc
ones (``agentwatch maintenance start/stop/list``); bad windows refused by check-config.
Real detector and notifier workers, real agent processes, a real HTTP receiver."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner

from agentwatch.cli import app
from agentwatch.config import GroupingSection, MaintenanceEntry, Pipeline
from agentwatch.keys import Keys
from agentwatch.maintenance import AdhocWindows, Window, covering, scheduled

from fleet_kit import Agents, alerts, outcomes, pipeline_running, write_config
from helpers import wait_for
from notify_kit import fire, now_ms, pipeline_with, receiver, resolve
from notify_kit import notifier_running as notifiers_only

HELD_THEN_DROPPED = ["maintenance", "skipped"]
ALLOWANCE_S = 1.0
"""The agents' silence allowance in these tests: ``after = "1s"`` (3 x 0.1 s intervals is less)."""


@pytest.fixture
def agents(tmp_path: Path, prefix: str, redis_url: str) -> Agents:
    fleet = Agents(tmp_path, prefix, redis_url)
    yield fleet  # type: ignore[misc]
    fleet.close()


@pytest.mark.slow
def test_a_recurring_window_covering_a_restart_of_20_agents_pages_nobody(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str, tmp_path: Path, agents: Agents
) -> None:
    """20 real agents SIGKILLed and started again inside a daily window (its slot is the current
    minute, so the test needs no waiting for a cron boundary): their silences fire and resolve,
    all held; nothing reaches the receiver, during the window or one allowance after it. Up to
    ~15 s: two launches of 20 Python processes on a loaded box."""
    names = [f"web-{i}" for i in range(20)]
    with receiver() as hook:
        now = now_ms(r)
        minute = datetime.fromtimestamp(now / 1000, UTC)
        slot_ms = now - now % 60_000
        end_ms = now + 10_000  # the window started at the top of this minute and ends 10 s from now
        extra = (
            f'[[maintenance]]\nagents = "web-*"\nschedule = "{minute.minute} {minute.hour} * * *"\n'
            f'duration = "{end_ms - slot_ms}ms"\nreason = "nightly deploy"\n'
        )
        path = write_config(tmp_path / "pipeline.toml", prefix, redis_url, hook.url, extra)
        with pipeline_running(path, redis_url):
            agents.launch(*names)
            agents.kill(*names)
            wait_for(lambda: len(alerts(r, keys, "firing")) == 20, timeout=30, what="20 silences")
            agents.launch(*names)
            wait_for(lambda: len(alerts(r, keys, "resolved")) == 20, timeout=30, what="20 recoveries")
            assert now_ms(r) < end_ms, "the restart took longer than the window (a very slow box)"
            wait_for(lambda: now_ms(r) > end_ms + (ALLOWANCE_S + 1.5) * 1000, timeout=30, interval=0.1,
                     what="the window's end and a fresh allowance")  # fmt: skip
            assert hook.requests == []
    held = [o for o in outcomes(r, keys) if o[0] == "maintenance"]
    assert len(held) == 40 and {agent for _, agent, _ in held} == set(names)  # 20 firings, 20 resolves


@pytest.mark.slow
def test_an_agent_still_down_after_an_adhoc_window_and_its_allowance_pages_exactly_once(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str, tmp_path: Path, agents: Agents
) -> None:
    """`maintenance start` before a deploy; three agents go down, two come back; `maintenance
    stop`: the one still down pages once, one allowance after the stop (not before), the others
    never."""
    runner = CliRunner()
    with receiver() as hook:
        path = write_config(tmp_path / "pipeline.toml", prefix, redis_url, hook.url)
        with pipeline_running(path, redis_url):
            agents.launch("api-1", "api-2", "api-3", "other")
            started = runner.invoke(app, ["maintenance", "start", "--agent", "api-*", "--for", "10m",
                                          "--reason", "deploy 4.2", "-c", str(path)])  # fmt: skip
            assert started.exit_code == 0, started.output
            assert "maintenance " in started.output and "started for api-*" in started.output
            listed = runner.invoke(app, ["maintenance", "list", "--json", "-c", str(path)])
            (window,) = [json.loads(line) for line in listed.output.splitlines()]
            assert window["in_force"] and window["reason"] == "deploy 4.2" and window["agents"] == ["api-*"]
            status = json.loads(runner.invoke(app, ["status", "--json", "-c", str(path)]).output)
            assert [w["id"] for w in status["maintenance"]] == [window["id"]]
            rows = {row["agent"]: row for row in status["agents"]}
            assert rows["api-1"]["maintenance"]["id"] == window["id"] and rows["other"]["maintenance"] is None

            agents.kill("api-1", "api-2", "api-3")
            wait_for(lambda: len(alerts(r, keys, "firing")) == 3, timeout=30, what="3 silences")
            agents.launch("api-1", "api-2")
            wait_for(lambda: len(alerts(r, keys, "resolved")) == 2, timeout=30, what="2 recoveries")
            assert hook.requests == []
            stopped_at = time.monotonic()
            stopped = runner.invoke(app, ["maintenance", "stop", "-c", str(path)])
            assert stopped.exit_code == 0 and f"maintenance {window['id']} stopped" in stopped.output
            (page,) = hook.wait_requests(1, timeout=15)
            assert page.at - stopped_at >= ALLOWANCE_S * 0.9  # the fresh allowance ran first
            body = page.json()
            assert (body["agent"], body["detector"], body["status"]) == ("api-3", "silence", "firing")
            time.sleep(1.5)  # a redelivery or a second release would come within a tick or two
            assert len(hook.requests) == 1
        again = runner.invoke(app, ["maintenance", "stop", "-c", str(path)])
        assert again.exit_code == 1 and "no ad-hoc maintenance window in force" in again.output


def test_windows_by_label_hold_only_the_agents_they_cover(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    """A label window holds a matching alert (recorded as maintenance); an alert of another team
    goes at once; an incident that began and ended in the window is never sent, and after
    `stop` and the allowance nothing of it follows."""
    with receiver() as hook:
        pipeline = pipeline_with(prefix, redis_url, [{"type": "webhook", "url": hook.url, "backoff": "50ms"}])
        window = AdhocWindows(r, keys).start(60, labels={"team": "search"}, reason="reindex")
        with notifiers_only(pipeline, redis_url):
            fire(r, keys, "indexer", details={"labels": {"team": "search"}, "allowance_s": 0.2})
            other = fire(r, keys, "billing", details={"labels": {"team": "money"}})
            (sent,) = hook.wait_requests(1)
            assert sent.json()["id"] == other.id
            resolve(r, keys, "indexer")
            # the firing was held; its resolve (no labels: these agents have no start facts) finds
            # it held and takes it along: the receiver never hears of that incident
            wait_for(lambda: [o[0] for o in outcomes(r, keys) if o[1] == "indexer"] == HELD_THEN_DROPPED,
                     what="the firing held, its resolve dropping it")  # fmt: skip
            AdhocWindows(r, keys).stop(window.id)
            time.sleep(1.5)  # past the 0.2 s allowance and a release tick: nothing may follow
            assert len(hook.requests) == 1


def test_recurring_windows_overlap_as_a_union_and_a_window_that_never_ends_is_refused(
    tmp_path: Path,
) -> None:
    entry = MaintenanceEntry.model_validate({"agents": ["*"], "schedule": "0,1 3 * * *", "duration": "90s"})
    at = datetime(2026, 12, 7, 3, 2, 20, tzinfo=UTC).timestamp() * 1000  # 140 s after 03:00
    (window,) = scheduled([entry], "UTC", int(at))
    assert window.in_force(int(at)) and window.end_ms == int(at) + 10_000  # the 03:01 one: 03:02:30
    path = tmp_path / "pipeline.toml"
    path.write_text('[[maintenance]]\nagents = "*"\nschedule = "*/5 * * * *"\nduration = "5m"\n')
    result = CliRunner().invoke(app, ["check-config", str(path)])
    assert result.exit_code == 2
    assert "[maintenance.0] schedule: windows of 5m starting '*/5 * * * *' never end" in result.output


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ('agents = "a"\nschedule = "61 * * * *"\nduration = "5m"',
         "[maintenance.0] schedule: invalid cron expression '61 * * * *': Bad minute"),
        ('agents = "a"\nschedule = "0 2 * * *"\nduration = "0s"', "[maintenance.0] duration: must be more"),
        ('agents = "a"\nschedule = "0 2 * * *"\nduration = "8d"', "[maintenance.0] duration: must be at"),
        ('schedule = "0 2 * * *"\nduration = "1h"', "say whom it covers"),
        ('agents = "a b"\nschedule = "0 2 * * *"\nduration = "1h"', "[maintenance.0] agents: 'a b' is not"),
        ('labels = { "te am" = "x" }\nschedule = "0 2 * * *"\nduration = "1h"', "is not a label key"),
        ('labels = { team = "<b>" }\nschedule = "0 2 * * *"\nduration = "1h"', "is not a label value"),
        ('agents = "a"\nschedule = "0 2 * * *"\nduration = "1h"\nreason = "x\\u001b[2J"', "printable"),
    ],
)  # fmt: skip
def test_check_config_refuses_a_bad_window_naming_the_key(tmp_path: Path, entry: str, says: str) -> None:
    path = tmp_path / "pipeline.toml"
    path.write_text(f"[[maintenance]]\n{entry}\n")
    result = CliRunner().invoke(app, ["check-config", str(path)])
    assert result.exit_code == 2 and says in result.output, result.output


def test_check_config_refuses_an_unknown_timezone_for_the_windows(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.toml"
    path.write_text('[report]\ntimezone = "Mars/Base"\n[[maintenance]]\nagents = "a"\n'
                    'schedule = "0 2 * * *"\nduration = "1h"\n')  # fmt: skip
    result = CliRunner().invoke(app, ["check-config", str(path)])
    assert result.exit_code == 2 and "[report] timezone: unknown time zone 'Mars/Base'" in result.output


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--agent", "a"], "Missing option '--for'"),
        (["--agent", "a", "--for", "8d"], "--for: at most 7d"),
        (["--agent", "a", "--for", "0s"], "--for must be longer than zero"),
        (["--for", "1h"], "say whom it covers"),
        (["--agent", "a;rm -rf /", "--for", "1h"], "is not an agent name or glob"),
        (["--label", "team", "--for", "1h"], "--label: 'team' is not key=value"),
        (["--agent", "a", "--for", "1h", "--reason", "\x1b[31mred"], "--reason: at most 200 characters"),
    ],
)
def test_maintenance_start_refuses_bad_input_before_touching_redis(args: list[str], says: str) -> None:
    result = CliRunner().invoke(app, ["maintenance", "start", *args])
    assert result.exit_code == 2 and says in result.output, result.output


def test_metrics_mark_the_agents_a_window_covers() -> None:
    from agentwatch.http.metrics import _agents  # noqa: PLC0415 - starlette, only for this test

    row = {"agent": "web-1", "state": "ok", "last_beat_age_s": 1.0, "beats_total": 1, "tokens_total": 0,
           "cost_total": 0.0, "incidents": [], "maintenance": {"id": "3f2a9c1e", "until": "..."}}  # fmt: skip
    other = {**row, "agent": "db", "maintenance": None}
    (family,) = [m for m in _agents([row, other]) if m.name == "agentwatch_agent_in_maintenance"]
    assert {s.labels["agent"]: s.value for s in family.samples} == {"web-1": 1, "db": 0}


def test_reminders_due_in_a_window_are_recorded_not_sent_and_resume_after_it(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    with receiver() as hook:
        entry = {"type": "webhook", "url": hook.url, "backoff": "50ms", "repeat": "300ms"}
        with notifiers_only(pipeline_with(prefix, redis_url, [entry]), redis_url):
            fire(r, keys, "stuck", details={"allowance_s": 0.2})
            hook.wait_requests(2)  # the page and a first reminder
            window = AdhocWindows(r, keys).start(60, agents=["stuck"])

            def reminders_held() -> int:
                return sum(o == ("maintenance", "stuck", "firing") for o in outcomes(r, keys))

            wait_for(lambda: reminders_held() >= 2, what="2 reminders held")
            sent = len(hook.requests)  # one queued just before the window may still have gone out
            wait_for(lambda: reminders_held() >= 4, what="2 more reminders held")
            assert len(hook.requests) == sent
            AdhocWindows(r, keys).stop(window.id)
            after = hook.wait_requests(sent + 1)[-1].json()
            assert after["details"]["reminder"] > 2 and after["agent"] == "stuck"


def test_agents_still_down_at_a_windows_end_are_one_grouped_page(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    """With [grouping], what a window held goes to its group when it ends: three agents of one
    host still down are one notification, not three."""
    with receiver() as hook:
        pipeline = pipeline_with(prefix, redis_url, [{"type": "webhook", "url": hook.url, "backoff": "50ms"}])
        grouping = GroupingSection.model_validate({"enabled": True, "group_wait": "500ms"})
        pipeline = Pipeline(settings=pipeline.settings.model_copy(update={"grouping": grouping}),
                            source="test", notifiers=pipeline.notifiers)  # fmt: skip
        window = AdhocWindows(r, keys).start(60, labels={"host": "w3"})
        with notifiers_only(pipeline, redis_url):
            for i in range(3):
                fire(r, keys, f"w3-{i}", details={"labels": {"host": "w3"}, "allowance_s": 0.1})
            wait_for(lambda: sum(o[0] == "maintenance" for o in outcomes(r, keys)) == 3, what="3 held")
            AdhocWindows(r, keys).stop(window.id)
            (page,) = hook.wait_requests(1)
            time.sleep(1.0)  # a group_wait and more: a second page would be here by now
            assert len(hook.requests) == 1
    body = page.json()
    assert body["dedup_key"] == "group:host=w3/silence" and sorted(body["details"]["group"]["agents"]) == [
        "w3-0", "w3-1", "w3-2"]  # fmt: skip


def test_the_windows_covering_an_agent_are_found_by_name_and_labels_in_order() -> None:
    def window(name: str, agents: tuple[str, ...] = (), **labels: str) -> Window:
        return Window(name, agents, labels, 0, 1, "adhoc")

    by_name, by_label = window("web", ("web-*",)), window("batch", team="batch")
    both, deploy = window("db", ("db-*",), tier="1"), window("deploy", ("deploy-*", "web-9"))
    everything = [by_name, by_label, both, deploy]
    covers = covering(everything)
    assert covers("web-1", {"team": "search"}) == [by_name]
    assert covers("web-9", {"team": "batch"}) == [by_name, by_label, deploy]
    assert covers("agent-1", {"team": "batch"}) == [by_label]
    assert covers("db-1", {"tier": "1"}) == [both] and covers("db-1", {"tier": "2"}) == []
    assert covers("agent-1", None) == [] and covers("Web-1", {}) == []  # case matters
    assert covering([window("all")])("anyone", None) == [window("all")]  # no selector: every agent
    assert covering([])("web-1", None) == []


def test_hand_edited_entries_are_ignored_not_fatal(r: redis.Redis, keys: Keys) -> None:
    """Whoever can write Redis cannot stop every delivery with a malformed window or record."""
    from agentwatch.dependencies import Dependents  # noqa: PLC0415

    good = AdhocWindows(r, keys).start(60, agents=["x"])
    r.hset(keys.maintenance, mapping={"a": "not json", "b": '{"id": "b", "agents": ["*"], "labels": {}, '
           '"start_ms": "0", "end_ms": 9e99, "source": "adhoc"}', "c": "[1, 2]"})  # fmt: skip
    assert [w.id for w in AdhocWindows(r, keys).all(now_ms(r))] == [good.id]
    r.hset(keys.dependents, mapping={"x/silence": '{"child": "x", "parent": "p", "since_ms": "soon"}'})
    assert Dependents(r, keys).all() == {}
