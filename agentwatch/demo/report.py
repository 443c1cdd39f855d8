"""How the demo looks: a line per step and per alert as it happens, then one summary table.

Lines are stamped with the seconds since the demo started, so the story reads as a timeline;
alerts carry their time-to-detect, counted from the moment the demo caused the failure.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from agentwatch.alerts import Alert
from agentwatch.demo.outcome import Outcome
from agentwatch.demo.plan import Role, Timings


class Reporter:
    """Renders the demo on one console (stdout, or stderr when stdout carries ``--json``)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.started = time.monotonic()

    def _stamp(self) -> str:
        return f"[dim]\\[{time.monotonic() - self.started:5.1f}s][/dim]"

    def intro(self, t: Timings, redis_url: str, config: str, fleet: tuple[Role, ...]) -> None:
        c = self.console
        c.print("[bold]agentwatch demo[/bold]: real agents, a real pipeline, three real failures")
        c.print(f"  redis     private server at {escape(redis_url)} (nothing else is touched)")
        c.print(
            f"  pipeline  1 detector worker; silence after {t.silence_after:g}s, stall after "
            f"{t.stall_after:g}s, tokens judged after {t.warmup} beats ({escape(config)})"
        )
        names = ", ".join(r.agent for r in fleet)
        c.print(f"  agents    {names}: one beat every {t.interval:g}s each")

    def step(self, text: str) -> None:
        self.console.print(f"{self._stamp()} {text}")

    def strike(self, agent: str, text: str) -> None:
        self.console.print(f"{self._stamp()} [bold red]FAIL[/bold red]  {agent:<9} {text}")

    def detected(self, alert: Alert, time_to_detect_s: float) -> None:
        self.console.print(
            f"{self._stamp()} [bold green]ALERT[/bold green] {alert.agent:<9} {alert.detector:<8} "
            f"[bold]detected in {time_to_detect_s:.1f}s[/bold]: {escape(alert.summary)}"
        )

    def early(self, alert: Alert, note: str) -> None:
        self.console.print(
            f"{self._stamp()} [yellow]ALERT[/yellow] {alert.agent:<9} {alert.detector:<8} "
            f"{note}: {escape(alert.summary)}"
        )

    def unexpected(self, alert: Alert) -> None:
        self.console.print(
            f"{self._stamp()} [bold red]ALERT[/bold red] {alert.agent:<9} {alert.detector:<8} "
            f"[red]unexpected[/red]: {escape(alert.summary)}"
        )

    def resolved(self, alert: Alert) -> None:
        self.console.print(
            f"{self._stamp()} [dim]resolved {alert.agent} {alert.detector}: {escape(alert.summary)}[/dim]"
        )

    def summary(self, outcome: Outcome, healthy: int) -> None:
        if outcome.interrupted and all(d.caused_at is None for d in outcome.detections.values()):
            self.console.print("[bold]demo interrupted[/bold] before any failure was caused.")
            return
        table = Table(title="agentwatch demo: summary", title_justify="left")
        table.add_column("failure")
        table.add_column("agent")
        table.add_column("detected")
        table.add_column("time to detect", justify="right")
        table.add_column("cause named")
        for d in outcome.detections.values():
            if d.alert is None:
                detected = "[red]no[/red]" if d.caused_at is not None else "[dim]not caused[/dim]"
            else:
                detected = f"[green]yes[/green] ({d.failure.detector})"
            ttd = f"{d.time_to_detect_s:.1f}s" if d.time_to_detect_s is not None else "-"
            named = escape(d.cause) if d.cause else ("[red]no[/red]" if d.alert else "-")
            table.add_row(d.failure.title, d.failure.agent, detected, ttd, named)
        alarms = len(outcome.false_alarms)
        quiet = f"[red]{alarms} false alarm(s)[/red]" if alarms else "[green]no alerts[/green]"
        table.add_row(f"none ({healthy} healthy agents)", "healthy-*", quiet, "-", "-")
        self.console.print()
        self.console.print(table)
        for warning in outcome.early_warnings:
            self.console.print(f"early warning: {escape(warning['summary'])} ({warning['note']})")
        brake = outcome.brake
        if brake is not None and brake["halted"]:
            self.console.print(
                f"brake: {brake['agent']} halted by its ${brake['limit_usd']:.2f}/day budget inside its "
                f"own loop; spent ${brake['spent_usd']:.4f}, "
                f"[bold]${brake['past_limit_usd']:.4f} past the limit[/bold]"
            )
        problems = outcome.problems()
        if not problems:
            self.console.print(
                f"[bold green]all three failures detected with their causes named[/bold green] "
                f"in {outcome.elapsed_s:.0f}s; everything the demo started is stopped and removed."
            )
        else:
            verdict = "demo interrupted" if outcome.interrupted else "demo failed"
            self.console.print(f"[bold red]{verdict}[/bold red]:")
            for problem in problems:
                self.console.print(f"  - {escape(problem)}")
