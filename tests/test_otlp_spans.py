"""Spans -> LLM calls and tool calls per agent, for every naming generation (fast, no Redis).

The recorded payloads were made by real instrumentations (tests/data/otlp/manifest.json says
which, and which versions); the built ones cover what no instrumentation sends on purpose.
"""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from agentwatch.config import OtlpSection
from agentwatch.errors import OtlpRejected
from agentwatch.otlp.decode import trace_bytes
from agentwatch.otlp.spans import Call, ToolCall, read_traces

from otlp_build import DATA, llm_call, read_request, recorded, span, tool_call, traces

SETTINGS = OtlpSection()
SERVICE = {"service.name": "svc", "service.instance.id": "i-1"}
FULL_USAGE = {
    "tokens_in": 120,
    "tokens_out": 30,
    "tokens": 150,
    "tokens_cache_read": 100,
    "tokens_reasoning": 10,
}


def read(name: str):
    content_type = "application/json" if name.endswith(".json") else "application/x-protobuf"
    return read_traces(trace_bytes(recorded(name), content_type, None, 10**7), SETTINGS)


@pytest.mark.parametrize(
    ("payload", "agent", "usage", "provider", "cost"),
    [
        # opentelemetry-instrumentation-openai-v2 2.4b0: semconv >= 1.37 names, no cache/reasoning
        (
            "openai-v2.traces.pb",
            "rec-openai-v2",
            {"tokens_in": 120, "tokens_out": 30, "tokens": 150},
            "openai",
            None,
        ),
        # OpenLLMetry 0.62: semconv names plus gen_ai.usage.reasoning_tokens
        ("openllmetry.traces.pb", "rec-openllmetry", FULL_USAGE, "openai", None),
        # OpenLLMetry 0.30: the deprecated prompt/completion names and gen_ai.system (semconv <= 1.26)
        (
            "openllmetry-0.30.traces.pb",
            "rec-openllmetry-0.30",
            {"tokens_in": 120, "tokens_out": 30, "tokens": 150},
            "OpenAI",
            None,
        ),
        # OpenInference: llm.token_count.* and llm.model_name
        ("openinference.traces.pb", "rec-openinference", FULL_USAGE, "openai", None),
        # OpenLIT: semconv names, its own gen_ai.usage.cost (priced from a local list: 0.0006)
        (
            "openlit.traces.pb",
            "rec-openlit",
            {
                "tokens_in": 120,
                "tokens_out": 30,
                "tokens": 150,
                "tokens_cache_read": 100,
                "tokens_cache_write": 0,
            },
            "openai",
            0.0006,
        ),
    ],
)
def test_one_llm_call_from_each_generation_gives_its_exact_usage(payload, agent, usage, provider, cost):
    batches = read(payload).batches
    assert len(batches) == 1
    (call,) = batches[0].steps
    assert isinstance(call, Call)
    assert call.agent == agent
    assert call.usage == usage
    assert call.model == "gpt-4o-2024-08-06"
    assert call.provider == provider
    assert call.cost == (pytest.approx(cost) if cost else None)
    # the SDK set service.instance.id in the recorder (OpenLIT's own SDK set-up does not)
    run = None if payload.startswith("openlit") else payload.removesuffix(".traces.pb") + "-1"
    assert batches[0].origin.run == run


def test_spans_of_other_instrumentations_only_prove_the_process_alive():
    found = read("openlit.traces.1.pb")  # OpenLIT's httpx span of the same request
    (batch,) = found.batches
    assert batch.steps == [] and batch.spans == 1


