"""A receiver that is down shows everywhere a user looks, from its first failed attempt.

Real notifier workers deliver to a port nothing listens on and to a real HTTP server answering
500; ``alerts``, ``alerts --failed``, ``status``, ``status --json`` and the dashboard's alerts
page are read through the real CLI and app while the deliveries wait for their next attempt.
The terminal views are read at 80 columns through a pipe (CliRunner), where a user finds them
least readable.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest
import redis
from typer.testing import CliRunner

from agentwatch.cli import app
from agentwatch.keys import Keys

from helpers import wait_for
from notify_kit import FAST_DELIVERY, Reply, fire, notifier_running, pipeline_with, receiver, stream

SUMMARY = "doomed-bot: no heartbeat for 2m [/etc] \x1b[2J\nforged line"
"""Hostile text: rich markup, a clear-screen escape and a line break of its own."""


@pytest.fixture
def cli(tmp_path: Path, redis_url: str, prefix: str) -> Any:
    config = tmp_path / "pipeline.toml"
    config.write_text(f'[redis]\nurl = "{redis_url}"\nprefix = "{prefix}"\n')
    runner = CliRunner()

    def run(*args: str, width: int = 80) -> str:
        result = runner.invoke(app, [*args, "--config", str(config)], env={"COLUMNS": str(width)})
        assert result.exit_code == 0, result.output
        return result.output

    return run


def closed_port() -> int:
    """A port on 127.0.0.1 that refuses connections (it was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def fits(output: str, width: int) -> list[str]:
    """Lines wider than ``width``, but for the causes: indented lines, which may run."""
    return [line for line in output.splitlines() if len(line) > width and not line.startswith("    ")]


def test_a_dead_and_a_failing_webhook_show_as_retrying_everywhere(
    cli: Any, r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    slow = {**FAST_DELIVERY, "backoff": "60s", "backoff_max": "60s"}  # one attempt, then the views
    with receiver() as broken:
        broken.default = Reply(500, b"receiver exploded")
        entries = [
            {"type": "webhook", "name": "dead", "url": f"http://127.0.0.1:{closed_port()}/hook", **slow},
            {"type": "webhook", "name": "broken", "url": broken.url, **slow},
        ]
        pipeline = pipeline_with(prefix, redis_url, entries)
        with notifier_running(pipeline, redis_url):
            alert = fire(r, keys, "doomed-bot", summary=SUMMARY)

            def both_failed_once() -> bool:
                return all(r.zscore(keys.notifier_retrying(n), alert.id) for n in ("dead", "broken"))

            wait_for(both_failed_once, timeout=20, what="a failed first attempt at each receiver")
            table = cli("alerts")
            failed = cli("alerts", "--failed")
            rows = [json.loads(line) for line in cli("alerts", "--failed", "--json").splitlines()]
            board = cli("status")
            document = json.loads(cli("status", "--json"))
            from starlette.testclient import TestClient  # noqa: PLC0415

            from agentwatch.http.app import create_app  # noqa: PLC0415

            with TestClient(create_app(pipeline, redis_url)) as http:
                page = http.get("/alerts").text
                scrape = http.get("/metrics").text
    assert len(broken.requests) == 1  # the views were read before any retry

    # alerts: what each notifier is doing, with the last error; the summary literal, whole
    text = " ".join(table.split())
    assert "dead: retrying (1, ConnectError:" in text and "Connection refused" in text
    assert "broken: retrying (1, HTTP 500)" in text
    assert "    doomed-bot: no heartbeat for 2m [/etc] \\x1b[2J\\nforged line" in table.splitlines()
    assert fits(table, 80) == [] and "\x1b" not in table
    alert_lines = [line for line in table.splitlines() if "doomed-bot" in line]
    assert len(table.splitlines()) <= 7, table  # title, header, the alert, notifiers, the summary

    # alerts --failed: both, still retrying, with the reason and the receiver's status
    assert {(row["notifier"], row["state"], row["http_status"]) for row in rows} == {
        ("dead", "retrying", None), ("broken", "retrying", 500),
    }  # fmt: skip
    assert all(row["id"] == row["alert"]["id"] == alert.id and row["attempts"] == 1 for row in rows)
    assert "Connection refused" in next(row["reason"] for row in rows if row["notifier"] == "dead")
    assert "2 deliveries in trouble: 2 retrying, 0 failed" in failed and "Connection refused" in failed
    assert fits(failed, 80) == []

    # status: a line per failing notifier, naming it and its last error
    assert fits(board, 80) == [], board
    flat = " ".join(board.split())
    assert re.search(
        r"deliveries: 1 failing at dead \(1 retrying\); last error [\w.]+ ago \(attempt 1\): Conn", flat
    )
    assert re.search(
        r"deliveries: 1 failing at broken \(1 retrying\); last error .* ago \(attempt 1\): HTTP 500 deliv",
        flat,
    )
    deliveries = {d["notifier"]: d for d in document["pipeline"]["deliveries"]}
    assert deliveries["broken"] | {"last_error_at": "-", "last_error_age_s": 0} == {
        "notifier": "broken", "retrying": 1, "failed_24h": 0, "last_error": "HTTP 500", "last_status": 500,
        "last_error_at": "-", "last_error_age_s": 0, "last_attempts": 1, "last_alert": alert.id,
        "last_state": "retrying",
    }  # fmt: skip
    assert "Connection refused" in deliveries["dead"]["last_error"]

    # the dashboard: the retry in the alert's row and the notifiers being retried
    assert "dead: retrying (1 attempt)" in page and "broken: retrying (1 attempt) (HTTP 500)" in page
    assert "Deliveries being retried" in page and "Connection refused" in page
    assert 'agentwatch_deliveries_retrying{notifier="dead"} 1.0' in scrape.splitlines()
    assert 'agentwatch_deliveries_retrying{notifier="broken"} 1.0' in scrape.splitlines()
    assert alert_lines


def test_retrying_ends_when_a_retry_goes_through_or_the_last_one_fails(
    cli: Any, r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    with receiver() as flaky, receiver() as hopeless:
        flaky.reply(Reply(503, b"try later"))  # then 200
        hopeless.default = Reply(500, b"receiver exploded")
        entries = [
            {"type": "webhook", "name": "flaky", "url": flaky.url, **FAST_DELIVERY},
            {"type": "webhook", "name": "hopeless", "url": hopeless.url, "max_attempts": 2, **FAST_DELIVERY},
        ]
        with notifier_running(pipeline_with(prefix, redis_url, entries), redis_url):
            alert = fire(r, keys, "lucky-bot")
            wait_for(lambda: len(stream(r, keys.notify_log)) == 2, timeout=20, what="both final outcomes")
    assert r.zcard(keys.notifier_retrying("flaky")) == 0 and r.zcard(keys.notifier_retrying("hopeless")) == 0
    table = " ".join(cli("alerts").split())
    assert "flaky: ok" in table and "hopeless: FAILED (HTTP 500)" in table and "retrying" not in table
    (row,) = [json.loads(line) for line in cli("alerts", "--failed", "--json").splitlines()]
    assert (row["notifier"], row["state"], row["id"], row["attempts"]) == ("hopeless", "failed", alert.id, 2)
    (entry,) = json.loads(cli("status", "--json"))["pipeline"]["deliveries"]
    assert (entry["notifier"], entry["retrying"], entry["failed_24h"], entry["last_state"]) == (
        "hopeless", 0, 1, "failed",
    )  # fmt: skip
    assert "deliveries: 1 failing at hopeless (1 failed in 24h)" in " ".join(cli("status").split())


def test_alerts_take_two_lines_each_at_80_columns_and_keep_long_causes_whole(
    cli: Any, r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    cause = "crashed with RuntimeError: " + "the upstream API kept answering 503; " * 8
    with receiver() as hook:
        entry = {"type": "webhook", "url": hook.url, **FAST_DELIVERY}
        with notifier_running(pipeline_with(prefix, redis_url, [entry]), redis_url):
            fire(r, keys, "scraper-7", "exit", summary=f"scraper-7: {cause}")
            fire(r, keys, "indexer", "stall", severity="warning")
            fire(r, keys, "mailer")
            wait_for(lambda: len(stream(r, keys.notify_log)) == 3, timeout=20, what="three deliveries")
    narrow = cli("alerts").splitlines()
    assert narrow[1].split() == ["when", "status", "agent", "detector", "notified"]
    assert len(narrow) == 2 + 2 * 3  # title, header, then two lines per alert
    heads, summaries = narrow[2::2], narrow[3::2]
    assert [h.split()[3:] for h in heads] == [["scraper-7", "exit", "webhook:", "ok"],
                                              ["indexer", "stall", "webhook:", "ok"],
                                              ["mailer", "silence", "webhook:", "ok"]]  # fmt: skip
    assert summaries[0] == f"    scraper-7: {cause}"  # whole, on one line of its own, however long
    assert fits("\n".join(narrow), 80) == []
    wide = cli("alerts", width=120).splitlines()
    assert wide[1].split() == ["when", "status", "severity", "agent", "detector", "notified"]
    assert wide[4].split()[3:5] == ["warning", "indexer"]
