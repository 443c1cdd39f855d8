"""OTLP ingest: spans per second through the receiver on one core, and Redis memory per OTel agent.

**Throughput.** A realistic export: 512 spans from one process, 10 % of them LLM calls (copies of
the chat span opentelemetry-instrumentation-openai-v2 recorded in tests/data/otlp/, with the
content capture PydanticAI and OpenLLMetry switch on by default: prompts and completions as
attributes), the rest HTTP client spans (copies of the httpx span OpenLIT recorded), each kind in
its instrumentation's scope as the SDK batches them. Measured in the same run, interleaved round
by round, as CPU seconds of this process (the receiver's one core; Redis runs in its own process):

* ``decode``: ``ExportTraceServiceRequest.FromString`` alone, the baseline (goal: ingest >= 0.5x);
* ``decode + every attribute``: decoding, then visiting each attribute of each span once (key and
  value kind): what any receiver that reads the spans without skipping pays, for context;
* ``decode + read``: reading every process's LLM and tool calls (agentwatch/otlp/spans.py: scopes
  without a GenAI name are searched and counted, never decoded; GenAI scopes are decoded with
  attributes as a map, only the names read become Python objects), no Redis;
* ``ingest``: the whole receiver as ``POST /v1/traces`` runs it, awaited from a running event
  loop: its export thread, decode, read, fold with the process's state, admit, number and encode
  52 beats, one script call that writes them and the new state, the answer;
* ``ingest, signed``: the same with ``[security] agent_keys`` (every event HMAC-signed).

A second table times the receiver's steps in place (the calling thread, no event loop) beside
the decode baseline: where an export's CPU goes. It shows why 0.5x is out of reach for a Python
receiver that writes one event per LLM call: 0.5x leaves one decode's time for everything else,
and the fixed costs alone take more (searching the non-GenAI scope for GenAI names, one pass per
name at CPython's substring-search speed, about a decode; one Redis round trip through redis-py
and the kernel, most of a decode; the hop to the export thread), before the Python work of 52 LLM
calls (finding their names, reading usage, model and provider, folding, encoding: a few
microseconds each, several decodes in all).

**Memory.** ``--agents`` agents reach Redis one way or the other with the same usage (a start and
10 LLM calls each): as a producer sends it (events XADDed directly), and as OTLP exports through
the receiver. A detector worker applies everything and checkpoints its state as it does when it
stops (without that, whether a population's detector state was in Redis yet depended on the
worker's half-second checkpoint clock); the event and alert streams are deleted (they are capped
and trimmed, not per-agent state), the connections that fed and processed them are closed and
gone (their buffers are not the agents'), and ``used_memory`` is compared with the empty
server's, one private server per population, with the server's per-command latency histograms
off (a fixed ~1 MB, not per agent: see :func:`_untracked`). The table lists ``MEMORY USAGE`` of
every key left, per agent, for both populations: where every byte goes. What an OTel agent has
and a producer agent has not is its run record (the ingest buckets) and its process's state (the
OTLP buckets), which a producer agent keeps in its own process instead.

    python benchmarks/otlp_ingest.py [--quick] [--rounds 5] [--exports 40] [--agents 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import figure, median, report

from agentwatch import codec, config, plugins
from agentwatch.embedded import EmbeddedRedis
from agentwatch.ingest import EventWriter, FloodLimit
from agentwatch.keys import BUCKETS
from agentwatch.otlp.receiver import Receiver
from agentwatch.otlp.spans import read_traces
from agentwatch.redisconn import connect
from agentwatch.workers import detector_worker

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "otlp"
SPANS = 512
LLM_EVERY = 10
BEATS = 10
UNLIMITED = FloodLimit(rate_per_s=1e9, burst=1_000_000_000)
SECRET = "a-benchmark-pipeline-secret-0123456789abcdef"


def export_body(service: str = "bench-bot", instance: str = "bench-1") -> bytes:
    """The realistic export (see the module docstring)."""
    chat = _first_span("openai-v2.traces.pb")
    chat.attributes.extend(
        [
            KeyValue(key="gen_ai.input.messages", value=AnyValue(string_value="[" + "x" * 1500 + "]")),
            KeyValue(key="gen_ai.output.messages", value=AnyValue(string_value="[" + "y" * 500 + "]")),
        ]
    )
    http = _first_span("openlit.traces.1.pb")
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    for key, value in (("service.name", service), ("service.instance.id", instance), ("host.name", "bench")):
        resource_spans.resource.attributes.add(key=key, value=AnyValue(string_value=value))
    genai = resource_spans.scope_spans.add()
    genai.scope.name = "opentelemetry.instrumentation.openai_v2"
    other = resource_spans.scope_spans.add()
    other.scope.name = "opentelemetry.instrumentation.httpx"
    for n in range(SPANS):
        template, scope = (chat, genai) if n % LLM_EVERY == 0 else (http, other)
        span = scope.spans.add()
        span.CopyFrom(template)
        span.span_id = (n + 1).to_bytes(8, "big")
        span.trace_id = (n // LLM_EVERY + 1).to_bytes(16, "big")
        span.end_time_unix_nano = template.end_time_unix_nano + n
    body: bytes = request.SerializeToString()
    return body


def _first_span(name: str) -> Any:
    request = ExportTraceServiceRequest.FromString((DATA / name).read_bytes())
    return request.resource_spans[0].scope_spans[0].spans[0]


def throughput(url: str, rounds: int, exports: int) -> tuple[list[dict[str, Any]], float, dict[str, float]]:
    client = redis.Redis.from_url(url)
    settings = config.OtlpSection()
    receivers = {}
    for name, secret in (("plain", None), ("signed", SECRET)):  # each its own prefix: its own agent
        keys = config.Pipeline(settings=config.PipelineSettings(), source="bench").keys
        keys = type(keys)(f"bench-{name}", keys.shards)
        writer = EventWriter(client, keys, limit=UNLIMITED, run_ttl_s=3600.0, secret=secret)
        receivers[name] = Receiver(client, keys, settings, writer)
    body = export_body()
    loop = asyncio.new_event_loop()

    def decode(n: int) -> None:
        for _ in range(n):
            ExportTraceServiceRequest.FromString(body)

    def every_attribute(n: int) -> None:
        for _ in range(n):
            request = ExportTraceServiceRequest.FromString(body)
            for resource_spans in request.resource_spans:
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        for kv in span.attributes:
                            kv.value.WhichOneof("value")

    def read(n: int) -> None:
        for _ in range(n):
            read_traces(body, settings)

    def ingest(receiver: Receiver) -> Callable[[int], None]:
        async def exports_in_turn(n: int) -> None:  # as the server's event loop awaits them
            for _ in range(n):
                outcome = await receiver.export("traces", body, "application/x-protobuf", None)
                assert outcome.tally["beats"] == SPANS // LLM_EVERY + 1 and not outcome.rejected, outcome

        return lambda n: loop.run_until_complete(exports_in_turn(n))

    cases = {
        "decode": decode,
        "decode + every attribute": every_attribute,
        "decode + read": read,
        "ingest": ingest(receivers["plain"]),
        "ingest, signed ([security] agent_keys)": ingest(receivers["signed"]),
    }
    for run in cases.values():
        run(1)  # warm-up: scripts loaded, the runs started, the states remembered
    samples: dict[str, list[float]] = {name: [] for name in cases}
    ratios = []
    for _ in range(rounds):
        for name, run in cases.items():
            started = time.process_time()
            run(exports)
            samples[name].append(SPANS * exports / (time.process_time() - started))
        ratios.append(samples["ingest"][-1] / samples["decode"][-1])
    where = stages(receivers["plain"], body, rounds, exports)
    loop.close()
    for receiver in receivers.values():
        receiver.close()
        keys = receiver.keys
        client.delete(keys.events(), keys.otlp_count(), *(keys.ingest(0, b) for b in range(BUCKETS)),
                      *(keys.otlp(0, b) for b in range(BUCKETS)))  # fmt: skip
    client.close()
    rows = [
        {
            "path": name,
            "spans/s min": min(values),
            "spans/s median": median(values),
            "spans/s max": max(values),
            "x decode (median)": median(values) / median(samples["decode"]),
        }
        for name, values in samples.items()
    ]
    return rows, median(ratios), where


STAGES = {
    "decode the request and read the LLM and tool calls": ("receiver", "_read"),
    "look up what this server does not hold (none when warm)": ("receiver", "_prefetch"),
    "number, encode (and sign) the events": ("writer", "_prepare"),
    "the one Redis round trip (redis-py, syscalls)": ("ingest", "run_calls"),
    "settle the script's reply": ("writer", "_settle"),
}
READ_STAGES = {
    "  of which: search the scopes for GenAI names": ("spans", "_holds"),
    "  of which: decode the GenAI scopes, count the others' spans (with the search)": ("spans", "_decoded"),
    "  of which: find the wanted names of the GenAI scopes' spans": ("spans", "_found"),
    "  of which: read the calls (usage, model, provider) and their agents": ("spans", "_steps"),
}
"""Steps inside the read, timed the same way (nested: each is part of the read's time)."""


def stages(receiver: Receiver, body: bytes, rounds: int, exports: int) -> dict[str, float]:
    """Where one export's CPU goes (median us over the rounds), the decode baseline beside it:
    the receiver's steps timed in place (process CPU time, each wrapper's own cost included: a
    few percent), in the calling thread."""
    import agentwatch.ingest as ingest_module  # noqa: PLC0415 - its run_calls is timed in place
    import agentwatch.otlp.spans as spans_module  # noqa: PLC0415 - so are steps of the read

    spent: dict[str, float] = {}
    owners = {"receiver": receiver, "writer": receiver.writer, "ingest": ingest_module, "spans": spans_module}
    every = {**STAGES, **READ_STAGES}
    originals = {name: getattr(owners[owner], attr) for name, (owner, attr) in every.items()}

    def timed(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            started = time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.process_time() - started

        return run

    per_round: dict[str, list[float]] = {}
    try:
        for name, (owner, attr) in every.items():
            setattr(owners[owner], attr, timed(name, originals[name]))
        for _ in range(rounds):
            spent.clear()
            started = time.process_time()
            for _ in range(exports):
                ExportTraceServiceRequest.FromString(body)
            baseline = time.process_time() - started
            started = time.process_time()
            for _ in range(exports):
                receiver.ingest("traces", body, "application/x-protobuf", None)
            total = time.process_time() - started
            steps = {name: spent.get(name, 0.0) for name in STAGES}
            rest = total - sum(steps.values())
            (read, *others) = steps.items()
            measured = {
                "decode alone (the baseline)": baseline,
                read[0]: read[1],
                **{name: spent.get(name, 0.0) for name in READ_STAGES},
                **dict(others),
                "fold, admit, plan the calls, the answer (the rest)": rest,
                "= an export in the calling thread (no event loop hop)": total,
            }
            for name, value in measured.items():
                per_round.setdefault(name, []).append(value / exports * 1e6)
    finally:
        for name, (owner, attr) in every.items():
            if owner in ("ingest", "spans"):
                setattr(owners[owner], attr, originals[name])
            else:
                delattr(owners[owner], attr)  # the instance attribute: the method shows again
    return {name: median(values) for name, values in per_round.items()}


def memory(agents: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
    per_agent = {}
    by_key: dict[str, dict[str, float]] = {}
    for population in ("producer", "otlp"):
        server = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="aw-bench-"))).start()
        client = redis.Redis.from_url(server.url)
        try:
            _untracked(client)
            detectors, problems = plugins.load_detectors({})
            assert not problems, problems
            settings = config.PipelineSettings()
            pipeline = config.Pipeline(settings=settings, source="bench", detectors=detectors)
            keys = pipeline.keys
            client.xgroup_create(keys.events(), "detectors", id="0", mkstream=True)
            before = int(client.info("memory")["used_memory"])
            feeder = redis.Redis.from_url(server.url)  # its buffers are not the agents' memory
            if population == "producer":
                _as_producers(feeder, keys.events(), agents)
            else:
                _as_otlp(feeder, pipeline, agents)
            feeder.close()
            worker = detector_worker(pipeline, connect(settings, server.url))
            events = client.xlen(keys.events())
            while worker.stats.processed < events:
                worker.run_once()
            for handler in worker.handlers:  # the detector state checkpointed, as at a stop
                handler.on_stop()
            worker.client.close()
            client.delete(keys.events(), keys.alerts)
            _alone(client)
            per_agent[population] = (int(client.info("memory")["used_memory"]) - before) / agents
            by_key[population] = _by_key(client, keys, agents)
            keyed = by_key[population]
            rest = per_agent[population] - sum(keyed.values())
            keyed["(the rest: in no key, or MEMORY USAGE's estimates off)"] = rest
        finally:
            client.close()
            server.cleanup()
    rows: list[dict[str, Any]] = [
        {"Redis bytes per agent": "used_memory (producer: start + 10 beats XADDed; OTel: one export "
         "of 10 LLM calls)", "producer": per_agent["producer"], "OTel": per_agent["otlp"]}
    ]  # fmt: skip
    names = sorted({*by_key["producer"], *by_key["otlp"]}, key=lambda name: (name.startswith("("), name))
    rows += [
        {"Redis bytes per agent": f"  of which {name}", "producer": by_key["producer"].get(name, 0.0),
         "OTel": by_key["otlp"].get(name, 0.0)}
        for name in names
    ]  # fmt: skip
    return rows, per_agent


