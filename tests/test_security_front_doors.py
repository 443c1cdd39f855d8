"""``[security] agent_keys`` with the front doors: a real ``agentwatch serve`` signs what the ping
API and the OTLP receiver write with each agent's key (derived from the pipeline secret, as the
producer's is), so a real detector worker that refuses unsigned events accepts them and detects
on them; an event XADDed by anyone else, unsigned, is still refused."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from otlp_sdk import sdk

from agentwatch import codec, signing

from helpers import wait_for
from http_kit import Deployment, deployment, shared_prefix

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
WAIT_S = 60.0
"""Bounded waits for what the server and worker do asynchronously, sized for a loaded 2-core box."""
SECRET = "front-doors-secret-" + "0123456789abcdef" * 2
INGEST = "ingest-token-for-tests-0123456789"
CONFIG = f"""
[security]
secret = "{SECRET}"
agent_keys = true
[otlp.agents."door-*"]
interval = "1s"
[detectors.silence]
after = "1s"
"""


@pytest.fixture(scope="module")
def dep(redis_url: str) -> Iterator[Deployment]:
    root = Path(tempfile.mkdtemp(prefix="aw-"))
    with (
        shared_prefix(redis_url) as prefix,
        deployment(
            root,
            prefix=prefix,
            redis_url=redis_url,
            extra=CONFIG,
            http=f'ingest_token = "{INGEST}"\nping_accept = "door-*"\n',
        ) as running,
    ):
        yield running
    shutil.rmtree(root, ignore_errors=True)


def dead_letters(dep: Deployment) -> list[str]:
    return [fields[b"reason"].decode() for _, fields in dep.r.xrange(dep.keys.deadletter)]


def test_pings_are_signed_accepted_and_detected(dep: Deployment) -> None:
    assert httpx.get(dep.ping_url("door-ping/start?interval=1"), timeout=10).status_code == 200
    assert httpx.post(dep.ping_url("door-ping"), json={"tokens": 42}, timeout=10).status_code == 200
    entries = [f for _, f in dep.r.xrange(dep.keys.events_for("door-ping"))]
    key = signing.agent_key(SECRET, "door-ping")
    mine = [f for f in entries if codec.decode(f[b"d"])["agent"] == "door-ping"]
    assert len(mine) == 2
    for fields in mine:
        signing.check(key, dep.keys.events_for("door-ping"), fields[b"d"], fields[b"s"])
    wait_for(  # (status shows the detectors' checkpoint: the start may be saved before the beat)
        lambda: (found := dep.status("door-ping")) and found["tokens_total"] == 42,
        timeout=WAIT_S,
        what="the pinged agent's tokens in status",
    )
    wait_for(lambda: dep.fired("door-ping", "silence"), timeout=WAIT_S, what="silence once the pings stop")
    assert not [reason for reason in dead_letters(dep) if "door-ping" in reason]


def test_otlp_exports_are_signed_accepted_and_detected(dep: Deployment) -> None:
    process = sdk(dep.base, INGEST, service="door-otlp", instance="run-1")
    tracer = process.tracing.get_tracer("door")
    with tracer.start_as_current_span("chat gpt-4o") as span:
        span.set_attribute("gen_ai.operation.name", "chat")
        span.set_attribute("gen_ai.request.model", "gpt-4o")
        span.set_attribute("gen_ai.usage.input_tokens", 120)
        span.set_attribute("gen_ai.usage.output_tokens", 30)
    process.shutdown()  # flushes the export, then the agent stops: silence follows
    agent = wait_for(
        lambda: (found := dep.status("door-otlp")) and found["tokens_total"] == 150 and found,
        timeout=WAIT_S,
        what="the OTel agent's tokens in status",
    )
    assert agent["beats_total"] == 1
    wait_for(lambda: dep.fired("door-otlp", "silence"), timeout=WAIT_S, what="silence once exports stop")
    assert not [reason for reason in dead_letters(dep) if "door-otlp" in reason]


def test_an_unsigned_event_xadded_by_anyone_else_is_refused(dep: Deployment) -> None:
    assert httpx.get(dep.ping_url("door-victim/start?interval=600"), timeout=10).status_code == 200
    (run,) = {codec.decode(f[b"d"])["run"] for _, f in dep.r.xrange(dep.keys.events_for("door-victim"))
              if codec.decode(f[b"d"])["agent"] == "door-victim"}  # fmt: skip
    forged = {"v": 1, "agent": "door-victim", "kind": "exit", "ts": time.time(), "run": run, "seq": 1,
              "reason": "exit", "code": 1, "error": "forged"}  # fmt: skip
    dep.r.xadd(dep.keys.events_for("door-victim"), {"d": codec.encode(forged)})
    wait_for(
        lambda: any("event of agent 'door-victim' refused: unsigned" in x for x in dead_letters(dep)),
        timeout=WAIT_S,
        what="the forged exit dead-lettered",
    )
    assert httpx.get(dep.ping_url("door-victim"), timeout=10).status_code == 200  # the real run goes on
    agent = wait_for(
        lambda: (found := dep.status("door-victim")) and found["beats_total"] == 1 and found,
        timeout=WAIT_S,
        what="the real beat counted",
    )
    assert agent["state"] != "down" and not dep.fired("door-victim", "exit")


def test_an_agents_own_key_pings_for_it_alone_and_the_ping_key_only_within_its_glob(dep: Deployment) -> None:
    own = signing.agent_key(SECRET, "cron-job")
    assert httpx.get(f"{dep.base}/ping/{own}/cron-job", timeout=10).status_code == 200  # outside the glob
    wrong = httpx.get(f"{dep.base}/ping/{own}/door-other", timeout=10)  # cron-job's key, another agent
    assert (wrong.status_code, wrong.text) == (404, "not found\n")
    refused = httpx.get(dep.ping_url("cron-job"), timeout=10)  # the ping key, outside ping_accept
    assert refused.status_code == 403 and "ping_accept = 'door-*'" in refused.text
    written = [codec.decode(f[b"d"]) for _, f in dep.r.xrange(dep.keys.events_for("cron-job"))]
    assert [e["kind"] for e in written if e["agent"] == "cron-job"] == ["start", "beat"]
    assert not [e for e in written if e["agent"] == "door-other"]
    with dep.client() as http:
        text = http.get("/metrics").text
    assert 'agentwatch_http_pings_total{outcome="not_accepted"} 1.0' in text
