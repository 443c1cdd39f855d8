"""``agentwatch up`` (the whole pipeline) and ``agentwatch worker`` (one scalable worker)."""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import shlex
import signal
import threading
from pathlib import Path
from typing import Annotated, Any, Final

import typer

from agentwatch import __version__
from agentwatch.cli import app
from agentwatch.cli.common import (
    EXIT_USAGE,
    ConfigOption,
    LogLevel,
    fail,
    load_pipeline,
    setup_logging,
    url_source,
    worker_url,
)
from agentwatch.cli.serve import dashboard_url
from agentwatch.config import DEFAULT_REDIS_URL, EMBEDDED, Pipeline, format_duration
from agentwatch.embedded import (
    EmbeddedRedis,
    default_data_dir,
    default_state_dir,
    private_dir,
    remove_stale_dirs,
    tcp_port_free,
)
from agentwatch.errors import ConfigError, EmbeddedRedisError
from agentwatch.http.access import check_bind
from agentwatch.keys import Keys
from agentwatch.redisconn import RECOVERABLE, answers, connect, describe, embedded_url_file
from agentwatch.supervisor import ServerWatch, Supervisor, serve_child, worker_child
from agentwatch.worker import Worker
from agentwatch.workers import detector_worker, notifier_worker

log = logging.getLogger("agentwatch.up")


class Kind(enum.StrEnum):
    detectors = "detectors"
    notifiers = "notifiers"


@app.command()
def worker(
    kind: Annotated[Kind, typer.Argument(help="Which worker: detectors or notifiers.")],
    config: ConfigOption = None,
    log_level: LogLevel = "info",
) -> None:
    """Run one worker in the foreground. Start as many as you like: they share the work."""
    setup_logging(log_level)
    pipeline = load_pipeline(config)
    url = worker_url(pipeline)
    client = connect(pipeline.settings, url, name=f"agentwatch-{kind.value}")
    runner: Worker[Any] = (
        detector_worker(pipeline, client) if kind is Kind.detectors else notifier_worker(pipeline, client)
    )
    log.info("%s worker on %s (prefix %r)", kind.value, describe(url), pipeline.settings.redis.prefix)
    try:
        runner.run()
    finally:
        client.close()


