"""What a worker feeds (:class:`Handler`) and what it counts (:class:`Stats`).

Every detector and notifier is a handler; ``agentwatch.worker`` re-exports these names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
Message = tuple[bytes, T]
"""(entry id, decoded entry). The id's time part is the Redis server's clock at XADD."""


class Handler(Generic[T]):
    """What a worker feeds. Override only the hooks you need; each one is a no-op here.

    Exceptions from any hook are caught by the runtime, logged and counted; they never stop the
    worker or the other handlers. Raise only for a real failure: the runtime retries
    ``on_batch`` entry by entry and dead-letters what keeps failing.
    """

    name: str = "handler"

    def on_start(self) -> None:
        """Once per worker process, after Redis answered and the consumer groups exist."""

    def on_batch(self, messages: Sequence[Message[T]]) -> None:
        """Per batch of valid entries, in stream order. Write effects before returning: the
        batch is acknowledged right after. May see an entry again after a crash (at least once)."""

    def on_tick(self, now_ms: int) -> None:
        """Every ``[worker] tick`` on every worker, with Redis server time: for timer checks."""

    def on_stop(self) -> None:
        """Once, when the worker stops gracefully (not after SIGKILL)."""


@dataclass
class Stats:
    """Counters a worker keeps and publishes in its health hash (``agentwatch status`` shows them)."""

    processed: int = 0
    deadlettered: int = 0
    reclaimed: int = 0
    errors: int = 0
    skipped: int = 0
    """Entries acked without a broken handler having seen them (breaker.py); also in ``processed``."""
    rejected: int = 0
    """Entries refused for a missing, wrong or too old signature (security.py); also dead-lettered."""
    batches: int = 0
    trimmed_pending: int = 0
    lag: int = 0
    pending: int = 0
    oldest_pending_ms: int = 0
    last_entry_ms: int = 0
    handler_errors: dict[str, int] = field(default_factory=dict)
    handler_skipped: dict[str, int] = field(default_factory=dict)
    broken: list[str] = field(default_factory=list)
    """Names of the handlers whose breaker is open now."""