@pytest.mark.parametrize("payload", ["pydantic-ai.traces.pb", "pydantic-ai-json.traces.json"])
def test_a_pydantic_ai_agent_run_gives_two_calls_and_the_tool_between_them(payload):
    found = read(payload)
    (batch,) = found.batches
    first, tool, second = batch.steps
    assert isinstance(first, Call) and isinstance(tool, ToolCall) and isinstance(second, Call)
    # the agent is named by gen_ai.agent.name on the spans ("weather bot"), mapped to the charset
    assert {step.agent for step in batch.steps} == {"weather_bot"}
    assert first.usage == second.usage == FULL_USAGE
    assert first.cost == pytest.approx(0.000475)  # PydanticAI's operation.cost wins
    assert tool.fp.startswith("get_weather(")
    # invoke_agent carries gen_ai.aggregated_usage.*: the run's total, not a third call
    assert found.tally["calls"] == 2 and found.tally["spans"] == 4


def test_usage_on_an_agent_run_span_is_not_counted_again():
    run = span("invoke_agent bot", gen_ai__operation__name="invoke_agent", gen_ai__agent__name="bot",
               gen_ai__usage__input_tokens=300, gen_ai__usage__output_tokens=60)  # fmt: skip
    child = llm_call(100, 20, parent=run.span_id)
    (batch,) = read_request(traces((SERVICE, [child, run])), SETTINGS).batches
    assert [step.usage["tokens"] for step in batch.steps if isinstance(step, Call)] == [120]


def test_a_call_seen_by_two_nested_instrumentations_counts_once():
    outer = llm_call(100, 20, gen_ai__agent__name="bot")
    inner = llm_call(100, 20, parent=outer.span_id)  # the OpenAI client's own span inside it
    found = read_request(traces((SERVICE, [inner, outer])), SETTINGS)
    (call,) = found.batches[0].steps
    assert isinstance(call, Call) and call.agent == "bot"
    assert found.tally["calls_nested"] == 1


def test_spans_inherit_the_agent_named_by_an_ancestor_in_the_same_export():
    run = span("invoke_agent", gen_ai__operation__name="invoke_agent", gen_ai__agent__name="planner")
    step = span("step", parent=run.span_id)
    call = llm_call(parent=step.span_id)
    orphan = llm_call()  # no ancestor names an agent: the resource's service.name does
    (batch,) = read_request(traces((SERVICE, [call, orphan, step, run])), SETTINGS).batches
    assert sorted(step.agent for step in batch.steps) == ["planner", "svc"]


def test_openinference_kinds_decide_what_is_a_call_or_a_tool():
    chain = span("chain", openinference__span__kind="CHAIN", llm__token_count__total=999)
    llm = span(
        "llm", openinference__span__kind="LLM", llm__token_count__prompt=7, llm__token_count__completion=3
    )
    tool = span("tool", openinference__span__kind="TOOL", tool__name="lookup", input__value='{"id": 1}')
    (batch,) = read_request(traces((SERVICE, [chain, llm, tool])), SETTINGS).batches
    assert [type(step).__name__ for step in batch.steps] == ["Call", "ToolCall"]
    assert batch.steps[0].usage == {"tokens_in": 7, "tokens_out": 3, "tokens": 10}  # type: ignore[union-attr]
    assert batch.steps[1].fp.startswith("lookup(")  # type: ignore[union-attr]


def test_only_a_total_gives_tokens_without_a_split():
    only_total = span("c", gen_ai__operation__name="chat", gen_ai__usage__total_tokens=77)
    (call,) = read_request(traces((SERVICE, [only_total])), SETTINGS).batches[0].steps
    assert call.usage == {"tokens": 77}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "bad",
    [-5, 10**15, 12.5, float("nan"), float("inf"), "120", True],
    ids=["negative", "huge", "fraction", "nan", "inf", "string", "bool"],
)
def test_a_bad_count_is_dropped_and_counted_and_the_rest_is_kept(bad):
    bad_span = llm_call(gen_ai__usage__input_tokens=bad, gen_ai__usage__output_tokens=30)
    good = llm_call(200, 40)
    found = read_request(traces((SERVICE, [bad_span, good])), SETTINGS)
    first, second = found.batches[0].steps
    assert first.usage == {"tokens_out": 30, "tokens": 30}  # type: ignore[union-attr]
    assert second.usage == {"tokens_in": 200, "tokens_out": 40, "tokens": 240}  # type: ignore[union-attr]
    assert found.tally["counts_dropped"] == 1


