"""What agents spend: every beat priced once, and exact per-window totals for budgets and views.

Two steps, both run by every detector worker on every batch (agentwatch/workers.py):

1. :func:`price_events` -- the one place a beat's cost is decided. A beat that carries no
   ``cost`` but tokens is priced with :class:`~agentwatch.prices.PriceBook` and its ``cost`` is
   filled in, in the event itself, before any detector sees it: the tokens detector, the
   detectors' running totals (status, report, dashboard, metrics) and the budgets all read the
   same number. A beat whose price is unknown keeps no ``cost`` (never ``0.0``) and is marked
   :data:`UNPRICED`, so it is counted as an *unpriced beat* instead.
2. :class:`Spending` -- per agent, USD and unpriced beats per calendar window (hour, day, month
   in ``[report] timezone``), the windows the budgets need (detectors/budgets.py decides on
   them), kept in a :class:`Tally` on the agent's record in the detector engine's memory.

Exactly once. The detector engine (detectors/engine.py) adds each beat it applies, in its one
pass over the batch, so a beat counts when the engine applies it and at no other time: the
shard's single owner applies its stream in order, drops repeats by the run's ``seq``, and
checkpoints the changed tallies into the shard's ledger hash (:meth:`Keys.spend`) in the same
fenced transaction as the agents' records and the last applied entry id
(detectors/checkpoint.py). A worker SIGKILLed mid-batch is replaced by one that loads that
checkpoint and replays the stream from its entry id: what the dead worker had added after it is
added again, once. :class:`Ledger` is the views' reader of that hash (``status``, reports, the
dashboard): what the owner has not checkpointed yet (half a second at most) is not in it.

Bad costs never get here: the codec dead-letters a negative, NaN, infinite or over-cap ``cost``
(counted in ``status``), and a computed price above the cap is unknown (prices.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final
from zoneinfo import ZoneInfo

import msgpack

from agentwatch.codec import Event, entry_ms
from agentwatch.keys import Keys, shard_of
from agentwatch.prices import TOKEN_KEYS, PriceBook
from agentwatch.redisconn import Client

UNPRICED: Final = "_unpriced"
"""Key :func:`price_events` sets on a beat whose cost is unknown (value: why, prices.Quote.source).
The underscore keeps it apart from protocol keys, which never start with one."""
PERS: Final = {"hour": "h", "day": "d", "month": "m"}
"""Budget ``per`` -> the letter its window ids start with."""
KEEP: Final = {"h": 3, "d": 40, "m": 3}
"""Windows kept per agent and kind: 40 days for reports, the current and last ones otherwise."""
MIN_KEEP: Final = min(KEEP.values())
GROUPS_FIELD: Final = "#g"
"""Ledger hash field of the shard's shares of ``scope = "together"`` budgets (``#`` is not a
character of agent names)."""


def price_events(messages: Sequence[tuple[bytes, Event]], book: PriceBook) -> int:
    """Fill in the ``cost`` of every beat that has tokens but no cost, priced at its entry's
    Redis time; mark the ones that cannot be priced :data:`UNPRICED`. Idempotent (a redelivered
    event is priced the same). Returns how many beats were unpriced."""
    unpriced = 0
    for entry_id, event in messages:
        if event.get("kind") != "beat" or event.get("cost") is not None or UNPRICED in event:
            continue
        if not any(event.get(key) for key in TOKEN_KEYS):
            continue  # a bare heartbeat(): it spent nothing, and says so by carrying no usage
        quote = book.quote(event, entry_ms(entry_id))
        if quote.cost is None:
            event[UNPRICED] = quote.source
            unpriced += 1
        else:
            event["cost"] = quote.cost
    return unpriced


@dataclass(frozen=True, slots=True)
class Window:
    """One calendar window: its id (``d20261207``, ``h2026120706``, ``m202612``) and bounds."""

    id: str
    start_ms: int
    end_ms: int

    def elapsed(self, now_ms: int) -> float:
        """Fraction of the window gone by at ``now_ms`` (0..1)."""
        return min(1.0, max(0.0, (now_ms - self.start_ms) / (self.end_ms - self.start_ms)))


def window_of(per: str, at_ms: int, zone: ZoneInfo) -> Window:
    """The calendar ``per`` window (hour, day, month, local time in ``zone``) holding ``at_ms``."""
    local = datetime.fromtimestamp(at_ms / 1000, tz=zone)
    if per == "hour":
        start = local.replace(minute=0, second=0, microsecond=0)
        start_ms = round(start.timestamp() * 1000)
        # The hour a DST change repeats (fold 1) is another window: its own id, still sorting
        # after the first one (the ledger keeps the newest ids), so two hours never share a total.
        again = "b" if start.fold else ""
        return Window(f"h{start:%Y%m%d%H}{again}", start_ms, start_ms + 3_600_000)
    if per == "day":
        start = local.replace(hour=0, minute=0, second=0, microsecond=0)
        nxt = datetime.fromordinal(start.toordinal() + 1).replace(tzinfo=zone)
        return Window(f"d{start:%Y%m%d}", round(start.timestamp() * 1000), round(nxt.timestamp() * 1000))
    if per == "month":
        start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
        nxt = datetime(year, month, 1, tzinfo=zone)
        return Window(f"m{start:%Y%m}", round(start.timestamp() * 1000), round(nxt.timestamp() * 1000))
    raise ValueError(f"unknown window {per!r}: hour, day or month")


class WindowClock:
    """:func:`window_of` for many timestamps: the last window of each kind is reused while the
    timestamps stay inside it (a batch rarely crosses a boundary)."""

    def __init__(self, zone: ZoneInfo) -> None:
        self.zone = zone
        self._last: dict[str, Window] = {}

    def __call__(self, per: str, at_ms: int) -> Window:
        last = self._last.get(per)
        if last is None or not last.start_ms <= at_ms < last.end_ms:
            last = self._last[per] = window_of(per, at_ms, self.zone)
        return last


@dataclass
class Spent:
    """USD spent in one window, with the beats priced and the beats whose price was unknown."""

    cost: float = 0.0
    unpriced: int = 0
    beats: int = 0

    @classmethod
    def of(cls, raw: Sequence[Any] | None) -> Spent:
        return cls() if not raw else cls(float(raw[0]), int(raw[1]), int(raw[2]))


@dataclass
class Applied:
    """What one batch changed: every (agent, window) it added to, with the tally holding it (its
    total is read once, after the batch), and the (glob, window) keys of the ``together``
    budgets it added to (:meth:`Ledger.groups`)."""

    agents: dict[tuple[str, str], Tally] = field(default_factory=dict)
    groups: set[tuple[str, str]] = field(default_factory=set)


@dataclass(slots=True)
class Tally:
    """Spend per window of one agent (window id -> [USD, unpriced beats, priced beats]), or one
    shard's shares of the ``together`` budgets (``"<glob>|<window id>"`` -> the same). Only the
    newest :data:`KEEP` windows of each kind (and glob) are kept."""

    windows: dict[str, list[Any]] = field(default_factory=dict)

    def add(self, key: str, cost: float, unpriced: int, beats: int) -> None:
        current = self.windows.get(key)
        if current is None:
            current = self.windows[key] = [0.0, 0, 0]
            if len(self.windows) > MIN_KEEP:  # (fewer windows than any kind keeps: none to drop)
                self._trim(key)
        current[0] += cost
        current[1] += unpriced
        current[2] += beats

    def spent(self, key: str) -> Spent:
        return Spent.of(self.windows.get(key))

    def _trim(self, new: str) -> None:
        """Drop the oldest windows of ``new``'s kind (and glob) past :data:`KEEP` (ids sort by time)."""
        head, bar, tail = new.rpartition("|")
        kind = head + bar + tail[:1]
        same = sorted(k for k in self.windows if k.startswith(kind) and "|" not in k[len(kind) :])
        for old in same[: max(0, len(same) - KEEP.get(tail[:1], 3))]:
            del self.windows[old]


