"""``agentwatch status`` and ``agentwatch report``: how the fleet is doing, now and over time."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from agentwatch.cli import app
from agentwatch.cli.common import EXIT_USAGE, ConfigOption, client_for, fail, load_pipeline
from agentwatch.config import format_duration, parse_duration
from agentwatch.fleet import fleet_status
from agentwatch.report import build_report, render_text

_STATE_STYLES = {
    "ok": "green", "late": "yellow", "muted": "blue", "stalled": "bold red", "down": "bold red",
    "exited": "red", "retired": "dim",
}  # fmt: skip

JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output (docs/operations.md).")]
AgentOption = Annotated[
    str | None, typer.Option("--agent", help='Only agents matching this glob, e.g. "scraper-*".')
]


@app.command()
def status(
    *,
    config: ConfigOption = None,
    as_json: JsonOption = False,
    agent: AgentOption = None,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh in place every 2 s until Ctrl-C.")] = False,
) -> None:
    """Every known agent (state, last beat and pulse, tokens/min, cost today, open incidents)
    and the pipeline's own health (workers alive, lag, pending, dead letters)."""
    if watch and as_json:
        fail("--watch and --json do not go together", EXIT_USAGE)
    pipeline = load_pipeline(config)
    client = client_for(pipeline)
    try:
        if as_json:
            typer.echo(json.dumps(_filtered(fleet_status(client, pipeline), agent), indent=2))
            return
        console = Console()
        if not watch:
            console.print(_render(_filtered(fleet_status(client, pipeline), agent)))
            return
        with Live(console=console, auto_refresh=False, screen=False) as live:
            try:
                while True:
                    live.update(_render(_filtered(fleet_status(client, pipeline), agent)), refresh=True)
                    time.sleep(2.0)
            except KeyboardInterrupt:
                pass
    finally:
        client.close()


@app.command()
def report(
    *,
    config: ConfigOption = None,
    since: Annotated[str, typer.Option("--since", help='The period, e.g. "24h", "7d".')] = "24h",
    as_json: JsonOption = False,
    agent: AgentOption = None,
    text: Annotated[bool, typer.Option("--text", help="Plain text, as Slack receives it.")] = False,
) -> None:
    """Per agent: uptime %, beats, incidents with durations, tokens, cost; and fleet totals."""
    try:
        since_s = parse_duration(since)
    except ValueError as exc:
        fail(f"--since: {exc}", EXIT_USAGE)
    pipeline = load_pipeline(config)
    client = client_for(pipeline)
    try:
        document = build_report(client, pipeline, since_s=since_s, agents=agent)
    finally:
        client.close()
    if as_json:
        typer.echo(json.dumps(document, indent=2))
    elif text:
        typer.echo(render_text(document))
    else:
        Console().print(_render_report(document))


def _filtered(document: dict[str, Any], glob: str | None) -> dict[str, Any]:
    if glob is None:
        return document
    import fnmatch  # noqa: PLC0415 - only with --agent

    return {**document, "agents": [a for a in document["agents"] if fnmatch.fnmatchcase(a["agent"], glob)]}


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else f"{format_duration(seconds)} ago"


def _render(document: dict[str, Any]) -> Group:
    table = Table(title=f"agentwatch status - {document['at']}", title_justify="left")
    for column in (
        "agent",
        "state",
        "last beat",
        "last pulse",
        "interval",
        "tokens/min",
        "cost today",
        "incidents",
    ):
        table.add_column(column, justify="right" if column in ("tokens/min", "cost today") else "left")
    for row in document["agents"]:
        state = Text(row["state"], style=_STATE_STYLES.get(row["state"], ""))
        incidents = "; ".join(f"{i['detector']}: {i['summary']}" for i in row["incidents"]) or "-"
        table.add_row(
            row["agent"],
            state,
            _age(row["last_beat_age_s"]),
            _age(row["last_pulse_age_s"]),
            format_duration(row["interval_s"]) if row["interval_s"] else "-",
            "-" if row["tokens_per_min"] is None else f"{row['tokens_per_min']:,.0f}",
            "-" if row["cost_today"] is None else f"${row['cost_today']:,.2f}",
            incidents,
        )
    if not document["agents"]:
        table.add_row("(no agents yet)", "", "", "", "", "", "", "")
    health = document["pipeline"]
    alive = ", ".join(f"{n} {kind}" for kind, n in sorted(health["workers_alive"].items())) or "none"
    lines = [
        f"workers alive: {alive}   lag: {_dash(health['lag'])}   pending: {_dash(health['pending'])}"
        f" (oldest {_dash(health['oldest_pending_s'])}s)   dead letters: {health['deadletter']}"
        f"   failed deliveries: {health['failed_deliveries']}",
    ]
    lines += [f"[bold red]pipeline: {i['summary']}[/]" for i in health["incidents"]]
    if not health["workers_alive"].get("detectors"):
        lines.append("[bold red]no detector worker is running: nothing is being watched (agentwatch up)[/]")
    return Group(table, *lines)


def _render_report(document: dict[str, Any]) -> Group:
    table = Table(title=f"agentwatch report {document['from']} -> {document['to']}", title_justify="left")
    for column in ("agent", "uptime", "down", "beats", "tokens", "cost", "incidents"):
        table.add_column(column, justify="left" if column in ("agent", "incidents") else "right")
    for row in document["agents"]:
        incidents = "; ".join(
            f"{i['detector']} {'(open)' if i['open'] else format_duration(i['duration_s'])}"
            for i in row["incidents"]
        )
        down = format_duration(row["down_s"]) if row["down_s"] else "-"
        table.add_row(
            row["agent"], f"{row['uptime_pct']:.2f}%", down, f"{row['beats']:,}", f"{row['tokens']:,}",
            f"${row['cost']:,.2f}", incidents or "-",
        )  # fmt: skip
    fleet = document["fleet"]
    uptime = "-" if fleet["uptime_pct"] is None else f"{fleet['uptime_pct']:.2f}%"
    table.add_section()
    down = format_duration(fleet["down_s"]) if fleet["down_s"] else "-"
    table.add_row(
        f"fleet ({fleet['agents']} agents)", uptime, down, f"{fleet['beats']:,}", f"{fleet['tokens']:,}",
        f"${fleet['cost']:,.2f}", f"{fleet['incidents']} incidents",
    )  # fmt: skip
    return Group(table)


def _dash(value: object) -> str:
    return "-" if value is None else str(value)
