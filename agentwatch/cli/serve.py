"""``agentwatch serve``: the dashboard, ``/metrics``, badges and the ping API (docs/http.md).

It reads what the workers keep and runs no detection, so it can run anywhere, as many times as
you like (behind a load balancer, say); ``agentwatch up`` starts one unless ``[http] enabled =
false``. It starts even while Redis is away: pages say so, ``/healthz`` answers 503, and it
recovers by itself when Redis is back.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from agentwatch.cli import app
from agentwatch.cli.common import (
    EXIT_USAGE,
    ConfigOption,
    LogLevel,
    fail,
    load_pipeline,
    setup_logging,
    worker_url,
)
from agentwatch.config import split_bind
from agentwatch.errors import ConfigError
from agentwatch.redisconn import describe

log = logging.getLogger("agentwatch.http")


def dashboard_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"http://[{shown}]:{port}/" if ":" in shown else f"http://{shown}:{port}/"


@app.command()
def serve(
    config: ConfigOption = None,
    bind: Annotated[
        str | None, typer.Option("--bind", help='"host:port" (default: [http] bind, 127.0.0.1:8787).')
    ] = None,
    log_level: LogLevel = "info",
) -> None:
    """Serve the dashboard, /metrics, badges and the ping API over HTTP."""
    setup_logging(log_level)
    pipeline = load_pipeline(config)
    http = pipeline.settings.http
    address = bind or http.bind
    try:
        host, port = split_bind(address)
        from agentwatch.http.access import check_bind  # noqa: PLC0415 - starlette only when serving

        check_bind(http, address, pipeline.source)
    except ValueError as exc:
        fail(f"--bind: {exc}", EXIT_USAGE)
    except ConfigError as exc:
        typer.echo(exc.render(), err=True)
        raise typer.Exit(EXIT_USAGE) from None
    import uvicorn  # noqa: PLC0415 - only this command needs the server

    from agentwatch.http import SERVER_OPTIONS  # noqa: PLC0415
    from agentwatch.http.app import create_app  # noqa: PLC0415

    url = worker_url(pipeline)
    typer.echo(f"dashboard: {dashboard_url(host, port)}  (redis: {describe(url)})")
    if http.ping_key is None:
        typer.echo("ping API: off (set [http] ping_key to accept /ping/<key>/<agent>)")
    if not pipeline.settings.otlp.enabled:
        typer.echo("OTLP ingest: off ([otlp] enabled = false)")
    elif http.ingest_token is None:
        typer.echo("OTLP ingest: off (set [http] ingest_token to accept /v1/traces and /v1/metrics)")
    else:
        typer.echo(f"OTLP ingest: {dashboard_url(host, port).rstrip('/')}/v1/traces, /v1/metrics")
    uvicorn.run(create_app(pipeline, url), host=host, port=port, log_level=log_level, **SERVER_OPTIONS)
