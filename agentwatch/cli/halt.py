"""``agentwatch halt`` / ``resume`` / ``halts``: the brake on a running agent's loop.

A halt reaches the agents it names within about a second; their next ``heartbeat()`` raises
``producers.Halted`` (see docs/producer.md for the loop that handles it). Halts stay in Redis
until resumed, or until ``--for`` runs out; each halt and resume is an alert (detector
``halt``), so ``agentwatch alerts`` shows who stopped what and why.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import asdict
from typing import Annotated, Any

import redis
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

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
from agentwatch.config import format_duration
from agentwatch.halts import Halts, is_glob, known_agents, pattern_problem, reason_problem
from agentwatch.redisconn import server_time_ms

PatternArgument = Annotated[str, typer.Argument(help='Agent name or glob, e.g. "scraper-*" (quote it).')]
_SHOWN: int = 10
"""Agent names listed in a message before "and N more"."""


@app.command()
def halt(
    agent: PatternArgument,
    reason: Annotated[
        str, typer.Option("--reason", help="Why: the agent's Halted.reason, and the alert.")
    ] = "",
    duration: Annotated[
        str | None,
        typer.Option("--for", help='Lift it by itself after this long, e.g. "1h" (default: never).'),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Stop matching agents: their next heartbeat() raises producers.Halted, until `resume`."""
    _check(agent)
    problem = reason_problem(reason)
    if problem is not None:
        fail(f"--reason: {problem}", EXIT_USAGE)
    seconds = None if duration is None else duration_flag("--for", duration)
    by = who()
    pipeline = load_pipeline(config, plugins=False)
    client: Any = client_for(pipeline)
    try:
        matched = fnmatch.filter(known_agents(client, pipeline.keys), agent)
        done, replaced = Halts(client, pipeline.keys, secret=pipeline.settings.security.secret).add(
            agent, reason, by=by, for_s=seconds
        )
    except redis.RedisError as exc:
        fail(f"Redis failed while halting {agent!r} ({exc}); the halt may be partly written: "
             "run the command again")  # fmt: skip
    finally:
        client.close()
    until = (
        "" if done.until_ms is None else f" until {iso_ms(done.until_ms)} ({format_duration(seconds or 0)})"
    )
    typer.echo(f"halted {agent!r}{until}: {done.reason}")
    if replaced is not None:
        since = iso_ms(replaced.at_ms)
        typer.echo(f"  (replaces the halt by {replaced.by or 'someone'} since {since}: {replaced.reason})")
    if matched:
        typer.echo(f"  {len(matched)} agent(s) seen so far: {_names(matched)}")
    elif is_glob(agent):
        typer.echo(f"agentwatch: warning: {agent!r} matches no agent seen so far; agents that match it are "
                   "halted as soon as they start", err=True)  # fmt: skip
    else:
        typer.echo(f"agentwatch: note: agent {agent!r} has never been seen; it is halted as soon as it "
                   "starts (check the name if you expected it to run)", err=True)  # fmt: skip


@app.command()
def resume(agent: PatternArgument, config: ConfigOption = None) -> None:
    """Lift halts: the one given for exactly this name or glob, and those of agents it matches."""
    _check(agent)
    pipeline = load_pipeline(config, plugins=False)
    client: Any = client_for(pipeline)
    try:
        halts = Halts(client, pipeline.keys, secret=pipeline.settings.security.secret)
        gone = halts.remove(agent, by=who())
        still = [] if gone or is_glob(agent) else halts.halting(agent)
    except redis.RedisError as exc:
        fail(f"Redis failed while resuming {agent!r} ({exc}); run the command again")
    finally:
        client.close()
    if still:
        patterns = ", ".join(repr(halt.pattern) for halt in still)
        fail(f"{agent!r} has no halt of its own: it is halted by {patterns}; resume that (it lifts "
             "every agent it matches), or halt the others by name instead")  # fmt: skip
    if not gone:
        fail(f"no halt matches {agent!r} (`agentwatch halts` lists them)")
    for item in gone:
        typer.echo(f"resumed {item.pattern!r} (halted by {item.by or 'someone'} since {iso_ms(item.at_ms)})")


@app.command()
def halts(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    config: ConfigOption = None,
) -> None:
    """List the halts in force, with the agents each one stops."""
    pipeline = load_pipeline(config, plugins=False)
    client: Any = client_for(pipeline)
    try:
        now = server_time_ms(client)
        active = Halts(client, pipeline.keys, secret=pipeline.settings.security.secret).active(now)
        known = known_agents(client, pipeline.keys) if active else []
    except redis.RedisError as exc:
        fail(f"Redis failed while reading the halts ({exc})")
    finally:
        client.close()
    if as_json:
        for item in active:
            typer.echo(
                json.dumps(
                    {**asdict(item), "agents": fnmatch.filter(known, item.pattern)}, separators=(",", ":")
                )
            )
        return
    if not active:
        typer.echo("no halts in force")
        return
    table = Table(title=f"{len(active)} halt(s)")
    for column in ("agent glob", "agents seen", "since (UTC)", "expires in", "by", "reason"):
        table.add_column(column)
    for item in active:
        expires = "never" if item.until_ms is None else format_duration((item.until_ms - now) / 1000)
        cells = (item.pattern, _names(fnmatch.filter(known, item.pattern)) or "none yet",
                 iso_ms(item.at_ms)[:19].replace("T", " "), expires, item.by, item.reason)  # fmt: skip
        table.add_row(*(Text(cell) for cell in cells))  # plain text: a reason is no markup
    Console().print(table)


def _check(pattern: str) -> None:
    problem = pattern_problem(pattern)
    if problem is not None:
        fail(problem, EXIT_USAGE)


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown if len(names) <= _SHOWN else f"{shown} and {len(names) - _SHOWN} more"
