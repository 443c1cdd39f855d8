"""Dependencies (``depends_on``): while an agent a silent agent depends on is down, the silence is
held and listed under the parent instead of paging; when the parent recovers and the child is
still silent one allowance later, it pages on its own; a child that died with its parent and came
back with it never pages. Cycles are refused at start-up. Real detector and notifier workers,
real agent processes, a real HTTP receiver."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from typer.testing import CliRunner

from agentwatch.alerts import Alert
from agentwatch.cli import app
from agentwatch.config import Pipeline
from agentwatch.keys import Keys
from notifiers.holds import for_pipeline
from notifiers.text import plain_text, slack_text

from fleet_kit import Agents, alerts, outcomes, pipeline_running, write_config
from helpers import settings_for, wait_for
from notify_kit import FAST_DELIVERY, Receiver, fire, now_ms, pipeline_with, receiver, resolve, stream
from notify_kit import notifier_running as notifiers_only

DEPENDS = '[detectors.silence.agents."web-*"]\ndepends_on = "db"\n'
ALLOWANCE_S = 1.0


@pytest.fixture
def agents(tmp_path: Path, prefix: str, redis_url: str) -> Agents:
    fleet = Agents(tmp_path, prefix, redis_url)
    yield fleet  # type: ignore[misc]
    fleet.close()


def _status(path: Path) -> dict[str, dict[str, object]]:
    result = CliRunner().invoke(app, ["status", "--json", "-c", str(path)])
    assert result.exit_code == 0, result.output
    return {row["agent"]: row for row in json.loads(result.output)["agents"]}


def _pages(hook: object) -> list[tuple[str, str]]:
    return [(q.json()["agent"], q.json()["status"]) for q in hook.requests]  # type: ignore[attr-defined]


@pytest.mark.slow
def test_a_child_is_held_while_its_parent_is_down_then_pages_on_its_own(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str, tmp_path: Path, agents: Agents
) -> None:
    """db dies and pages; web-1 dies: held, listed under db. db comes back (its resolve goes
    out); web-1 is still down one allowance later, so it pages, once. About 8 s."""
    with receiver() as hook:
        path = write_config(tmp_path / "pipeline.toml", prefix, redis_url, hook.url, DEPENDS)
        with pipeline_running(path, redis_url):
            agents.launch("db", "web-1")
            agents.kill("db")
            hook.wait_requests(1, timeout=15)
            agents.kill("web-1")
            wait_for(lambda: any(a.agent == "web-1" for a in alerts(r, keys, "firing")), timeout=15,
                     what="web-1's silence")  # fmt: skip
            wait_for(lambda: ("dependency", "web-1", "firing") in outcomes(r, keys), what="held")
            rows = _status(path)
            assert rows["db"]["dependents"] == ["web-1"] and rows["web-1"]["held_for"] == "db"
            assert _pages(hook) == [("db", "firing")]

            agents.launch("db")
            hook.wait_requests(2, timeout=15)
            parent_back = time.monotonic()
            (_, _, third) = hook.wait_requests(3, timeout=15)
            assert third.at - parent_back >= ALLOWANCE_S * 0.9  # a fresh allowance from db's recovery
            time.sleep(1.5)  # a second release would come within a tick or two
            assert _pages(hook) == [("db", "firing"), ("db", "resolved"), ("web-1", "firing")]
            assert _status(path)["web-1"]["held_for"] is None


@pytest.mark.slow
def test_a_child_that_died_with_its_parent_and_came_back_with_it_never_pages(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str, tmp_path: Path, agents: Agents
) -> None:
    """The host took both: whichever silence fires first, web-1 waits for db's verdict (db is
    overdue) and is held under it; both come back: the receiver hears of db only. About 6 s."""
    with receiver() as hook:
        path = write_config(tmp_path / "pipeline.toml", prefix, redis_url, hook.url, DEPENDS)
        with pipeline_running(path, redis_url):
            agents.launch("db", "web-1")
            agents.kill("db", "web-1")
            wait_for(lambda: len(alerts(r, keys, "firing")) == 2, timeout=15, what="both silences")
            hook.wait_requests(1, timeout=15)
            agents.launch("db", "web-1")
            wait_for(lambda: len(alerts(r, keys, "resolved")) == 2, timeout=15, what="both back")
            hook.wait_requests(2, timeout=15)
            time.sleep(ALLOWANCE_S + 1.5)  # past web-1's fresh allowance: nothing of it may follow
            assert _pages(hook) == [("db", "firing"), ("db", "resolved")]
    assert ("dependency", "web-1", "firing") in outcomes(r, keys)


@pytest.mark.parametrize(
    ("toml", "says"),
    [
        (
            '[detectors.silence.agents."web-*"]\ndepends_on = "db-*"\n'
            '[detectors.silence.agents."db-*"]\ndepends_on = "web-1"\n',
            "[detectors.silence.agents.\"web-*\"] depends_on: dependency cycle 'web-*' -> 'db-*' -> 'web-*'",
        ),
        (
            '[detectors.silence.agents."web-*"]\ndepends_on = "web-db"\n',
            "dependency cycle 'web-*' -> 'web-*'",
        ),
        (
            '[detectors.silence]\ndepends_on = "redis-main"\n',
            "[detectors.silence] depends_on: dependency cycle (the section) -> (the section)",
        ),
        ('[detectors.silence.agents."web-*"]\ndepends_on = "db;rm"\n', "is not an agent name or glob"),
    ],
)
def test_check_config_refuses_dependency_cycles_naming_them(tmp_path: Path, toml: str, says: str) -> None:
    path = tmp_path / "pipeline.toml"
    path.write_text(toml)
    result = CliRunner().invoke(app, ["check-config", str(path)])
    assert result.exit_code == 2 and says in result.output, result.output


def test_a_dependency_the_globs_keep_apart_is_accepted(tmp_path: Path) -> None:
    """Every agent needs redis-main, except redis-main itself: no cycle."""
    path = tmp_path / "pipeline.toml"
    path.write_text('[detectors.silence]\ndepends_on = "redis-main"\n'
                    '[detectors.silence.agents."redis-main"]\ndepends_on = ""\n')  # fmt: skip
    result = CliRunner().invoke(app, ["check-config", str(path)])
    assert result.exit_code == 0, result.output


def test_a_cron_agents_missed_run_is_held_under_its_parent_and_pages_after_its_grace(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    """A missed slot (detector ``schedule``) is a cron agent's silence: held while the parent is
    down, paged one ``grace`` after the parent recovered if the slot is still missed."""
    with receiver() as hook:
        base = pipeline_with(prefix, redis_url, [{"type": "webhook", "url": hook.url, "backoff": "50ms"}])
        silence = {"agents": {"cron-*": {"depends_on": "db", "schedule": "* * * * *", "grace": "300ms"}}}
        settings = base.settings.model_copy(update={"detectors": {"silence": silence}})
        with notifiers_only(Pipeline(settings=settings, source="test", notifiers=base.notifiers), redis_url):
            fire(r, keys, "db")
            hook.wait_requests(1)
            fire(r, keys, "cron-1", detector="schedule", details={"grace_s": 0.3})
            wait_for(lambda: ("dependency", "cron-1", "firing") in outcomes(r, keys), what="held")
            resolve(r, keys, "db")
            back = hook.wait_requests(2)[1].at
            third = hook.wait_requests(3)[2]
            assert third.json()["agent"] == "cron-1" and third.json()["detector"] == "schedule"
            assert third.at - back >= 0.3 * 0.9


def _held_pipeline(prefix: str, redis_url: str, url: str, **silence: object) -> Pipeline:
    """A notifier worker's pipeline: a JSON webhook and a Slack-format one at ``url``'s
    ``/slack``, reminders every second, ``web-*`` depending on ``db``."""
    notifiers = [{"type": "webhook", "url": url, "repeat": "1s", **FAST_DELIVERY},
                 {"type": "webhook", "name": "slack", "format": "slack", "url": f"{url}/slack",
                  "repeat": "1s", **FAST_DELIVERY}]  # fmt: skip
    base = pipeline_with(prefix, redis_url, notifiers)
    config = {"agents": {"web-*": {"depends_on": "db", **silence}}}
    settings = base.settings.model_copy(update={"detectors": {"silence": config}})
    return Pipeline(settings=settings, source="test", notifiers=base.notifiers)


def _json_pages(hook: Receiver) -> list[dict[str, Any]]:
    return [q.json() for q in hook.requests if not q.path.endswith("/slack")]


def _slack_pages(hook: Receiver) -> list[str]:
    return [str(q.json()["text"]) for q in hook.requests if q.path.endswith("/slack")]


def test_a_parents_alerts_list_the_dependents_held_for_it(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    """db pages; web-1 and web-2 go silent while it is down and are held. db's reminder names
    them (``details.held``, and a line in the Slack text), and so does its resolve. About 3 s."""
    with receiver() as hook, notifiers_only(_held_pipeline(prefix, redis_url, hook.url), redis_url):
        fire(r, keys, "db")
        wait_for(lambda: len(_json_pages(hook)) >= 1, what="db's page")
        assert "held" not in _json_pages(hook)[0]["details"]  # nothing held for it yet
        for child in ("web-1", "web-2"):
            fire(r, keys, child)
        children = [("dependency", "web-1", "firing"), ("dependency", "web-2", "firing")]
        wait_for(
            lambda: sum(o in children for o in outcomes(r, keys)) >= 4, what="both held at both notifiers"
        )

        def reminder_with_held() -> dict[str, Any] | None:
            return next((p for p in _json_pages(hook) if p["agent"] == "db" and p["details"].get("reminder")
                         and p["details"].get("held")), None)  # fmt: skip

        wait_for(lambda: reminder_with_held() is not None, timeout=10, what="a reminder of db listing web-*")
        held = reminder_with_held()["details"]["held"]  # type: ignore[index]
        assert sorted((h["agent"], h["detector"]) for h in held) == [
            ("web-1", "silence"),
            ("web-2", "silence"),
        ]
        assert all(h["since"].endswith("Z") for h in held)
        wait_for(lambda: any("holding the silence of 2 dependents: `web-1` (silence), `web-2` (silence)" in t
                             for t in _slack_pages(hook)), what="the Slack line")  # fmt: skip
        assert not any(p["agent"].startswith("web-") for p in _json_pages(hook))  # held, not paged

        resolve(r, keys, "db")
        wait_for(lambda: any(p["agent"] == "db" and p["status"] == "resolved" for p in _json_pages(hook)),
                 what="db's resolve")  # fmt: skip
        back = next(p for p in _json_pages(hook) if p["agent"] == "db" and p["status"] == "resolved")
        assert sorted(h["agent"] for h in back["details"]["held"]) == ["web-1", "web-2"]
        line = "held while it was down: 2 dependents"
        wait_for(lambda: any(t.startswith(":large_green_circle:") and line in t for t in _slack_pages(hook)),
                 what="the Slack resolve's line")  # fmt: skip


def test_a_parents_first_page_lists_a_dependent_held_in_the_same_batch(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    """The host took both: web-1's silence comes right after db's, in the batch the notifier
    reads first. db's first page already names web-1; web-1 is held, not paged."""
    fire(r, keys, "db")
    fire(r, keys, "web-1")  # both on the stream before the worker reads it (its group starts at 0)
    with receiver() as hook, notifiers_only(_held_pipeline(prefix, redis_url, hook.url), redis_url):
        wait_for(lambda: len(_json_pages(hook)) >= 1, what="db's page")
        first = _json_pages(hook)[0]
        assert (first["agent"], first["status"], first["details"].get("reminder")) == ("db", "firing", None)
        assert [(h["agent"], h["detector"]) for h in first["details"]["held"]] == [("web-1", "silence")]
        assert ("dependency", "web-1", "firing") in outcomes(r, keys)
        assert not any(p["agent"] == "web-1" for p in _json_pages(hook))


