"""Grouping (``[grouping]``): incidents of one detector that open within ``group_wait`` for agents
sharing the ``group_by`` labels reach a notifier as one notification, then one resolve; a group
of one sends its own alert; alerts without the labels, restart notifiers and groups past
``max_groups`` are sent alone. Real notifier workers, a real HTTP receiver; the last test runs
20 real agent processes that die together."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from agentwatch import plugins
from agentwatch.alerts import Alert, decode_alert
from agentwatch.config import GroupingSection, Pipeline
from agentwatch.keys import Keys
from agentwatch.redisconn import connect
from agentwatch.workers import detector_worker

from helpers import running, settings_for, wait_for
from notify_kit import FAST_DELIVERY, fire, notifier_running, receiver, resolve, stream


def grouped_pipeline(prefix: str, url: str, hook_url: str, **grouping: Any) -> Pipeline:
    loaded, problems = plugins.load_notifiers([{"type": "webhook", "url": hook_url, **FAST_DELIVERY}])
    assert not problems, problems
    settings = settings_for(prefix, url, worker={"tick": "50ms", "block": "100ms"})
    section = GroupingSection.model_validate({"enabled": True, "group_wait": "1s", **grouping})
    settings = settings.model_copy(update={"grouping": section})
    return Pipeline(settings=settings, source="test", notifiers=loaded)


def on_host(host: str, **extra: str) -> dict[str, Any]:
    return {"details": {"labels": {"host": host, **extra}}}


def test_one_notification_for_a_host_then_one_resolve(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    with receiver() as hook, notifier_running(grouped_pipeline(prefix, redis_url, hook.url), redis_url):
        for i in range(5):
            fire(r, keys, f"bot-{i}", **on_host("worker-3"))
        (request,) = hook.wait_requests(1, timeout=10)
        body = request.json()
        assert body["status"] == "firing" and body["dedup_key"] == "group:host=worker-3/silence"
        assert body["summary"].startswith("host worker-3: 5 agents silent since ")
        assert sorted(body["details"]["group"]["agents"]) == [f"bot-{i}" for i in range(5)]
        assert body["details"]["labels"] == {"host": "worker-3"} and body["severity"] == "critical"
        for i in range(4):
            resolve(r, keys, f"bot-{i}")
        time.sleep(1.5)  # a group_wait and more: still nothing, one member is open
        assert len(hook.requests) == 1
        resolve(r, keys, "bot-4")
        requests = hook.wait_requests(2)
        done = requests[1].json()
        assert done["status"] == "resolved" and done["dedup_key"] == body["dedup_key"]
        assert done["summary"].startswith("host worker-3: all 5 agents recovered")
        time.sleep(0.5)
        assert len(hook.requests) == 2
    outcomes = [entry["outcome"] for entry in stream(r, keys.notify_log)]
    assert outcomes.count("grouped") == 10 and outcomes.count("delivered") == 2
    assert len(r.xrange(keys.alerts)) == 10  # every incident is still on the alerts stream


def test_a_group_of_one_sends_its_own_alert_and_unlabelled_alerts_are_not_held(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    with receiver() as hook, notifier_running(grouped_pipeline(prefix, redis_url, hook.url), redis_url):
        plain = fire(r, keys, "agentwatch", detector="lag")
        first = hook.wait_requests(1, timeout=5)[0].json()
        assert first["id"] == plain.id  # no labels: sent at once, not grouped
        lone = fire(r, keys, "solo", **on_host("h1"))
        second = hook.wait_requests(2, timeout=10)[1]
        assert decode_alert(second.body) == lone
        back = resolve(r, keys, "solo")
        third = hook.wait_requests(3, timeout=5)[2]
        assert decode_alert(third.body) == back


def test_groups_are_per_detector_and_host_and_bounded(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    with receiver() as hook:
        pipeline = grouped_pipeline(prefix, redis_url, hook.url, max_groups=2)
        with notifier_running(pipeline, redis_url):
            for host in ("a", "b"):
                for i in range(2):
                    fire(r, keys, f"{host}-{i}", **on_host(host))
            extra = fire(r, keys, "c-0", **on_host("c"))  # a third group: over max_groups
            first = hook.wait_requests(1, timeout=5)[0]
            assert decode_alert(first.body) == extra
            requests = hook.wait_requests(3, timeout=10)
            keys_sent = sorted(req.json()["dedup_key"] for req in requests[1:])
            assert keys_sent == ["group:host=a/silence", "group:host=b/silence"]
    counts = {k.decode(): int(v) for k, v in r.hgetall(keys.notify_stats).items()}
    assert counts["webhook:ungrouped"] == 1


def test_late_members_are_sent_as_one_update_after_the_group_interval(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    with receiver() as hook:
        pipeline = grouped_pipeline(prefix, redis_url, hook.url, group_interval="1s")
        with notifier_running(pipeline, redis_url):
            fire(r, keys, "x-0", **on_host("h"))
            fire(r, keys, "x-1", **on_host("h"))
            hook.wait_requests(1, timeout=10)
            fire(r, keys, "x-2", **on_host("h"))
            fire(r, keys, "x-3", **on_host("h"))
            update = hook.wait_requests(2, timeout=10)[1].json()
    assert update["status"] == "firing" and update["details"]["group"]["update"] == 1
    assert update["summary"].startswith("host h: 4 agents silent")


def test_config_refuses_bad_group_keys() -> None:
    with pytest.raises(ValueError, match="not label keys"):
        GroupingSection.model_validate({"group_by": ["host name"]})
    with pytest.raises(ValueError, match="named twice"):
        GroupingSection.model_validate({"group_by": ["host", "host"]})


AGENT = """
import sys, time
import producers
producers.init(interval=0.1, pulse_interval=0.2)
with open(sys.argv[1], "a") as ready:
    ready.write("x\\n")
