"""Small builders of OTLP protobuf requests for the receiver's unit tests.

Recorded payloads (tests/data/otlp/) show what real instrumentations send; these builders make
the cases no instrumentation sends on purpose (bad counts, nested calls, thousands of services),
with the same generated ``opentelemetry-proto`` classes the receiver decodes.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality
from opentelemetry.proto.trace.v1.trace_pb2 import Span

DATA = Path(__file__).parent / "data" / "otlp"
CUMULATIVE = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
DELTA = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
_ids = itertools.count(1)


def value(raw: Any) -> AnyValue:
    if isinstance(raw, AnyValue):
        return raw
    if isinstance(raw, bool):
        return AnyValue(bool_value=raw)
    if isinstance(raw, int):
        return AnyValue(int_value=raw)
    if isinstance(raw, float):
        return AnyValue(double_value=raw)
    return AnyValue(string_value=str(raw))


def attrs(mapping: dict[str, Any]) -> list[KeyValue]:
    return [KeyValue(key=key, value=value(raw)) for key, raw in mapping.items()]


def span(
    name: str = "span",
    *,
    trace: bytes = b"t" * 16,
    parent: bytes = b"",
    end_ns: int | None = None,
    span_id: bytes | None = None,
    **attributes: Any,
) -> Span:
    """A span; attribute names use ``__`` for dots (``gen_ai__usage__input_tokens=5``)."""
    number = next(_ids)
    return Span(
        trace_id=trace,
        span_id=span_id or number.to_bytes(8, "big"),
        parent_span_id=parent,
        name=name,
        start_time_unix_nano=1_700_000_000_000_000_000 + number,
        end_time_unix_nano=end_ns if end_ns is not None else 1_700_000_000_000_000_000 + 1000 * number,
        attributes=attrs({key.replace("__", "."): raw for key, raw in attributes.items()}),
    )


def llm_call(tokens_in: Any = 100, tokens_out: Any = 20, *, model: str = "gpt-4o", **more: Any) -> Span:
    """A chat span with usage; ``more`` may replace the usage attributes themselves."""
    fields = {
        "gen_ai__operation__name": "chat",
        "gen_ai__request__model": model,
        "gen_ai__usage__input_tokens": tokens_in,
        "gen_ai__usage__output_tokens": tokens_out,
        **more,
    }
    return span(f"chat {model}", **fields)


def tool_call(name: str = "search", arguments: str = '{"q": "x"}', **more: Any) -> Span:
    return span(
        f"execute_tool {name}",
        gen_ai__operation__name="execute_tool",
        gen_ai__tool__name=name,
        gen_ai__tool__call__arguments=arguments,
        **more,
    )


def traces(*groups: tuple[dict[str, Any], list[Span]]) -> ExportTraceServiceRequest:
    """A request with one ResourceSpans per (resource attributes, spans)."""
    request = ExportTraceServiceRequest()
    for resource, spans in groups:
        rs = request.resource_spans.add()
        rs.resource.attributes.extend(attrs(resource))
        rs.scope_spans.add().spans.extend(spans)
    return request


def token_histogram(
    resource: dict[str, Any],
    points: list[tuple[str, float, int]],
    *,
    temporality: int = CUMULATIVE,
    model: str = "gpt-4o",
    extra: dict[str, Any] | None = None,
) -> ExportMetricsServiceRequest:
    """``gen_ai.client.token.usage`` with one point per (token type, sum, start ns)."""
    request = ExportMetricsServiceRequest()
    rm = request.resource_metrics.add()
    rm.resource.attributes.extend(attrs(resource))
    metric = rm.scope_metrics.add().metrics.add()
    metric.name = "gen_ai.client.token.usage"
    metric.histogram.aggregation_temporality = temporality  # type: ignore[assignment]
    for token_type, total, start_ns in points:
        point = metric.histogram.data_points.add()
        point.start_time_unix_nano = start_ns
        point.time_unix_nano = start_ns + 1
        point.sum = total
        point.count = 1
        labels = {"gen_ai.token.type": token_type, "gen_ai.request.model": model, **(extra or {})}
        point.attributes.extend(attrs(labels))
    return request


def read_request(request: ExportTraceServiceRequest, settings: Any) -> Any:
    """What the receiver reads from this request (it reads the protobuf encoding)."""
    from agentwatch.otlp.spans import read_traces  # noqa: PLC0415

    return read_traces(request.SerializeToString(), settings)


def recorded(name: str) -> bytes:
    return (DATA / name).read_bytes()
