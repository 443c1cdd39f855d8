"""What every subcommand shares: loading the config, connecting, logging, exit codes."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from agentwatch import config as config_mod
from agentwatch.config import DEFAULT_REDIS_URL, EMBEDDED, Pipeline
from agentwatch.errors import ConfigError, RedisUnavailable
from agentwatch.redisconn import Client, answers, connect, describe, resolve_url, running_embedded_url

EXIT_RUNTIME = 1
EXIT_USAGE = 2

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="pipeline.toml to use (default: ./pipeline.toml if it exists, else built-in defaults).",
        show_default=False,
    ),
]
LogLevel = Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")]


def fail(message: str, code: int = EXIT_RUNTIME) -> NoReturn:
    typer.echo(f"agentwatch: {message}", err=True)
    raise typer.Exit(code)


def load_pipeline(path: Path | None, *, plugins: bool = True) -> Pipeline:
    """The validated pipeline, or exit 2 with every bad key named."""
    try:
        return config_mod.load(path, plugins=plugins)
    except ConfigError as exc:
        typer.echo(exc.render(), err=True)
        raise typer.Exit(EXIT_USAGE) from None


def setup_logging(level: str) -> None:
    numeric = getattr(logging, level.upper(), None)
    if not isinstance(numeric, int):
        fail(f"unknown log level {level!r}: use debug, info, warning or error", EXIT_USAGE)
    logging.basicConfig(
        level=numeric,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )


def worker_url(pipeline: Pipeline) -> str:
    """For long-running workers: the configured URL, a running embedded server, or the default.

    No ping here: a worker started before Redis waits for it with backoff (and says so).
    """
    configured = pipeline.settings.redis.url
    if configured and configured != EMBEDDED:
        return configured
    if configured is None and answers(DEFAULT_REDIS_URL):
        return DEFAULT_REDIS_URL
    return running_embedded_url(pipeline.settings) or DEFAULT_REDIS_URL


def client_for(pipeline: Pipeline, *, name: str = "agentwatch-cli") -> Client:
    """A connected client for one-shot commands, or exit 1 saying which URL failed and why."""
    try:
        url = resolve_url(pipeline.settings)
    except RedisUnavailable as exc:
        fail(str(exc))
    if not answers(url, timeout_s=pipeline.settings.redis.timeout_s):
        fail(f"Redis does not answer at {describe(url)}; is it running? (`agentwatch up` embeds one)")
    return connect(pipeline.settings, url, name=name)