def _untracked(client: redis.Redis) -> None:
    """Turn off the server's per-command latency histograms (Redis 7's ``latency-tracking``, on by
    default): one is allocated the first time a command name runs, tens of kilobytes each, about
    1 MB for the commands a worker uses. A fixed cost of the server, not of any agent, which the
    per-agent division would otherwise spread over the agents (flattering both populations, and
    charging the OTel one for the few commands only it runs: EVALSHA, SCRIPT LOAD)."""
    with contextlib.suppress(redis.ResponseError):  # a server before 7.0 has no histograms
        client.config_set("latency-tracking", "no")


def _by_key(client: redis.Redis, keys: Any, agents: int) -> dict[str, float]:
    """``MEMORY USAGE`` of every key left, per agent, named by what it is (the prefix and the
    stream's name taken out, so the two populations' keys line up)."""
    found: dict[str, float] = {}
    for raw in client.scan_iter(count=1000):
        key = raw.decode()
        if key.startswith(f"{keys.prefix}:worker:"):
            name = "worker registry"
        else:
            name = key.removeprefix(f"{keys.prefix}:").replace(f":{{{keys.events()}}}", "")
            name = re.sub(r":\d+$", " (its buckets)", name.replace("{0}:", ""))
        found[name] = found.get(name, 0.0) + int(client.memory_usage(raw, samples=0) or 0) / agents
    return found


