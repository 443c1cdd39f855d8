"""The ``agentwatch`` command. Each group of subcommands lives in its own module here.

Exit codes (SPEC section 6): 0 ok, 1 runtime failure, 2 bad usage or bad config.
"""

from __future__ import annotations

from typing import Annotated

import typer

from agentwatch import __version__

app = typer.Typer(
    name="agentwatch",
    help="Monitor long-running AI agents: silent death, stalled work loops, runaway token use.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Click's own help layout: typer's rich one shows a type (`<bool>`) beside every plain flag.
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"agentwatch {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """agentwatch: catch the failures process checks miss."""


# Subcommand modules register themselves on ``app`` when imported.
from agentwatch.cli import (  # noqa: E402, F401
    acl,
    alerts,
    config_cmd,
    demo,
    halt,
    mute,
    prices,
    run,
    serve,
    status,
)


def main() -> None:
    app()
