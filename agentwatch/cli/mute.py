"""``agentwatch mute`` / ``unmute`` / ``mutes``: silence notifications for agents for a while.

A mute stops delivery of matching alerts through every notifier until it expires by itself or
is lifted; the alerts still happen, stay on the alerts stream and are recorded as ``muted`` in
the delivery log (``agentwatch alerts`` shows that). When it ends, incidents still firing are
delivered (docs/notifiers.md, Mutes). Muting the same glob and detector again replaces the expiry.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from agentwatch.alerts import iso_ms
from agentwatch.cli import app
from agentwatch.cli.common import EXIT_USAGE, ConfigOption, client_for, fail, load_pipeline, who
from agentwatch.config import format_duration, parse_duration
from agentwatch.redisconn import server_time_ms
from notifiers.routing import Mutes, known_detectors, unknown_detectors

AgentGlob = Annotated[str, typer.Argument(help='Agent name or glob, e.g. "scraper-*" (quote it).')]
DetectorOption = Annotated[
    str | None, typer.Option("--detector", "-d", help="Only this detector's alerts (default: all).")
]


@app.command()
def mute(
    agent: AgentGlob,
    duration: Annotated[str, typer.Option("--for", help='How long, e.g. "30m", "1h", "2d".')],
    detector: DetectorOption = None,
    reason: Annotated[str, typer.Option("--reason", help="Shown in `agentwatch mutes`.")] = "",
    config: ConfigOption = None,
) -> None:
    """Stop notifications for matching agents for a while (it expires by itself)."""
    try:
        seconds = parse_duration(duration)
    except ValueError as exc:
        fail(f"--for: {exc}", EXIT_USAGE)
    if seconds <= 0:
        fail("--for must be longer than zero", EXIT_USAGE)
    pipeline = load_pipeline(config, plugins=False)
    if detector is not None:
        # A misspelt name would mute nothing, silently: say so instead.
        for problem in unknown_detectors([detector], known_detectors(pipeline.settings.detectors)):
            fail(f"--detector: {problem}", EXIT_USAGE)
    client: Any = client_for(pipeline)
    try:
        done = Mutes(client, pipeline.keys).add(agent, seconds, detector=detector, reason=reason, by=who())
    finally:
        client.close()
    what = f"{detector} alerts of" if detector else "alerts of"
    typer.echo(f"muted {what} {agent!r} for {format_duration(seconds)} (until {iso_ms(done.until_ms)})")


@app.command()
def unmute(
    agent: Annotated[str | None, typer.Argument(help="The glob given to `mute`, exactly.")] = None,
    detector: DetectorOption = None,
    everything: Annotated[bool, typer.Option("--all", help="Remove every mute.")] = False,
    config: ConfigOption = None,
) -> None:
    """Remove mutes before they expire: one glob (optionally one detector), or --all."""
    if (agent is None) == (not everything):
        fail("give an agent glob to unmute, or --all (not both)", EXIT_USAGE)
    pipeline = load_pipeline(config, plugins=False)
    client: Any = client_for(pipeline)
    try:
        gone = Mutes(client, pipeline.keys).remove(agent, detector)
    finally:
        client.close()
    if not gone:
        fail(f"no mute matches {agent!r}" + (f" for detector {detector!r}" if detector else ""))
    for item in gone:
        typer.echo(f"unmuted {item.agent!r} ({item.detector or 'all detectors'})")


@app.command()
def mutes(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    config: ConfigOption = None,
) -> None:
    """List the mutes in force."""
    pipeline = load_pipeline(config, plugins=False)
    client: Any = client_for(pipeline)
    try:
        now = server_time_ms(client)
        active = sorted(Mutes(client, pipeline.keys).active(now), key=lambda m: m.until_ms)
    finally:
        client.close()
    if as_json:
        for item in active:
            typer.echo(json.dumps(asdict(item), separators=(",", ":")))
        return
    if not active:
        typer.echo("no mutes in force")
        return
    table = Table(title=f"{len(active)} mute(s)")
    for column in ("agent glob", "detector", "expires in", "until (UTC)", "by", "reason"):
        table.add_column(column)
    for item in active:
        table.add_row(item.agent, item.detector or "all", format_duration((item.until_ms - now) / 1000),
                      iso_ms(item.until_ms)[:19].replace("T", " "), item.by, item.reason)  # fmt: skip
    Console().print(table)
