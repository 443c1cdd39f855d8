"""``type = "apprise"``: any Apprise URL - Slack, Telegram, Discord, email, ntfy, and ~100 more.

Apprise is an optional extra (``pip install 'agentwatch[apprise]'``): it is imported only when a
notifier of this type is configured, and a missing install fails at start-up (and in
``agentwatch check-config``) saying how to install it. Apprise reports success or failure per
message but no status code, so every failure is retried with backoff until the attempts run out.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from typing import Any, ClassVar

from pydantic import Field, model_validator

from agentwatch.config import Seconds
from agentwatch.report import render_text
from notifiers.base import Notifier, NotifierConfig
from notifiers.delivery import Delivered, Delivery, Outcome, Retry
from notifiers.webhook import slack_text

INSTALL_HINT = "apprise is not installed: pip install 'agentwatch[apprise]'"


class AppriseConfig(NotifierConfig):
    urls: list[str] = Field(min_length=1, description='e.g. ["tgram://bot-token/chat-id"]')
    title: str = Field(
        "agentwatch: {agent} {detector} {status}", description="{agent} {detector} {status} {severity}"
    )
    timeout_s: Seconds = Field(
        30.0, alias="timeout", gt=0, description="budget of one message (sizes the lease)"
    )
    reports_supported: ClassVar[bool] = True

    @model_validator(mode="after")
    def _installed(self) -> AppriseConfig:
        if importlib.util.find_spec("apprise") is None:
            raise ValueError(INSTALL_HINT)
        return self


class Apprise(Notifier[AppriseConfig]):
    Config = AppriseConfig
    apobj: Any

    @property
    def attempt_budget_s(self) -> float:
        return self.config.timeout_s

    def open(self) -> None:
        # Apprise loads its ~100 service modules on first use; some import stdlib modules that
        # Python deprecates (imghdr). Not ours to fix, and not worth a warning per worker start.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            apprise = importlib.import_module("apprise")
            self.apobj = apprise.Apprise()
            for url in self.config.urls:
                if not self.apobj.add(url):
                    # check-config cannot know every scheme: name the URL at start-up, keep the rest
                    self.log.error("apprise does not understand the URL %r (see its docs); skipped", url)

    def deliver(self, delivery: Delivery) -> Outcome:
        alert = delivery.alert
        title = self.config.title
        for name in ("agent", "detector", "status", "severity"):
            title = title.replace(f"{{{name}}}", str(getattr(alert, name)))
        body = slack_text(alert).replace("*", "")
        report = delivery.extra.get("report")
        if report is not None:  # a scheduled fleet report (notifiers/reports.py)
            title, body = alert.summary, render_text(report)
        if self.apobj.notify(title=title, body=body):
            return Delivered()
        return Retry("apprise reported a failure (see the worker log for the service's answer)")
