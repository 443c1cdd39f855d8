"""``agentwatch demo``: watch agentwatch catch the three failures, in under a minute."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from typing import Annotated

import typer
from rich.console import Console

from agentwatch.cli import app
from agentwatch.cli.common import EXIT_RUNTIME, LogLevel, fail, setup_logging
from agentwatch.demo import plan
from agentwatch.demo.report import Reporter
from agentwatch.demo.scenario import Demo, DemoError


@app.command()
def demo(
    fast: Annotated[
        bool, typer.Option("--fast", help="Shortest timings (about 7s instead of 25s); what CI runs.")
    ] = False,
    json_out: Annotated[
        bool,
        typer.Option("--json", help="Print a machine-readable summary on stdout (the story goes to stderr)."),
    ] = False,
    log_level: LogLevel = "warning",
) -> None:
    """Run real agents on a private pipeline, break three of them, show the alerts, clean up.

    One agent is SIGKILLed after its memory climbs, one gets stuck in a
    socket call that never returns, one jumps from 200 to 40,000 tokens a
    minute; three stay healthy. Nothing outside the demo is touched: it runs
    its own Redis server in a temporary directory. Exit 0 when all three
    failures were detected with their causes named, 1 otherwise.
    """
    setup_logging(log_level)
    if not sys.platform.startswith("linux"):
        fail("the demo needs Linux (its private Redis and agents use Linux process controls)")
    # soft_wrap: an alert stays one line (the terminal wraps it), so logs of the demo grep well.
    console = Console(stderr=json_out, highlight=False, soft_wrap=True)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 120  # a log or a pipe: wide enough that alerts stay one line each
    reporter = Reporter(console)
    stopping = threading.Event()
    runner = Demo(plan.FAST if fast else plan.NORMAL, reporter, fast=fast, stopping=stopping,
                  log_level=log_level)  # fmt: skip

    def on_signal(_signum: int, _frame: object) -> None:
        stopping.set()  # the demo stops at its next poll and cleans up; a second Ctrl-C is harmless

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        outcome = runner.run()
    except DemoError as exc:
        fail(str(exc))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if outcome.interrupted:
        reporter.console.print("interrupted: everything the demo started is stopped and removed.")
    reporter.summary(outcome, healthy=len(plan.HEALTHY))
    if json_out:
        typer.echo(json.dumps(outcome.to_json(), indent=2))
    if not outcome.ok:
        raise typer.Exit(EXIT_RUNTIME)
