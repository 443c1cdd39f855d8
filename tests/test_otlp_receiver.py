"""The OTLP receiver on a real Redis, without HTTP: what exports become on the event stream,
what it remembers between exports, and the bounds on what exporters can make it write."""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from agentwatch import codec
from agentwatch.alerts import decode_alert
from agentwatch.config import OtlpSection
from agentwatch.ingest import EventWriter, FloodLimit
from agentwatch.keys import BUCKETS, OTLP_COUNT_FIELD, Keys, shard_of
from agentwatch.otlp.receiver import Outcome, Receiver
from agentwatch.otlp.state import EXPIRY, ProcessState

from helpers import wait_for
from otlp_build import llm_call, span, token_histogram, tool_call, traces

PB = "application/x-protobuf"
SERVICE = {"service.name": "bot", "service.instance.id": "i-1", "host.name": "h1"}
ROOMY = FloodLimit(rate_per_s=1000.0, burst=1000)


_made: list[Receiver] = []


@pytest.fixture(autouse=True)
def _close_receivers() -> Iterator[None]:
    yield
    while _made:
        _made.pop().close()


def receiver(r: redis.Redis, keys: Keys, limit: FloodLimit = ROOMY, **settings: Any) -> Receiver:
    writer = EventWriter(r, keys, limit=limit, run_ttl_s=3600.0)
    made = Receiver(r, keys, OtlpSection(**settings), writer)
    _made.append(made)
    return made


def export(rec: Receiver, request: Any, signal: str = "traces") -> Outcome:
    return asyncio.run(rec.export(signal, request.SerializeToString(), PB, None))  # type: ignore[arg-type]


def events(r: redis.Redis, keys: Keys, agent: str | None = None) -> list[dict[str, Any]]:
    decoded = [codec.decode(fields[b"d"]) for _, fields in r.xrange(keys.events())]
    return [event for event in decoded if agent is None or event["agent"] == agent]


def test_an_export_becomes_a_run_of_protocol_events(r: redis.Redis, keys: Keys) -> None:
    outcome = export(receiver(r, keys), traces((SERVICE, [llm_call(100, 20), tool_call(), llm_call(7, 3)])))
    assert outcome.rejected == 0 and outcome.problems == []
    evs = events(r, keys)
    assert [(e["kind"], e["run"], e["seq"]) for e in evs] == [
        ("start", "i-1", 0),
        ("beat", "i-1", 1),
        ("beat", "i-1", 2),
    ]
    start, first, second = evs
    assert start["interval"] == 60.0 and start["host"] == "h1" and start["source"] == "otlp"
    assert (first["tokens"], first["tokens_in"], first["tokens_out"], first["model"]) == (
        120,
        100,
        20,
        "gpt-4o",
    )
    assert second["fp"].startswith("search(")


def test_the_next_export_continues_the_run_and_reads_what_the_last_one_left(
    r: redis.Redis, keys: Keys
) -> None:
    rec = receiver(r, keys)
    export(rec, traces((SERVICE, [llm_call(), tool_call("lookup", "1")])))
    export(rec, traces((SERVICE, [llm_call()])))  # the model reading the tool's result, a moment later
    evs = events(r, keys)
    assert [e["seq"] for e in evs] == [0, 1, 2]
    assert evs[-1]["fp"].startswith("lookup(")


def test_a_new_service_instance_starts_a_new_run(r: redis.Redis, keys: Keys) -> None:
    rec = receiver(r, keys)
    export(rec, traces((SERVICE, [llm_call()])))
    export(rec, traces(({**SERVICE, "service.instance.id": "i-2"}, [llm_call()])))
    assert [(e["kind"], e["run"]) for e in events(r, keys)] == [
        ("start", "i-1"),
        ("beat", "i-1"),
        ("start", "i-2"),
        ("beat", "i-2"),
    ]


