"""``agentwatch alerts``, ``mute``, ``unmute`` and ``mutes`` against a real Redis."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis
from typer.testing import CliRunner

from agentwatch import plugins
from agentwatch.alerts import Alert
from agentwatch.cli import app
from agentwatch.keys import Keys
from notifiers.routing import Mutes, known_detectors, unknown_detectors

from helpers import wait_for
from notify_kit import (
    FAST_DELIVERY,
    Reply,
    fire,
    notifier_running,
    now_ms,
    pipeline_with,
    receiver,
    resolve,
    stream,
)


@pytest.fixture
def cli(tmp_path: Path, redis_url: str, prefix: str) -> Any:
    config = tmp_path / "pipeline.toml"
    config.write_text(f'[redis]\nurl = "{redis_url}"\nprefix = "{prefix}"\n')
    runner = CliRunner()

    def run(*args: str, code: int = 0) -> str:
        result = runner.invoke(app, [*args, "--config", str(config)], env={"COLUMNS": "250"})
        assert result.exit_code == code, result.output
        return result.output

    return run


def lines(output: str) -> list[Any]:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def test_alerts_json_since_agent_and_firing(cli: Any, r: redis.Redis, keys: Keys) -> None:
    a1 = fire(r, keys, "a-1")
    fire(r, keys, "a-2")
    b1 = fire(r, keys, "b-1", "stall", severity="warning")
    resolve(r, keys, "a-2")
    old_until = now_ms(r)
    everything = lines(cli("alerts", "--json"))
    assert [(x["agent"], x["status"]) for x in everything] == [
        ("a-1", "firing"), ("a-2", "firing"), ("b-1", "firing"), ("a-2", "resolved"),
    ]  # fmt: skip
    assert set(everything[0]) == set(Alert.__dataclass_fields__)  # exactly SPEC section 5
    assert [x["agent"] for x in lines(cli("alerts", "--json", "--agent", "a-*"))] == ["a-1", "a-2", "a-2"]
    assert [x["id"] for x in lines(cli("alerts", "--json", "--firing"))] == [a1.id, b1.id]
    assert lines(cli("alerts", "--json", "--limit", "1")) == [everything[-1]]
    # The window is Redis time: once it has passed since the last of those (+1 s for any entry-id
    # lag), a window holds only what is new. 2 s: the command's own start on a loaded box.
    wait_for(lambda: now_ms(r) > old_until + 2000 + 1000, timeout=10, what="time to pass")
    late = fire(r, keys, "c-1")
    assert [x["id"] for x in lines(cli("alerts", "--json", "--since", "2s"))] == [late.id]
    cli("alerts", "--since", "yesterday", code=2)


def test_alerts_table_shows_what_each_notifier_did_and_failed_lists_dead_letters(
    cli: Any, r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    with receiver() as good, receiver() as bad:
        bad.default = Reply(410, b"gone for good")
        entries = [
            {"type": "webhook", "name": "good", "url": good.url, **FAST_DELIVERY},
            {"type": "webhook", "name": "bad", "url": bad.url, **FAST_DELIVERY},
        ]
        with notifier_running(pipeline_with(prefix, redis_url, entries), redis_url):
            alert = fire(r, keys, "table-bot")
            wait_for(lambda: len(stream(r, keys.notify_log)) == 2, what="both outcomes")
    table = cli("alerts")
    assert "table-bot" in table and "good: ok" in table and "bad: FAILED (HTTP 410)" in table
    (row,) = lines(cli("alerts", "--failed", "--json"))
    assert row["notifier"] == "bad" and row["http_status"] == 410 and row["body"] == "gone for good"
    assert row["state"] == "failed"
    assert row["alert"]["id"] == alert.id and row["attempts"] == 1
    assert "gone for good" in cli("alerts", "--failed")
    assert lines(cli("alerts", "--failed", "--json", "--agent", "other-*")) == []


def test_mute_holds_back_delivery_until_unmuted_or_expired(
    cli: Any, r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    assert "muted alerts of 'noisy-*' for 1h" in cli("mute", "noisy-*", "--for", "1h", "--reason", "deploy")
    # 3 s: long enough to outlive the next command's start on a loaded box (300 ms did not).
    cli("mute", "calm", "--for", "3s", "--detector", "silence")
    (listed, short) = sorted(lines(cli("mutes", "--json")), key=lambda m: m["agent"], reverse=True)
    assert listed["agent"] == "noisy-*" and listed["detector"] is None and listed["reason"] == "deploy"
    assert short["detector"] == "silence"
    with receiver() as hook:
        entry = {"type": "webhook", "url": hook.url, **FAST_DELIVERY}
        with notifier_running(pipeline_with(prefix, redis_url, [entry]), redis_url):
            muted = fire(r, keys, "noisy-3")
            other = fire(r, keys, "calm", "stall")  # another detector: not muted
            wait_for(lambda: len(stream(r, keys.notify_log)) == 2, what="two outcomes")
            outcomes = {e["id"]: e["outcome"] for e in stream(r, keys.notify_log)}
            assert outcomes == {muted.id: "muted", other.id: "delivered"}
            assert "noisy-*" in next(e["detail"] for e in stream(r, keys.notify_log) if e["id"] == muted.id)
            # The short mute expires by itself; the long one goes when unmuted.
            wait_for(lambda: len(Mutes(r, keys).active()) == 1, what="the 3s mute to expire")
            assert [q.headers["webhook-id"] for q in hook.requests] == [other.id]
            assert "unmuted 'noisy-*'" in cli("unmute", "noisy-*")
            assert cli("mutes") == "no mutes in force\n"
            later = [fire(r, keys, "calm"), fire(r, keys, "noisy-4")]
            # noisy-3 is still firing: delivered now that its mute is lifted (Alertmanager does so).
            hook.wait_requests(4)
            wait_for(lambda: len(stream(r, keys.notify_log)) == 5, what="every outcome")
    ids = [q.headers["webhook-id"] for q in hook.requests]
    assert ids[0] == other.id and sorted(ids[1:]) == sorted([muted.id] + [a.id for a in later])
    assert [e["outcome"] for e in stream(r, keys.notify_log) if e["id"] == muted.id] == ["muted", "delivered"]
    assert "webhook: muted, webhook: ok" in cli("alerts")


def test_cli_usage_errors_exit_2(cli: Any) -> None:
    cli("unmute", code=2)
    cli("mute", "x", "--for", "soon", code=2)
    cli("mute", "x", "--for", "0s", code=2)
    cli("unmute", "never-muted", code=1)


def test_mute_refuses_a_misspelt_detector_and_accepts_every_real_one(
    cli: Any, r: redis.Redis, keys: Keys, tmp_path: Path, redis_url: str, prefix: str
) -> None:
    """A typo would mute nothing, silently; the names the pipeline really alerts under pass."""
    runner = CliRunner()
    config = tmp_path / "plugin.toml"
    config.write_text(f'[redis]\nurl = "{redis_url}"\nprefix = "{prefix}"\n'
                      '[detectors.limits]\nclass = "sample_plugins:Threshold"\n')  # fmt: skip
    result = runner.invoke(
        app, ["mute", "typo", "--for", "1h", "--detector", "stal", "--config", str(config)]
    )
    assert (
        result.exit_code == 2
        and "--detector: unknown detector 'stal' (did you mean 'stall'?)" in result.output
    )
    assert "limits" in result.output and "restart_loop" in result.output  # the known names are listed
    assert Mutes(r, keys).active() == []
    for name in ("stall", "loop", "restart_loop", "lag", "limits"):  # built-in, alert-only, plugin
        done = runner.invoke(app, ["mute", "bot", "--for", "1h", "-d", name, "--config", str(config)])
        assert done.exit_code == 0, done.output
    assert sorted(m.detector or "" for m in Mutes(r, keys).active()) == [
        "lag",
        "limits",
        "loop",
        "restart_loop",
        "stall",
    ]
    cli("mute", "bot", "--for", "1h", "--detector", "silense", code=2)  # without plugins too


def test_notifier_entries_name_the_detectors_they_filter_on() -> None:
    """What the pipeline checks against its detectors (``referenced_detectors``)."""
    loaded, problems = plugins.load_notifiers(
        [
            {"type": "webhook", "url": "http://x", "match": {"detectors": ["silense", "stall"]}},
            {"type": "restart", "command": ["x"], "on": ["stal"], "match": {"detectors": ["exit"]}},
            {"type": "webhook", "name": "all", "url": "http://x"},
        ]
    )
    assert not problems, problems
    referenced = [plugin.config.referenced_detectors() for plugin in loaded]
    assert referenced == [{"silense", "stall"}, {"stal", "exit"}, set()]
    known = known_detectors({})
    assert unknown_detectors(sorted(referenced[0] | referenced[1]), known) == [
        f"unknown detector {name!r} (did you mean {fix!r}?); known: {', '.join(sorted(known))}"
        for name, fix in sorted([("silense", "silence"), ("stal", "stall")])
    ]
