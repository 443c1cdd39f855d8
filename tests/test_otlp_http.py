"""OpenTelemetry ingest end to end: agents with no agentwatch code in them, instrumented by real
instrumentations (opentelemetry-instrumentation-openai-v2 on the real ``openai`` client,
PydanticAI's own instrumentation), exporting with the real OTLP/HTTP exporters (protobuf and
JSON) to a running ``agentwatch serve``, with a real detector worker deciding the alerts.

The model API is a local server answering like OpenAI's (otlp_kit.FakeOpenAI).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from google.protobuf import json_format
from google.rpc import status_pb2
from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from otlp_sdk import Sdk, sdk
from prometheus_client.parser import text_string_to_metric_families

from agentwatch import codec

from helpers import wait_for
from http_kit import Deployment, deployment, shared_prefix
from otlp_build import llm_call, traces
from otlp_kit import FakeOpenAI, Usage

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
WAIT_S = 60.0
"""Bounded waits for what the server and worker do asynchronously, sized for a loaded 2-core box."""
INGEST = "ingest-token-for-tests-0123456789"
CONFIG = """
[otlp]
max_body_bytes = 65536
[otlp.agents."quiet-*"]
interval = "1s"
[detectors.silence]
after = "1s"
[detectors.tokens]
warmup = 5
min_tokens = 100
repeat = 5
"""


@pytest.fixture(scope="module")
def dep(redis_url: str) -> Iterator[Deployment]:
    root = Path(tempfile.mkdtemp(prefix="aw-"))
    with (
        shared_prefix(redis_url) as prefix,
        deployment(
            root, prefix=prefix, redis_url=redis_url, extra=CONFIG, http=f'ingest_token = "{INGEST}"\n'
        ) as running,
    ):
        yield running
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def api() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI()
    yield server
    server.close()


def openai_agent(
    dep: Deployment, api: FakeOpenAI, started: list[Sdk], service: str, **options: Any
) -> tuple[Sdk, Any]:
    """A process whose OpenAI client is instrumented by opentelemetry-instrumentation-openai-v2."""
    import openai  # noqa: PLC0415

    process = sdk(dep.base, INGEST, service=service, **options)
    started.append(process)
    OpenAIInstrumentor().instrument(tracer_provider=process.tracing, meter_provider=process.metering)
    return process, openai.OpenAI(base_url=api.url, api_key="test", max_retries=0)


def chat(client: Any, times: int = 1) -> None:
    for _ in range(times):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


def pydantic_agent(
    dep: Deployment, api: FakeOpenAI, started: list[Sdk], name: str, **options: Any
) -> tuple[Sdk, Any]:
    """A PydanticAI agent with one tool, instrumented by PydanticAI itself."""
    from pydantic_ai import Agent, InstrumentationSettings  # noqa: PLC0415
    from pydantic_ai.capabilities import Instrumentation  # noqa: PLC0415
    from pydantic_ai.models.openai import OpenAIChatModel  # noqa: PLC0415
    from pydantic_ai.providers.openai import OpenAIProvider  # noqa: PLC0415

    process = sdk(dep.base, INGEST, service=f"{name}-service", **options)
    started.append(process)
    model = OpenAIChatModel("gpt-4o", provider=OpenAIProvider(base_url=api.url, api_key="test"))
    settings = InstrumentationSettings(tracer_provider=process.tracing, meter_provider=process.metering)
    agent = Agent(model, name=name, capabilities=[Instrumentation(settings)])

    @agent.tool_plain
    def get_weather(city: str) -> str:
        return f"sunny in {city}"

    return process, agent


def events_of(dep: Deployment, agent: str) -> list[dict[str, Any]]:
    found = (codec.decode(fields[b"d"]) for _, fields in dep.r.xrange(dep.keys.events()))
    return [event for event in found if event["agent"] == agent]


def status(dep: Deployment, agent: str, **expected: Any) -> dict[str, Any]:
    """The agent's status once every ``expected`` value shows (the detectors read asynchronously)."""

    def matches() -> dict[str, Any] | None:
        found = dep.status(agent)
        return found if found and all(found.get(k) == v for k, v in expected.items()) else None

    return wait_for(matches, timeout=WAIT_S, what=f"{agent} in status with {expected}")


@pytest.fixture(autouse=True)
def processes() -> Iterator[list[Sdk]]:
    """Every SDK a test started is shut down after it, passed or not (exporters left running
    would retry against a server that is gone), and the OpenAI client un-instrumented."""
    started: list[Sdk] = []
    yield started
    OpenAIInstrumentor().uninstrument()
    for process in started:
        process.shutdown()


