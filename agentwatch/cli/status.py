"""``agentwatch status`` and ``agentwatch report``: how the fleet is doing, now and over time."""

from __future__ import annotations

import json
import signal
import time
from types import FrameType
from typing import Annotated, Any

import redis
import typer
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from agentwatch.alerts import iso_ms
from agentwatch.cli import app
from agentwatch.cli.common import (
    EXIT_USAGE,
    AgentOption,
    ConfigOption,
    client_for,
    duration_flag,
    fail,
    load_pipeline,
)
from agentwatch.config import Pipeline, format_duration
from agentwatch.fleet import fleet_status
from agentwatch.redisconn import Client, describe, explain
from agentwatch.report import build_report, money, notes, pct, render_text

_STATE_STYLES = {
    "ok": "green", "late": "yellow", "muted": "blue", "stalled": "bold red", "down": "bold red",
    "exited": "red", "halted": "magenta", "retired": "dim",
}  # fmt: skip

JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output (docs/operations.md).")]


class _Stopped(Exception):
    """SIGTERM during ``--watch``: leave the loop like Ctrl-C does."""


@app.command()
def status(
    *,
    config: ConfigOption = None,
    as_json: JsonOption = False,
    agent: AgentOption = None,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh in place until Ctrl-C.")] = False,
    refresh: Annotated[
        str | None, typer.Option("--refresh", help='With --watch: how often, e.g. "5s" (default 2s).')
    ] = None,
) -> None:
    """Every known agent (state, last beat and pulse, tokens/min, cost today, open incidents)
    and the pipeline's own health (workers alive, lag, pending, dead letters)."""
    if watch and as_json:
        fail("--watch and --json do not go together", EXIT_USAGE)
    if refresh is not None and not watch:
        fail("--refresh goes with --watch", EXIT_USAGE)
    every_s = duration_flag("--refresh", refresh or "2s")
    pipeline = load_pipeline(config)
    client = client_for(pipeline)
    try:
        if as_json:
            typer.echo(json.dumps(_filtered(fleet_status(client, pipeline), agent), indent=2))
            return
        console = Console()
        if not watch:
            console.print(_render(_filtered(fleet_status(client, pipeline), agent), console.width))
            return
        _watch(console, client, pipeline, agent, every_s)
    finally:
        client.close()


def _watch(console: Console, client: Client, pipeline: Pipeline, agent: str | None, every_s: float) -> None:
    """Refresh in place until Ctrl-C or SIGTERM; both exit 0, and the last frame stays on screen
    (on a pipe or a file, where nothing can be redrawn, only the last frame is printed).

    Losing Redis is not the end of watching: the last good frame stays, with the error under
    it, and the next refresh that reaches Redis again replaces both (redis-py reconnects)."""

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        raise _Stopped

    previous = signal.signal(signal.SIGTERM, on_term)
    last: dict[str, Any] | None = None
    lost_since: float | None = None
    try:
        with Live(console=console, auto_refresh=False, screen=False) as live:
            try:
                while True:
                    frame: RenderableType
                    try:
                        last = _filtered(fleet_status(client, pipeline), agent)
                        lost_since = None
                        frame = _render(last, console.width)
                    except (redis.RedisError, OSError) as exc:
                        lost_since = lost_since or time.time()
                        where = _url_of(client, pipeline)
                        frame = _lost(
                            last, where, exc, since=lost_since, every_s=every_s, width=console.width
                        )
                    live.update(frame, refresh=True)
                    time.sleep(every_s)
            except (KeyboardInterrupt, _Stopped):
                pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def _lost(
    last: dict[str, Any] | None, where: str, exc: Exception, *, since: float, every_s: float, width: int
) -> RenderableType:
    error = Text(
        f"Redis at {where} is unreachable since {iso_ms(int(since * 1000))[11:19]} UTC: "
        f"{explain(exc)}; retrying every {format_duration(every_s)}",
        style="bold red",
    )
    if last is None:
        return error
    return Group(Text("(the last frame that reached Redis)", style="dim"), _render(last, width), error)


def _url_of(client: Client, pipeline: Pipeline) -> str:
    """Where the client connects, password left out (a cluster client: the configured URL)."""
    kwargs: dict[str, Any] = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    if "host" in kwargs:
        return f"redis://{kwargs['host']}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
    return describe(pipeline.settings.redis.url or "the configured URL")


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
    if as_json and text:
        fail("--json and --text do not go together", EXIT_USAGE)
    since_s = duration_flag("--since", since)
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


def _age(seconds: float | None, *, ago: bool = True) -> str:
    if seconds is None:
        return "-"
    return f"{format_duration(seconds)} ago" if ago else format_duration(seconds)


_INCIDENTS_MIN = 24
"""Narrower than this, the incidents column moves under the table (one line each, whole)."""