def pack_tally(tally: Tally, packb: Callable[[Any], bytes] | None = None) -> bytes:
    """An agent's tally as the ledger hash keeps it (the views read ``w``). ``packb``: a reused
    ``msgpack.Packer(use_bin_type=True).pack`` of the caller's (default: one per call)."""
    if packb is not None:
        return packb({"w": tally.windows})
    out: bytes = msgpack.packb({"w": tally.windows}, use_bin_type=True)
    return out


def unpack_tally(raw: bytes | None) -> Tally:
    """The inverse of :func:`pack_tally` (also of the ledger written by earlier versions, which
    kept per-run ``seq`` marks beside ``w``); damaged: nothing spent."""
    windows = _unpack(raw).get("w") if raw else None
    return Tally({str(k): list(v) for k, v in windows.items()} if isinstance(windows, dict) else {})


def pack_shares(shares: Tally) -> bytes:
    """A shard's ``together`` shares as the ledger hash's :data:`GROUPS_FIELD` keeps them."""
    out: bytes = msgpack.packb(shares.windows, use_bin_type=True)
    return out


def unpack_shares(raw: bytes | None) -> Tally:
    found = _unpack(raw) if raw else {}
    return Tally({str(k): list(v) for k, v in found.items() if isinstance(v, (list, tuple))})


