"""The real OpenTelemetry SDK, set up the way an agent's process sets it up, exporting to a
running ``agentwatch serve`` with the real OTLP/HTTP exporters (protobuf or JSON)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from opentelemetry.exporter.otlp.common.http import Compression
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

Protocol = Literal["protobuf", "json"]


@dataclass
class Sdk:
    """One process's tracer and meter providers."""

    tracing: TracerProvider
    metering: MeterProvider | None
    stopped: bool = False

    def flush(self) -> None:
        self.tracing.force_flush()
        if self.metering is not None:
            self.metering.force_flush()

    def shutdown(self) -> None:
        """What an agent's SDK does at exit: flush, then stop exporting (once)."""
        if self.stopped:
            return
        self.stopped = True
        self.tracing.shutdown()
        if self.metering is not None:
            self.metering.shutdown()


def sdk(
    base: str,
    token: str,
    *,
    service: str,
    instance: str | None = None,
    protocol: Protocol = "protobuf",
    metrics_every_ms: int | None = None,
    compression: bool = False,
    resource: dict[str, Any] | None = None,
) -> Sdk:
    """Providers exporting to ``base`` (``/v1/traces``, ``/v1/metrics``) with the bearer token,
    as ``OTEL_EXPORTER_OTLP_ENDPOINT``/``_HEADERS``/``_PROTOCOL`` would set them up."""
    if protocol == "json":
        from opentelemetry.exporter.otlp.json.http.metric_exporter import OTLPMetricExporter  # noqa: PLC0415
        from opentelemetry.exporter.otlp.json.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (  # noqa: PLC0415
            OTLPMetricExporter,
        )
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415
    attributes = {"service.name": service, **(resource or {})}
    if instance is not None:
        attributes["service.instance.id"] = instance
    headers = {"Authorization": f"Bearer {token}"}
    extra: dict[str, Any] = {}
    if compression:
        extra["compression"] = Compression.GZIP
    tracing = TracerProvider(resource=Resource.create(attributes))
    spans = OTLPSpanExporter(endpoint=f"{base}/v1/traces", headers=headers, timeout=10, **extra)
    tracing.add_span_processor(BatchSpanProcessor(spans, schedule_delay_millis=200))
    metering = None
    if metrics_every_ms is not None:
        exporter = OTLPMetricExporter(endpoint=f"{base}/v1/metrics", headers=headers, timeout=10, **extra)
        reader = PeriodicExportingMetricReader(exporter, export_interval_millis=metrics_every_ms)
        metering = MeterProvider(resource=Resource.create(attributes), metric_readers=[reader])
    return Sdk(tracing, metering)
