"""What happened to each alert at each notifier: the delivery log, failed deliveries, counters.

* ``<prefix>:notify:log`` - one entry per final outcome (``delivered``, ``failed``, ``muted``,
  ``stale``, ``skipped``), capped by length. ``agentwatch alerts`` shows it beside each alert.
* ``<prefix>:notify:failed`` - the dead letters of delivery: the alert, the HTTP status and a
  snippet of the receiver's answer. ``agentwatch alerts --failed`` lists them.
* ``<prefix>:notify:stats`` - ``<notifier>:<outcome>`` counters for ``agentwatch status``.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any, Final

from agentwatch.alerts import Alert
from agentwatch.keys import Keys
from agentwatch.redisconn import Client
from notifiers.queue import Job

if TYPE_CHECKING:
    from notifiers.delivery import Failed

BODY_SNIPPET: Final = 512
"""Characters of a receiver's answer kept with a failed delivery: enough to read its error."""


class Journal:
    def __init__(
        self, client: Client, keys: Keys, *, max_len: int = 100_000, failed_max_len: int = 10_000
    ) -> None:
        self.client: Any = client
        self.keys = keys
        self.max_len = max_len
        self.failed_max_len = failed_max_len

    def delivered_commands(
        self, notifier: str, job: Job, attempts: int, status: int | None, detail: str = ""
    ) -> list[tuple[Any, ...]]:
        """The commands that log a delivery, for the delivery threads to send with their next
        claim, one round trip for both (:meth:`DeliveryQueue.finish_and_claim`)."""
        fields = self._fields(notifier, "delivered", job.id, job.alert, attempts=attempts, http_status=status,
                              detail=detail, ms=_now_ms() - job.first_ms)  # fmt: skip
        flat = [part for pair in fields.items() for part in pair]
        return [
            ("XADD", self.keys.notify_log, "MAXLEN", "~", self.max_len, "*", *flat),
            ("HINCRBY", self.keys.notify_stats, f"{notifier}:delivered", 1),
        ]

    def failed(self, notifier: str, kind: str, job: Job, attempts: int, outcome: Failed) -> None:
        alert = job.alert
        fields = {
            "notifier": notifier,
            "type": kind,
            "id": job.id,
            "agent": alert.get("agent", ""),
            "detector": alert.get("detector", ""),
            "alert_status": alert.get("status", ""),
            "http_status": "" if outcome.status is None else outcome.status,
            "reason": outcome.reason,
            "body": outcome.body[:BODY_SNIPPET],
            "attempts": attempts,
            "first_ms": job.first_ms,
            "failed_ms": _now_ms(),
            "alert": json.dumps(alert, separators=(",", ":"), default=str),
        }
        pipe = self.client.pipeline(transaction=False)
        pipe.xadd(self.keys.notify_failed, fields, maxlen=self.failed_max_len, approximate=True)
        self._log(notifier, "failed", job.id, alert, attempts=attempts, http_status=outcome.status,
                  detail=outcome.reason, pipe=pipe)  # fmt: skip
        pipe.execute()

    def skipped(
        self, notifier: str, outcome: str, alert: Alert, detail: str = "", *, pipe: Any = None
    ) -> None:
        """An alert routed here but not sent: ``muted``, ``stale`` (too old) or ``skipped``."""
        self._log(notifier, outcome, alert.id, _alert_fields(alert), detail=detail, pipe=pipe)

    def count(self, notifier: str, outcome: str, *, pipe: Any = None) -> None:
        (pipe or self.client).hincrby(self.keys.notify_stats, f"{notifier}:{outcome}", 1)

    def _log(self, notifier: str, outcome: str, alert_id: str, alert: dict[str, Any], *,
             pipe: Any = None, attempts: int = 0, http_status: int | None = None, detail: str = "",
             ms: int = 0) -> None:  # fmt: skip
        fields = self._fields(notifier, outcome, alert_id, alert, attempts=attempts, http_status=http_status,
                              detail=detail, ms=ms)  # fmt: skip
        own = pipe is None
        target = self.client.pipeline(transaction=False) if own else pipe
        target.xadd(self.keys.notify_log, fields, maxlen=self.max_len, approximate=True)
        self.count(notifier, outcome, pipe=target)
        if own:
            target.execute()

    @staticmethod
    def _fields(notifier: str, outcome: str, alert_id: str, alert: dict[str, Any], *, attempts: int,
                http_status: int | None, detail: str, ms: int) -> dict[str, str | int]:  # fmt: skip
        """One ``notify:log`` entry. Values are str or int only (the delivery threads pack them
        without redis-py's encoder)."""
        return {
            "notifier": notifier,
            "outcome": outcome,
            "id": alert_id,
            "alert": str(alert.get("id", alert_id)),
            "agent": str(alert.get("agent", "")),
            "detector": str(alert.get("detector", "")),
            "status": str(alert.get("status", "")),
            "attempts": attempts,
            "http_status": "" if http_status is None else http_status,
            "detail": detail[:BODY_SNIPPET],
            "ms": ms,
        }


def _alert_fields(alert: Alert) -> dict[str, Any]:
    return {"id": alert.id, "agent": alert.agent, "detector": alert.detector, "status": alert.status}


def _now_ms() -> int:
    return int(time.time() * 1000)


def decode_fields(fields: dict[Any, Any]) -> dict[str, str]:
    """A stream entry's fields as str -> str (for the CLI)."""
    return {_text(k): _text(v) for k, v in fields.items()}


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
