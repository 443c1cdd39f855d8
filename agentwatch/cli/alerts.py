"""``agentwatch alerts``: recent alerts from ``<prefix>:alerts``, or the deliveries in trouble.

``--json`` prints one JSON object per line: each alert exactly as SPEC section 5 shows it (the
webhook's payload), or with ``--failed`` each delivery that failed for good or waits for a retry
after a failed attempt (``state``: ``failed`` or ``retrying``; notifier, alert id, agent, HTTP
status, reason, body snippet, attempts, and the alert itself under ``alert``). Without it, plain
text for humans: one line per alert, its summary on the next, readable at 80 columns and in a
pipe. Agent-supplied text is printed literally, control characters as escapes.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import shutil
from collections.abc import Sequence
from typing import Annotated, Any, Final

import typer

from agentwatch.activity import literal
from agentwatch.alerts import Alert, Incidents, decode_alert, iso_ms
from agentwatch.cli import app
from agentwatch.cli.common import AgentOption, ConfigOption, client_for, duration_flag, load_pipeline
from agentwatch.errors import InvalidEntry
from agentwatch.keys import Keys
from agentwatch.redisconn import server_time_ms

_PAGE = 1000
_OUTCOME_MARKS: Final = {
    "delivered": "ok",
    "failed": "FAILED",
    "muted": "muted",
    "maintenance": "maintenance",
    "dependency": "held (dependency)",
    "stale": "stale",
    "skipped": "skip",
}
_ERROR_CHARS: Final = 60
"""An error shown inside the ``notified`` column is cut here; ``alerts --failed`` has it whole."""
_GAVE_UP: Final = "gave up after "


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
    failed: Annotated[
        bool, typer.Option("--failed", help="Deliveries that failed, or wait for a retry, instead of alerts.")
    ] = False,
    limit: Annotated[
        int, typer.Option("--limit", min=1, metavar="<int>", help="At most this many (the most recent).")
    ] = 200,
) -> None:
    """Recent alerts (or, with --failed, deliveries that failed or are being retried)."""
    window_s = duration_flag("--since", since or "24h")
    pipeline = load_pipeline(config, plugins=False)
    client: Any = client_for(pipeline)
    keys = pipeline.keys
    try:
        now = server_time_ms(client)
        start_ms = now - int(window_s * 1000)
        if failed:
            rows = _troubled(client, keys, start_ms, limit)
            rows = [row for row in rows if _agent_ok(row.get("agent", ""), agent)]
            _print_failed(rows[-limit:], as_json, now)
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
        _pending(client, keys, [alert.id for alert in found], deliveries)
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


def _troubled(client: Any, keys: Keys, start_ms: int, limit: int) -> list[dict[str, Any]]:
    """Failed deliveries and those waiting for a retry after a failed attempt, oldest first."""
    from notifiers.queue import notifier_names, retrying_jobs  # noqa: PLC0415

    rows = _failed(client, keys, start_ms)
    for name in notifier_names(client, keys):
        for at_ms, job in retrying_jobs(client, keys, name, since_ms=start_ms, limit=limit):
            alert = job.alert
            rows.append({
                "state": "retrying", "notifier": name, "id": job.id, "agent": alert.get("agent", ""),
                "detector": alert.get("detector", ""), "alert_status": alert.get("status", ""),
                "http_status": job.last_status, "reason": job.last_error, "body": "",
                "attempts": job.attempts, "first_ms": job.first_ms, "failed_ms": at_ms, "alert": alert,
            })  # fmt: skip
    rows.sort(key=lambda row: int(row.get("failed_ms") or 0))
    return rows


def _failed(client: Any, keys: Keys, start_ms: int) -> list[dict[str, Any]]:
    rows = []
    for _, fields in _entries(client, keys.notify_failed, start_ms):
        row: dict[str, Any] = {"state": "failed", **{_text(k): _text(v) for k, v in fields.items()}}
        for name in ("attempts", "first_ms", "failed_ms"):
            if str(row.get(name, "")).isdigit():
                row[name] = int(row[name])
        row["http_status"] = int(row["http_status"]) if str(row.get("http_status", "")).isdigit() else None
        with contextlib.suppress(ValueError):
            row["alert"] = json.loads(row.get("alert", "null"))
        rows.append(row)
    return rows


def _short(error: str) -> str:
    """An error for the ``notified`` column: without the "gave up after ..." preamble (the
    state says so), cut at ``_ERROR_CHARS``."""
    if error.startswith(_GAVE_UP) and ": " in error:
        error = error.split(": ", 1)[1]
    error = literal(error)
    return error if len(error) <= _ERROR_CHARS else error[: _ERROR_CHARS - 1] + "…"


def _deliveries(client: Any, keys: Keys, start_ms: int) -> dict[str, list[str]]:
    """alert id -> ["webhook: ok", "pagerduty: FAILED (HTTP 400)", ...] from the delivery log."""
    out: dict[str, list[str]] = {}
    for _, fields in _entries(client, keys.notify_log, start_ms):
        row = {_text(k): _text(v) for k, v in fields.items()}
        outcome = row.get("outcome", "")
        mark = _OUTCOME_MARKS.get(outcome, literal(outcome))
        if outcome == "failed":
            why = f"HTTP {row['http_status']}" if row.get("http_status") else _short(row.get("detail", ""))
            mark += f" ({why})" if why else ""
        out.setdefault(row.get("alert", ""), []).append(f"{literal(row.get('notifier', '?'))}: {mark}")
    return out


def _pending(client: Any, keys: Keys, ids: Sequence[str], out: dict[str, list[str]]) -> None:
    """Add what each notifier has not finished: ``retrying (3, <last error>)`` after a failed
    attempt, else ``queued`` (including one a stopping worker handed back unfinished)."""
    from notifiers.queue import notifier_names, pending_jobs, retrying_ids  # noqa: PLC0415

    for name in notifier_names(client, keys):
        jobs = pending_jobs(client, keys, name, list(ids))
        failing = retrying_ids(client, keys, name, list(jobs))
        for delivery_id, job in jobs.items():
            if delivery_id in failing:
                why = f"HTTP {job.last_status}" if job.last_status else _short(job.last_error)
                mark = f"retrying ({job.attempts}, {why})"
            else:
                mark = "queued"
            out.setdefault(delivery_id, []).append(f"{literal(name)}: {mark}")


def _width() -> int:
    """The terminal's width (``COLUMNS`` when set), else 80: a pipe gets what 80 columns show."""
    return max(40, shutil.get_terminal_size((80, 24)).columns)