def test_a_whole_float_count_is_accepted_as_javascript_sdks_send_it():
    call = llm_call(gen_ai__usage__input_tokens=120.0)
    (step,) = read_request(traces((SERVICE, [call])), SETTINGS).batches[0].steps
    assert step.usage["tokens_in"] == 120  # type: ignore[union-attr]


def test_a_bad_cost_is_dropped_and_counted():
    call = llm_call(gen_ai__usage__cost=-1.0)
    found = read_request(traces((SERVICE, [call])), SETTINGS)
    assert found.batches[0].steps[0].cost is None  # type: ignore[union-attr]
    assert found.tally["counts_dropped"] == 1


def test_the_token_cap_is_configurable():
    found = read_request(traces((SERVICE, [llm_call(5000, 10)])), OtlpSection(max_tokens=1000))
    assert found.batches[0].steps[0].usage == {"tokens_out": 10, "tokens": 10}  # type: ignore[union-attr]


def test_genai_spans_without_any_agent_name_are_counted_and_rejected_not_guessed():
    unnamed = {"service.name": "unknown_service:python"}
    found = read_request(traces((unnamed, [llm_call(), tool_call(), span("GET /")])), SETTINGS)
    assert found.batches[0].steps == []
    assert found.tally["spans_without_agent"] == 2
    assert found.rejected == 2


def test_agent_names_are_mapped_onto_the_protocol_charset():
    call = llm_call(gen_ai__agent__name="Weather Bot <script>")
    (step,) = read_request(traces((SERVICE, [call])), SETTINGS).batches[0].steps
    assert step.agent == "Weather_Bot__script_"


def test_tool_fingerprints_hash_the_arguments_and_never_show_them():
    first = tool_call("send_mail", '{"to": "a@b.c", "password": "hunter2"}')
    same = tool_call("send_mail", '{"to": "a@b.c", "password": "hunter2"}')
    other = tool_call("send_mail", '{"to": "x@y.z"}')
    steps = read_request(traces((SERVICE, [first, same, other])), SETTINGS).batches[0].steps
    fps = [step.fp for step in steps]  # type: ignore[union-attr]
    assert fps[0] == fps[1] != fps[2]
    assert all(fp.startswith("send_mail(") and "hunter2" not in fp for fp in fps)


def test_steps_come_in_the_order_they_ended():
    late = llm_call(end_ns=3_000)
    early = tool_call(end_ns=1_000)
    middle = llm_call(end_ns=2_000)
    steps = read_request(traces((SERVICE, [late, early, middle])), SETTINGS).batches[0].steps
    assert [step.end_ns for step in steps] == [1_000, 2_000, 3_000]


def test_agent_from_is_configurable():
    settings = OtlpSection(agent_from=["deployment.name", "service.name"])
    resource = {**SERVICE, "deployment.name": "prod-bot"}
    (step,) = (
        read_request(traces((resource, [llm_call(gen_ai__agent__name="ignored")])), settings).batches[0].steps
    )
    assert step.agent == "prod-bot"


def test_every_name_that_makes_a_span_a_call_or_a_tool_carries_a_marker() -> None:
    """Scopes without a marker are skipped undecoded (wire.py): that is only sound if no span
    can be an LLM call or a tool call without one."""
    from agentwatch.otlp import conventions as conv  # noqa: PLC0415

    for name in (*conv.USAGE, conv.OPERATION, conv.OPENINFERENCE_KIND):
        assert name.startswith(conv.SPAN_MARKERS), name


