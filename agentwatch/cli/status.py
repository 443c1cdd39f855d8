"""``agentwatch status`` and ``agentwatch report``: how the fleet is doing, now and over time."""

from __future__ import annotations

import fnmatch
import json
import shutil
import signal
import textwrap
import time
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any, Final

import typer

from agentwatch import labels
from agentwatch.activity import literal
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
from agentwatch.redisconn import Client, describe, explain, server_time_ms

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

_STATE_STYLES: Final[dict[str, dict[str, Any]]] = {
    "ok": {"fg": "green"}, "late": {"fg": "yellow"}, "muted": {"fg": "blue"},
    "stalled": {"fg": "red", "bold": True}, "down": {"fg": "red", "bold": True}, "exited": {"fg": "red"},
    "halted": {"fg": "magenta"},
    "retired": {"dim": True},
}  # fmt: skip
_ALARM: Final[dict[str, Any]] = {"fg": "red", "bold": True}

LabelOption = Annotated[
    list[str] | None,
    typer.Option(
        "--label",
        metavar="<key=glob>",
        help='Only agents with this label, e.g. "team=search" (a glob); repeatable.',
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output (docs/operations.md).")]


class _Stopped(Exception):
    """SIGTERM during ``--watch``: leave the loop like Ctrl-C does."""


@app.command()
def status(
    *,
    config: ConfigOption = None,
    as_json: JsonOption = False,
    agent: AgentOption = None,
    label: LabelOption = None,
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
    selectors = _selectors(label)
    pipeline = load_pipeline(config, plugins=False)  # settings only: starts fast (issue 10)
    client = client_for(pipeline)
    from agentwatch.cli.elsewhere import wiring, wiring_notes  # noqa: PLC0415 - only once the flags are right
    from agentwatch.fleet import fleet_status  # noqa: PLC0415 - heavy: only once the flags are right

    try:
        if as_json:
            document = _filtered(fleet_status(client, pipeline), agent, selectors)
            document.update(wiring(client, pipeline, server_time_ms(client)))
            typer.echo(json.dumps(document, indent=2))
            return
        if not watch:
            width = max(40, shutil.get_terminal_size((80, 24)).columns)  # a pipe: 80, or $COLUMNS
            for line in _board(_filtered(fleet_status(client, pipeline), agent, selectors), width):
                typer.echo(line)  # colours only on a terminal (click strips them on a pipe)
            for note in wiring_notes(wiring(client, pipeline, server_time_ms(client))):
                # Flowed to the terminal like the board; continuation lines indented.
                for line in textwrap.wrap(note, width, subsequent_indent="    ", break_on_hyphens=False):
                    typer.echo(typer.style(line, fg="yellow") if note.startswith("note:") else line)
            return
        from rich.console import Console  # noqa: PLC0415

        _watch(Console(), client, pipeline, agent, every_s, selectors)
    finally:
        client.close()


def _watch(  # noqa: PLR0917 - the command's options
    console: Console,
    client: Client,
    pipeline: Pipeline,
    agent: str | None,
    every_s: float,
    selectors: list[tuple[str, str]],
) -> None:
    """Refresh in place until Ctrl-C or SIGTERM; both exit 0, and the last frame stays on screen
    (on a pipe or a file, where nothing can be redrawn, only the last frame is printed).

    Losing Redis is not the end of watching: the last good frame stays, with the error under
    it, and the next refresh that reaches Redis again replaces both (redis-py reconnects)."""
    import redis  # noqa: PLC0415
    from rich.live import Live  # noqa: PLC0415

    from agentwatch.fleet import fleet_status  # noqa: PLC0415

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        raise _Stopped

    previous = signal.signal(signal.SIGTERM, on_term)
    last: dict[str, Any] | None = None
    lost_since: float | None = None
    try:
        with Live(console=console, auto_refresh=False, screen=False) as live:
            try:
                while True:
                    frame: Text
                    try:
                        last = _filtered(fleet_status(client, pipeline), agent, selectors)
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
) -> Text:
    error = typer.style(
        f"Redis at {where} is unreachable since {iso_ms(int(since * 1000))[11:19]} UTC: "
        f"{explain(exc)}; retrying every {format_duration(every_s)}",
        **_ALARM,
    )
    lines = [error]
    if last is not None:
        lines = [typer.style("(the last frame that reached Redis)", dim=True), *_board(last, width), error]
    return _ansi(lines)


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
    from rich.console import Console  # noqa: PLC0415

    from agentwatch.report import build_report, render_text  # noqa: PLC0415

    since_s = duration_flag("--since", since)
    pipeline = load_pipeline(config, plugins=False)  # settings only: starts fast (issue 10)
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


def _selectors(given: list[str] | None) -> list[tuple[str, str]]:
    try:
        return [labels.selector(text) for text in given or []]
    except ValueError as exc:
        fail(f"--label: {exc}", EXIT_USAGE)


def _filtered(
    document: dict[str, Any], glob: str | None, selectors: list[tuple[str, str]] | None = None
) -> dict[str, Any]:
    """Only the agents matching ``--agent`` and every ``--label key=glob``."""
    if glob is None and not selectors:
        return document

    def keep(row: dict[str, Any]) -> bool:
        if glob is not None and not fnmatch.fnmatchcase(row["agent"], glob):
            return False
        found = row.get("labels") or {}
        return all(key in found and fnmatch.fnmatchcase(found[key], want) for key, want in selectors or ())

    return {**document, "agents": [row for row in document["agents"] if keep(row)]}


def _age(seconds: float | None, *, ago: bool = True) -> str:
    if seconds is None:
        return "-"
    return f"{format_duration(seconds)} ago" if ago else format_duration(seconds)


def _render(document: dict[str, Any], width: int = 80) -> Text:
    """The status board as one rich renderable (for ``--watch``, which redraws it in place)."""
    return _ansi(_board(document, width))


def _ansi(lines: list[str]) -> Text:
    from rich.text import Text  # noqa: PLC0415

    return Text.from_ansi("\n".join(lines))  # a cause longer than the screen folds, whole


_HEADERS: Final = ("agent", "state", "beat", "pulse", "every", "tok/min", "today")
_RIGHT: Final = frozenset({"tok/min", "today"})
_GAP: Final = "  "


def _board(document: dict[str, Any], width: int = 80) -> list[str]:
    """The status board as lines of text for a terminal ``width`` columns wide (styled with
    ANSI colours, which ``typer.echo`` drops on a pipe).

    One line per agent. Agent names are never cut: the other columns are short, and ages drop
    their "ago" when space is tight. An agent's open incidents (the cause: "crashed with
    ValueError: boom") are never cut either: they fill the last column when every one fits,
    else each goes whole on an indented line under its agent, the one kind of line that may
    run past ``width``. The pipeline's health follows, its parts flowed onto lines that fit."""
    agents = document["agents"]
    lines = [typer.style(f"agentwatch status - {document['at']}", italic=True)]
    if agents:
        lines += _table(agents, width)
    else:
        lines.append("(no agents yet)")
    return lines + _health(document["pipeline"], width)


def _table(agents: list[dict[str, Any]], width: int) -> list[str]:
    names = [literal(row["agent"]) for row in agents]
    causes = ["; ".join(literal(text) for text in _causes(row)) for row in agents]

    def layout(ago: bool) -> tuple[list[list[str]], list[int]]:
        rows = [[name, *_cells(row, ago=ago)[1:]] for name, row in zip(names, agents, strict=True)]
        return rows, [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(_HEADERS)]

    rows, widths = layout(True)
    fixed = sum(widths) + len(_GAP) * len(widths)
    longest = max([len("incidents"), *(len(c) for c in causes)])
    if fixed + longest > width:  # in order: drop "ago", then move the causes under their agents
        rows, widths = layout(False)
        fixed = sum(widths) + len(_GAP) * len(widths)
    inline = fixed + longest <= width
    headers = [h.rjust(w) if h in _RIGHT else h.ljust(w) for h, w in zip(_HEADERS, widths, strict=True)]
    if inline:
        headers.append("incidents")
    out = [_GAP.join(headers).rstrip()]
    out.append(_GAP.join("─" * w for w in [*widths, *([longest] if inline else [])]))
    for row, cells, cause in zip(agents, rows, causes, strict=True):
        padded = [
            c.rjust(w) if h in _RIGHT else c.ljust(w) for h, c, w in zip(_HEADERS, cells, widths, strict=True)
        ]
        padded[1] = typer.style(padded[1], **_STATE_STYLES.get(row["state"], {}))
        if inline:
            padded.append(cause or "-")
        out.append(_GAP.join(padded).rstrip())
        if cause and not inline:
            out.append("    " + typer.style(cause, **_STATE_STYLES.get(row["state"], {})))
    return out


def _causes(row: dict[str, Any]) -> list[str]:
    """An agent's open incidents, then what holds its pages (notifiers/holds.py): a maintenance
    window, the parent its silence waits for, the children whose silence waits for it."""
    out = [f"{i['detector']}: {i['summary']}" for i in row["incidents"]]
    if row.get("maintenance"):
        out.append(f"in maintenance until {row['maintenance']['until'][11:19]} UTC")
    if row.get("held_for"):
        out.append(f"page held: depends on {row['held_for']}, which is down")
    if row.get("dependents"):
        out.append(f"holding the silence of {', '.join(row['dependents'])}")
    return out


def _health(health: dict[str, Any], width: int) -> list[str]:
    """The pipeline's health: counters flowed onto lines of at most ``width``, then each problem
    in words (in red), folded onto as many lines as it needs."""
    alive = ", ".join(f"{n} {kind}" for kind, n in sorted(health["workers_alive"].items())) or "none"
    oldest = health["oldest_pending_s"]
    parts = [
        f"workers alive: {alive}",
        f"lag: {_dash(health['lag'])}",
        f"pending: {_dash(health['pending'])}" + (f" (oldest {oldest:g}s)" if oldest else ""),
        f"dead letters: {health['deadletter']}",
        f"failed deliveries: {health['failed_deliveries']}",
    ]
    parts += _shard_parts(health.get("shards", []))
    lines = _flow(parts, width)
    alarms = [f"pipeline: {literal(i['summary'])}" for i in health["incidents"]]
    orphans = [s["shard"] for s in health.get("shards", []) if s["owner"] is None]
    if orphans and health.get("detecting", True):
        alarms.append(
            f"shards without an owner (not watched until a detector worker takes them): {_ranges(orphans)}"
        )
    alarms += [_delivery_line(entry) for entry in health.get("deliveries", [])]
    if health.get("rejected"):
        why = "with a missing or bad signature (forged, or a key that does not match: see the dead letters)"
        alarms.append(f"rejected: {health['rejected']:,} events or alerts {why}")
    alarms += [
        f"{literal(w['name'])}: handler {literal(name)!r} is broken ({w['skipped']:,} entries acked "
        "without it)" for w in health["workers"] for name in w.get("broken", [])
    ]  # fmt: skip
    if not health.get("detecting", True):
        alarms.append(f"not detecting: {health['detecting_reason']}")

    for alarm in alarms:  # prose: folded at spaces onto indented lines, nothing cut
        folded = textwrap.wrap(alarm, width, subsequent_indent="  ", break_long_words=False)
        lines += [typer.style(line, **_ALARM) for line in folded]
    return lines


def _shard_parts(shards: list[dict[str, Any]]) -> list[str]:
    """``shards 0-3: host-41-a1b2c3 (checkpoint 0.3s ago)``: who owns which event shards."""
    owners: dict[str, list[dict[str, Any]]] = {}
    for shard in shards:
        if shard["owner"] is not None:
            owners.setdefault(shard["owner"], []).append(shard)
    parts = []
    for owner, held in sorted(owners.items()):
        ages = [s["checkpoint_age_s"] for s in held if s["checkpoint_age_s"] is not None]
        age = f" (checkpoint {_age(max(ages))})" if ages else ""
        parts.append(f"shards {_ranges([s['shard'] for s in held])}: {literal(owner)}{age}")
    return parts


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    out: list[str] = []
    for n in sorted(numbers):
        if out and out[-1].split("-")[-1] == str(n - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{n}"
        else:
            out.append(str(n))
    return ", ".join(out)


def _delivery_line(entry: dict[str, Any]) -> str:
    """``deliveries: 3 failing at webhook (3 retrying); last error 4s ago (attempt 2): ...``"""
    retrying, failed = int(entry.get("retrying") or 0), int(entry.get("failed_24h") or 0)
    counts = ", ".join(part for part in (f"{retrying} retrying" if retrying else "",
                                         f"{failed} failed in 24h" if failed else "") if part)  # fmt: skip
    line = f"deliveries: {retrying + failed} failing at {literal(entry['notifier'])} ({counts})"
    if entry.get("last_error"):
        error = literal(entry["last_error"])
        if entry.get("last_status") and f"HTTP {entry['last_status']}" not in error:
            error = f"HTTP {entry['last_status']}: {error}"
        ago = _age(entry.get("last_error_age_s"))
        line += f"; last error {ago} (attempt {entry.get('last_attempts', 0)}): {error}"
    return line


def _flow(parts: list[str], width: int) -> list[str]:
    """``parts`` joined with three spaces, a new line begun wherever the next would not fit."""
    lines: list[str] = []
    for part in parts:
        if lines and len(lines[-1]) + 3 + len(part) <= width:
            lines[-1] += "   " + part
        else:
            lines.append(part)
    return lines


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


def _render_report(document: dict[str, Any]) -> Any:
    from rich.console import Group  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415

    from agentwatch.report import money, notes, pct  # noqa: PLC0415

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
