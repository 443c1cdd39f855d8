"""``type = "webhook"``: POST each alert, exactly as SPEC section 5 shows it, to a URL.

Headers on every request:

* ``X-Agentwatch-Delivery`` / ``webhook-id`` - the alert id: the same on every retry, so a
  receiver de-duplicates on it (delivery is at least once);
* ``X-Agentwatch-Timestamp`` / ``webhook-timestamp`` - Unix seconds when this attempt was sent;
* ``X-Agentwatch-Attempt`` - 1 for the first attempt.

With ``secret`` set, two HMAC-SHA256 signatures of the exact body bytes:

* ``X-Agentwatch-Signature: v1=<hex>`` over ``"<timestamp>.<body>"``; docs/notifiers.md has the
  ten-line verification snippet;
* ``webhook-signature: v1,<base64>`` over ``"<id>.<timestamp>.<body>"``: the Standard Webhooks
  scheme, so their libraries verify it as is (give them a ``whsec_<base64>`` secret).

Both bind the timestamp, so a receiver that rejects old timestamps also rejects replays. The key
is the secret's UTF-8 bytes, or the decoded key when the secret is ``whsec_<base64>``.

``format = "slack"`` posts ``{"text": ...}`` instead, for Slack (and Mattermost, Rocket.Chat)
incoming webhooks, with agent-supplied text escaped by Slack's rules (notifiers/text.py): no
``<!channel>``, no disguised link.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from agentwatch.report import render_text
from notifiers.delivery import Delivery
from notifiers.http import HttpConfig, HttpNotifier
from notifiers.text import slack_escape, slack_text


class WebhookConfig(HttpConfig):
    secret: str | None = Field(None, description="HMAC-SHA256 signing secret")
    format: Literal["json", "slack"] = "json"
    reports_supported: ClassVar[bool] = True

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError("secret is empty (an unset variable?); remove the key to send unsigned")
        signing_key(value)  # a whsec_ secret must decode
        return value


def signing_key(secret: str) -> bytes:
    """The HMAC key: a ``whsec_<base64>`` secret's decoded bytes, else the secret's UTF-8 bytes."""
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret[len("whsec_") :], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("a secret starting with whsec_ must continue with base64") from None
    return secret.encode()


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """``X-Agentwatch-Signature``: ``v1=`` + hex HMAC-SHA256 of ``"<timestamp>.<body>"``."""
    mac = hmac.new(signing_key(secret), timestamp.encode() + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def sign_standard(secret: str, msg_id: str, timestamp: str, body: bytes) -> str:
    """``webhook-signature`` (Standard Webhooks): ``v1,`` + base64 HMAC of ``"<id>.<ts>.<body>"``."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    mac = hmac.new(signing_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


class Webhook(HttpNotifier[WebhookConfig]):
    Config = WebhookConfig

    def render(self, delivery: Delivery) -> tuple[bytes, dict[str, str]]:
        alert = delivery.alert
        report = delivery.extra.get("report")
        if report is not None:  # a scheduled fleet report (notifiers/reports.py), not an alert
            text = render_text(report)
            slack = {"text": slack_escape(text)}
            payload = slack if self.config.format == "slack" else {"report": report, "text": text}
            body = json.dumps(payload, separators=(",", ":")).encode()
        elif self.config.format == "slack":
            body = json.dumps({"text": slack_text(alert)}, separators=(",", ":")).encode()
        else:
            body = alert.to_json().encode()
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "X-Agentwatch-Delivery": delivery.id,
            "X-Agentwatch-Timestamp": timestamp,
            "X-Agentwatch-Attempt": str(delivery.attempt),
            "webhook-id": delivery.id,
            "webhook-timestamp": timestamp,
        }
        secret = self.config.secret
        if secret:
            headers["X-Agentwatch-Signature"] = sign(secret, timestamp, body)
            headers["webhook-signature"] = sign_standard(secret, delivery.id, timestamp, body)
        return body, headers
