"""What a detector is: a worker handler with a config model and a context.

Write one by subclassing :class:`Detector`, declaring a ``Config`` (a subclass of
:class:`DetectorConfig` with your keys), and overriding only the hooks you need. Every hook is a
no-op here. A hook that raises is logged, counted and isolated by the runtime: other detectors
and the worker keep running. See docs/writing-a-detector.md.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from agentwatch.alerts import Incidents
from agentwatch.codec import Event
from agentwatch.config import PipelineSettings
from agentwatch.keys import Keys
from agentwatch.plugins import DetectorConfig
from agentwatch.redisconn import Client
from agentwatch.worker import Handler, Message, Stats

__all__ = ["Detector", "DetectorConfig", "DetectorContext", "Event", "Message"]

C = TypeVar("C", bound=DetectorConfig)


@dataclass(frozen=True)
class DetectorContext:
    """What the worker gives every detector: one Redis client, the key schema, incidents, the
    pipeline settings, and the worker's own live counters (lag, last entry time).

    ``shared`` is scratch space common to every detector of one worker: the built-ins keep their
    shared engine there (detectors/engine.py), and a family of plugins may do the same."""

    client: Client
    keys: Keys
    incidents: Incidents
    settings: PipelineSettings
    stats: Stats
    shared: dict[str, Any] = field(default_factory=dict)


class Detector(Handler[Event], Generic[C]):
    """Base class of every detector.

    ``on_batch`` receives valid events as ``(entry id, event dict)`` in stream order; the entry
    id's time (``agentwatch.codec.entry_ms``) is the Redis server's clock at XADD and is the only
    clock a detector should trust. Delivery is at least once: make every effect idempotent
    (the producer's ``run`` and ``seq`` identify an event).
    """

    Config: ClassVar[type[DetectorConfig]] = DetectorConfig

    def __init__(self, name: str, config: C, ctx: DetectorContext) -> None:
        self.name = name
        self.config = config
        self.ctx = ctx
        self.log = logging.getLogger(f"agentwatch.detectors.{name}")

    def on_batch(self, messages: Sequence[Message[Event]]) -> None:
        """Per batch of valid events (see :class:`agentwatch.worker.Handler`)."""

    def on_tick(self, now_ms: int) -> None:
        """Every ``[worker] tick`` on every worker, with Redis server time in ms."""