@app.command()
def up(
    config: ConfigOption = None,
    log_level: LogLevel = "info",
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Do not print a line for each alert and delivery outcome.")
    ] = False,
) -> None:
    """Run the whole pipeline (detector and notifier workers) in the foreground.

    With no Redis configured and none answering at the default URL, an embedded one is started
    (and stopped on exit). Prints a line for each alert fired or resolved and for each delivery
    delivered, retrying or failed (not with --quiet).
    """
    setup_logging(log_level)
    pipeline = load_pipeline(config)
    settings = pipeline.settings
    if settings.http.enabled:
        try:
            check_bind(settings.http, source=pipeline.source)  # before anything starts
        except ConfigError as exc:
            typer.echo(exc.render(), err=True)
            raise typer.Exit(EXIT_USAGE) from None
    # Signals first: a Ctrl-C that arrives while the server or workers start must still stop
    # everything cleanly, not raise KeyboardInterrupt half way.
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("%s: stopping workers", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    embedded: EmbeddedRedis | None = None
    url = settings.redis.url
    if url is None and answers(DEFAULT_REDIS_URL):
        url = DEFAULT_REDIS_URL
    if url is None or url == EMBEDDED:
        embedded = _start_embedded(pipeline)
        url = embedded.url
    elif not answers(url):
        log.warning("Redis does not answer at %s yet; workers will wait for it", describe(url))
    config_arg = None if pipeline.source.startswith("built-in") else str(Path(pipeline.source).resolve())
    children = [
        worker_child("detectors", i, url, config_arg, log_level) for i in range(settings.worker.detectors)
    ]
    if pipeline.notifiers:
        children += [
            worker_child("notifiers", i, url, config_arg, log_level) for i in range(settings.worker.notifiers)
        ]
    serving, dashboard = _dashboard(pipeline)
    if serving:
        children.append(serve_child(url, config_arg, log_level, settings.http.bind))
    _print_banner(pipeline, url, embedded, dashboard, url_source(pipeline, url))
    watch = ServerWatch(embedded) if embedded is not None else None
    supervisor = Supervisor(children, stopping=stopping, server=watch)
    code = 1
    try:
        if not quiet:
            _follow_activity(pipeline, url, stopping)
        supervisor.start()
        code = supervisor.run()
    finally:
        supervisor.stop()
        if embedded is not None:
            _stop_embedded(pipeline, embedded)
    raise typer.Exit(code)


def _follow_activity(pipeline: Pipeline, url: str, stopping: threading.Event) -> None:
    """Print each alert and delivery outcome as it happens (agentwatch/activity.py), from a
    daemon thread with its own connection, until ``stopping`` is set."""
    from agentwatch.activity import Activity  # noqa: PLC0415 - only `up` needs it

    settings = pipeline.settings
    try:
        client = connect(settings, url, name="agentwatch-up")  # a cluster client connects now
    except Exception as exc:  # these lines must never keep the pipeline from starting
        log.warning("cannot show alerts and deliveries as they happen (%s); the pipeline runs on", exc)
        return
    keys = Keys(settings.redis.prefix, settings.redis.shards)
    activity = Activity(client, keys, [p.name for p in pipeline.notifiers])
    if answers(url):  # else the first poll that reaches Redis starts from there
        with contextlib.suppress(*RECOVERABLE):
            activity.start_here()  # before the workers: an alert raised as they start is shown too
    threading.Thread(target=activity.run, args=(stopping,), name="activity", daemon=True).start()


def _start_embedded(pipeline: Pipeline) -> EmbeddedRedis:
    cfg = pipeline.settings.embedded
    base = cfg.state_dir or default_state_dir()
    port = cfg.port if cfg.port and tcp_port_free(cfg.port) else 0
    data_dir = cfg.data_dir or (cfg.state_dir / "data" if cfg.state_dir else default_data_dir())
    try:
        private_dir(base, tighten=cfg.state_dir is None)  # a folder the user chose keeps its mode
        for stale in remove_stale_dirs(base):
            log.info("removed %s, left by an agentwatch up that is gone", stale)
        data = data_dir if cfg.persist else None
        server = EmbeddedRedis(base / str(os.getpid()), port=port, persist=cfg.persist, data_dir=data).start()
    except EmbeddedRedisError as exc:
        fail(f"cannot start the embedded Redis: {exc}")
    embedded_url_file(base).write_text(server.url + "\n")
    return server


def _stop_embedded(pipeline: Pipeline, server: EmbeddedRedis) -> None:
    record = embedded_url_file(pipeline.settings.embedded.state_dir or default_state_dir())
    if record.is_file() and record.read_text().strip() == server.url:
        record.unlink()
    server.cleanup()


def _dashboard(pipeline: Pipeline) -> tuple[bool, str]:
    """Whether ``up`` starts the dashboard, and its URL or why not. A port already taken (another
    ``up``, say) is said plainly and the workers start anyway: monitoring must not wait for a page."""
    http = pipeline.settings.http
    if not http.enabled:
        return False, "off ([http] enabled = false; `agentwatch serve` runs it on its own)"
    probe = "127.0.0.1" if http.host in ("0.0.0.0", "::", "") else http.host
    try:
        free = tcp_port_free(http.port, probe)
    except OSError:
        free = True  # an address this probe cannot reach (IPv6): let the server try
    if not free:
        why = f"not started: {http.bind} is in use (another agentwatch up?); set [http] bind"
        return False, why + ", or [http] enabled = false"
    return True, dashboard_url(http.host, http.port)


def _print_banner(
    pipeline: Pipeline, url: str, embedded: EmbeddedRedis | None, dashboard: str, source: str
) -> None:
    settings = pipeline.settings
    typer.echo(f"agentwatch {__version__} - pipeline from {pipeline.source}")
    agent_url = url
    if embedded is not None:
        typer.echo(f"redis: embedded server at {embedded.url} (agentwatch's own, stopped with `up`)")
        if embedded.persist:
            typer.echo(f"       data kept in {embedded.data_dir} (append-only file, fsync every second)")
        else:
            typer.echo("       not persisted ([embedded] persist = false): a restart forgets everything")
        if embedded.tcp_url:
            typer.echo(f"       also at {embedded.tcp_url}")
            agent_url = embedded.tcp_url
    else:
        typer.echo(f"redis: {describe(url)} (from {source})")
        for line in _foreign_server(pipeline, url, told=source.startswith("the default")):
            typer.echo(f"       {line}")
    typer.echo(f"prefix: {settings.redis.prefix!r}, shards: {settings.redis.shards}")
    typer.echo(f"agents need: {' '.join(agent_env(pipeline, agent_url))}")
    if settings.security.agent_keys:
        typer.echo(
            "       and each its own AGENTWATCH_KEY ([security] agent_keys): `agentwatch agent-key NAME`"
        )
    names = ", ".join(p.name for p in pipeline.detectors) or "none"
    typer.echo(f"detectors: {names} ({settings.worker.detectors} worker(s))")
    if pipeline.notifiers:
        names = ", ".join(f"{p.name} ({p.config.type})" for p in pipeline.notifiers)
        typer.echo(f"notifiers: {names} ({settings.worker.notifiers} worker(s))")
    else:
        typer.echo("notifiers: none configured (alerts are kept; see `agentwatch alerts`)")
    typer.echo(f"dashboard: {dashboard}")
    if dashboard.startswith("http") and settings.otlp.enabled and settings.http.ingest_token:
        typer.echo(f"OTLP ingest: {dashboard.rstrip('/')}/v1/traces, /v1/metrics")
    typer.echo("Ctrl-C to stop.")


def agent_env(pipeline: Pipeline, url: str) -> list[str]:
    """The exact ``AGENTWATCH_*`` settings an agent needs to write where this pipeline reads,
    shell-quoted (a mismatched prefix or shard count is otherwise a silent, empty dashboard).
    A password in the URL is masked: a terminal's scrollback and a log are no place for it."""
    redis_cfg = pipeline.settings.redis
    shown = describe(url)
    env = [f"AGENTWATCH_REDIS_URL={shlex.quote(shown)}", f"AGENTWATCH_PREFIX={shlex.quote(redis_cfg.prefix)}"]
    if redis_cfg.shards > 1:
        env.append(f"AGENTWATCH_SHARDS={redis_cfg.shards}")
    if shown != url:
        env.append("(with the credentials of the URL in place of ***)")
    return env


EVENT_BYTES: Final = 150
"""About what one event costs in a stream, for the sizing line of the banner: MEMORY USAGE of a
stream of 2,000 beats with tokens, model and fingerprint is 141 bytes an event (Redis 7)."""


def _foreign_server(pipeline: Pipeline, url: str, *, told: bool) -> list[str]:
    """What ``up`` says about a server it did not start: whose it is, what it holds, what
    agentwatch will add, and how to get a private one instead. ``told``: the server was picked
    because it answered at the default address, not because the user named it."""
    settings = pipeline.settings
    try:
        client: Any = connect(settings, url, name="agentwatch-up")
        try:
            version = client.info("server").get("redis_version", "?")
            keys = int(client.dbsize())
            ours = int(client.exists(Keys(settings.redis.prefix, settings.redis.shards).stats))
        finally:
            client.close()
    except Exception:
        return []
    days = settings.streams.events_retention_s / 86400
    per_day_mb = EVENT_BYTES * 86400 / 1e6
    held = f"it holds {keys:,} keys" + (
        f", among them {settings.redis.prefix!r} keys of an earlier run" if ours else ""
    )
    lines = [
        f"an existing server, not agentwatch's own: Redis {version}; {held}",
        f"agentwatch adds its {settings.redis.prefix}:* keys: event streams keep "
        f"{format_duration(settings.streams.events_retention_s)} of events ([streams] events_retention), "
        f"about {per_day_mb * days:,.0f} MB for each event per second the agents send; alerts up to "
        f"{settings.streams.alerts_max_len:,}",
    ]
    if told:
        lines.append('for a private server instead, set [redis] url = "embedded" in pipeline.toml')
    return lines
