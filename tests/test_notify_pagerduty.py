"""The PagerDuty notifier against a receiver that checks the Events API v2 schema."""

from __future__ import annotations

import json
import time
from datetime import datetime
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
import redis

from agentwatch import plugins
from agentwatch.alerts import Alert
from agentwatch.keys import Keys
from notifiers.http import retry_after_s
from notifiers.pagerduty import DEDUP_MAX, SUMMARY_MAX, PagerDutyConfig, dedup_key, event

from helpers import wait_for
from notify_kit import (
    FAST_DELIVERY,
    Reply,
    Request,
    fire,
    notifier_running,
    pipeline_with,
    receiver,
    resolve,
    stream,
)

ROUTING_KEY = "R0123456789abcdef0123456789abcde"
SEVERITIES = {"critical", "error", "warning", "info"}


def check_v2(request: Request) -> str | None:
    """What PagerDuty's /v2/enqueue validates; a problem string makes the receiver answer 400."""
    try:
        body = request.json()
    except ValueError:
        return "body is not JSON"
    if request.path != "/v2/enqueue":
        return f"wrong path {request.path}"
    if request.headers.get("content-type") != "application/json":
        return "content-type must be application/json"
    if body.get("routing_key") != ROUTING_KEY:
        return "routing_key"
    if body.get("event_action") not in ("trigger", "acknowledge", "resolve"):
        return "event_action"
    key = body.get("dedup_key")
    if not isinstance(key, str) or not 0 < len(key) <= DEDUP_MAX:
        return "dedup_key"
    if body["event_action"] == "trigger":
        payload = body.get("payload") or {}
        if not isinstance(payload.get("summary"), str) or not 0 < len(payload["summary"]) <= SUMMARY_MAX:
            return "payload.summary"
        if not payload.get("source"):
            return "payload.source"
        if payload.get("severity") not in SEVERITIES:
            return "payload.severity"
        try:
            datetime.fromisoformat(payload["timestamp"].replace("Z", "+00:00"))
        except (KeyError, ValueError):
            return "payload.timestamp"
        if not isinstance(payload.get("custom_details", {}), dict):
            return "payload.custom_details"
    return None


def pagerduty(url: str, **extra: Any) -> dict[str, Any]:
    return {"type": "pagerduty", "routing_key": ROUTING_KEY, "url": url, **FAST_DELIVERY, **extra}


def pd_receiver() -> Any:
    server = receiver(check_v2)
    return server


