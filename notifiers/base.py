"""What a notifier is: a worker handler fed with alerts, with a config model and a context.

Subclass :class:`Notifier`, declare a ``Config`` (a subclass of :class:`NotifierConfig`), and
override the hooks you need. A hook that raises is logged, counted and isolated by the runtime.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Generic, TypeVar

from agentwatch.alerts import Alert
from agentwatch.config import PipelineSettings
from agentwatch.keys import Keys
from agentwatch.plugins import NotifierConfig
from agentwatch.redisconn import Client
from agentwatch.worker import Handler, Message, Stats

__all__ = ["Alert", "Message", "Notifier", "NotifierConfig", "NotifierContext"]

C = TypeVar("C", bound=NotifierConfig)


@dataclass(frozen=True)
class NotifierContext:
    """What the worker gives every notifier: Redis, the key schema, settings and live counters."""

    client: Client
    keys: Keys
    settings: PipelineSettings
    stats: Stats


class Notifier(Handler[Alert], Generic[C]):
    """Base class of every notifier: ``on_batch`` receives ``(entry id, Alert)`` pairs."""

    Config: ClassVar[type[NotifierConfig]] = NotifierConfig

    def __init__(self, name: str, config: C, ctx: NotifierContext) -> None:
        self.name = name
        self.config = config
        self.ctx = ctx
        self.log = logging.getLogger(f"agentwatch.notifiers.{name}")

    def on_batch(self, messages: Sequence[Message[Alert]]) -> None:
        """Per batch of alerts from ``<prefix>:alerts``, in order."""
