"""What ``agentwatch up`` prints while it runs: one line per alert and per delivery outcome.

A user who starts ``up``, kills an agent and watches the terminal must see the alert fire, and
then whether the webhook got it: that is the first thing anyone checks, and the only thing a
silent terminal cannot tell them. ``up`` itself (not its workers) follows what the pipeline
records anyway, so the lines are the same however many workers run and whichever of them did
the work:

* ``<prefix>:alerts``: every alert fired or resolved (``alert FIRING ...``, ``alert resolved ...``);
* ``<prefix>:notify:log``: every final delivery outcome (delivered, failed, muted, stale, skipped);
* each notifier's pending deliveries (``{n:<name>}:jobs``): an attempt that failed and will be
  retried, with its count and error. Read only when the notifier's ``retried`` counter moved,
  and at most :data:`SCAN_LIMIT` deliveries, so a day-long outage costs nothing per second.

Only new entries are shown (from when ``up`` started). Each stream is read on its own, without
BLOCK, so this works on a Redis Cluster too. Agent-supplied text (names, summaries, errors) is
printed literally with control characters escaped: it can never move the cursor or recolour a
terminal. Redis away is waited out in silence; the workers already say so.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Final, TextIO

from agentwatch.keys import Keys
from agentwatch.redisconn import RECOVERABLE, Client
from notifiers.text import visible

log = logging.getLogger("agentwatch.up")

POLL_S: Final = 0.5
SCAN_LIMIT: Final = 500
"""Most pending deliveries of one notifier looked at for retries per change of its counter."""
_READ: Final = 200


def literal(text: object) -> str:
    """Agent-supplied text on one terminal line: controls, newlines and tabs as escapes."""
    return visible(str(text)).replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def alert_line(alert: dict[str, Any]) -> str:
    """``alert FIRING silence agent 'scraper-1' [critical]: no event for 30s``."""
    status = str(alert.get("status", ""))
    shown = "FIRING" if status == "firing" else status or "?"
    return (
        f"alert {shown} {literal(alert.get('detector', '?'))} agent {_quoted(alert.get('agent', '?'))} "
        f"[{literal(alert.get('severity', '?'))}]: {literal(alert.get('summary', ''))}"
    )


def outcome_line(fields: dict[str, str]) -> str:
    """One final delivery outcome from ``<prefix>:notify:log``."""
    outcome = fields.get("outcome", "?")
    what = (
        f"{literal(fields.get('detector', '?'))} {literal(fields.get('status', '?'))} "
        f"agent {_quoted(fields.get('agent', '?'))}"
    )
    head = f"delivery {literal(fields.get('notifier', '?'))}: "
    attempts = fields.get("attempts") or "0"
    detail = literal(fields.get("detail", ""))
    if outcome == "delivered":
        status = fields.get("http_status")
        extra = f", HTTP {status}" if status else ""
        return f"{head}delivered {what} (attempt {attempts}{extra})"
    if outcome == "failed":
        return f"{head}FAILED {what} after {attempts} attempt(s): {detail}"
    return f"{head}{literal(outcome)} {what}" + (f": {detail}" if detail else "")


def retry_line(notifier: str, job: dict[str, Any]) -> str:
    """A delivery that failed an attempt and waits for the next one."""
    alert = job.get("alert")
    if not isinstance(alert, dict):
        alert = {}
    what = (
        f"{literal(alert.get('detector', '?'))} {literal(alert.get('status', '?'))} "
        f"agent {_quoted(alert.get('agent', '?'))}"
    )
    return (
        f"delivery {literal(notifier)}: retrying {what} "
        f"({job.get('attempts', '?')}, {literal(job.get('last_error', '') or 'no error recorded')})"
    )


def _quoted(text: object) -> str:
    return "'" + literal(text).replace("'", "\\'") + "'"


class Activity:
    """Follows the alerts and deliveries of one deployment and writes a line for each."""

    def __init__(
        self,
        client: Client,
        keys: Keys,
        notifiers: Iterable[str],
        *,
        out: TextIO | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client: Any = client
        self.keys = keys
        self.notifiers = list(notifiers)
        self.out = out or sys.stdout
        self.clock = clock
        self._after: dict[str, str] = {}
        self._retried: dict[str, int] = {}
        self._attempts: dict[str, dict[str, int]] = {name: {} for name in self.notifiers}
        self._started = False

    def start_here(self) -> None:
        """Remember where each stream ends now and how many retries each notifier counted, so
        only what happens from now on is printed."""
        for stream in (self.keys.alerts, self.keys.notify_log):
            last = self.client.xrevrange(stream, count=1)
            self._after[stream] = _text(last[0][0]) if last else "0-0"
        for name in self.notifiers:
            self._retried[name] = self._retry_count(name)
            self._attempts[name] = {i: _attempts_of(raw) for i, raw in self._scan_jobs(name)}
        self._started = True

    def poll(self) -> int:
        """Print what happened since the last call; returns how many lines it wrote."""
        if not self._started:
            self.start_here()
        lines = [alert_line(alert) for alert in self._read(self.keys.alerts, _alert_of)]
        lines += [outcome_line(fields) for fields in self._read(self.keys.notify_log, _fields_of)]
        for name in self.notifiers:
            lines += self._retries(name)
        stamp = time.strftime("%H:%M:%S", time.localtime(self.clock()))
        if lines:
            self.out.write("".join(f"{stamp} {line}\n" for line in lines))
            self.out.flush()
        return len(lines)

    def run(self, stop: threading.Event, interval_s: float = POLL_S) -> None:
        """Poll until ``stop`` is set; Redis away or restarting is waited out without a word."""
        while not stop.is_set():
            try:
                self.poll()
            except RECOVERABLE:
                pass  # the workers log Redis being away; these lines resume when it is back
            except Exception:
                # A bug here must cost only these lines, never ``up`` or its workers.
                log.exception("cannot show alerts and deliveries; the pipeline runs on")
                return
            stop.wait(interval_s)

    def _read(self, stream: str, decode: Callable[[dict[Any, Any]], Any]) -> list[Any]:
        found = []
        while True:
            entries = self.client.xrange(stream, min=f"({self._after[stream]}", count=_READ)
            for entry_id, fields in entries:
                self._after[stream] = _text(entry_id)
                item = decode(fields)
                if item is not None:
                    found.append(item)
            if len(entries) < _READ:
                return found

    def _retry_count(self, name: str) -> int:
        value = self.client.hget(self.keys.notify_stats, f"{name}:retried")
        return int(value or 0)

    def _retries(self, name: str) -> list[str]:
        count = self._retry_count(name)
        if count == self._retried.get(name):
            return []
        self._retried[name] = count
        seen: dict[str, int] = {}
        lines = []
        known = self._attempts[name]
        for delivery_id, raw in self._scan_jobs(name):
            try:
                job = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(job, dict):
                continue
            attempts = _attempts_of(raw)
            seen[delivery_id] = attempts
            if attempts > known.get(delivery_id, 0):
                lines.append(retry_line(name, job))
        self._attempts[name] = seen  # deliveries gone from the hash are done: forget them
        return lines

    def _scan_jobs(self, name: str) -> list[tuple[str, Any]]:
        jobs = []
        for delivery_id, raw in self.client.hscan_iter(self.keys.notifier_jobs(name), count=100):
            jobs.append((_text(delivery_id), raw))
            if len(jobs) >= SCAN_LIMIT:
                break
        return jobs


def _attempts_of(raw: Any) -> int:
    try:
        return int(json.loads(raw).get("attempts") or 0)
    except (ValueError, TypeError, AttributeError):
        return 0


def _alert_of(fields: dict[Any, Any]) -> dict[str, Any] | None:
    try:
        data = json.loads(fields.get(b"d") or fields.get("d") or b"")
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _fields_of(fields: dict[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in fields.items()}


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
