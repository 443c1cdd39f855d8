"""Alerts cannot be forged or un-paged by whoever else can write ``<prefix>:alerts``: detector
workers sign what they publish, a real notifier worker delivers only signed alerts to a real
receiver, and refuses the rest with the reason (dead letter) and a count (``rejected``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import redis

from agentwatch import signing
from agentwatch.alerts import Incidents
from agentwatch.config import SecuritySection
from agentwatch.keys import Keys

from helpers import wait_for
from notify_kit import fire, notifier_running, pipeline_with, receiver, stream

OTHER = "another-secret-" + "0" * 32


def forged(alert_id: str, status: str, dedup_key: str = "bot/silence") -> bytes:
    """What an attacker writes: a well-formed alert, as the protocol documents it."""
    agent, detector = dedup_key.split("/")
    return json.dumps({"id": alert_id, "agent": agent, "detector": detector, "status": status,
                       "severity": "critical", "summary": "forged", "dedup_key": dedup_key,
                       "at": "2026-01-01T00:00:00.000Z", "details": {}}).encode()  # fmt: skip


def reasons(r: redis.Redis, keys: Keys) -> list[str]:
    return [entry["reason"] for entry in stream(r, keys.deadletter)]


def test_forged_alerts_page_no_one_and_a_forged_resolve_closes_nothing(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    with receiver() as hook:
        pipeline = pipeline_with(prefix, redis_url, [{"type": "webhook", "url": hook.url, "backoff": "50ms"}])
        with notifier_running(pipeline, redis_url) as worker:
            real = fire(r, keys, "bot")  # a genuine incident, open at the receiver
            hook.wait_requests(1)
            r.xadd(keys.alerts, {"d": forged("f1", "resolved")})  # un-page it
            r.xadd(keys.alerts, {"d": forged("f2", "firing", "ceo/silence")})  # page someone
            key = signing.alerts_key(OTHER)  # signed, but not with the pipeline's key
            signer = signing.Signer(key, keys.alerts)
            signer.stamp(time.time())
            data = forged("f3", "resolved")
            r.xadd(keys.alerts, {"d": data, "s": signer.sign(data)})
            wait_for(lambda: len(reasons(r, keys)) == 3, what="the forgeries refused")
            genuine = Incidents(r, keys).resolve("bot", "silence", summary="bot: back", at_ms=real.at_ms + 1)
            assert genuine is not None  # the forged resolve closed nothing here either
            hook.wait_requests(2)
            wait_for(lambda: worker.stats.rejected == 3, what="the count")
    assert [json.loads(q.body)["id"] for q in hook.requests] == [real.id, genuine.id]
    assert reasons(r, keys) == [
        "alert refused: unsigned (no 's' field); alerts come from the pipeline, which holds the secret",
        "alert refused: unsigned (no 's' field); alerts come from the pipeline, which holds the secret",
        "alert refused: bad signature; alerts come from the pipeline, which holds the secret",
    ]


def test_a_signed_alert_replayed_long_after_is_refused(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    with receiver() as hook:
        pipeline = pipeline_with(prefix, redis_url, [{"type": "webhook", "url": hook.url, "backoff": "50ms"}])
        with notifier_running(pipeline, redis_url):
            fire(r, keys, "bot")
            hook.wait_requests(1)
            secret = r.get(keys.secret)  # kept in Redis: none configured
            assert secret is not None and re.fullmatch(rb"[0-9a-f]{64}", secret)
            signer = signing.Signer(signing.alerts_key(secret.decode()), keys.alerts)
            signer.stamp(time.time() - 3600)  # what a copy of last hour's resolve would carry
            data = forged("old", "resolved")
            r.xadd(keys.alerts, {"d": data, "s": signer.sign(data)})
            wait_for(lambda: reasons(r, keys), what="the replay refused")
    assert len(hook.requests) == 1
    (reason,) = reasons(r, keys)
    expected = (r"alert refused: signed at \S+, added to the stream 1h(\ds)? later: more than "
                r"\[security\] max_skew \(5m\); a replayed entry, or a clock that is off")  # fmt: skip
    assert re.fullmatch(expected, reason), reason


def test_a_secret_kept_in_redis_that_is_made_anew_is_picked_up(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    with receiver() as hook:
        pipeline = pipeline_with(prefix, redis_url, [{"type": "webhook", "url": hook.url, "backoff": "50ms"}])
        with notifier_running(pipeline, redis_url):
            fire(r, keys, "before")
            hook.wait_requests(1)
            first = r.get(keys.secret)
            r.delete(keys.secret)  # Redis lost its data, say: the next publisher makes a new one
            fire(r, keys, "after")
            hook.wait_requests(2)
    assert r.get(keys.secret) not in (None, first)
    assert [json.loads(q.body)["agent"] for q in hook.requests] == ["before", "after"]
    assert reasons(r, keys) == []


def test_detectors_and_notifiers_with_different_configured_secrets_deliver_nothing(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    with receiver() as hook:
        pipeline = pipeline_with(prefix, redis_url, [{"type": "webhook", "url": hook.url}])
        security = SecuritySection.model_validate({"secret": OTHER})
        pipeline = pipeline.__class__(
            settings=pipeline.settings.model_copy(update={"security": security}),
            source="test",
            notifiers=pipeline.notifiers,
        )
        with notifier_running(pipeline, redis_url):
            fire(r, keys, "bot")  # signed with the Redis-kept secret
            wait_for(lambda: reasons(r, keys), what="the refusal")
    assert hook.requests == []
    assert reasons(r, keys) == [
        "alert refused: bad signature; alerts come from the pipeline, which holds the secret"
    ]


def test_with_a_configured_secret_every_publisher_signs_with_it(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str, tmp_path: Path
) -> None:
    """Detectors, notifiers, `agentwatch halt` and the dashboard all take [security] secret from the
    configuration; a halt from the CLI is delivered by a notifier holding the same secret."""
    config = tmp_path / "pipeline.toml"
    config.write_text(f'[redis]\nurl = "{redis_url}"\nprefix = "{prefix}"\n[security]\nsecret = "{OTHER}"\n')
    with receiver() as hook:
        pipeline = pipeline_with(prefix, redis_url, [{"type": "webhook", "url": hook.url, "backoff": "50ms"}])
        security = SecuritySection.model_validate({"secret": OTHER})
        pipeline = pipeline.__class__(
            settings=pipeline.settings.model_copy(update={"security": security}),
            source="test",
            notifiers=pipeline.notifiers,
        )
        with notifier_running(pipeline, redis_url):
            env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTWATCH_")}
            argv = [
                sys.executable,
                "-m",
                "agentwatch",
                "halt",
                "bot",
                "--reason",
                "drill",
                "--config",
                str(config),
            ]
            done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
            assert done.returncode == 0, done.stderr
            (request,) = hook.wait_requests(1)
    assert json.loads(request.body)["detector"] == "halt" and reasons(r, keys) == []
    assert r.get(keys.secret) is None  # nothing generated: the configured secret is the only one
