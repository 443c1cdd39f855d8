"""``type = "pagerduty"``: PagerDuty Events API v2 (``POST /v2/enqueue``).

Mapping (docs/notifiers.md has the table): a ``firing`` alert is a ``trigger`` event, a
``resolved`` alert a ``resolve`` event, both with the alert's ``dedup_key``, so PagerDuty opens
one incident and closes the same one. ``payload`` carries summary, source (the agent), severity
(the alert's: PagerDuty has the same four levels), timestamp, component (the detector) and
custom_details (the alert's details: stack, token figures).

PagerDuty answers 202 when it accepted the event; 400 means the event itself is invalid, so it is
dead-lettered at once (retrying cannot fix it); 429 and 5xx are retried. It documents about 120
events per minute per routing key, hence the default ``rate_limit``.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from pydantic import Field, field_validator

from agentwatch.alerts import Alert
from agentwatch.config import PerSecond
from notifiers.delivery import Delivery, Failed, Outcome
from notifiers.http import HttpConfig, HttpNotifier

DEFAULT_URL = "https://events.pagerduty.com/v2/enqueue"
_ROUTING_KEY = re.compile(r"[A-Za-z0-9]{32}")
DEDUP_MAX = 255
SUMMARY_MAX = 1024


class PagerDutyConfig(HttpConfig):
    url: str = DEFAULT_URL
    routing_key: str = Field(description="the 32-character integration key of an Events API v2 integration")
    rate_limit: PerSecond | None = Field(2.0, description="PagerDuty allows ~120 events/min per key")
    client: str = Field("agentwatch", description="shown in PagerDuty as the sender")
    client_url: str | None = Field(None, description="a link shown with each incident")

    @field_validator("routing_key")
    @classmethod
    def _routing_key(cls, value: str) -> str:
        if not _ROUTING_KEY.fullmatch(value):
            raise ValueError(
                f"must be the 32-character integration key of an Events API v2 integration "
                f"(letters and digits; got {len(value)} characters)"
            )
        return value


def dedup_key(key: str) -> str:
    """PagerDuty caps dedup keys at 255 chars; longer keys keep a prefix and a hash of the whole,
    so trigger and resolve still agree and distinct keys stay distinct."""
    if len(key) <= DEDUP_MAX:
        return key
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return f"{key[: DEDUP_MAX - 17]}~{digest}"


def event(alert: Alert, config: PagerDutyConfig) -> dict[str, Any]:
    """The Events API v2 body for one alert."""
    body: dict[str, Any] = {
        "routing_key": config.routing_key,
        "event_action": "trigger" if alert.status == "firing" else "resolve",
        "dedup_key": dedup_key(alert.dedup_key),
    }
    if alert.status == "firing":  # PagerDuty ignores the payload of a resolve
        body["payload"] = {
            "summary": _clip(alert.summary, SUMMARY_MAX),
            "source": alert.agent,
            "severity": alert.severity,
            "timestamp": alert.at,
            "component": alert.detector,
            "custom_details": alert.details,
        }
        body["client"] = config.client
        if config.client_url:
            body["client_url"] = config.client_url
    return body


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class PagerDuty(HttpNotifier[PagerDutyConfig]):
    Config = PagerDutyConfig

    def render(self, delivery: Delivery) -> tuple[bytes, dict[str, str]]:
        payload = json.dumps(event(delivery.alert, self.config), separators=(",", ":"), default=str)
        return payload.encode(), {"Content-Type": "application/json"}

    def classify(self, status: int, headers: Any, body: str) -> Outcome:
        if status == 400:
            # The event is invalid (PagerDuty says which field in its "errors"): never retried.
            return Failed("HTTP 400: PagerDuty rejected the event", status, body)
        return super().classify(status, headers, body)