while True:
    producers.heartbeat()
    time.sleep(0.05)
"""


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(10)


@pytest.mark.slow
def test_twenty_agents_of_one_host_killed_together_page_once_and_resolve_once(
    r: redis.Redis,
    keys: Keys,
    prefix: str,
    redis_url: str,
    tmp_path: Path,
    agents: list[subprocess.Popen[bytes]],
) -> None:
    script = tmp_path / "agent.py"
    script.write_text(AGENT)
    ready = tmp_path / "ready"
    env = {**os.environ, "AGENTWATCH_REDIS_URL": redis_url, "AGENTWATCH_PREFIX": prefix,
           "AGENTWATCH_LABELS": "host=worker-3,team=search"}  # fmt: skip

    def launch() -> None:
        ready.write_text("")
        for i in range(20):
            agents.append(
                subprocess.Popen(
                    [sys.executable, str(script), str(ready)], env={**env, "AGENTWATCH_AGENT": f"w3-{i}"}
                )
            )
        wait_for(lambda: len(ready.read_text().split()) == 20, timeout=60, what="20 agents started")

    with receiver() as hook:
        pipeline = grouped_pipeline(prefix, redis_url, hook.url, group_wait="2s")
        detectors = pipeline.settings.model_copy(update={"detectors": {"silence": {"after": "1s"}}})
        loaded, problems = plugins.load_detectors({"silence": {"after": "1s"}})
        assert not problems
        det_pipeline = Pipeline(settings=detectors, source="test", detectors=loaded)
        client = connect(det_pipeline.settings, redis_url)
        try:
            with running(detector_worker(det_pipeline, client)), notifier_running(pipeline, redis_url):
                launch()
                wait_for(lambda: r.hlen(keys.facts(0)) == 20, timeout=30, what="facts of 20 agents")
                for proc in agents:
                    proc.send_signal(signal.SIGKILL)
                for proc in agents:
                    proc.wait(10)
                agents.clear()
                (page,) = hook.wait_requests(1, timeout=30)
                body = page.json()
                firing = [a for a in _alerts(r, keys) if a.status == "firing"]
                assert len(firing) == 20
                first_ms = min(a.at_ms for a in firing)
                launch()
                hook.wait_requests(2, timeout=60)
                time.sleep(1.0)
        finally:
            client.close()
        requests = list(hook.requests)
    assert [req.json()["status"] for req in requests] == ["firing", "resolved"]
    assert body["dedup_key"] == "group:host=worker-3/silence" and body["details"]["group"]["count"] == 20
    assert body["summary"].startswith("host worker-3: 20 agents silent since ")
    assert requests[1].json()["dedup_key"] == body["dedup_key"]
    assert Alert(**body).at_ms >= first_ms


def _alerts(r: redis.Redis, keys: Keys) -> list[Alert]:
    return [decode_alert(fields[b"d"]) for _, fields in r.xrange(keys.alerts)]
