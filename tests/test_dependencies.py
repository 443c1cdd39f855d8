"""Dependencies (``depends_on``): while an agent a silent agent depends on is down, the silence is
held and listed under the parent instead of paging; when the parent recovers and the child is
still silent one allowance later, it pages on its own; a child that died with its parent and came
back with it never pages. Cycles are refused at start-up. Real detector and notifier workers,
real agent processes, a real HTTP receiver."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner

from agentwatch.cli import app
from agentwatch.config import Pipeline
from agentwatch.keys import Keys

from fleet_kit import Agents, alerts, outcomes, pipeline_running, write_config
from helpers import wait_for
from notify_kit import fire, pipeline_with, receiver, resolve
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