def _alone(client: redis.Redis, timeout_s: float = 10.0) -> None:
    """Wait until the server has let go of every other connection (a closed client's buffers
    are freed when the server reads its close, which a command on another connection can
    overtake)."""
    deadline = time.monotonic() + timeout_s
    while len(client.client_list()) > 1:
        if time.monotonic() > deadline:
            raise SystemExit(f"connections still open: {client.client_list()}")
        time.sleep(0.01)


def _as_producers(client: redis.Redis, stream: str, agents: int) -> None:
    pipe = client.pipeline(transaction=False)
    for n in range(agents):
        head = {"v": 1, "agent": f"agent-{n:06d}", "ts": time.time(), "run": f"{n:016x}"}
        start = {**head, "kind": "start", "seq": 0, "interval": 60.0, "pid": 4242, "host": "bench",
                 "version": "0.1.0"}  # fmt: skip
        pipe.xadd(stream, {"d": codec.encode(start)})
        for seq in range(1, BEATS + 1):
            usage = {"tokens": 150, "tokens_in": 120, "tokens_out": 30, "tokens_cache_read": 100,
                     "tokens_reasoning": 10, "model": "gpt-4o-2024-08-06"}  # fmt: skip
            beat = {**head, "kind": "beat", "seq": seq, **usage}
            pipe.xadd(stream, {"d": codec.encode(beat)})
        if n % 200 == 0:
            pipe.execute()
    pipe.execute()


