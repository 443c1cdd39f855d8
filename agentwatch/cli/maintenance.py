"""``agentwatch maintenance start`` / ``stop`` / ``list``: ad-hoc maintenance windows for deploys.

While a window is in force nothing pages for the agents it covers; when it ends (expired, or
``stop``) they get a fresh allowance, so only what is still down after it pages (the decision:
notifiers/holds.py; the windows: agentwatch/maintenance.py). Recurring windows are
``[[maintenance]]`` entries in pipeline.toml; ``list`` shows both kinds.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from agentwatch import labels
from agentwatch.alerts import iso_ms
from agentwatch.cli import app
from agentwatch.cli.common import (
    EXIT_USAGE,
    ConfigOption,
    client_for,
    duration_flag,
    fail,
    load_pipeline,
    who,
)
from agentwatch.config import MAX_MAINTENANCE_S, format_duration
from agentwatch.maintenance import AdhocWindows, Window, next_start_ms, scheduled
from agentwatch.redisconn import server_time_ms

maintenance_app = typer.Typer(
    help="Maintenance windows: nothing pages for the agents they cover; a fresh allowance after.",
    no_args_is_help=True,
)
app.add_typer(maintenance_app, name="maintenance")


@maintenance_app.command("start")
def start(
    duration: Annotated[str, typer.Option("--for", help='How long, e.g. "30m" (at most 7d).')],
    agent: Annotated[
        list[str] | None, typer.Option("--agent", help='Agent name or glob, e.g. "web-*" (repeatable).')
    ] = None,
    label: Annotated[
        list[str] | None,
        typer.Option("--label", help='Label selector key=glob, e.g. "team=search" (repeatable).'),
    ] = None,
    reason: Annotated[str, typer.Option("--reason", help="Shown in status and `maintenance list`.")] = "",
    config: ConfigOption = None,
) -> None:
    """Start a maintenance window now for the agents matching --agent and/or --label."""
    seconds = duration_flag("--for", duration)
    if seconds > MAX_MAINTENANCE_S:
        fail(f"--for: at most {format_duration(MAX_MAINTENANCE_S)}, got {duration!r}", EXIT_USAGE)
    globs = list(agent or [])
    for glob in globs:
        if labels.GLOB_RE.fullmatch(glob) is None:
            fail(
                f"--agent: {glob[:60]!r} is not an agent name or glob (A-Za-z0-9._:@/- and * ? [ ] !)",
                EXIT_USAGE,
            )
    wanted: dict[str, str] = {}
    for text in label or []:
        try:
            key, glob = labels.selector(text)
        except ValueError as exc:
            fail(f"--label: {exc}", EXIT_USAGE)
        if labels.GLOB_RE.fullmatch(glob) is None:
            fail(f"--label: the value of {key!r} is not a label value or glob", EXIT_USAGE)
        wanted[key] = glob
    if not globs and not wanted:
        fail('say whom it covers: --agent "web-*" and/or --label team=search', EXIT_USAGE)
    if not reason.isprintable() or len(reason) > 200:
        fail("--reason: at most 200 characters of printable text", EXIT_USAGE)
    pipeline = load_pipeline(config, plugins=False)
    client: Any = client_for(pipeline)
    try:
        window = AdhocWindows(client, pipeline.keys).start(
            seconds, agents=globs, labels=wanted, reason=reason, by=who()
        )
    finally:
        client.close()
    typer.echo(
        f"maintenance {window.id} started for {_whom(window)} for {format_duration(seconds)} "
        f"(until {iso_ms(window.end_ms)}); stop it early with `agentwatch maintenance stop {window.id}`"
    )


@maintenance_app.command("stop")
def stop(
    window_id: Annotated[
        str | None, typer.Argument(help="The id `start` printed; default: every ad-hoc window in force.")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """End ad-hoc windows now: the agents they cover get a fresh allowance from now."""
    pipeline = load_pipeline(config, plugins=False)
    client: Any = client_for(pipeline)
    try:
        stopped = AdhocWindows(client, pipeline.keys).stop(window_id)
    finally:
        client.close()
    if not stopped:
        fail("no ad-hoc maintenance window in force" + (f" with id {window_id!r}" if window_id else ""))
    for window in stopped:
        typer.echo(f"maintenance {window.id} stopped ({_whom(window)}); a fresh allowance runs from now")


@maintenance_app.command("list")
def list_windows(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    config: ConfigOption = None,
) -> None:
    """List the windows: ad-hoc ones in force or ended in the last day, and each recurring one."""
    pipeline = load_pipeline(config, plugins=False)
    settings = pipeline.settings
    client: Any = client_for(pipeline)
    try:
        now = server_time_ms(client)
        adhoc = AdhocWindows(client, pipeline.keys).all(now)
    finally:
        client.close()
    recurring = scheduled(settings.maintenance, settings.report.timezone, now)
    rows = [*adhoc, *recurring]
    if as_json:
        for window, entry in [(w, None) for w in adhoc] + list(
            zip(recurring, settings.maintenance, strict=True)
        ):
            data = window.to_dict() | {"in_force": window.in_force(now)}
            if entry is not None:
                data["next_start"] = iso_ms(next_start_ms(entry, settings.report.timezone, now))
            typer.echo(json.dumps(data, separators=(",", ":")))
        return
    if not rows:
        typer.echo("no maintenance windows (none configured, none started)")
        return
    table = Table(title=f"maintenance windows (times UTC; schedules in {settings.report.timezone})")
    for column in ("id", "covers", "state", "from", "until", "by", "reason"):
        table.add_column(column)
    for window in rows:
        state = "in force" if window.in_force(now) else ("stopped" if window.stopped else "over")
        if window.source == "schedule":
            entry = settings.maintenance[int(window.id.split(":")[1])]
            upcoming = next_start_ms(entry, settings.report.timezone, now)
            state += f"; next {iso_ms(upcoming)[:16].replace('T', ' ')}"
        cells = (window.schedule or window.id, _whom(window), state, _short(window.start_ms),
                 _short(window.end_ms), window.by, window.reason)  # fmt: skip
        table.add_row(*(Text(cell) for cell in cells))  # Text: a "[...]" in a glob is not markup
    Console().print(table)


def _whom(window: Window) -> str:
    parts = [", ".join(window.agents)] if window.agents else []
    parts += [f"{key}={glob}" for key, glob in window.labels.items()]
    return " ".join(parts)


def _short(at_ms: int) -> str:
    return iso_ms(at_ms)[:19].replace("T", " ")
