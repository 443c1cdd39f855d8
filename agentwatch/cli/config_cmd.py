"""``agentwatch check-config``: validate a pipeline.toml and show what it would run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from agentwatch.cli import app
from agentwatch.cli.common import load_pipeline
from agentwatch.config import Pipeline, format_duration, is_secret
from agentwatch.plugins import DetectorConfig, PluginConfig
from agentwatch.redisconn import describe


@app.command("check-config")
def check_config(
    path: Annotated[
        Path | None,
        typer.Argument(help="File to check (default: ./pipeline.toml, else the built-in defaults)."),
    ] = None,
) -> None:
    """Validate a pipeline file: exit 0 with a summary, or 2 naming every bad key."""
    pipeline = load_pipeline(path)
    typer.echo(summary(pipeline))


def summary(pipeline: Pipeline) -> str:
    """A one-screen description of the pipeline, secrets masked."""
    s = pipeline.settings
    url = describe(s.redis.url) if s.redis.url else "default (127.0.0.1:6379, else embedded)"
    lines = [
        f"{pipeline.source}: OK",
        f"redis      {url}  prefix={s.redis.prefix!r} shards={s.redis.shards}"
        + ("  cluster" if s.redis.cluster else ""),
        f"workers    {s.worker.detectors} detector, {s.worker.notifiers} notifier; "
        f"batch={s.worker.batch} tick={format_duration(s.worker.tick_s)} "
        f"claim_idle={format_duration(s.worker.claim_idle_s)} max_attempts={s.worker.max_attempts}",
        f"streams    events kept {format_duration(s.streams.events_retention_s)}, "
        f"alerts kept {format_duration(s.streams.alerts_retention_s)}",
        "detectors",
    ]
    for plugin in pipeline.detectors:
        config = plugin.config
        assert isinstance(config, DetectorConfig)
        overrides = f"  (+{len(config.agents)} per-agent override(s))" if config.agents else ""
        lines.append(
            f"  {plugin.name:<10} {_settings(config, skip={'enabled', 'class', 'agents'})}{overrides}"
        )
    lines.append("notifiers" + ("" if pipeline.notifiers else "  none (alerts stay on the alerts stream)"))
    for plugin in pipeline.notifiers:  # notifiers have many keys: show only what the file sets
        lines.append(f"  {plugin.name:<10} {_settings(plugin.config, skip={'name'}, only_set=True)}")
    return "\n".join(lines)


def _settings(config: PluginConfig, skip: set[str], *, only_set: bool = False) -> str:
    parts = []
    for name, info in type(config).model_fields.items():
        key = info.alias or name
        if key in skip or (only_set and name not in config.model_fields_set and key != "type"):
            continue
        value: Any = getattr(config, name)
        if is_secret(key) and value:
            value = "***"
        elif isinstance(value, str) and "://" in value:
            value = describe(value)
        elif name.endswith("_s") and isinstance(value, float):
            value = format_duration(value)
        parts.append(f"{key}={value}")
    return " ".join(parts)