def test_a_held_dependents_reminders_are_held_too_then_its_firing_goes_once(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    """web-1's silence is held under db; its reminders (every second) are recorded as
    ``dependency``, not sent. db recovers; one allowance later web-1's own firing goes out,
    first and once (its reminders only follow it). About 4 s."""
    with receiver() as hook, notifiers_only(_held_pipeline(prefix, redis_url, hook.url), redis_url):
        fire(r, keys, "db")
        wait_for(lambda: len(_json_pages(hook)) >= 1, what="db's page")
        child = fire(r, keys, "web-1", details={"allowance_s": 0.3})

        def held_reminders() -> list[str]:
            rows = stream(r, keys.notify_log)
            return [
                f["id"]
                for f in rows
                if f["agent"] == "web-1" and f["outcome"] == "dependency" and "-r" in f["id"]
            ]

        wait_for(lambda: len(held_reminders()) >= 2, timeout=10, what="web-1's reminders held")
        assert all(i.startswith(f"{child.id}-r") for i in held_reminders())
        assert not any(p["agent"] == "web-1" for p in _json_pages(hook))

        resolve(r, keys, "db")
        wait_for(lambda: any(p["agent"] == "web-1" for p in _json_pages(hook)), what="web-1's page")
        time.sleep(1.5)  # a reminder comes at most a second after the firing; a second firing would too
        web = [p for p in _json_pages(hook) if p["agent"] == "web-1"]
        assert web[0]["id"] == child.id and "reminder" not in web[0]["details"]  # the firing, first
        assert [p["id"] for p in web].count(child.id) == 1
        assert all(p["details"].get("reminder") for p in web[1:])


def test_held_dependents_are_escaped_in_each_text_format() -> None:
    """``details.held`` names come from the dependents record: hostile text stays literal (no
    Slack mention or link, no terminal escape), and past ten names the rest are counted."""
    held = [{"agent": "<!channel>", "detector": "silence"}, {"agent": "x`y\x1b[2J", "detector": "<b>"}]
    held += [{"agent": f"web-{n}", "detector": "silence"} for n in range(10)]
    alert = Alert(id="a1", agent="db", detector="silence", status="firing", severity="critical",
                  summary="db: silent", dedup_key="db/silence", at="2026-01-01T00:00:00.000Z",
                  details={"held": held, "held_more": 3})  # fmt: skip
    slack = slack_text(alert)
    assert (
        "holding the silence of 15 dependents: `&lt;!channel&gt;` (silence), `x'y\\x1b[2J` (&lt;b&gt;)"
        in slack
    )
    assert slack.rstrip().endswith("`web-7` (silence) and 5 more")
    plain = plain_text(alert)
    assert "holding the silence of 15 dependents: <!channel> (silence), x`y\\x1b[2J (<b>)" in plain
    assert "\x1b" not in plain and "\x1b" not in slack


@pytest.mark.parametrize(
    ("glob", "parent"),
    [("db-*", "db-2"), ("db-[2]", "db-2"), ("db-?", "db-2"), ("d*2", "db-2"), ("cache", None)],
)
def test_a_down_parent_is_found_by_its_glob_among_many_open_incidents(
    r: redis.Redis, keys: Keys, prefix: str, glob: str, parent: str | None
) -> None:
    """Redis narrows the open incidents to the glob's agents (HSCAN MATCH), fnmatch decides: a
    bracket glob reads every key; an agent with only a ``tokens`` incident is not down; many other
    open incidents change nothing."""
    for n in range(300):
        fire(r, keys, f"web-{n}")
    fire(r, keys, "db-1", detector="tokens")  # up, just expensive
    fire(r, keys, "db-2", detector="exit")
    fire(r, keys, "dbx", detector="silence")
    silence = {"agents": {"web-*": {"depends_on": glob}}}
    settings = settings_for(prefix).model_copy(update={"detectors": {"silence": silence}})
    holds = for_pipeline(r, keys, settings, [])
    child = fire(r, keys, "web-child")
    hold = holds.view(now_ms(r)).why(child)
    if parent is None:
        assert hold is None
    else:
        assert hold is not None and hold.kind == "dependency" and f"{parent!r} ({glob})" in hold.detail


@pytest.mark.parametrize(("detector", "held"), [("lag", True), ("trimmed", True), ("tokens", False)])
def test_the_pipelines_own_outage_holds_every_dependent_among_many_open_incidents(
    r: redis.Redis, keys: Keys, prefix: str, detector: str, held: bool
) -> None:
    """An open ``lag`` or ``trimmed`` incident of the pipeline (agent ``agentwatch``: its Redis
    or its workers were away) holds a dependent's silence even with no parent down; another
    incident of the pipeline does not. Its incidents are read by name, among many open ones."""
    for n in range(300):
        fire(r, keys, f"web-{n}")
    fire(r, keys, "agentwatch", detector=detector)
    silence = {"agents": {"web-*": {"depends_on": "db-*"}}}
    settings = settings_for(prefix).model_copy(update={"detectors": {"silence": silence}})
    holds = for_pipeline(r, keys, settings, [])
    hold = holds.view(now_ms(r)).why(fire(r, keys, "web-child"))
    if held:
        assert hold is not None and hold.kind == "dependency" and "'agentwatch'" in hold.detail
    else:
        assert hold is None