def test_cumulative_metrics_across_exports_become_usage_once(r: redis.Redis, keys: Keys) -> None:
    rec = receiver(r, keys)
    start = (int(r.time()[0]) - 5) * 1_000_000_000
    for total in (100, 100, 250):
        export(rec, token_histogram(SERVICE, [("input", total, start)]), "metrics")
    beats = [e for e in events(r, keys) if e["kind"] == "beat"]
    assert [b["tokens_in"] for b in beats] == [100, 150]


def test_ten_thousand_service_names_from_one_exporter_are_bounded_with_an_alert(
    r: redis.Redis, keys: Keys
) -> None:
    rec = receiver(r, keys, max_agents=100, max_agents_per_export=1000)
    rejected = 0
    for batch in range(10):
        groups = [({"service.name": f"svc-{batch}-{n}"}, [llm_call()]) for n in range(1000)]
        rejected += export(rec, traces(*groups)).rejected
    assert rejected == 10_000 - 100
    assert int(r.hget(keys.otlp_count(), OTLP_COUNT_FIELD) or 0) == 100
    assert len({e["agent"] for e in events(r, keys)}) == 100
    alerts = [decode_alert(fields[b"d"]) for _, fields in r.xrange(keys.alerts)]
    assert [(a.agent, a.detector, a.status) for a in alerts] == [("agentwatch", "otlp", "firing")]
    assert "max_agents (100)" in alerts[0].summary
    # the agents already known keep being written
    assert export(rec, traces(({"service.name": "svc-0-0"}, [llm_call()]))).rejected == 0


def test_the_cap_incident_resolves_once_forgotten_agents_make_room(r: redis.Redis, keys: Keys) -> None:
    rec = receiver(r, keys, max_agents=2, forget="1s", interval="0.1s")  # a record outlives 4 intervals
    export(rec, traces(*[({"service.name": f"a{n}"}, [llm_call()]) for n in range(3)]))
    assert export(rec, traces(({"service.name": "a2"}, [llm_call()]))).rejected == 1  # still no room
    # [otlp] forget passes for the two known agents; the HTTP server's sweep forgets them
    wait_for(lambda: (rec.writer.sweep(), rec.writer.counted() == 0)[1], timeout=10, what="agents forgotten")
    assert export(rec, traces(({"service.name": "a2"}, [llm_call()]))).rejected == 0
    alerts = [decode_alert(fields[b"d"]) for _, fields in r.xrange(keys.alerts)]
    assert [a.status for a in alerts] == ["firing", "resolved"]
    assert rec.writer.counted() == 1


def test_one_export_may_name_only_so_many_agents(r: redis.Redis, keys: Keys) -> None:
    rec = receiver(r, keys, max_agents_per_export=3)
    outcome = export(rec, traces(*[({"service.name": f"s{n}"}, [llm_call(), llm_call()]) for n in range(5)]))
    assert outcome.rejected == 4  # two agents' two calls each
    assert "2 agent(s) refused, over [otlp] max_agents_per_export (3)" in outcome.message
    assert not r.xrange(keys.alerts)  # a per-export refusal is the exporter's problem: no page


def test_agent_names_outside_the_accept_glob_are_refused(r: redis.Redis, keys: Keys) -> None:
    rec = receiver(r, keys, accept="team-a-*")
    outcome = export(
        rec, traces(({"service.name": "team-a-bot"}, [llm_call()]), ({"service.name": "x"}, [llm_call()]))
    )
    assert outcome.rejected == 1 and "not matching [otlp] accept ('team-a-*'), e.g. 'x'" in outcome.message
    assert {e["agent"] for e in events(r, keys)} == {"team-a-bot"}


def test_a_flooding_agent_is_refused_and_the_others_are_written(r: redis.Redis, keys: Keys) -> None:
    rec = receiver(r, keys, limit=FloodLimit(rate_per_s=0.001, burst=1))
    export(rec, traces((SERVICE, [llm_call()])))
    outcome = export(rec, traces((SERVICE, [llm_call()]), ({"service.name": "quiet"}, [llm_call()])))
    assert outcome.rejected == 1 and "over the flood limit" in outcome.message
    assert [e["agent"] for e in events(r, keys) if e["kind"] == "beat"] == ["bot", "quiet"]


