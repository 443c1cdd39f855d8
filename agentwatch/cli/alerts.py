"""``agentwatch alerts``: recent alerts from ``<prefix>:alerts``, or the deliveries that failed.

``--json`` prints one JSON object per line: each alert exactly as SPEC section 5 shows it (the
webhook's payload), or with ``--failed`` each failed delivery (notifier, alert id, agent, HTTP
status, reason, body snippet, attempts, and the alert itself under ``alert``). Without it, a
table for humans, with what each notifier did about each alert.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from agentwatch.alerts import Alert, Incidents, decode_alert, iso_ms
from agentwatch.cli import app
from agentwatch.cli.common import AgentOption, ConfigOption, client_for, duration_flag, load_pipeline
from agentwatch.errors import InvalidEntry
from agentwatch.keys import Keys
from agentwatch.redisconn import server_time_ms

_PAGE = 1000
_OUTCOME_MARKS = {
    "delivered": "ok",
    "failed": "FAILED",
    "muted": "muted",
    "stale": "stale",
    "skipped": "skip",
}


@app.command("alerts")
def alerts_cmd(
    *,
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    since: Annotated[
        str | None, typer.Option("--since", help='How far back, e.g. "1h", "30m", "7d" (default 24h).')
    ] = None,
    agent: AgentOption = None,
    firing: Annotated[
        bool, typer.Option("--firing", help="Only incidents still firing (however old).")
    ] = False,
    failed: Annotated[bool, typer.Option("--failed", help="Failed deliveries instead of alerts.")] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many (the most recent).")] = 200,
) -> None:
    """Recent alerts (or, with --failed, deliveries that failed for good)."""
    window_s = duration_flag("--since", since or "24h")
    pipeline = load_pipeline(config, plugins=False)
    client: Any = client_for(pipeline)
    keys = pipeline.keys
    try:
        now = server_time_ms(client)
        start_ms = now - int(window_s * 1000)
        if failed:
            rows = [row for row in _failed(client, keys, start_ms) if _agent_ok(row.get("agent", ""), agent)]
            _print_failed(rows[-limit:], as_json)
            return
        open_ids: set[str] = set()
        if firing:
            incidents = Incidents(client, keys).all_open()
            open_ids = {str(incident["alert"]) for incident in incidents.values()}
            oldest = min((int(i["since_ms"]) for i in incidents.values()), default=now)
            start_ms = min(start_ms, oldest) if since else oldest
        found = [
            alert
            for alert in _alerts(client, keys, start_ms)
            if _agent_ok(alert.agent, agent) and (not firing or alert.id in open_ids)
        ][-limit:]
        if as_json:
            for alert in found:
                typer.echo(alert.to_json())
            return
        deliveries = _deliveries(client, keys, start_ms)
        _print_alerts(found, deliveries, now)
    finally:
        client.close()


def _agent_ok(name: str, glob: str | None) -> bool:
    return glob is None or fnmatch.fnmatchcase(name, glob)


def _entries(client: Any, stream: str, start_ms: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Every entry of ``stream`` since ``start_ms``, oldest first, a page at a time."""
    out: list[tuple[bytes, dict[bytes, bytes]]] = []
    lower = f"{start_ms}-0"
    while True:
        page = client.xrange(stream, min=lower, count=_PAGE)
        out += page
        if len(page) < _PAGE:
            return out
        lower = "(" + page[-1][0].decode()


def _alerts(client: Any, keys: Keys, start_ms: int) -> list[Alert]:
    found = []
    for _, fields in _entries(client, keys.alerts, start_ms):
        try:
            found.append(decode_alert(fields.get(b"d", b"")))
        except InvalidEntry:
            continue  # the notifier workers dead-letter these; nothing to show
    return found


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _failed(client: Any, keys: Keys, start_ms: int) -> list[dict[str, Any]]:
    rows = []
    for _, fields in _entries(client, keys.notify_failed, start_ms):
        row: dict[str, Any] = {_text(k): _text(v) for k, v in fields.items()}
        for name in ("attempts", "first_ms", "failed_ms"):
            if str(row.get(name, "")).isdigit():
                row[name] = int(row[name])
        row["http_status"] = int(row["http_status"]) if str(row.get("http_status", "")).isdigit() else None
        with contextlib.suppress(ValueError):
            row["alert"] = json.loads(row.get("alert", "null"))
        rows.append(row)
    return rows


def _deliveries(client: Any, keys: Keys, start_ms: int) -> dict[str, list[str]]:
    """alert id -> ["webhook ok", "pagerduty FAILED 400", ...] from the delivery log."""
    out: dict[str, list[str]] = {}
    for _, fields in _entries(client, keys.notify_log, start_ms):
        row = {_text(k): _text(v) for k, v in fields.items()}
        mark = _OUTCOME_MARKS.get(row.get("outcome", ""), row.get("outcome", ""))
        status = f" {row['http_status']}" if row.get("outcome") == "failed" and row.get("http_status") else ""
        out.setdefault(row.get("alert", ""), []).append(f"{row.get('notifier', '?')} {mark}{status}")
    return out


def _print_alerts(alerts: list[Alert], deliveries: dict[str, list[str]], now_ms: int) -> None:
    console = Console()
    if not alerts:
        console.print("no alerts in this window")
        return
    table = Table(title=f"{len(alerts)} alert(s) up to {iso_ms(now_ms)}")
    for column in ("at (UTC)", "agent", "detector", "status", "severity", "summary", "notified"):
        table.add_column(column, overflow="fold")
    styles = {"firing": "bold red", "resolved": "green"}
    for alert in alerts:
        notified = ", ".join(deliveries.get(alert.id, [])) or "-"
        table.add_row(alert.at.replace("T", " ")[:19], alert.agent, alert.detector,
                      f"[{styles[alert.status]}]{alert.status}[/]", alert.severity, alert.summary,
                      notified)  # fmt: skip
    console.print(table)


def _print_failed(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row, separators=(",", ":")))
        return
    console = Console()
    if not rows:
        console.print("no failed deliveries in this window")
        return
    table = Table(title=f"{len(rows)} failed deliveries")
    for column in (
        "failed at (UTC)",
        "notifier",
        "agent",
        "detector",
        "alert",
        "http",
        "tries",
        "reason",
        "answer",
    ):
        table.add_column(column, overflow="fold")
    for row in rows:
        when = iso_ms(int(row["failed_ms"])).replace("T", " ")[:19] if row.get("failed_ms") else "?"
        table.add_row(when, row.get("notifier", ""), row.get("agent", ""), row.get("detector", ""),
                      row.get("alert_status", ""), str(row.get("http_status") or "-"),
                      str(row.get("attempts", "")), row.get("reason", ""),
                      row.get("body", "")[:200])  # fmt: skip
    console.print(table)