class Spending:
    """Adds each applied beat's spend to its agent's :class:`Tally` (and to the shard's shares of
    the ``together`` budgets covering it): the detector engine calls :meth:`add` once per beat,
    in its single pass over the batch, so a beat is counted exactly when the engine applies it
    (repeats and replays are the engine's: detectors/engine.py)."""

    def __init__(self, zone: ZoneInfo, pers: Iterable[str], groups_of: Any = None, *, noting: bool) -> None:
        self.clock = WindowClock(zone)
        self.noting = noting
        """Whether budgets judge the windows a batch touched (else nothing is noted in Applied)."""
        self.kinds = sorted({"day", *pers})
        """The windows kept: the budgets' ``per`` and the day (status and report read it)."""
        self.groups_of = groups_of
        """``agent -> [(glob, per)]`` of the ``together`` budgets covering it, or None."""
        self._ids: list[str] = []
        self._ids_from = self._ids_until = 0

    def add(  # noqa: PLR0917 - one beat's parts
        self, tally: Tally, shares: Tally, agent: str, event: Event, at_ms: int, applied: Applied
    ) -> bool:
        """Add one beat (priced by :func:`price_events`) at entry time ``at_ms``; note the
        windows it touched in ``applied`` when :attr:`noting`. False: it carried no usage."""
        if UNPRICED in event:
            cost, unpriced, priced = 0.0, 1, 0
        elif (found := event.get("cost")) is not None:
            cost, unpriced, priced = float(found), 0, 1
        else:
            return False
        if not self._ids_from <= at_ms < self._ids_until:
            self._window_ids(at_ms)
        for wid in self._ids:
            tally.add(wid, cost, unpriced, priced)
        if self.noting:
            touched = applied.agents
            for wid in self._ids:
                touched[(agent, wid)] = tally
        if self.groups_of is not None:
            for glob, per in self.groups_of(agent):
                wid = self.clock(per, at_ms).id
                shares.add(f"{glob}|{wid}", cost, unpriced, priced)
                applied.groups.add((glob, wid))
        return True

    def _window_ids(self, at_ms: int) -> None:
        """The ids of the windows of :attr:`kinds` holding ``at_ms``, kept with the span over
        which they stay the same (most beats of a batch fall in it)."""
        windows = [self.clock(per, at_ms) for per in self.kinds]
        self._ids = [window.id for window in windows]
        self._ids_from = max(window.start_ms for window in windows)
        self._ids_until = min(window.end_ms for window in windows)


class Ledger:
    """The spend ledger of one deployment, as the views read it (see the module docstring)."""

    def __init__(self, client: Client, keys: Keys, zone: ZoneInfo) -> None:
        self.client: Any = client
        self.keys = keys
        self.clock = WindowClock(zone)

    def read(self, agents: Sequence[str]) -> dict[str, dict[str, Spent]]:
        """Every window kept for each of ``agents`` (absent: nothing spent or priced yet)."""
        if not agents:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for agent in agents:
            pipe.hget(self.keys.spend(shard_of(agent, self.keys.shards)), agent)
        out: dict[str, dict[str, Spent]] = {}
        for agent, raw in zip(agents, pipe.execute(), strict=True):
            if raw:
                windows = unpack_tally(raw).windows
                out[agent] = {wid: Spent.of(v) for wid, v in windows.items()}
        return out

    def groups(
        self, wanted: Iterable[tuple[str, str]], held: Mapping[int, Tally] | None = None
    ) -> dict[tuple[str, str], Spent]:
        """Totals of ``together`` budgets, ``(glob, window id)`` -> spend summed over shards;
        ``held``: the shares of the shards the caller owns, newer than their last checkpoint."""
        wanted = list(wanted)
        out = {key: Spent() for key in wanted}
        if not wanted:
            return out
        for shard in range(max(self.keys.shards, 1)):
            share = held.get(shard) if held else None
            if share is None:
                share = unpack_shares(self.client.hget(self.keys.spend(shard), GROUPS_FIELD))
            for glob, wid in wanted:
                part = share.spent(f"{glob}|{wid}")
                total = out[(glob, wid)]
                total.cost += part.cost
                total.unpriced += part.unpriced
                total.beats += part.beats
        return out


def _unpack(raw: bytes) -> dict[str, Any]:
    try:
        value = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData):
        return {}  # damaged: read as nothing spent
    return value if isinstance(value, dict) else {}