def test_spans_naming_no_agent_are_reported_to_the_exporter(r: redis.Redis, keys: Keys) -> None:
    outcome = export(receiver(r, keys), traces(({"service.name": "unknown_service:python"}, [llm_call()])))
    assert outcome.rejected == 1
    assert outcome.message.startswith("1 GenAI span(s) name no agent: set gen_ai.agent.name or service.name")
    assert events(r, keys) == []


def test_processes_that_are_not_agents_leave_nothing_behind(r: redis.Redis, keys: Keys) -> None:
    rec = receiver(r, keys)
    export(rec, traces(({"service.name": "web"}, [span("GET /")])))
    request = token_histogram({"service.name": "web"}, [("input", 1, 0)])
    request.resource_metrics[0].scope_metrics[0].metrics[0].name = "http.server.duration"
    export(rec, request, "metrics")
    assert events(r, keys) == []
    assert list(r.scan_iter(match=f"{keys.prefix}:otlp:*")) == []


def test_the_process_state_expires_after_forget(r: redis.Redis, keys: Keys) -> None:
    export(receiver(r, keys, forget="1h"), traces((SERVICE, [tool_call()])))
    (value,) = processes(r, keys).values()
    (expires,) = EXPIRY.unpack_from(value)
    assert time.time() + 3500 < expires <= time.time() + 3602
    assert ProcessState.unpack(value).trace.pending  # the tool call waits for the next LLM call


def test_expired_process_states_and_agents_are_swept(r: redis.Redis, keys: Keys) -> None:
    rec = receiver(r, keys, forget="1s", interval="0.1s")
    export(rec, traces((SERVICE, [llm_call(), tool_call()])))
    assert len(processes(r, keys)) == 1 and len(records(r, keys)) == 1  # a process; the agent
    assert r.hget(keys.otlp_count(), OTLP_COUNT_FIELD) == b"1"
    wait_for(lambda: (rec.writer.sweep(), records(r, keys) == processes(r, keys) == {})[1], timeout=10,
             what="the sweep")  # fmt: skip
    assert r.hgetall(keys.otlp_count()) == {OTLP_COUNT_FIELD.encode(): b"0"}


def processes(r: redis.Redis, keys: Keys, shard: int = 0) -> dict[bytes, bytes]:
    """Every process state of a stream, over its buckets."""
    return {k: v for bucket in range(BUCKETS) for k, v in r.hgetall(keys.otlp(shard, bucket)).items()}


def records(r: redis.Redis, keys: Keys, shard: int = 0) -> dict[bytes, bytes]:
    """Every run record of a stream, over its buckets."""
    return {k: v for bucket in range(BUCKETS) for k, v in r.hgetall(keys.ingest(shard, bucket)).items()}


def test_a_gzipped_body_is_decoded(r: redis.Redis, keys: Keys) -> None:
    body = gzip.compress(traces((SERVICE, [llm_call()])).SerializeToString())
    asyncio.run(receiver(r, keys).export("traces", body, PB, "gzip"))
    assert [e["kind"] for e in events(r, keys)] == ["start", "beat"]


def test_an_empty_export_writes_nothing(r: redis.Redis, keys: Keys) -> None:
    assert export(receiver(r, keys), ExportTraceServiceRequest()).rejected == 0
    assert events(r, keys) == []


def test_without_an_ingest_token_the_routes_say_ingest_is_off(redis_url: str, prefix: str) -> None:
    from google.rpc import status_pb2  # noqa: PLC0415
    from starlette.testclient import TestClient  # noqa: PLC0415

    from agentwatch.config import Pipeline  # noqa: PLC0415
    from agentwatch.http.app import create_app  # noqa: PLC0415

    from helpers import settings_for  # noqa: PLC0415

    pipeline = Pipeline(settings=settings_for(prefix, redis_url), source="test")
    with TestClient(create_app(pipeline, redis_url)) as http:
        answer = http.post("/v1/metrics", content=b"", headers={"Content-Type": "application/x-protobuf"})
    assert answer.status_code == 404
    why = status_pb2.Status.FromString(answer.content)
    assert "OTLP ingest is off: set [http] ingest_token" in why.message