def test_every_recorded_span_read_in_full_gives_what_the_scope_skipping_read_gives() -> None:
    """Reading every span of every recording (markers or not) finds no call or tool more."""
    from agentwatch.otlp import conventions as conv  # noqa: PLC0415

    for path in sorted(DATA.glob("*.traces*")):
        content_type = "application/json" if path.name.endswith(".json") else "application/x-protobuf"
        body = trace_bytes(path.read_bytes(), content_type, None, 10**7)
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            for scope in resource_spans.scope_spans:
                encoded = scope.SerializeToString()
                if any(marker.encode() in encoded for marker in conv.SPAN_MARKERS):
                    continue
                names = {kv.key for span in scope.spans for kv in span.attributes}
                assert names.isdisjoint(conv.USAGE | {conv.OPERATION, conv.OPENINFERENCE_KIND}), path.name


def test_garbage_inside_an_attribute_that_is_read_is_refused_like_garbage_anywhere() -> None:
    good = llm_call(5, 5).SerializeToString()
    broken_value = b"\x0a\x05ab"  # AnyValue.string_value of 5 bytes, 2 given
    key = b"gen_ai.usage.input_tokens"
    key_value = b"\x0a" + bytes([len(key)]) + key + b"\x12" + bytes([len(broken_value)]) + broken_value
    span_bytes = good + b"\x4a" + bytes([len(key_value)]) + key_value  # field 9: one more attribute
    request = traces((SERVICE, []))
    scope = request.resource_spans[0].scope_spans[0]
    body = request.SerializeToString()
    with pytest.raises(DecodeError):  # what decoding the whole request with the official class says
        ExportTraceServiceRequest.FromString(_with_span(body, scope, span_bytes))
    with pytest.raises(OtlpRejected) as refused:
        read_traces(_with_span(body, scope, span_bytes), SETTINGS)
    assert refused.value.status == 400 and "not valid protobuf" in refused.value.message


def _with_span(body: bytes, scope: object, span: bytes) -> bytes:
    """``body`` (one resource, one empty scope) with ``span`` appended to that scope."""
    request = ExportTraceServiceRequest.FromString(body)
    resource = request.resource_spans[0]
    encoded_scope = resource.scope_spans[0].SerializeToString() + b"\x12" + _varint(len(span)) + span
    del resource.scope_spans[:]
    encoded_resource = resource.SerializeToString() + b"\x12" + _varint(len(encoded_scope)) + encoded_scope
    return b"\x0a" + _varint(len(encoded_resource)) + encoded_resource


def _varint(n: int) -> bytes:
    out = b""
    while True:
        byte, n = n & 0x7F, n >> 7
        out += bytes([byte | (0x80 if n else 0)])
        if not n:
            return out


def test_the_readings_and_decoded_values_remembered_are_bounded() -> None:
    from agentwatch.otlp import reading, values  # noqa: PLC0415

    names = sorted(reading.wanted(("gen_ai.agent.name",)))
    for n in range(reading.MAX_READINGS + 10):
        subset = frozenset(name for bit, name in enumerate(names) if n >> bit & 1)
        reading.reading_of(subset, ("gen_ai.agent.name",))
    assert len(reading._readings(("gen_ai.agent.name",))) <= reading.MAX_READINGS
    for n in range(values.MAX_CACHED + 10):
        assert values.count_of(AnyValue(int_value=n).SerializeToString(), 10**9) == n
    assert len(values._whole) <= values.MAX_CACHED
    raw = AnyValue(int_value=500).SerializeToString()
    assert values.count_of(raw, 1000) == 500 and values.count_of(raw, 100) is values.BAD  # cap after cache


def test_a_call_whose_parts_are_each_under_the_cap_but_not_their_sum_loses_its_usage() -> None:
    settings = OtlpSection(max_tokens=1000)
    (batch,) = read_request(traces((SERVICE, [llm_call(600, 600), llm_call(6, 6)])), settings).batches
    first, second = batch.steps
    assert isinstance(first, Call) and first.usage == {} and first.model == "gpt-4o"  # still a call
    assert isinstance(second, Call) and second.usage["tokens"] == 12
