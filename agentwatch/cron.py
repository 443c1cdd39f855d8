"""Cron expressions, for schedules (a cron agent expected once per slot) and maintenance windows.

Parsed by ``cronsim`` (the parser Healthchecks uses: five fields, ``L``, ``W``, ``#``, and
daylight-saving transitions handled the way cron does) in a named timezone, so "every night at
02:00" means 02:00 on the wall clock where the operator lives, not UTC. One place parses and
validates, so check-config, the detectors and the notifiers agree on what an expression means.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError


class CronError(ValueError):
    """An expression or timezone that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class Cron:
    """A validated cron expression in a timezone; times in and out are Unix seconds (UTC)."""

    expr: str
    tz: ZoneInfo

    @classmethod
    def parse(cls, expr: str, timezone: str = "UTC") -> Cron:
        """Validate ``expr`` in ``timezone`` now, so a typo fails at start-up and not at 3 AM."""
        try:
            tz = ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise CronError(f"unknown timezone {timezone!r} (use an IANA name like 'Europe/Berlin')") from exc
        try:
            next(CronSim(expr, datetime.now(tz)))
        except (CronSimError, StopIteration) as exc:
            raise CronError(f"invalid cron expression {expr!r}: {exc or 'it never matches'}") from exc
        return cls(expr, tz)

    def next_after(self, t: float) -> float:
        """The first slot strictly after ``t``."""
        return next(CronSim(self.expr, self._at(t))).timestamp()

    def last_at_or_before(self, t: float) -> float:
        """The latest slot at or before ``t`` (a slot exactly at ``t`` counts)."""
        return next(CronSim(self.expr, self._at(t + 1), reverse=True)).timestamp()

    def _at(self, t: float) -> datetime:
        # cronsim works in whole seconds of a zone-aware datetime.
        return datetime.fromtimestamp(int(t), UTC).astimezone(self.tz)
