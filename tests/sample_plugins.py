"""Plugins used by the spine's tests (loaded by dotted path, like a user's own plugin would be)."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from agentwatch.config import Seconds
from detectors.base import Detector, DetectorConfig, Event, Message
from notifiers.base import Alert, Notifier, NotifierConfig


class ThresholdConfig(DetectorConfig):
    limit: int = Field(100, ge=0)
    after_s: Seconds = Field(60.0, alias="after")


class Threshold(Detector[ThresholdConfig]):
    """Counts events per agent in memory; enough to prove config and plugin wiring."""

    Config = ThresholdConfig

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.seen: list[Event] = []

    def on_batch(self, messages: Sequence[Message[Event]]) -> None:
        self.seen += [event for _, event in messages]


class PrintConfig(NotifierConfig):
    prefix: str = ">>"


class Print(Notifier[PrintConfig]):
    Config = PrintConfig

    def on_batch(self, messages: Sequence[Message[Alert]]) -> None:
        for _, alert in messages:
            print(self.config.prefix, alert.summary)


class NotAPlugin:
    """Has no Config: resolving it must fail with a clear message."""
