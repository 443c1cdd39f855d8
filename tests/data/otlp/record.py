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
    "openllmetry-0.30": "OpenLLMetry 0.30 (semconv <= 1.26 names) on the OpenAI client",
    "openinference": "OpenInference (openinference-instrumentation-openai) on the OpenAI client",
    "openlit": "OpenLIT on the OpenAI client",
    "pydantic-ai": "PydanticAI's own instrumentation, an agent calling one tool",
    "pydantic-ai-json": "the same, sent by the OTLP/HTTP JSON exporters",
    "inference-counters": "gen_ai.client.inference.usage.* counters made with the SDK (no "
    "instrumentation emits them yet)",
}
PACKAGES = (
    "opentelemetry-sdk",
    "opentelemetry-exporter-otlp-proto-http",
    "opentelemetry-exporter-otlp-json-http",
    "opentelemetry-instrumentation-openai-v2",
    "opentelemetry-util-genai",
    "opentelemetry-instrumentation-openai",
    "openinference-instrumentation-openai",
    "openlit",
    "pydantic-ai-slim",
    "openai",
)


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
        for index, item in enumerate(capture.bodies(signal)):
            suffix = "json" if "json" in item.content_type else "pb"
            name = f"{scenario}.{signal}{'' if index == 0 else f'.{index}'}.{suffix}"
            (out / name).write_bytes(item.body)
            files.append(name)
    versions = {}
    for package in PACKAGES:
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
    elif scenario == "openlit":
        import openlit  # noqa: PLC0415

        openlit.init(tracer=tracing.get_tracer("openlit"), meter=metering.get_meter("openlit"))
    else:
        raise SystemExit(f"unknown scenario {scenario}")


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
        print(f"{scenario}: {', '.join(entry['files'])}")
    manifest_path.write_text(json.dumps(dict(sorted(manifest.items())), indent=2) + "\n")


if __name__ == "__main__":
    main()
