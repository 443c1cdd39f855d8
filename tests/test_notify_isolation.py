"""Notifiers deliver independently, and a dead notifier worker's deliveries are taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis

from agentwatch.keys import Keys

from helpers import wait_for
from notify_kit import FAST_DELIVERY, Reply, fire, notifier_running, now_ms, pipeline_with, receiver, stream


def test_a_receiver_that_hangs_forever_does_not_delay_the_other_notifier(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    with receiver() as stuck, receiver() as healthy:
        stuck.default = Reply(hang=True)
        entries = [
            {"type": "webhook", "name": "stuck", "url": stuck.url, **FAST_DELIVERY, "timeout": "3s"},
            {"type": "webhook", "name": "healthy", "url": healthy.url, **FAST_DELIVERY},
        ]
        with notifier_running(pipeline_with(prefix, redis_url, entries), redis_url):
            sent: dict[str, float] = {}
            for i in range(20):
                sent[fire(r, keys, f"bot-{i}").id] = time.monotonic()
            healthy.wait_requests(20, timeout=5)
            stuck_calls = len(stuck.requests)
            # Every healthy delivery landed while the stuck receiver still held its requests
            # (its read timeout is 3 s): nothing on the healthy side waited for it.
            assert stuck_calls >= 1 and not r.xlen(keys.notify_failed)
            assert not [q for q in stuck.requests if q.at + 3.0 < healthy.requests[-1].at]
    latencies = sorted(q.at - sent[q.headers["webhook-id"]] for q in healthy.requests)
    print(f"\nhealthy notifier latency with the other hung: p50 {latencies[10] * 1000:.1f} ms, "
          f"max {latencies[-1] * 1000:.1f} ms; stuck receiver held {stuck_calls} request(s)")  # fmt: skip
    assert latencies[-1] < 1.5  # well inside the stuck receiver's 3 s read timeout


def worker_config(path: Path, redis_url: str, prefix: str, hook_url: str, timeout: str) -> Path:
    path.write_text(
        f'[redis]\nurl = "{redis_url}"\nprefix = "{prefix}"\n\n'
        '[worker]\ntick = "50ms"\nblock = "100ms"\nclaim_idle = "1s"\n\n'
        f'[[notifiers]]\ntype = "webhook"\nurl = "{hook_url}"\ntimeout = "{timeout}"\nbackoff = "50ms"\n'
    )
    return path


def test_a_notifier_worker_sigkilled_mid_delivery_leaves_the_alert_to_another(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str, tmp_path: Path
) -> None:
    with receiver() as hook:
        hook.reply(Reply(hang=True))  # the first attempt never gets an answer
        config = worker_config(tmp_path / "pipeline.toml", redis_url, prefix, hook.url, "1s")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTWATCH_")}
        argv = [sys.executable, "-m", "agentwatch", "worker", "notifiers", "--config", str(config)]
        victim = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            alert = fire(r, keys)
            wait_for(lambda: hook.requests or victim.poll() is not None, 30, what="the victim's request")
            assert victim.poll() is None, victim.communicate()[1].decode()
            (first,) = hook.requests
            assert r.hget(keys.notifier_leases("webhook"), alert.id)  # leased to the victim
            victim.send_signal(signal.SIGKILL)
            victim.wait(5)
        finally:
            if victim.poll() is None:
                victim.kill()
                victim.wait()
            assert victim.stderr is not None
            victim.stderr.close()
        killed_at = time.monotonic()
        entry = {"type": "webhook", "url": hook.url, **FAST_DELIVERY}
        with notifier_running(pipeline_with(prefix, redis_url, [entry]), redis_url):
            _, second = hook.wait_requests(2, timeout=10)
            wait_for(lambda: stream(r, keys.notify_log), what="the delivered record")
    assert second.headers["webhook-id"] == first.headers["webhook-id"] == alert.id
    # Taken over once the victim's lease ran out: 1 s timeout + 1 s margin, from its claim.
    assert second.at - first.at >= 1.5 and second.at - killed_at < 5.0
    # The victim's attempt counts although it never recorded an outcome: two requests, two attempts.
    assert [q.headers["x-agentwatch-attempt"] for q in (first, second)] == ["1", "2"]
    (record,) = stream(r, keys.notify_log)
    assert record["outcome"] == "delivered" and record["attempts"] == "2"


def test_a_worker_stopping_gracefully_hands_its_hung_delivery_over_at_once(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    with receiver() as hook:
        hook.reply(Reply(hang=True))
        entry: dict[str, Any] = {"type": "webhook", "url": hook.url, **FAST_DELIVERY, "timeout": "20s",
                                 "connect_timeout": "1s"}  # fmt: skip
        pipeline = pipeline_with(prefix, redis_url, [entry])
        with notifier_running(pipeline, redis_url):
            fire(r, keys)
            hook.wait_requests(1)
        stopped_at = time.monotonic()  # the first worker is gone; its lease would last 25 s
        with notifier_running(pipeline, redis_url):
            _, second = hook.wait_requests(2, timeout=10)
            wait_for(lambda: stream(r, keys.notify_log), what="the delivered record")
    assert second.at - stopped_at < 3.0


def test_a_worker_with_several_hung_notifiers_still_stops_within_two_seconds(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    with receiver() as one, receiver() as two:
        one.default = two.default = Reply(hang=True)
        entries = [
            {"type": "webhook", "name": name, "url": hook.url, **FAST_DELIVERY, "timeout": "20s"}
            for name, hook in (("one", one), ("two", two))
        ]
        with notifier_running(pipeline_with(prefix, redis_url, entries), redis_url) as worker:
            alert = fire(r, keys)
            one.wait_requests(1)
            two.wait_requests(1)
            stopping = time.monotonic()
            worker.stop()
        stopped = time.monotonic() - stopping
    assert stopped < 2.5, f"took {stopped:.2f}s to stop"
    # Both hung deliveries were handed back for the next worker, not left leased for 25 s.
    for name in ("one", "two"):
        assert r.hget(keys.notifier_leases(name), alert.id) is None
        assert r.zscore(keys.notifier_queue(name), alert.id) <= now_ms(r)  # due again at once
        assert r.zscore(keys.notifier_retrying(name), alert.id) is None  # interrupted, not failing
