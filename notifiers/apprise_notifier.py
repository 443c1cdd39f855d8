"""``type = "apprise"``: any Apprise URL - Slack, Telegram, Discord, email, ntfy, and ~100 more.

Apprise is an optional extra (``pip install 'agentwatch[apprise]'``): it is imported only when a
notifier of this type is configured, and a missing install fails at start-up (and in
``agentwatch check-config``) saying how to install it.

Each URL is its own destination: a message goes to all of them at once, each in its own thread,
and the attempt ends at ``timeout`` whatever the services do (one still busy then counts as
failed; its thread finishes in the background under the service's own timeouts). Apprise says
success or failure per URL but no status code, so a failure is retried with backoff, and the
retry goes only to the URLs that failed: the others are not sent the same message twice. The
message's apprise type follows the alert: critical and error are ``failure``, warning is
``warning``, info is ``info``, and a resolved alert is ``success``. The message goes to apprise
as plain text, which apprise escapes into each target's format (notifiers/text.py).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import threading
import time
import warnings
from typing import Any, ClassVar

from pydantic import Field, model_validator

from agentwatch.alerts import Alert
from agentwatch.config import Seconds
from agentwatch.report import render_text
from notifiers.base import Notifier, NotifierConfig
from notifiers.delivery import Delivered, Delivery, Failed, Outcome, Retry
from notifiers.text import plain_text

INSTALL_HINT = "apprise is not installed: pip install 'agentwatch[apprise]'"
SENT = "apprise_sent"
"""The delivery's ``extra`` key listing the URLs (by :func:`url_key`) that already have it."""
_NOTIFY_TYPES = {"critical": "failure", "error": "failure", "warning": "warning", "info": "info"}


class AppriseConfig(NotifierConfig):
    urls: list[str] = Field(min_length=1, description='e.g. ["tgram://bot-token/chat-id"]')
    title: str = Field(
        "agentwatch: {agent} {detector} {status}", description="{agent} {detector} {status} {severity}"
    )
    timeout_s: Seconds = Field(30.0, alias="timeout", gt=0, description="the most one message may take")
    reports_supported: ClassVar[bool] = True

    @model_validator(mode="after")
    def _installed(self) -> AppriseConfig:
        if importlib.util.find_spec("apprise") is None:
            raise ValueError(INSTALL_HINT)
        return self


def url_key(url: str) -> str:
    """How a delivery remembers a URL it reached: a digest, since URLs carry tokens."""
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def notify_type(alert: Alert) -> str:
    """The apprise message type: how the service colours or files it."""
    return "success" if alert.status == "resolved" else _NOTIFY_TYPES.get(alert.severity, "info")


class Apprise(Notifier[AppriseConfig]):
    Config = AppriseConfig
    targets: dict[str, Any]
    """url_key -> an Apprise object holding just that URL."""

    @property
    def attempt_budget_s(self) -> float:
        return self.config.timeout_s

    def open(self) -> None:
        # Apprise loads its ~100 service modules on first use; some import stdlib modules that
        # Python deprecates (imghdr). Not ours to fix, and not worth a warning per worker start.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            apprise = importlib.import_module("apprise")
            self.targets = {}
            for url in self.config.urls:
                target = apprise.Apprise()
                if target.add(url):
                    self.targets[url_key(url)] = target
                else:
                    # check-config cannot know every scheme: name the URL at start-up, keep the rest
                    self.log.error("apprise does not understand the URL %r (see its docs); skipped", url)

    def deliver(self, delivery: Delivery) -> Outcome:
        alert = delivery.alert
        title = self.config.title
        for name in ("agent", "detector", "status", "severity"):
            title = title.replace(f"{{{name}}}", str(getattr(alert, name)))
        body = plain_text(alert)
        report = delivery.extra.get("report")
        if report is not None:  # a scheduled fleet report (notifiers/reports.py)
            title, body = alert.summary, render_text(report)
        if not self.targets:
            return Failed("apprise understood none of the configured urls (see the worker log at start-up)")
        sent = set(delivery.extra.get(SENT, []))
        pending = {key: target for key, target in self.targets.items() if key not in sent}
        # As text: apprise converts it to each target's format, escaping agent text (text.py).
        message = {"title": title, "body": body, "notify_type": notify_type(alert),
                   "body_format": "text", "interpret_escapes": False}  # fmt: skip
        results = self._notify_all(pending, **message)
        sent |= {key for key, ok in results.items() if ok}
        failed = len(pending) - sum(results.values())
        if not failed:
            return Delivered(detail=f"{len(pending)} of {len(self.targets)} URLs this attempt")
        late = len(pending) - len(results)
        why = f"{failed} of {len(self.targets)} apprise URLs failed"
        why += f" ({late} still busy after {self.config.timeout_s:g}s)" if late else ""
        return Retry(why + "; see the worker log for the services' answers", progress={SENT: sorted(sent)})

    def _notify_all(self, targets: dict[str, Any], **message: Any) -> dict[str, bool]:
        """Send to every target at once; url_key -> success, for those done within the timeout."""
        results: dict[str, bool] = {}
        lock = threading.Lock()

        def one(key: str, target: Any) -> None:
            try:
                ok = bool(target.notify(**message))
            except Exception:  # a service plugin's bug: that URL failed, the others go on
                self.log.exception("apprise raised sending to one of its URLs")
                ok = False
            with lock:
                results[key] = ok

        threads = [
            threading.Thread(target=one, args=item, name=f"apprise-{self.name}", daemon=True)
            for item in targets.items()
        ]
        deadline = time.monotonic() + self.config.timeout_s
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with lock:
            return dict(results)