def test_with_otlp_disabled_there_are_no_routes(redis_url: str, prefix: str) -> None:
    from starlette.testclient import TestClient  # noqa: PLC0415

    from agentwatch.config import OtlpSection, Pipeline  # noqa: PLC0415
    from agentwatch.http.app import create_app  # noqa: PLC0415

    from helpers import settings_for  # noqa: PLC0415

    settings = settings_for(prefix, redis_url)
    settings = settings.model_copy(update={"otlp": OtlpSection(enabled=False)})
    with TestClient(create_app(Pipeline(settings=settings, source="test"), redis_url)) as http:
        assert http.post("/v1/traces", content=b"").status_code == 404


def test_exports_spread_over_servers_fold_from_the_state_the_other_left(r: redis.Redis, keys: Keys) -> None:
    """Two servers behind a load balancer, each remembering what it stored last: a server whose
    memory is behind folds again from the state in Redis, so nothing is counted twice."""
    one, two = receiver(r, keys), receiver(r, keys)
    start = (int(r.time()[0]) - 5) * 1_000_000_000
    for rec, total in ((one, 100), (two, 150), (one, 250), (two, 260)):  # one's memory says 100 at 250
        export(rec, token_histogram(SERVICE, [("input", total, start)]), "metrics")
    # the first export of a metrics-only process is held back (docs/opentelemetry.md), then usage
    # since the series began, then each export's increase: 250 - 150, not 250 - 100
    assert [b["tokens_in"] for b in events(r, keys) if b["kind"] == "beat"] == [150, 100, 10]
    export(one, traces((SERVICE, [llm_call(), tool_call("lookup", "1")])))
    export(two, traces((SERVICE, [llm_call(), tool_call("fetch", "2")])))  # reads what one left
    export(one, traces((SERVICE, [llm_call()])))  # reads what two left, not its own memory
    fps = [e["fp"].split("(")[0] for e in events(r, keys) if "fp" in e]
    assert fps == ["lookup", "fetch"]
    assert [e["seq"] for e in events(r, keys)] == list(range(len(events(r, keys))))  # one run, in order


def test_agents_in_other_streams_than_their_process_are_written_after_its_state(
    r: redis.Redis, prefix: str
) -> None:
    keys = Keys(prefix, 4)
    home = shard_of("svc", 4)
    far = next(f"agent-{n}" for n in range(100) if shard_of(f"agent-{n}", 4) != home)
    near = next(f"agent-{n}" for n in range(100) if shard_of(f"agent-{n}", 4) == home)
    rec = receiver(r, keys)
    resource = {"service.name": "svc", "service.instance.id": "i-1"}
    calls = [
        llm_call(gen_ai__agent__name=far),
        llm_call(gen_ai__agent__name=near),
        tool_call(gen_ai__agent__name=far),
    ]
    outcome = export(rec, traces((resource, calls)))
    assert outcome.rejected == 0 and outcome.tally["events"] == 4  # a start and a beat each
    for agent in (far, near):
        stream = [codec.decode(f[b"d"]) for _, f in r.xrange(keys.events_for(agent))]
        assert [(e["agent"], e["kind"]) for e in stream] == [(agent, "start"), (agent, "beat")]
    (state,) = processes(r, keys, home).values()
    assert ProcessState.unpack(state).trace.pending_agent == far  # the tool call waits in the home stream
    export(rec, traces((resource, [llm_call(gen_ai__agent__name=far)])))
    beats = [codec.decode(f[b"d"]) for _, f in r.xrange(keys.events_for(far))][2:]
    assert [b["fp"].split("(")[0] for b in beats] == ["search"]
