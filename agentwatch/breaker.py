"""A handler's circuit breaker: tell a broken handler from bad input.

An entry that makes a handler raise, alone and ``max_attempts`` times, is poison and is
dead-lettered. But a handler that raises on *every* entry (a plugin with a bug, a missing
dependency) would dead-letter every healthy event that way, flood ``<prefix>:deadletter`` and
evict the entries that really were bad. So:

* after ``BROKEN_AFTER`` entries in a row have failed alone (across batches; they are
  dead-lettered, a handful per trip), the handler counts as broken: its breaker opens;
* while it is open, each batch gets one call, and if that fails a few entries alone decide
  (the first three, in order: one bad entry must not keep a recovered handler out); what
  the handler could not handle is acknowledged without it (the other handlers did process it)
  and counted per handler (``skipped:<name>`` in the worker's health hash), not dead-lettered;
  the state is logged when it opens, at most once a minute while it stays open, and when it
  closes;
* the breaker closes as soon as the handler passes a batch, or one entry, again.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from agentwatch.handler import Stats

log = logging.getLogger("agentwatch.worker")

BROKEN_AFTER: Final = 5
"""Entries in a row that fail alone before a handler counts as broken."""
_LOG_EVERY_S: Final = 60.0


class Breaker:
    """The failure record of one handler in one worker (not shared: each worker judges alone)."""

    def __init__(self, name: str, stats: Stats) -> None:
        self.name = name
        self.stats = stats
        self.failures = 0
        """Entries in a row that failed alone."""
        self.opened_at: float | None = None
        self.skipped = 0
        """Entries skipped since the breaker opened."""
        self._logged = -math.inf

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def passed(self) -> None:
        """The handler handled a batch or an entry: it works."""
        self.failures = 0
        if self.opened_at is not None:
            log.warning(
                "handler %r works again after %.0fs; %d entries were acked without it while it was "
                "broken", self.name, time.monotonic() - self.opened_at, self.skipped,
            )  # fmt: skip
            self.opened_at = None
            self.skipped = 0
            self.stats.broken.remove(self.name)

    def failed(self, error: Exception) -> bool:
        """One more entry failed alone (and was dead-lettered). True when this opens the breaker."""
        self.failures += 1
        if self.opened_at is not None or self.failures < BROKEN_AFTER:
            return False
        self.opened_at = self._logged = time.monotonic()
        self.stats.broken.append(self.name)
        log.error(
            "handler %r failed on %d entries in a row (last: %s: %s): it is broken, not fed bad "
            "data; until it passes a batch again, entries it cannot handle are acked without it "
            "and counted as skipped:%s, not dead-lettered",
            self.name, self.failures, type(error).__name__, error, self.name,
        )  # fmt: skip
        return True

    def skip(self, count: int, error: Exception) -> None:
        """``count`` entries go on without this (broken) handler."""
        if not count:
            return
        self.skipped += count
        self.stats.skipped += count
        self.stats.handler_skipped[self.name] = self.stats.handler_skipped.get(self.name, 0) + count
        now = time.monotonic()
        if now - self._logged >= _LOG_EVERY_S:
            self._logged = now
            log.error(
                "handler %r is still broken (%s: %s); %d entries acked without it so far",
                self.name, type(error).__name__, error, self.skipped,
            )  # fmt: skip