def test_an_instrumented_openai_client_appears_in_status_with_its_tokens(
    dep: Deployment, api: FakeOpenAI, processes: list[Sdk]
) -> None:
    process, client = openai_agent(dep, api, processes, "oa-bot", instance="oa-1", compression=True)
    chat(client, 3)
    process.flush()
    found = status(dep, "oa-bot", tokens_total=450, beats_total=3)
    assert found["run"] == "oa-1" and found["state"] == "ok"
    beats = [e for e in events_of(dep, "oa-bot") if e["kind"] == "beat"]
    # what the pipeline prices the calls by (agentwatch/prices.py): the model and token classes
    assert {(b["model"], b["tokens_in"], b["tokens_out"]) for b in beats} == {("gpt-4o-2024-08-06", 120, 30)}
    process.shutdown()


def test_a_pydantic_ai_agent_appears_with_its_tokens_and_cost(
    dep: Deployment, api: FakeOpenAI, processes: list[Sdk]
) -> None:
    process, agent = pydantic_agent(dep, api, processes, "weather bot", protocol="json")
    asyncio.run(agent.run("weather in Paris?"))  # run_sync would leave its event loop open
    process.flush()
    found = status(dep, "weather_bot", tokens_total=300, beats_total=2)
    assert found["cost_total"] == pytest.approx(0.00095)  # PydanticAI's operation.cost, twice
    process.shutdown()


def test_an_agent_whose_exports_stop_gets_a_silence_alert(
    dep: Deployment, api: FakeOpenAI, processes: list[Sdk]
) -> None:
    process, agent = pydantic_agent(dep, api, processes, "quiet-pai")  # [otlp.agents."quiet-*"] interval = 1s
    asyncio.run(agent.run("weather in Paris?"))  # run_sync would leave its event loop open
    process.shutdown()  # the process exits: its SDK flushes, then nothing more comes
    status(dep, "quiet-pai", beats_total=2)
    (alert,) = wait_for(lambda: dep.fired("quiet-pai", "silence"), timeout=WAIT_S, what="a silence alert")
    assert "no heartbeat" in alert.summary


def test_a_token_runaway_raises_a_tokens_incident(
    dep: Deployment, api: FakeOpenAI, processes: list[Sdk]
) -> None:
    process, client = openai_agent(dep, api, processes, "runaway-bot")
    chat(client, 6)  # the baseline: 150 tokens a call ([detectors.tokens] warmup = 5)
    process.flush()
    status(dep, "runaway-bot", beats_total=6)
    api.usage = Usage(prompt=40_000, completion=2_000)
    chat(client)
    process.flush()
    (alert,) = wait_for(lambda: dep.fired("runaway-bot", "tokens"), timeout=WAIT_S, what="a tokens alert")
    assert "42,000" in alert.summary
    process.shutdown()


def test_an_agent_calling_the_same_tool_again_and_again_raises_a_loop(
    dep: Deployment, api: FakeOpenAI, processes: list[Sdk]
) -> None:
    from pydantic_ai.exceptions import UsageLimitExceeded  # noqa: PLC0415
    from pydantic_ai.usage import UsageLimits  # noqa: PLC0415

    api.loop = True  # the model asks for get_weather(Paris) after every result
    process, agent = pydantic_agent(dep, api, processes, "loop-bot")
    with pytest.raises(UsageLimitExceeded):
        asyncio.run(agent.run("weather in Paris?", usage_limits=UsageLimits(request_limit=8)))
    process.flush()
    (alert,) = wait_for(lambda: dep.fired("loop-bot", "loop"), timeout=WAIT_S, what="a loop alert")
    assert alert.details["fp"].startswith("get_weather(") and alert.details["count"] >= 5
    process.shutdown()


def test_an_agent_known_by_its_metrics_alone_is_timed_by_their_cadence(
    dep: Deployment, api: FakeOpenAI, processes: list[Sdk]
) -> None:
    """No span exporter at all: tokens from gen_ai.client.token.usage, liveness from the metrics
    exports (every 500 ms, learnt), and silence when they stop."""
    process, client = openai_agent(dep, api, processes, "metered-bot", metrics_every_ms=500)
    process.tracing.shutdown()  # this process exports metrics only
    chat(client, 2)
    found = status(dep, "metered-bot", tokens_total=300)
    assert found["beats_total"] >= 1
    pulses = wait_for(
        lambda: [
            e for e in events_of(dep, "metered-bot") if e["kind"] == "pulse" and e.get("interval", 60) < 1
        ],
        timeout=WAIT_S,
        what="pulses declaring the learnt interval",
    )
    assert 0.3 <= pulses[-1]["interval"] <= 0.9
    assert process.metering is not None
    process.metering.shutdown()
    wait_for(lambda: dep.fired("metered-bot", "silence"), timeout=WAIT_S, what="a silence alert")


