"""agentwatch.cron: one parser for schedules and maintenance windows, in the operator's timezone."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from agentwatch.cron import Cron, CronError


def _ts(text: str, tz: str = "UTC") -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz)).timestamp()


def test_slots_are_wall_clock_times_of_the_timezone() -> None:
    nightly = Cron.parse("0 2 * * *", "Europe/Berlin")
    after = nightly.next_after(_ts("2026-12-07 10:00", "Europe/Berlin"))
    assert datetime.fromtimestamp(after, ZoneInfo("Europe/Berlin")).isoformat() == "2026-12-08T02:00:00+01:00"
    assert datetime.fromtimestamp(after, UTC).hour == 1


def test_next_is_strictly_after_and_last_includes_the_instant() -> None:
    quarter = Cron.parse("*/15 * * * *")
    slot = _ts("2026-12-07 10:15")
    assert quarter.next_after(slot) == _ts("2026-12-07 10:30")
    assert quarter.last_at_or_before(slot) == slot
    assert quarter.last_at_or_before(slot + 899) == slot


@pytest.mark.parametrize(
    ("expr", "tz", "says"),
    [
        ("61 * * * *", "UTC", "invalid cron expression '61 * * * *': Bad minute"),
        ("* * *", "UTC", "Wrong number of fields"),
        ("0 0 30 2 *", "UTC", "invalid cron expression '0 0 30 2 *'"),
        ("* * * * *", "Mars/Base", "unknown timezone 'Mars/Base'"),
        ("* * * * *", "../../etc/passwd", "unknown timezone"),
    ],
)
def test_bad_expressions_and_timezones_say_which_and_why(expr: str, tz: str, says: str) -> None:
    with pytest.raises(CronError) as caught:
        Cron.parse(expr, tz)
    assert says in str(caught.value)
