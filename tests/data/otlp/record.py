"""Record the OTLP payloads in this folder from real instrumentations (run by hand, not by tests).

Each scenario runs in a fresh process (instrumentations patch the ``openai`` module globally):
the real ``openai`` client (or PydanticAI) talks to a local fake OpenAI API, the instrumentation
under test makes spans and metrics, the real OTLP/HTTP exporters of ``opentelemetry-sdk`` send
them to a local capture server, and the bodies are written here byte for byte, with what made
them in ``manifest.json``.

    python tests/data/otlp/record.py                      # every scenario this venv can run
    python tests/data/otlp/record.py openllmetry-0.30 --python /tmp/old/bin/python

Scenarios needing packages the test venv does not hold (an old OpenLLMetry, OpenLIT) take a
``--python`` of a venv that has them; the manifest keeps the versions each recording used.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/, for otlp_kit

SCENARIOS = {
    "openai-v2": "opentelemetry-instrumentation-openai-v2 on the OpenAI client",
    "openllmetry": "OpenLLMetry (opentelemetry-instrumentation-openai) on the OpenAI client",
    "openllmetry-0.30": "OpenLLMetry 0.30 on the OpenAI client",
    "openinference": "OpenInference (openinference-instrumentation-openai) on the OpenAI client",
    "openlit": "OpenLIT on the OpenAI client, priced from a local price list",
    "pydantic-ai": "PydanticAI's own instrumentation, an agent calling one tool",
    "pydantic-ai-json": "the same, sent by the OTLP/HTTP JSON exporters",
    "inference-counters": "gen_ai.client.inference.usage.* counters made with the SDK as "
    "semantic-conventions-genai describes them (no instrumentation emits them yet)",
}
SDK = ("opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-http")
PACKAGES = {
    "openai-v2": (*SDK, "opentelemetry-instrumentation-openai-v2", "opentelemetry-util-genai", "openai"),
    "openllmetry": (*SDK, "opentelemetry-instrumentation-openai", "openai"),
    "openllmetry-0.30": (*SDK, "opentelemetry-instrumentation-openai", "openai"),
    "openinference": (*SDK, "openinference-instrumentation-openai", "openai"),
    "openlit": (*SDK, "openlit", "openai"),
    "pydantic-ai": (*SDK, "pydantic-ai-slim", "openai"),
    "pydantic-ai-json": (
        "opentelemetry-sdk",
        "opentelemetry-exporter-otlp-json-http",
        "pydantic-ai-slim",
        "openai",
    ),
    "inference-counters": SDK,
}
NAMES = ("gen_ai.", "llm.", "operation.cost", "tool", "openinference.")
"""Attribute and metric names worth listing in the manifest: what each generation calls things."""


def providers(scenario: str, endpoint: str) -> tuple[Any, Any]:
    from opentelemetry.sdk.metrics import MeterProvider  # noqa: PLC0415
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader  # noqa: PLC0415
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

    if scenario.endswith("-json"):
        from opentelemetry.exporter.otlp.json.http.metric_exporter import OTLPMetricExporter  # noqa: PLC0415
        from opentelemetry.exporter.otlp.json.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter  # noqa: PLC0415
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415

    resource = Resource.create(
        {"service.name": f"rec-{scenario}", "service.instance.id": f"{scenario}-1", "host.name": "recorder"}
    )
    tracing = TracerProvider(resource=resource)
    tracing.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces")))
    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=f"{endpoint}/v1/metrics"), export_interval_millis=3_600_000
    )
    return tracing, MeterProvider(resource=resource, metric_readers=[reader])


def run(scenario: str, out: Path) -> None:
    """Run one scenario in this process and write its payloads."""
    from opentelemetry import metrics, trace  # noqa: PLC0415

    from otlp_kit import FakeOpenAI, OtlpCapture  # noqa: PLC0415

    api, capture = FakeOpenAI(), OtlpCapture()
    if scenario == "openlit":
        tracing, metering = _openlit(capture.url, out)
    else:
        tracing, metering = providers(scenario, capture.url)
        trace.set_tracer_provider(tracing)
        metrics.set_meter_provider(metering)
    if scenario.startswith("pydantic-ai"):
        _pydantic_agent(api.url)
    elif scenario == "inference-counters":
        _inference_counters(metering)
    else:
        _instrument(scenario, tracing, metering)
        import openai  # noqa: PLC0415

        client = openai.OpenAI(base_url=api.url, api_key="test")
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    tracing.force_flush()
    metering.force_flush()
    files = []
    for signal in ("traces", "metrics"):
        # GenAI payloads first: other instrumentations' (OpenLIT's httpx spans) follow as .1, .2
        bodies = sorted(capture.bodies(signal), key=lambda item: b"gen_ai" not in item.body)
        for index, item in enumerate(bodies):
            suffix = "json" if "json" in item.content_type else "pb"
            name = f"{scenario}.{signal}{'' if index == 0 else f'.{index}'}.{suffix}"
            (out / name).write_bytes(item.body)
            files.append(name)
    versions = {}
    for package in PACKAGES[scenario]:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    print(
        json.dumps({"scenario": scenario, "what": SCENARIOS[scenario], "files": files, "versions": versions})
    )
    tracing.shutdown()
    metering.shutdown()


def _instrument(scenario: str, tracing: Any, metering: Any) -> None:
    if scenario == "openai-v2":
        from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor  # noqa: PLC0415

        OpenAIInstrumentor().instrument(tracer_provider=tracing, meter_provider=metering)
    elif scenario.startswith("openllmetry"):
        from opentelemetry.instrumentation.openai import OpenAIInstrumentor  # noqa: PLC0415

        OpenAIInstrumentor().instrument(tracer_provider=tracing, meter_provider=metering)
    elif scenario == "openinference":
        from openinference.instrumentation.openai import OpenAIInstrumentor  # noqa: PLC0415

        OpenAIInstrumentor().instrument(tracer_provider=tracing)
    elif scenario != "openlit":  # OpenLIT instrumented itself in _openlit
        raise SystemExit(f"unknown scenario {scenario}")


def _openlit(endpoint: str, out: Path) -> tuple[Any, Any]:
    """OpenLIT sets up its own SDK providers and OTLP/HTTP exporters from ``otlp_endpoint``. Its
    default price list is fetched over the network; a local one (USD per 1k tokens, OpenLIT's
    format) makes it price the call offline."""
    import openlit  # noqa: PLC0415
    from opentelemetry import metrics, trace  # noqa: PLC0415

    prices = out / "openlit-prices.json"
    prices.write_text(json.dumps({"chat": {"gpt-4o": {"promptPrice": 0.0025, "completionPrice": 0.01}}}))
    try:
        openlit.init(
            otlp_endpoint=endpoint,
            application_name="rec-openlit",
            environment="recording",
            pricing_json=str(prices),
            disable_batch=True,
        )
    finally:
        prices.unlink()
    return trace.get_tracer_provider(), metrics.get_meter_provider()


def _pydantic_agent(api_url: str) -> None:
    from pydantic_ai import Agent  # noqa: PLC0415
    from pydantic_ai.models.openai import OpenAIChatModel  # noqa: PLC0415
    from pydantic_ai.providers.openai import OpenAIProvider  # noqa: PLC0415

    Agent.instrument_all()
    model = OpenAIChatModel("gpt-4o", provider=OpenAIProvider(base_url=api_url, api_key="test"))
    agent = Agent(model, name="weather bot")  # a space: the receiver maps it to weather_bot

    @agent.tool_plain
    def get_weather(city: str) -> str:
        return f"sunny in {city}"

    agent.run_sync("weather in Paris?")


def _inference_counters(metering: Any) -> None:
    """The counters of semantic-conventions-genai's gen-ai-token-metrics.md, as an
    instrumentation following it would record one call (120 in, 100 of them cache reads; 30
    out, 10 of them reasoning), with the attributes it lists."""
    meter = metering.get_meter("inference-counters-example")
    base = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o",
        "gen_ai.response.model": "gpt-4o-2024-08-06",
        "gen_ai.token.modality": "text",
    }
    for name, value in (
        ("input_tokens", 120),
        ("output_tokens", 30),
        ("cache_read.input_tokens", 100),
        ("cache_write.input_tokens", 0),
        ("reasoning.output_tokens", 10),
    ):
        meter.create_counter(f"gen_ai.client.inference.usage.{name}", unit="{token}").add(value, base)


def names_in(files: list[str]) -> list[str]:
    """The GenAI attribute and metric names the recorded payloads hold (what the manifest shows
    for each generation), read with opentelemetry-proto."""
    from google.protobuf import json_format  # noqa: PLC0415
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (  # noqa: PLC0415
        ExportMetricsServiceRequest,
    )
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest  # noqa: PLC0415

    found: set[str] = set()
    for name in files:
        body = (HERE / name).read_bytes()
        if ".traces" in name:
            traces = ExportTraceServiceRequest()
            _parse(traces, body, name, json_format)
            for rs in traces.resource_spans:
                found |= {
                    kv.key for scope in rs.scope_spans for span in scope.spans for kv in span.attributes
                }
        else:
            metrics = ExportMetricsServiceRequest()
            _parse(metrics, body, name, json_format)
            for rm in metrics.resource_metrics:
                found |= {f"metric {m.name}" for scope in rm.scope_metrics for m in scope.metrics}
    return sorted(n for n in found if n.removeprefix("metric ").startswith(NAMES))


def _parse(message: Any, body: bytes, name: str, json_format: Any) -> None:
    if name.endswith(".json"):  # ids are hex in OTLP JSON; the names are all this needs
        json_format.Parse(body, message, ignore_unknown_fields=True)
    else:
        message.ParseFromString(body)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("scenarios", nargs="*", default=[])
    parser.add_argument("--python", default=sys.executable, help="interpreter of a venv with the packages")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run(args.scenarios[0], HERE)
        return
    manifest_path = HERE / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    for scenario in args.scenarios or [s for s in SCENARIOS if s not in ("openllmetry-0.30", "openlit")]:
        env = {**os.environ, "OTEL_SEMCONV_STABILITY_OPT_IN": ""}
        done = subprocess.run(
            [args.python, __file__, "--one", scenario], capture_output=True, text=True, env=env, check=False
        )
        if done.returncode != 0:
            print(f"{scenario}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        entry = json.loads(done.stdout.strip().splitlines()[-1])
        manifest[scenario] = {key: entry[key] for key in ("what", "files", "versions")}
        manifest[scenario]["names"] = names_in(entry["files"])
        print(f"{scenario}: {', '.join(entry['files'])}")
    manifest_path.write_text(json.dumps(dict(sorted(manifest.items())), indent=2) + "\n")


if __name__ == "__main__":
    main()
