"""Rollups for reports: every agent's running totals, snapshotted at each bucket boundary.

The detectors already keep exact, redelivery-proof running totals per agent (beats, tokens,
cost: ``bt``, ``tt``, ``ct`` in the detector record). So a rollup need not count anything: at
each ``[report] bucket`` boundary (hourly by default) one worker copies every agent's totals
into a snapshot hash, and "tokens of my-bot between t1 and t2" is the difference of two totals.
A 7-day report reads two snapshots, never the raw stream, and the hot path pays nothing.

Besides the bucket boundaries (multiples of ``bucket`` since the epoch, so UTC-aligned), a
snapshot is also taken at every local midnight in ``[report] timezone``: "cost today" must start
at midnight where the operator lives, not at the UTC bucket before it (30 minutes of yesterday
in Asia/Kolkata with hourly buckets, 23 hours in Europe/Berlin with daily ones).

Totals only grow, except when a record is deleted and recreated (the agent was forgotten, or
the detector layout changed): then the totals restart from zero, and a difference against an
older snapshot would be negative. :meth:`Totals.since` treats that as "counted from the reset".

Snapshots are taken in slices of a few thousand agents per tick (HSCAN with a cursor kept in
Redis), so a large fleet never stalls a worker's tick, and any worker can continue a slice
another one started. Each snapshot expires after ``[report] retention``.

Memory: about 60 bytes per agent per snapshot; with hourly buckets kept 8 days that is ~12 KB
per agent (12 MB for 1,000 agents), plus one snapshot a day for local midnight when the time
zone is not aligned to the buckets. Large fleets should use ``bucket = "6h"`` or ``"1d"``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final
from zoneinfo import ZoneInfo

from agentwatch.alerts import PIPELINE_AGENT
from agentwatch.codec import Event
from agentwatch.keys import Keys, shard_of
from agentwatch.redisconn import Client
from agentwatch.worker import Handler

_PACK: Final = struct.Struct("<ddd")  # beats, tokens, cost
_SLICE: Final = 2000
_LOCK_MS: Final = 10_000
_PIPELINE: Final = PIPELINE_AGENT.encode()


@dataclass(frozen=True, slots=True)
class Totals:
    """Running totals of one agent at some moment."""

    beats: float = 0.0
    tokens: float = 0.0
    cost: float = 0.0

    def __sub__(self, other: Totals) -> Totals:
        return Totals(self.beats - other.beats, self.tokens - other.tokens, self.cost - other.cost)

    def since(self, base: Totals) -> Totals:
        """What was added since ``base`` was taken. Totals never shrink unless the record was
        deleted and recreated (a forgotten agent that came back): then everything counted now
        was counted since that reset, and that is the answer, never a negative delta."""
        if self.beats < base.beats or self.tokens < base.tokens or self.cost < base.cost - 1e-9:
            return self
        return self - base

    def pack(self) -> bytes:
        return _PACK.pack(self.beats, self.tokens, self.cost)

    @classmethod
    def unpack(cls, raw: bytes) -> Totals:
        return cls(*_PACK.unpack(raw))

    @classmethod
    def of_record(cls, record: dict[str, Any]) -> Totals:
        """From a checkpointed agent (detectors.agent.describe)."""
        return cls(
            float(record.get("beats", 0)), float(record.get("tokens", 0)), float(record.get("cost", 0))
        )


@dataclass(frozen=True, slots=True)
class Sample:
    """What a sweep reads of one agent: its running totals and its last RSS (KiB, 0: unknown)."""

    totals: Totals
    rss_kib: int


def scan_totals(
    client: Client, keys: Keys, shard: int, cursor: int, count: int | None = None
) -> tuple[int, dict[bytes, Sample]]:
    """One slice of a shard's agents, HSCAN-style: (next cursor, 0 when done; agent -> sample).

    The one place where sweeps over the whole fleet (rollup snapshots, chart series) read the
    detectors' records, so a new record layout changes this function and nothing else. The
    pipeline agent (the lag detector's state, checkpointed beside the agents) is not one of the
    fleet: it never beats, and the views leave it out too."""
    from detectors.agent import describe, unpack  # noqa: PLC0415 - the spine imports detectors lazily

    redis: Any = client
    cursor, pairs = redis.hscan(keys.states(shard), cursor, count=count or _SLICE)
    out: dict[bytes, Sample] = {}
    for agent, raw in pairs.items():
        if agent == _PIPELINE:
            continue
        found = unpack(agent.decode(), raw, {})
        if found is not None:
            out[agent] = Sample(Totals.of_record(describe(found)), found.rss_last // 1024)
    return int(cursor), out


def known_agents(client: Client, keys: Keys, shard: int, agents: Sequence[bytes]) -> set[bytes]:
    """Which of ``agents`` (of ``shard``) the detectors still keep (the others were forgotten)."""
    redis: Any = client
    found = redis.hmget(keys.states(shard), list(agents)) if agents else []
    return {agent for agent, raw in zip(agents, found, strict=True) if raw is not None}


class Snapshotter(Handler[Event]):
    """Detector-worker handler: takes each bucket's snapshot, a slice per tick (see module doc)."""

    name = "rollups"

    def __init__(
        self,
        client: Client,
        keys: Keys,
        *,
        bucket_s: float,
        retention_s: float,
        owner: str,
        timezone: str = "UTC",
    ) -> None:
        self.client: Any = client
        self.keys = keys
        self.bucket_ms = int(bucket_s * 1000)
        self.retention_ms = int(retention_s * 1000)
        self.owner = owner
        self.zone = ZoneInfo(timezone)
        self._done: dict[int, int] = {}  # shard -> last bucket known complete (saves a round trip)

    def boundary(self, now_ms: int) -> int:
        """The latest snapshot boundary at or before ``now_ms``: a bucket boundary or, if later,
        local midnight (see the module docstring)."""
        return max(now_ms // self.bucket_ms * self.bucket_ms, local_midnight_ms(now_ms, self.zone))

    def on_tick(self, now_ms: int) -> None:
        bucket = self.boundary(now_ms)
        for shard in range(max(self.keys.shards, 1)):
            if self._done.get(shard) != bucket:
                self.advance(shard, bucket, now_ms)

    def advance(self, shard: int, bucket: int, now_ms: int) -> bool:
        """Take the next slice of ``bucket``'s snapshot of ``shard``; True once it is complete."""
        keys, redis = self.keys, self.client
        if redis.zscore(keys.snapshots(shard), bucket) is not None:
            self._done[shard] = bucket
            return True
        progress, lock = keys.snapshot_progress(shard), keys.snapshot_lock(shard)
        if not redis.set(lock, self.owner, nx=True, px=_LOCK_MS):
            return False  # another worker is on it
        try:
            state = redis.hgetall(progress)
            cursor = int(state[b"cursor"]) if state.get(b"bucket") == str(bucket).encode() else 0
            cursor, found = scan_totals(redis, keys, shard, cursor)
            target = keys.snapshot(shard, bucket)
            rows = {agent: sample.totals.pack() for agent, sample in found.items()}
            pipe = redis.pipeline(transaction=False)
            if rows:
                pipe.hset(target, mapping=rows)
            pipe.pexpire(target, self.retention_ms)
            if int(cursor) == 0:
                pipe.zadd(keys.snapshots(shard), {str(bucket): bucket})
                pipe.zremrangebyscore(keys.snapshots(shard), "-inf", now_ms - self.retention_ms)
                pipe.delete(progress)
            else:
                pipe.hset(progress, mapping={"bucket": bucket, "cursor": cursor})
            pipe.execute()
        finally:
            if redis.get(lock) == self.owner.encode():
                redis.delete(lock)
        if int(cursor) == 0:
            self._done[shard] = bucket
            return True
        return False


def local_midnight_ms(now_ms: int, zone: ZoneInfo) -> int:
    """The start of the local day that ``now_ms`` falls in, in ms. Where midnight does not exist
    (a DST jump at 00:00) this is the moment the day began, which is what "today" means."""
    local = datetime.fromtimestamp(now_ms / 1000, tz=zone)
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    return min(now_ms, int(midnight.timestamp() * 1000))


@dataclass(frozen=True, slots=True)
class Base:
    """What a period's counts are measured from (:func:`base_totals`)."""

    totals: dict[str, Totals]
    """Each agent's totals at the start (absent: counted from zero, e.g. first seen later)."""
    from_ms: int | None
    """The snapshot used (the oldest, over shards); None: there is no snapshot at all."""
    partial: bool
    """No snapshot reaches back to the start (the rollups' retention, or a young pipeline): the
    earliest snapshot after it was used, so the counts cover less than was asked for."""


def base_totals(client: Client, keys: Keys, start_ms: int, agents: Iterable[str]) -> Base:
    """The totals to subtract for counts since ``start_ms``: per shard the latest snapshot at or
    before it, else the earliest one after it (``partial``): never "from the beginning of time"
    for an agent that is older than the period."""
    redis: Any = client
    wanted: dict[int, list[str]] = {}
    for agent in agents:
        wanted.setdefault(shard_of(agent, keys.shards), []).append(agent)
    out: dict[str, Totals] = {}
    before: list[int] = []  # snapshots at or before the start, one per shard that has one
    after: list[int] = []  # the earliest snapshot of shards that have none that old
    for shard, names in wanted.items():
        found = redis.zrevrangebyscore(keys.snapshots(shard), start_ms, "-inf", start=0, num=1)
        if found:
            before.append(int(found[0]))
        else:
            found = redis.zrange(keys.snapshots(shard), 0, 0)
            if not found:
                continue
            after.append(int(found[0]))
        bucket = int(found[0])
        for name, raw in zip(names, redis.hmget(keys.snapshot(shard, bucket), names), strict=True):
            if raw:
                out[name] = Totals.unpack(raw)
    if after:  # the counts cover only what every shard's snapshots cover
        return Base(out, max(after), True)
    return Base(out, min(before) if before else None, False)
