"""``agentwatch check-config``: validate a pipeline.toml and show what it would run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic.fields import FieldInfo

from agentwatch.cli import app
from agentwatch.cli.common import EXIT_USAGE, load_pipeline
from agentwatch.config import Pipeline, format_duration
from agentwatch.config_errors import is_secret, looks_like_url, serializer
from agentwatch.errors import ConfigError
from agentwatch.plugins import DetectorConfig, PluginConfig
from agentwatch.redisconn import describe
from agentwatch.urls import mask_url


@app.command("check-config")
def check_config(
    path: Annotated[
        Path | None,
        typer.Argument(help="File to check (default: ./pipeline.toml, else the built-in defaults)."),
    ] = None,
) -> None:
    """Validate a pipeline file: exit 0 with a summary, or 2 naming every bad key."""
    pipeline = load_pipeline(path)
    if pipeline.settings.http.enabled:
        # What `up` refuses at start (its dashboard open to the network without a token) fails
        # here first, with the same words: check-config passing means `up` starts.
        from agentwatch.http.access import check_bind  # noqa: PLC0415 - starlette only here

        try:
            check_bind(pipeline.settings.http, source=pipeline.source)
        except ConfigError as exc:
            typer.echo(exc.render(), err=True)
            raise typer.Exit(EXIT_USAGE) from None
    typer.echo(summary(pipeline))


def summary(pipeline: Pipeline) -> str:
    """A one-screen description of the pipeline, secrets masked: secret keys, header and env
    values, userinfo in any URL, and the path of notifier URLs (a webhook's path is its key)."""
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
        f"alerts kept {format_duration(s.streams.alerts_retention_s)}, "
        f"dead letters {s.streams.deadletter_max_len} of at most {_kib(s.streams.deadletter_max_bytes)}",
        _security(pipeline),
        _http_line(pipeline),
        "detectors",
    ]
    for plugin in pipeline.detectors:
        config = plugin.config
        assert isinstance(config, DetectorConfig)
        overrides = f"  (+{len(config.agents)} per-agent override(s))" if config.agents else ""
        lines.append(
            f"  {plugin.name:<10} {_settings(config, skip={'enabled', 'class', 'agents'})}{overrides}"
        )
    budgets = pipeline.settings.budgets
    lines.append("budgets" + ("" if budgets else "    none (cost is counted, nothing is capped)"))
    for b in budgets:
        lines.append(f"  {b.agents:<10} ${b.limit:,.2f}/{b.per} {b.scope} warn_at={b.warn_at:g}"
                     + (" halt" if b.halt else ""))  # fmt: skip
    windows = pipeline.settings.maintenance
    lines.append(
        "maintenance"
        + ("" if windows else "  no recurring windows (`agentwatch maintenance start` for ad-hoc ones)")
    )
    for w in windows:
        whom = " ".join([*w.agents, *(f"{k}={v}" for k, v in w.labels.items())])
        lines.append(f"  {whom:<10} {w.schedule!r} for {format_duration(w.duration_s)} "
                     f"({pipeline.settings.report.timezone})")  # fmt: skip
    lines.append("notifiers" + ("" if pipeline.notifiers else "  none (alerts stay on the alerts stream)"))
    for plugin in pipeline.notifiers:  # notifiers have many keys: show only what the file sets
        lines.append(f"  {plugin.name:<10} {_settings(plugin.config, skip={'name'}, only_set=True)}")
    return "\n".join(lines)


def _security(pipeline: Pipeline) -> str:
    sec = pipeline.settings.security
    secret = "secret=***" if sec.secret else f"secret generated and kept in Redis ({pipeline.keys.secret})"
    events = (
        f"every event signed with its agent's key, max_skew={format_duration(sec.max_skew_s)}"
        if sec.agent_keys
        else "unsigned events accepted (agent_keys = false)"
    )
    return f"security   alerts signed, {secret}; {events}"


def _http_line(pipeline: Pipeline) -> str:
    http = pipeline.settings.http
    if not http.enabled:
        return "http       off in `up` ([http] enabled = false)"
    access = "token required" if http.token else "no token (loopback only)"
    ping = "ping API on" if http.ping_key else "ping API off (no ping_key)"
    otlp = "OTLP on" if http.ingest_token and pipeline.settings.otlp.enabled else "OTLP off (no ingest_token)"
    if not pipeline.settings.otlp.enabled:
        otlp = "OTLP off ([otlp] enabled = false)"
    return f"http       {http.bind}  {access}, {ping}, {otlp}"


def _settings(config: PluginConfig, skip: set[str], *, only_set: bool = False) -> str:
    parts = []
    for name, info in type(config).model_fields.items():
        key = info.alias or name
        if key in skip or (only_set and name not in config.model_fields_set and key != "type"):
            continue
        parts.append(f"{key}={_shown(key, getattr(config, name), info)}")
    return " ".join(parts)


def _shown(key: str, value: Any, info: FieldInfo) -> str:
    if is_secret(key) and value:
        if isinstance(value, dict):  # headers, env: which are set, not what they are
            return "{" + ", ".join(f"{name}=***" for name in value) + "}"
        return "***"
    show = serializer(info)  # durations and sizes as one would write them: 1m, 50MB
    if show is not None and value is not None:
        return str(show(value))
    if looks_like_url(value):
        return mask_url(value)
    if isinstance(value, list) and any(looks_like_url(item) for item in value):
        return "[" + ", ".join(mask_url(item) if looks_like_url(item) else str(item) for item in value) + "]"
    if key.endswith("_s") and isinstance(value, float):
        return format_duration(value)
    return str(value)


def _kib(size: int) -> str:
    return f"{size // 1024} KiB" if size % 1024 == 0 else f"{size} bytes"