def _as_otlp(client: redis.Redis, pipeline: config.Pipeline, agents: int) -> None:
    settings = pipeline.settings.otlp.model_copy(update={"max_agents": agents})
    writer = EventWriter(client, pipeline.keys, limit=UNLIMITED, run_ttl_s=7 * 86400.0)
    receiver = Receiver(client, pipeline.keys, settings, writer)
    chat = _first_span("openai-v2.traces.pb")

    async def send() -> None:
        for n in range(agents):
            request = ExportTraceServiceRequest()
            resource_spans = request.resource_spans.add()
            for key, value in (("service.name", f"agent-{n:06d}"), ("service.instance.id", f"{n:016x}")):
                resource_spans.resource.attributes.add(key=key, value=AnyValue(string_value=value))
            scope = resource_spans.scope_spans.add()
            for _ in range(BEATS):
                scope.spans.add().CopyFrom(chat)
            await receiver.export("traces", request.SerializeToString(), "application/x-protobuf", None)

    asyncio.run(send())
    receiver.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 20 exports, 500 agents")
    parser.add_argument("--rounds", type=int, default=None, help="default 5")
    parser.add_argument("--exports", type=int, default=None, help="exports per case and round (40)")
    parser.add_argument("--agents", type=int, default=None, help="agents per population, memory (2000)")
    args = parser.parse_args()
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.exports = args.exports or (20 if args.quick else 40)
    args.agents = args.agents or (500 if args.quick else 2000)
    server = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="aw-bench-"))).start()
    try:
        rows, ratio, where = throughput(server.url, args.rounds, args.exports)
    finally:
        server.cleanup()
    memory_rows, per_agent = memory(args.agents)
    stage_rows = [{"where an export's CPU goes": name, "us (median)": value} for name, value in where.items()]
    figures = [
        figure(
            "OTLP ingest spans/s vs opentelemetry-proto decoding alone",
            round(ratio, 3),
            "ratio",
            goal=0.5,
            better="higher",
            issue=15,
        ),
        figure(
            "Redis bytes per OTel agent / per producer agent",
            round(per_agent["otlp"] / per_agent["producer"], 3),
            "ratio",
            goal=1.0,
            better="lower",
            issue=15,
        ),
    ]
    report(
        "otlp_ingest",
        [*rows, *stage_rows, *memory_rows],
        extra={
            "spans": SPANS,
            "llm_share": 1 / LLM_EVERY,
            "exports": args.exports,
            "rounds": args.rounds,
            "agents": args.agents,
            "bytes_per_agent": per_agent,
            "stages_us": where,
        },
        figures=figures,
    )
    print(f"ingest / decode: {ratio:.3f} (goal >= 0.5); bytes per OTel agent {per_agent['otlp']:.0f} vs "
          f"producer {per_agent['producer']:.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