def _when(at_ms: int) -> str:
    return iso_ms(at_ms).replace("T", " ")[5:19]  # "12-07 07:01:02": the window is days, not years


_SEVERITY_FROM: Final = 100
"""Narrower than this, the severity column is left out (``--json`` has it) so that what the
notifiers did fits on the alert's line."""


def _print_alerts(alerts: list[Alert], deliveries: dict[str, list[str]], now_ms: int) -> None:
    """One line per alert (when, status, severity on a wide terminal, agent, detector, then what
    each notifier did if it fits, else on the next line), and its summary under it, whole: a
    cause is never cut."""
    if not alerts:
        typer.echo("no alerts in this window")
        return
    width = _width()
    agents = [literal(alert.agent) for alert in alerts]
    detectors = [literal(alert.detector) for alert in alerts]
    agent_w = min(max(len("agent"), *map(len, agents)), 24)
    detector_w = min(max(len("detector"), *map(len, detectors)), 12)
    severity = width >= _SEVERITY_FROM
    typer.echo(f"{len(alerts)} alert(s) up to {iso_ms(now_ms)} (times UTC)")
    columns = f"{'severity':<8}  " if severity else ""
    columns += f"{'agent':<{agent_w}}  {'detector':<{detector_w}}"
    typer.echo(f"{'when':<14}  {'status':<8}  {columns}  notified")
    colours = {"firing": "red", "resolved": "green"}
    for alert, name, detector in zip(alerts, agents, detectors, strict=True):
        rest = f"{literal(alert.severity):<8}  " if severity else ""
        rest += f"{name:<{agent_w}}  {detector:<{detector_w}}"
        plain = f"{_when(alert.at_ms)}  {alert.status:<8}  {rest}"
        status = typer.style(
            f"{alert.status:<8}", fg=colours.get(alert.status), bold=alert.status == "firing"
        )
        head = f"{_when(alert.at_ms)}  {status}  {rest}"
        notified = ", ".join(deliveries.get(alert.id, [])) or "-"
        if len(plain) + 2 + len(notified) <= width:
            typer.echo(f"{head}  {notified}")
        else:
            typer.echo(head.rstrip())
            for part in _wrap(deliveries.get(alert.id, []), width, first="    notified: ", indent=14):
                typer.echo(part)
        typer.echo(f"    {literal(alert.summary)}")


def _wrap(parts: Sequence[str], width: int, *, first: str, indent: int) -> list[str]:
    """``parts`` joined with ", " on lines of at most ``width`` (a part longer than a line gets
    a line of its own): the first line starts with ``first``, the others are indented."""
    lines: list[str] = []
    line = ""
    for part in parts:
        lead = len(first) if not lines else indent
        candidate = f"{line}, {part}" if line else part
        if line and lead + len(candidate) > width:
            lines.append(line + ",")
            candidate = part
        line = candidate
    if line:
        lines.append(line)
    return [(first if n == 0 else " " * indent) + text for n, text in enumerate(lines)]


def _print_failed(rows: list[dict[str, Any]], as_json: bool, now_ms: int) -> None:
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row, separators=(",", ":")))
        return
    if not rows:
        typer.echo("no failed or retrying deliveries in this window")
        return
    retrying = sum(1 for row in rows if row["state"] == "retrying")
    typer.echo(
        f"{len(rows)} deliveries in trouble: {retrying} retrying, {len(rows) - retrying} failed (times UTC)"
    )
    for row in rows:
        when = _when(int(row["failed_ms"])) if row.get("failed_ms") else "?"
        state = "retrying" if row["state"] == "retrying" else typer.style("FAILED  ", fg="red", bold=True)
        tries = int(row.get("attempts") or 0)
        alert = " ".join(literal(row.get(name, "")) for name in ("agent", "detector", "alert_status"))
        attempts = f"{tries} attempt{'' if tries == 1 else 's'}"
        typer.echo(f"{when}  {state}  {literal(row.get('notifier', ''))}  {alert}  ({attempts})")
        reason = literal(row.get("reason", ""))
        if row.get("http_status") and f"HTTP {row['http_status']}" not in reason:
            reason = f"HTTP {row['http_status']}: {reason}"
        body = literal(str(row.get("body", ""))[:200])
        typer.echo(f"    {reason}" + (f"; answer: {body}" if body else ""))
