"""Per-incident order at the receiver across a notifier worker SIGKILLed holding a firing (issue 11).

A notifier worker that read a firing from the alerts stream and died before queueing it leaves
the entry pending; the stream hands it to another worker only after ``claim_idle``. The
incident's resolve, published meanwhile, is read at once. The receiver must still get the firing
first and the resolve after it, never the other way round (its incident would stay open for
ever). Real worker processes, real Redis, a real HTTP receiver.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from agentwatch.keys import Keys
from agentwatch.workers import NOTIFIERS_GROUP
from notifiers.queue import DeliveryQueue, Job

from helpers import wait_for
from notify_kit import (
    FAST_DELIVERY,
    Receiver,
    fire,
    notifier_running,
    pipeline_with,
    receiver,
    resolve,
    stream,
)


def _victim(path: Path, redis_url: str, prefix: str, hook: Receiver) -> subprocess.Popen[bytes]:
    """A notifier worker that spends most of its life blocked in XREADGROUP."""
    path.write_text(
        f'[redis]\nurl = "{redis_url}"\nprefix = "{prefix}"\n\n'
        '[worker]\ntick = "10s"\nblock = "1500ms"\nclaim_idle = "2s"\n\n'
        f'[[notifiers]]\ntype = "webhook"\nurl = "{hook.url}"\nbackoff = "50ms"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTWATCH_")}
    argv = [sys.executable, "-m", "agentwatch", "worker", "notifiers", "--config", str(path)]
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _frozen_while_reading(r: redis.Redis, victim: subprocess.Popen[bytes], others: set[str]) -> bool:
    """SIGSTOP the victim; keep it stopped only if its connection is blocked in XREADGROUP (then
    Redis hands it the next entry all the same, as it does to a worker about to die). The victim's
    connections are the clients that were not there before it started (``others``): a Unix socket
    names no port to tell them apart by."""
    victim.send_signal(signal.SIGSTOP)
    for client in r.client_list():
        if (
            client["id"] not in others
            and client.get("cmd") == "xreadgroup"
            and "b" in client.get("flags", "")
        ):
            return True
    victim.send_signal(signal.SIGCONT)
    return False


def test_a_resolve_never_overtakes_the_firing_a_dead_notifier_held(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str, tmp_path: Path
) -> None:
    with receiver() as hook:
        others = {client["id"] for client in r.client_list()}
        victim = _victim(tmp_path / "pipeline.toml", redis_url, prefix, hook)
        try:
            caught = lambda: _frozen_while_reading(r, victim, others)  # noqa: E731
            wait_for(caught, 20, interval=0.02, what="the victim frozen while waiting for alerts")
            firing = fire(r, keys)
            held = lambda: r.xpending(keys.alerts, NOTIFIERS_GROUP)["pending"] == 1  # noqa: E731
            wait_for(held, 5, what="the firing handed to the frozen victim")
            victim.send_signal(signal.SIGKILL)
            victim.wait(5)
        finally:
            if victim.poll() is None:
                victim.kill()
                victim.wait()
        assert not hook.requests  # the victim never queued it
        back = resolve(r, keys)  # read at once by the next worker; the firing only after 2 s
        entry = {"type": "webhook", "url": hook.url, **FAST_DELIVERY}
        pipeline = pipeline_with(prefix, redis_url, [entry], claim_idle="2s")
        with notifier_running(pipeline, redis_url):
            hook.wait_requests(2, timeout=20)
            wait_for(lambda: len(stream(r, keys.notify_log)) >= 2, what="both delivery records")
    got = [(body["id"], body["status"]) for body in hook.bodies()]
    assert got == [(firing.id, "firing"), (back.id, "resolved")]


# -- the queue's side of it, step by step ----------------------------------------------------------


def _alert(status: str, at: str, ident: str) -> Job:
    alert = {"id": ident, "agent": "bot", "detector": "silence", "status": status, "severity": "critical",
             "summary": "bot", "dedup_key": "bot/silence", "at": at, "details": {}}  # fmt: skip
    return Job(ident, alert, 0)


def _drain(queue: DeliveryQueue) -> list[str]:
    """Claim and finish every delivery due now, in the order the delivery threads would."""
    out = []
    for _ in range(20):
        claimed = queue.claim(5000)
        if isinstance(claimed, int):
            if claimed == -1 or claimed > 1000:
                return out
            time.sleep(claimed / 1000)
            continue
        out.append(claimed.job.id)
        assert queue.finish(claimed)
    return out


def test_a_parked_resolve_goes_out_just_after_its_firing_and_before_the_next_incident(
    r: redis.Redis, keys: Keys
) -> None:
    queue = DeliveryQueue(r, keys, "hook")
    assert queue.enqueue_resolve(_alert("resolved", "2026-12-07T07:00:05.000Z", "r1"), "bot/silence",
                                 park_ms=60_000)  # fmt: skip
    assert _drain(queue) == []  # parked: its firing was never queued here
    # the next incident fires before the first one's firing turns up: it waits behind the resolve
    assert queue.enqueue(_alert("firing", "2026-12-07T07:00:09.000Z", "f2"), "bot/silence")
    assert queue.enqueue(_alert("firing", "2026-12-07T07:00:01.000Z", "f1"), "bot/silence")
    assert _drain(queue) == ["f1", "r1", "f2"]
    assert queue.enqueue_resolve(_alert("resolved", "2026-12-07T07:00:20.000Z", "r2"), "bot/silence")
    assert _drain(queue) == ["r2"]  # its firing was queued: not parked


def test_a_firing_that_comes_after_its_resolve_went_out_is_not_sent(r: redis.Redis, keys: Keys) -> None:
    queue = DeliveryQueue(r, keys, "hook")
    resolve_job = _alert("resolved", "2026-12-07T07:00:05.000Z", "r1")
    assert queue.enqueue_resolve(resolve_job, "bot/silence", park_ms=0)
    assert _drain(queue) == ["r1"]  # waited out its park time
    assert queue.enqueue(_alert("firing", "2026-12-07T07:00:01.000Z", "f1"), "bot/silence") is None
    assert _drain(queue) == []
    assert queue.enqueue(_alert("firing", "2026-12-07T07:00:09.000Z", "f2"), "bot/silence")  # a new incident
    assert _drain(queue) == ["f2"]
