"""Metric data points -> token usage per process, as the exporter sent it (cumulative or delta).

Two generations of GenAI token metrics are read (conventions.py): the histogram
``gen_ai.client.token.usage`` split by ``gen_ai.token.type`` (its *sum* is the tokens), and the
newer monotonic counters ``gen_ai.client.inference.usage.*``, one per token class; and cost
histograms where an instrumentation records one (OpenLIT, PydanticAI).

SDKs export cumulative totals by default (the Python SDK for every instrument), so one point says
"12,400 input tokens since this series started". Turning totals into usage since the last export
needs the previous total of the same series: that is the fold's job (fold.py), with the state it
keeps per process. This module only reads points, each with the identity of its series (metric
name and attributes) and its start time, which changes when the series restarts.

Any ``gen_ai.*`` metric from a process also proves the process alive; other metrics (HTTP,
runtime) only do so for a process already known as an agent.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    AggregationTemporality,
    HistogramDataPoint,
    Metric,
    NumberDataPoint,
)

from agentwatch.config import OtlpSection
from agentwatch.otlp import conventions as conv
from agentwatch.otlp.resource import Origin, origin_of
from agentwatch.otlp.values import text

CUMULATIVE: Final = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
GENAI_PREFIX: Final = "gen_ai."
COST: Final = "cost"
"""The ``kind`` of a cost point (USD); token points have their protocol token key as kind."""


@dataclass(frozen=True, slots=True)
class Point:
    """One data point of a usage metric."""

    series: bytes
    """Hash of the metric name and every attribute: a series whose totals follow each other."""
    kind: str
    """``tokens_in``, ``tokens_out``, ``tokens_cache_read``... or :data:`COST`."""
    value: float
    cumulative: bool
    start_ns: int
    agent: str | None
    """The agent the point's own attributes name (rare: metrics seldom carry the agent)."""
    model: str | None
    provider: str | None


@dataclass(slots=True)
class MetricBatch:
    """One process's part of a metrics export."""

    origin: Origin
    points: list[Point] = field(default_factory=list)
    genai: bool = False
    """Any ``gen_ai.*`` metric at all: the process is doing GenAI work (an agent)."""


@dataclass(slots=True)
class Metrics:
    batches: list[MetricBatch] = field(default_factory=list)
    tally: Counter[str] = field(default_factory=Counter)
    rejected: int = 0
    """Data points not accepted (values no count can be): OTLP's ``rejected_data_points``."""


def read_metrics(request: ExportMetricsServiceRequest, settings: OtlpSection) -> Metrics:
    """Every process's usage points in ``request``."""
    out = Metrics()
    for resource_metrics in request.resource_metrics:
        batch = MetricBatch(origin_of(resource_metrics.resource.attributes, settings))
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                out.tally["metrics"] += 1
                if metric.name.startswith(GENAI_PREFIX) or metric.name in conv.METRIC_COST:
                    batch.genai = True
                    _read(metric, batch, settings, out)
        out.batches.append(batch)
    return out


def _read(metric: Metric, batch: MetricBatch, settings: OtlpSection, out: Metrics) -> None:
    name = metric.name
    shape = metric.WhichOneof("data")
    if name == conv.TOKEN_USAGE_HISTOGRAM and shape == "histogram":
        cumulative = metric.histogram.aggregation_temporality == CUMULATIVE
        for hpoint in metric.histogram.data_points:
            attrs = _attributes(hpoint.attributes)
            token_type = attrs.get(conv.TOKEN_TYPE)
            kind = conv.TOKEN_TYPES.get(text(token_type) or "") if token_type is not None else None
            if kind is not None:
                _add(batch, out, name, hpoint, attrs, kind, _histogram_sum(hpoint), cumulative, settings)
    elif name in conv.METRIC_COST and shape == "histogram":
        cumulative = metric.histogram.aggregation_temporality == CUMULATIVE
        for hpoint in metric.histogram.data_points:
            attrs = _attributes(hpoint.attributes)
            _add(batch, out, name, hpoint, attrs, COST, _histogram_sum(hpoint), cumulative, settings)
    elif name in conv.USAGE_COUNTERS and shape == "sum" and metric.sum.is_monotonic:
        cumulative = metric.sum.aggregation_temporality == CUMULATIVE
        kind = conv.USAGE_COUNTERS[name]
        for npoint in metric.sum.data_points:
            attrs = _attributes(npoint.attributes)
            value = float(npoint.as_int) if npoint.WhichOneof("value") == "as_int" else npoint.as_double
            _add(batch, out, name, npoint, attrs, kind, value, cumulative, settings)


def _histogram_sum(point: HistogramDataPoint) -> float | None:
    return point.sum if point.HasField("sum") else None


def _add(  # noqa: PLR0917 - one point's parts
    batch: MetricBatch,
    out: Metrics,
    name: str,
    point: HistogramDataPoint | NumberDataPoint,
    attrs: dict[str, AnyValue],
    kind: str,
    value: float | None,
    cumulative: bool,
    settings: OtlpSection,
) -> None:
    out.tally["usage_points"] += 1
    if value is None:
        return  # a histogram without a sum (negative recordings): nothing to count
    if not (0 <= value < float(2**53)) or (kind != COST and not value.is_integer()):
        out.tally["counts_dropped"] += 1
        out.rejected += 1
        return
    agent = None
    for key in settings.agent_from:
        if key == conv.SERVICE_NAME:
            continue  # a copy of the resource's (OpenLIT puts it on points): the resource decides
        found = attrs.get(key)
        name_text = text(found) if found is not None else None
        if name_text is not None and not name_text.startswith(conv.UNKNOWN_SERVICE):
            agent = Origin.agent_name(name_text)
            break
    model = _first_text(attrs, conv.MODEL)
    batch.points.append(
        Point(
            series=_series(name, point.attributes),
            kind=kind,
            value=value,
            cumulative=cumulative,
            start_ns=point.start_time_unix_nano,
            agent=agent,
            model=model,
            provider=_first_text(attrs, conv.PROVIDER),
        )
    )


def _attributes(attributes: object) -> dict[str, AnyValue]:
    found: dict[str, AnyValue] = {}
    kv: KeyValue
    for kv in attributes:  # type: ignore[attr-defined]
        found[kv.key] = kv.value
    return found


def _series(name: str, attributes: object) -> bytes:
    digest = hashlib.blake2b(name.encode(), digest_size=8)
    kv: KeyValue
    for kv in sorted(attributes, key=lambda kv: kv.key):  # type: ignore[call-overload]
        digest.update(b"\x00" + kv.key.encode() + b"\x01" + kv.value.SerializeToString(deterministic=True))
    return digest.digest()


def _first_text(attrs: dict[str, AnyValue], names: tuple[str, ...]) -> str | None:
    for name in names:
        value = attrs.get(name)
        if value is not None:
            return text(value)
    return None