def test_bad_requests_get_a_status_saying_why_and_are_counted(dep: Deployment) -> None:
    url = f"{dep.base}/v1/traces"
    good = {"Authorization": f"Bearer {INGEST}", "Content-Type": "application/x-protobuf"}
    body = traces(({"service.name": "wire-bot"}, [llm_call()])).SerializeToString()
    before = requests_by_outcome(dep)
    answers = {
        "no token": httpx.post(url, content=body, headers={"Content-Type": "application/x-protobuf"}),
        "wrong token": httpx.post(url, content=body, headers={**good, "Authorization": "Bearer nope"}),
        "garbage": httpx.post(url, content=b"\xff\xff\xff\xffnot protobuf", headers=good),
        "not otlp json": httpx.post(
            url, content=b'{"resourceSpans": 7}', headers={**good, "Content-Type": "application/json"}
        ),
        "media": httpx.post(url, content=body, headers={**good, "Content-Type": "text/plain"}),
        "too large": httpx.post(url, content=b"\x00" * 70_000, headers=good),
    }
    statuses = {what: answer.status_code for what, answer in answers.items()}
    assert statuses == {
        "no token": 401,
        "wrong token": 401,
        "garbage": 400,
        "not otlp json": 400,
        "media": 415,
        "too large": 413,
    }
    why = status_pb2.Status()
    why.ParseFromString(answers["no token"].content)
    assert "ingest_token" in why.message and answers["no token"].headers["WWW-Authenticate"].startswith(
        "Bearer"
    )
    assert "resourceSpans" in json.loads(answers["not otlp json"].text)["message"]
    after = requests_by_outcome(dep)
    counted = {outcome: after[outcome] - before.get(outcome, 0) for outcome in after}
    assert {k: v for k, v in counted.items() if v} == {
        "unauthorized": 2,
        "bad_request": 2,
        "unsupported": 1,
        "too_large": 1,
    }
    assert dep.status("wire-bot") is None  # nothing refused was written


def test_refused_parts_come_back_as_partial_success_in_the_request_encoding(dep: Deployment) -> None:
    request = traces(
        ({"service.name": "unknown_service:python"}, [llm_call()]),
        ({"service.name": "partial-bot"}, [llm_call()]),
    )
    body = json_format.MessageToJson(request)  # ids in base64, which hex-only OTLP JSON would refuse:
    body_json = json.loads(body)
    for rs in body_json["resourceSpans"]:
        for span in rs["scopeSpans"][0]["spans"]:
            span.pop("traceId"), span.pop("spanId")
    answer = httpx.post(
        f"{dep.base}/v1/traces",
        content=json.dumps(body_json),
        headers={"Authorization": f"Bearer {INGEST}", "Content-Type": "application/json"},
    )
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("application/json")
    response = json_format.Parse(answer.text, ExportTraceServiceResponse())
    assert response.partial_success.rejected_spans == 1
    assert "name no agent" in response.partial_success.error_message
    status(dep, "partial-bot", beats_total=1)


def requests_by_outcome(dep: Deployment) -> dict[str, float]:
    with dep.client() as http:
        families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
    samples = families["agentwatch_otlp_requests"].samples
    return {s.labels["outcome"]: s.value for s in samples if s.labels["signal"] == "traces"}


def test_redis_down_is_503_and_the_exporter_keeps_the_batch_until_it_is_back(
    short_dir: Path, prefix: str, spawn_redis: Any, processes: list[Sdk]
) -> None:
    server = spawn_redis()
    http = f'ingest_token = "{INGEST}"\n'
    with deployment(short_dir, prefix=prefix, redis_url=server.url, workers=(), http=http) as down:
        body = traces(({"service.name": "patient-bot"}, [llm_call()])).SerializeToString()
        headers = {"Authorization": f"Bearer {INGEST}", "Content-Type": "application/x-protobuf"}
        server.stop()
        answer = httpx.post(f"{down.base}/v1/traces", content=body, headers=headers, timeout=10)
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "5"
        # A real exporter, told 503, retries with backoff instead of dropping the batch.
        process = sdk(down.base, INGEST, service="patient-bot")
        processes.append(process)
        process.tracing.get_tracer("t").start_span("chat", attributes={"gen_ai.usage.input_tokens": 9}).end()
        flushing = threading.Thread(target=process.flush)
        flushing.start()
        time.sleep(1.5)
        server.start()
        flushing.join(30)
        client = redis.Redis.from_url(server.url)
        try:
            beats = wait_for(
                lambda: [e for e in _events(client, down) if e["kind"] == "beat"],
                timeout=WAIT_S,
                what="the retried beat",
            )
            assert beats[0]["tokens_in"] == 9
        finally:
            client.close()


def _events(client: redis.Redis, dep: Deployment) -> list[dict[str, Any]]:
    return [codec.decode(fields[b"d"]) for _, fields in client.xrange(dep.keys.events())]
