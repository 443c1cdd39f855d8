"""Events authenticated per agent (``[security] agent_keys``): real producer processes sign with
their agent's key, a real detector worker checks every event in its decode step, before any
detector sees it; unsigned, wrongly signed and replayed entries are dead-lettered and counted."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
import redis
from agents.testkit import agent_env, run
from agents_detect.kit import pipeline_for, worker_for

from agentwatch import codec, signing
from agentwatch.config import Pipeline, SecuritySection
from agentwatch.fleet import fleet_status
from agentwatch.halts import Halts
from agentwatch.keys import Keys
from producers import Halted, Producer

from helpers import caught_up, running, wait_for

SECRET = "test-secret-" + "0123456789abcdef" * 2


def signed_pipeline(prefix: str, redis_url: str, **security: Any) -> Pipeline:
    pipeline = pipeline_for(prefix, redis_url)
    section = SecuritySection.model_validate({"secret": SECRET, "agent_keys": True, **security})
    return Pipeline(
        settings=pipeline.settings.model_copy(update={"security": section}),
        source="test",
        detectors=pipeline.detectors,
    )


def dead_letters(r: redis.Redis, keys: Keys) -> list[str]:
    return [fields[b"reason"].decode() for _, fields in r.xrange(keys.deadletter)]


def beat(agent: str, run: str, seq: int, **fields: Any) -> bytes:
    return codec.encode({"v": 1, "agent": agent, "kind": "beat", "ts": time.time(), "run": run, "seq": seq,
                         **fields})  # fmt: skip


def test_signed_producers_are_accepted_and_unsigned_or_misfiled_ones_refused(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    good_key = signing.agent_key(SECRET, "good-bot")
    for agent, key in (("good-bot", good_key), ("no-key-bot", None), ("thief-bot", good_key)):
        extra = {"AGENTWATCH_KEY": key} if key else {}
        code, _, err = run("scripted.py", agent_env(redis_url, prefix, agent, AW_BEATS=3, **extra), "exit")
        assert code == 0, err
    worker = worker_for(signed_pipeline(prefix, redis_url), redis_url)
    with running(worker):
        wait_for(lambda: caught_up(r, keys), what="every event read")
        agents = fleet_status(worker.client, signed_pipeline(prefix, redis_url))["agents"]
        status = {agent["agent"] for agent in agents}
    worker.client.close()
    assert status == {"good-bot"}  # no detector ever saw the others
    reasons = dead_letters(r, keys)
    assert len(reasons) == 10 and worker.stats.rejected == 10  # start, 3 beats, exit: each
    assert sum("event of agent 'no-key-bot' refused: unsigned (no 's' field)" in x for x in reasons) == 5
    assert sum("event of agent 'thief-bot' refused: bad signature" in x for x in reasons) == 5
    assert all("`agentwatch agent-key`" in x for x in reasons)
    assert r.hget(keys.stats, "detectors:rejected") == b"10"  # published, for `status`
    assert fleet_status(r, signed_pipeline(prefix, redis_url))["pipeline"]["rejected"] == 10


def test_a_replayed_entry_is_the_same_event_again_and_changes_nothing(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    signer = signing.Signer(signing.agent_key(SECRET, "bot"), keys.events())
    signer.stamp(time.time())
    for seq, tokens in enumerate((100, 200)):
        data = beat("bot", "run-1", seq, tokens=tokens)
        r.xadd(keys.events(), {"d": data, "s": signer.sign(data)})
    pipeline = signed_pipeline(prefix, redis_url)
    worker = worker_for(pipeline, redis_url)
    with running(worker):
        wait_for(lambda: caught_up(r, keys), what="the genuine beats")
        before = fleet_status(worker.client, pipeline)["agents"][0]["tokens_total"]
        for _, fields in r.xrange(keys.events()):  # anyone who can read the stream copies them
            r.xadd(keys.events(), fields)
        wait_for(lambda: caught_up(r, keys), what="the copies")
        after = fleet_status(worker.client, pipeline)["agents"][0]["tokens_total"]
    worker.client.close()
    assert before == after == 300 and dead_letters(r, keys) == []


def test_an_entry_signed_long_before_it_was_added_is_refused(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    signer = signing.Signer(signing.agent_key(SECRET, "bot"), keys.events())
    signer.stamp(time.time() - 600)  # an old run's entry, replayed ten minutes later
    data = beat("bot", "old-run", 7)
    r.xadd(keys.events(), {"d": data, "s": signer.sign(data)})
    worker = worker_for(signed_pipeline(prefix, redis_url, max_skew="2m"), redis_url)
    with running(worker):
        wait_for(lambda: caught_up(r, keys), what="the entry read")
    worker.client.close()
    (reason,) = dead_letters(r, keys)
    assert reason.startswith("event of agent 'bot' refused: signed at ")
    assert re.search(r"added to the stream 10m(\ds)? later: more than \[security\] max_skew \(2m\)", reason)
    assert worker.stats.rejected == 1


@pytest.mark.parametrize(
    ("tamper", "why"),
    [(lambda d, s: (codec.encode({**codec.decode(d), "tokens": 1}), s), "bad signature"),
     (lambda d, s: (d, s[:-1] + (b"1" if s.endswith(b"0") else b"0")), "bad signature"),
     (lambda d, s: (d, b"v2." + s[3:]), "malformed signature"),
     (lambda d, s: (d, b"garbage"), "malformed signature")],
)  # fmt: skip
def test_a_tampered_entry_is_refused_with_the_reason(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str, tamper: Any, why: str
) -> None:
    signer = signing.Signer(signing.agent_key(SECRET, "bot"), keys.events())
    signer.stamp(time.time())
    data = beat("bot", "run-1", 0, tokens=100)
    data, signature = tamper(data, signer.sign(data))
    r.xadd(keys.events(), {"d": data, "s": signature})
    worker = worker_for(signed_pipeline(prefix, redis_url), redis_url)
    with running(worker):
        wait_for(lambda: caught_up(r, keys), what="the entry read")
    worker.client.close()
    (reason,) = dead_letters(r, keys)
    assert f"event of agent 'bot' refused: {why}" in reason


def test_a_signature_for_another_stream_does_not_carry_over(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    signer = signing.Signer(signing.agent_key(SECRET, "bot"), "other:events")
    signer.stamp(time.time())
    data = beat("bot", "run-1", 0)
    r.xadd(keys.events(), {"d": data, "s": signer.sign(data)})
    worker = worker_for(signed_pipeline(prefix, redis_url), redis_url)
    with running(worker):
        wait_for(lambda: caught_up(r, keys), what="the entry read")
    worker.client.close()
    assert dead_letters(r, keys) == [
        "event of agent 'bot' refused: bad signature ([security] agent_keys: sign with the key "
        "`agentwatch agent-key` prints for it)"
    ]


def test_a_signing_producer_still_learns_of_its_halt_and_its_events_pass(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    """The halt poll rides on the same write as the signed XADDs (producers/_transport.py)."""
    producer = Producer("braked", redis_url=redis_url, prefix=prefix, flush_interval=0.01,
                        key=signing.agent_key(SECRET, "braked"))  # fmt: skip
    try:
        producer.heartbeat()
        Halts(r, keys).add("braked", "over budget", by="test")
        deadline = time.monotonic() + 10
        with pytest.raises(Halted):
            while time.monotonic() < deadline:
                producer.heartbeat(tokens=5)
                time.sleep(0.01)
    finally:
        producer.close()
    worker = worker_for(signed_pipeline(prefix, redis_url), redis_url)
    with running(worker):
        wait_for(lambda: caught_up(r, keys), what="every event read")
    worker.client.close()
    assert dead_letters(r, keys) == [] and worker.stats.rejected == 0
    assert all(fields.get(b"s", b"").startswith(b"v1.") for _, fields in r.xrange(keys.events()))
