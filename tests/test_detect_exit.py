"""Exit: a run ending without shutdown() alerts at once, names how it ended, and resolves when the
agent starts again; shutdown() retires quietly; an exit applied after the restart still tells."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from agents_detect.kit import Agent, Feed, alerts, fired, pipeline_for, resolved, transitions, worker_for

from agentwatch.keys import Keys
from detectors.agent import read_agents

from helpers import running, wait_for


@pytest.mark.parametrize(
    ("reason", "code", "fields", "summary", "severity"),
    [
        ("exception", 1, {"error": "ValueError: bad row 7", "traceback": "Traceback...\nValueError"},
         "bot: crashed with ValueError: bad row 7", "critical"),
        ("signal", 143, {"error": "SIGTERM"}, "bot: killed by SIGTERM", "critical"),
        ("signal", 137, {}, "bot: killed by SIGKILL", "critical"),
        ("exit", 3, {}, "bot: exited with code 3", "critical"),
        ("exit", 0, {}, "bot: exited with code 0 without shutdown()", "warning"),
        # the producer could not know the code: unknown, never 0 (and so never the clean case)
        ("exit", None, {}, "bot: exited without shutdown(), exit code unknown", "critical"),
        ("signal", None, {}, "bot: killed by a signal", "critical"),
    ],
)  # fmt: skip
def test_an_exit_alerts_at_once_and_says_how(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys,
    reason: str, code: int | None, fields: dict[str, str], summary: str, severity: str,
) -> None:  # fmt: skip
    worker = worker_for(pipeline_for(prefix, redis_url), redis_url)
    feed = Feed(worker)
    feed.apply([feed.event("bot", "start"), feed.event("bot", "beat")])
    known = {} if code is None else {"code": code}
    feed.apply([feed.event("bot", "exit", reason=reason, **known, **fields)])
    (alert,) = alerts(r, keys)
    assert (alert.detector, alert.status, alert.summary, alert.severity) == (
        "exit",
        "firing",
        summary,
        severity,
    )
    assert alert.details["reason"] == reason and alert.details["code"] == code
    if "traceback" in fields:
        assert alert.details["traceback"] == fields["traceback"]
    feed.apply([feed.event("bot", "start", run="run-2")])
    assert transitions(r, keys) == [("bot", "exit", "firing"), ("bot", "exit", "resolved")]
    assert resolved(r, keys, "exit")[0].summary == "bot: started again"
    worker.client.close()


@pytest.fixture
def live(redis_url: str, prefix: str) -> Iterator[tuple[Agent, Keys]]:
    pipeline = pipeline_for(prefix, redis_url, silence={"after": "400ms"}, exit={"clean_exit": False})
    worker = worker_for(pipeline, redis_url)
    with running(worker):
        yield Agent(worker.client, pipeline.keys, "bot"), pipeline.keys


def test_no_silence_follows_an_exit_alert(live: tuple[Agent, Keys], r: redis.Redis) -> None:
    bot, keys = live
    bot.start()
    bot.exit("exception", 1, error="RuntimeError: out of retries")
    wait_for(lambda: fired(r, keys, "exit"), timeout=5, what="exit alert")
    wait_for(lambda: read_agents(r, keys).get("bot", {}).get("exited"), timeout=10, what="no longer expected")
    bot.start(run="run-2")
    bot.beat()
    wait_for(lambda: fired(r, keys, "silence"), timeout=5, what="silence of the new run")
    assert transitions(r, keys) == [
        ("bot", "exit", "firing"), ("bot", "exit", "resolved"), ("bot", "silence", "firing"),
    ]  # fmt: skip


def test_a_clean_exit_can_be_quiet(live: tuple[Agent, Keys], r: redis.Redis) -> None:
    bot, keys = live
    bot.start()
    bot.exit("exit", 0)
    bot2 = Agent(r, keys, "other")
    bot2.start()
    wait_for(lambda: fired(r, keys, "silence"), timeout=5, what="the other agent's silence")
    assert transitions(r, keys) == [("other", "silence", "firing")]


def test_an_exit_applied_after_the_restart_fires_and_resolves(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    worker = worker_for(pipeline_for(prefix, redis_url), redis_url)
    feed = Feed(worker)
    feed.apply([feed.event("bot", "start"), feed.event("bot", "beat")])
    restart = [feed.event("bot", "start", run="run-2"), feed.event("bot", "beat", run="run-2")]
    # the dying process wrote its exit after its successor had started (a slow teardown)
    crash = [feed.event("bot", "exit", run="run-1", reason="exception", code=1, error="OSError: disk full")]
    feed.apply(restart)
    feed.apply(crash)
    feed.apply(list(crash))  # and it is delivered once more (a replay after a takeover)
    assert transitions(r, keys) == [("bot", "exit", "firing"), ("bot", "exit", "resolved")]
    assert fired(r, keys, "exit")[0].summary == "bot: crashed with OSError: disk full"
    assert "processed after the restart" in resolved(r, keys, "exit")[0].summary
    worker.client.close()