def test_trigger_then_resolve_with_the_same_dedup_key(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    with pd_receiver() as pd:
        pd.default = Reply(202, b'{"status":"success","message":"Event processed","dedup_key":"x"}')
        url = pd.url.replace("/hook", "/v2/enqueue")
        with notifier_running(pipeline_with(prefix, redis_url, [pagerduty(url)]), redis_url):
            fired = fire(r, keys, "scraper-7", "stall", severity="error", summary="stuck in recv",
                         details={"stack": "socket.recv", "tokens_per_min": 200})  # fmt: skip
            resolve(r, keys, "scraper-7", "stall")
            pd.wait_requests(2)
            wait_for(lambda: len(stream(r, keys.notify_log)) == 2, what="both delivered")
    assert pd.errors == []
    trigger, resolved = pd.bodies()
    assert trigger["event_action"] == "trigger" and resolved["event_action"] == "resolve"
    assert trigger["dedup_key"] == resolved["dedup_key"] == "scraper-7/stall"
    assert trigger["payload"] == {
        "summary": "stuck in recv", "source": "scraper-7", "severity": "error", "timestamp": fired.at,
        "component": "stall", "custom_details": {"stack": "socket.recv", "tokens_per_min": 200},
    }  # fmt: skip
    assert "payload" not in resolved


def test_429_with_retry_after_is_honoured(r: redis.Redis, keys: Keys, prefix: str, redis_url: str) -> None:
    with pd_receiver() as pd:
        pd.reply(Reply(429, b'{"status":"throttle event"}', {"Retry-After": "1"}))
        pd.default = Reply(202)
        url = pd.url.replace("/hook", "/v2/enqueue")
        # One thread, so no second request is already in flight when the 429 comes back.
        with notifier_running(pipeline_with(prefix, redis_url, [pagerduty(url, concurrency=1)]), redis_url):
            fire(r, keys, "a")
            fire(r, keys, "b")  # the pause holds back every delivery, not just the refused one
            first, *later = pd.wait_requests(3)
            wait_for(lambda: len(stream(r, keys.notify_log)) == 2, what="both delivered")
    assert pd.errors == []
    assert all(request.at - first.at >= 1.0 for request in later), [q.at - first.at for q in later]
    assert later[0].at - first.at < 3.0  # and not much longer than Retry-After


def test_429_with_retry_after_as_an_http_date_is_honoured(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    """RFC 9110 allows ``Retry-After: <HTTP-date>``; it has one-second resolution, so a date
    2 s ahead of the answer means a wait of 1-2 s after it (never the 50 ms backoff)."""
    with pd_receiver() as pd:
        # The date is made when the 429 is sent: the notifier's start-up, slow on a loaded
        # machine, must not eat into the wait.
        in_2s = lambda: {"Retry-After": formatdate(time.time() + 2, usegmt=True)}  # noqa: E731
        pd.reply(Reply(429, b'{"status":"throttle event"}', in_2s))
        pd.default = Reply(202)
        url = pd.url.replace("/hook", "/v2/enqueue")
        with notifier_running(pipeline_with(prefix, redis_url, [pagerduty(url)]), redis_url):
            fire(r, keys)
            first, second = pd.wait_requests(2)
            wait_for(lambda: stream(r, keys.notify_log), what="the delivered record")
    assert 0.9 <= second.at - first.at < 3.0, second.at - first.at
    assert stream(r, keys.notify_log)[0]["attempts"] == "2"


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert retry_after_s("120") == 120.0 and retry_after_s(" 0 ") == 0.0
    ahead = retry_after_s(formatdate(time.time() + 60, usegmt=True))
    assert ahead is not None and 58 <= ahead <= 60
    assert retry_after_s("Sun, 06 Nov 1994 08:49:37 GMT") == 0.0  # past: at once
    assert retry_after_s("soon") is None and retry_after_s("") is None and retry_after_s(None) is None


def test_500_three_times_then_202_is_delivered_exactly_once(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    with pd_receiver() as pd:
        pd.reply(Reply(500), Reply(502), Reply(500), Reply(202))
        url = pd.url.replace("/hook", "/v2/enqueue")
        with notifier_running(pipeline_with(prefix, redis_url, [pagerduty(url)]), redis_url):
            fire(r, keys)
            pd.wait_requests(4)
            wait_for(lambda: stream(r, keys.notify_log), what="the delivered record")
            # Nothing is left that could send it again: the job is gone, not waiting for a retry.
            assert r.hlen(keys.notifier_jobs("pagerduty")) == 0
            assert r.zcard(keys.notifier_queue("pagerduty")) == 0
    assert len(pd.requests) == 4
    (record,) = stream(r, keys.notify_log)
    assert (record["outcome"], record["attempts"], record["http_status"]) == ("delivered", "4", "202")
    assert r.hget(keys.notify_stats, "pagerduty:retried") == b"3"


def test_400_is_dead_lettered_and_never_retried(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    answer = json.dumps({"status": "invalid event", "message": "Event object is invalid",
                         "errors": ["Length of 'routing_key' is incorrect"]}).encode()  # fmt: skip
    with pd_receiver() as pd:
        pd.default = Reply(400, answer)
        url = pd.url.replace("/hook", "/v2/enqueue")
        with notifier_running(pipeline_with(prefix, redis_url, [pagerduty(url)]), redis_url):
            alert = fire(r, keys)
            wait_for(lambda: r.xlen(keys.notify_failed), what="the dead letter")
            # Dead-lettered first, then forgotten (a crash in between repeats it, never loses it).
            wait_for(lambda: r.hlen(keys.notifier_jobs("pagerduty")) == 0, what="the job forgotten")
    assert len(pd.requests) == 1
    (failed,) = stream(r, keys.notify_failed)
    assert failed["http_status"] == "400" and failed["attempts"] == "1" and failed["id"] == alert.id
    assert "routing_key" in failed["body"] and "rejected" in failed["reason"]


def test_rate_limit_spreads_a_burst_over_time(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    with pd_receiver() as pd:
        pd.default = Reply(202)
        url = pd.url.replace("/hook", "/v2/enqueue")
        entry = pagerduty(url, rate_limit="10/s", burst=2, concurrency=4)
        with notifier_running(pipeline_with(prefix, redis_url, [entry]), redis_url):
            for i in range(8):
                fire(r, keys, f"bot-{i}")
            requests = pd.wait_requests(8)
    # 2 at once from the burst, then one per 100 ms: the last no sooner than 0.6 s after the first
    assert requests[-1].at - requests[0].at >= 0.55
    assert requests[1].at - requests[0].at < 0.3  # the burst: no wait for a token


def test_long_keys_and_summaries_are_cut_to_pagerduty_limits() -> None:
    long_key = "a" * 300 + "/silence"
    key = dedup_key(long_key)
    assert len(key) == DEDUP_MAX and key == dedup_key(long_key) and key != dedup_key("b" * 300 + "/silence")
    assert dedup_key("short/silence") == "short/silence"
    alert = Alert(
        "id", "bot", "silence", "firing", "critical", "x" * 5000, long_key, "2026-01-01T00:00:00.000Z"
    )
    config = PagerDutyConfig.model_validate({"type": "pagerduty", "routing_key": ROUTING_KEY})
    body = event(alert, config)
    assert len(body["payload"]["summary"]) == SUMMARY_MAX and len(body["dedup_key"]) == DEDUP_MAX
    assert config.url == "https://events.pagerduty.com/v2/enqueue" and config.rate_limit == 2.0


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ({"routing_key": "short"}, "routing_key"),
        ({"routing_key": ROUTING_KEY, "url": "ftp://x/v2"}, "url"),
        ({"routing_key": ROUTING_KEY, "url": "not a url"}, "url"),
        ({"routing_key": ROUTING_KEY, "rate_limit": "lots"}, "rate_limit"),
        ({"routing_key": ROUTING_KEY, "routng_key": "x"}, "did you mean 'routing_key'"),
        ({}, "routing_key"),
    ],
)
def test_bad_config_fails_naming_the_key(entry: dict[str, Any], needle: str) -> None:
    loaded, problems = plugins.load_notifiers([{"type": "pagerduty", **entry}])
    assert not loaded and len(problems) >= 1
    assert needle in " ".join(problems) and "[[notifiers]][0]" in problems[0], problems


def test_the_documented_routing_key_error_is_the_real_one() -> None:
    _, problems = plugins.load_notifiers([{"type": "pagerduty", "routing_key": "short12chars"}])
    docs = " ".join((Path(__file__).resolve().parents[1] / "docs" / "notifiers.md").read_text().split())
    assert problems[-1].startswith("[[notifiers]][0] routing_key: must be the 32-character")
    assert f"`{problems[-1]}`" in docs