def _render(document: dict[str, Any], width: int = 80) -> Group:
    """The status board for a terminal ``width`` columns wide.

    Agent names are never cut: the other columns are short, ages drop their "ago" when space is
    tight, and the incidents column, the only one that gives way, is cut with an ellipsis
    (`agentwatch alerts` has the whole text) or, with no room for it, listed under the table."""
    agents = document["agents"]
    cells = [_cells(row, ago=True) for row in agents]
    headers = ["agent", "state", "beat", "pulse", "every", "tok/min", "today"]

    def fixed(rows: list[list[str]]) -> int:
        """Columns before the incidents, each with the two spaces that follow it."""
        widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
        return sum(widths) + 2 * len(widths)

    compact = [_cells(row, ago=False) for row in agents]
    inline = True
    if fixed(cells) + _INCIDENTS_MIN > width:  # in order: drop "ago", move incidents, both
        if fixed(compact) + _INCIDENTS_MIN <= width:
            cells = compact
        else:
            inline = False
            cells = cells if fixed(cells) <= width else compact
    table = Table(
        title=f"agentwatch status - {document['at']}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )
    for header in headers:
        table.add_column(header, no_wrap=True, justify="right" if header in ("tok/min", "today") else "left")
    if inline:
        table.add_column("incidents", width=width - fixed(cells), no_wrap=True, overflow="ellipsis")
    below: list[RenderableType] = []
    for row, texts in zip(agents, cells, strict=True):
        incidents = "; ".join(f"{i['detector']}: {i['summary']}" for i in row["incidents"])
        state = Text(row["state"], style=_STATE_STYLES.get(row["state"], ""))
        extra = [Text(incidents or "-", no_wrap=True, overflow="ellipsis")] if inline else []
        table.add_row(texts[0], state, *texts[2:], *extra)
        if incidents and not inline:
            below.append(Text(f"{row['agent']}: {incidents}", style=_STATE_STYLES.get(row["state"], "")))
    board: list[RenderableType] = [table]
    if not agents:  # no table to speak of: the title, and why it is empty
        board = [Text(f"agentwatch status - {document['at']}", style="italic"), Text("(no agents yet)")]
    health = document["pipeline"]
    alive = ", ".join(f"{n} {kind}" for kind, n in sorted(health["workers_alive"].items())) or "none"
    oldest = health["oldest_pending_s"]
    lines: list[RenderableType] = [
        Text(
            f"workers alive: {alive}   lag: {_dash(health['lag'])}   pending: {_dash(health['pending'])}"
            + (f" (oldest {oldest:g}s)" if oldest else "")
            + f"   dead letters: {health['deadletter']}   failed deliveries: {health['failed_deliveries']}"
        )
    ]
    lines += [Text(f"pipeline: {i['summary']}", style="bold red") for i in health["incidents"]]
    if health.get("rejected"):
        why = "with a missing or bad signature (forged, or a key that does not match: see the dead letters)"
        lines.append(Text(f"rejected: {health['rejected']:,} events or alerts {why}", style="bold red"))
    lines += [
        Text(f"{w['name']}: handler {name!r} is broken ({w['skipped']:,} entries acked without it)",
             style="bold red")
        for w in health["workers"] for name in w.get("broken", [])
    ]  # fmt: skip
    if not health.get("detecting", True):
        lines.append(Text(f"not detecting: {health['detecting_reason']}", style="bold red"))
    return Group(*board, *below, *lines)


def _cells(row: dict[str, Any], *, ago: bool) -> list[str]:
    return [
        row["agent"],
        row["state"],
        _age(row["last_beat_age_s"], ago=ago),
        _age(row["last_pulse_age_s"], ago=ago),
        format_duration(row["interval_s"]) if row["interval_s"] else "-",
        "-" if row["tokens_per_min"] is None else f"{row['tokens_per_min']:,.0f}",
        cost_cell(row),
    ]


def cost_cell(row: dict[str, Any]) -> str:
    """Cost today: ``$1.23``, with the tightest budget's share (``$1.23 41%``), ``+?`` when some
    beats could not be priced, ``unknown`` when none could (never ``$0.00`` for those)."""
    cost, unpriced = row["cost_today"], row.get("unpriced_beats_today") or 0
    if cost is None:
        return "unknown" if unpriced else "-"
    text = f"${cost:,.2f}" + ("+?" if unpriced else "")
    budgets = row.get("budgets") or []
    if budgets:
        text += f" {max(b['used_pct'] for b in budgets):.0f}%"
    return text


def _render_report(document: dict[str, Any]) -> Group:
    table = Table(title=f"agentwatch report {document['from']} -> {document['to']}", title_justify="left")
    for column in ("agent", "uptime", "down", "beats", "tokens", "cost", "incidents"):
        table.add_column(
            column,
            justify="left" if column in ("agent", "incidents") else "right",
            no_wrap=column != "incidents",
        )
    for row in document["agents"]:
        incidents = "; ".join(
            f"{i['detector']} {'(open)' if i['open'] else format_duration(i['duration_s'])}"
            for i in row["incidents"]
        )
        down = format_duration(row["down_s"]) if row["down_s"] else "-"
        table.add_row(
            row["agent"], pct(row["uptime_pct"]), down, f"{row['beats']:,}", f"{row['tokens']:,}",
            money(row["cost"], row.get("unpriced_beats", 0)), incidents or "-",
        )  # fmt: skip
    fleet = document["fleet"]
    table.add_section()
    down = format_duration(fleet["down_s"]) if fleet["down_s"] else "-"
    table.add_row(
        f"fleet ({fleet['agents']} agents)", pct(fleet["uptime_pct"]), down, f"{fleet['beats']:,}",
        f"{fleet['tokens']:,}", money(fleet["cost"], fleet.get("unpriced_beats", 0)),
        f"{fleet['incidents']} incidents",
    )  # fmt: skip
    return Group(table, *[Text(note, style="yellow") for note in notes(document)])


def _dash(value: object) -> str:
    return "-" if value is None else str(value)
