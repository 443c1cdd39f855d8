"""Chart series for the dashboard: each agent's beats, tokens, cost and RSS per bucket over a day.

Nothing else keeps a time series: the detectors keep running totals, rollups snapshot them
hourly for reports. So, like the rollups, this counts nothing on the hot path: at every
``[http] series_bucket`` boundary (5 minutes by default) one detector worker sweeps the fleet's
totals (:func:`agentwatch.rollups.scan_totals`, a slice per tick) and stores, per agent, what
was added since its previous sample. Sampling totals is idempotent by construction: a point is
written once per bucket (the agent's header says which bucket it last took), a redelivered
batch changes no total, and two workers sweeping the same bucket write the same numbers.

One hash field per agent (:meth:`agentwatch.keys.Keys.series`) holds a packed record: a header
(the bucket and the totals of the last sample) and a ring of ``span / bucket`` points (beats,
tokens, cost added in the bucket, RSS at its end). Memory: 32 + 16 x points bytes per agent,
4.6 KB with the defaults (288 points), 46 MB for 10,000 agents. Buckets a sweep missed (no
detector worker ran) read as zero; what was added meanwhile lands in the first bucket sampled
again. Agents the detectors forgot are dropped from the hash by later sweeps.

The partial bucket in progress is not stored: readers add it from the live totals
(:meth:`Series.live`), so a chart is current to the second.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from agentwatch.codec import Event
from agentwatch.keys import Keys, shard_of
from agentwatch.redisconn import Client
from agentwatch.rollups import Sample, Totals, known_agents, scan_totals
from agentwatch.worker import Handler

_HEADER: Final = struct.Struct("<qddd")  # last bucket index, beats, tokens, cost totals then
_POINT: Final = struct.Struct("<IIfI")  # beats, tokens, cost (USD), RSS KiB
_U32: Final = 2**32 - 1
_LOCK_MS: Final = 10_000


@dataclass(frozen=True, slots=True)
class Point:
    start_ms: int
    beats: int
    tokens: int
    cost: float
    rss_kib: int


@dataclass(frozen=True, slots=True)
class Series:
    """One agent's points, oldest first, ending with the last complete bucket."""

    bucket_ms: int
    points: list[Point]
    base: Totals
    """The totals when the last point was taken: the live bucket is ``totals - base``."""
    base_ms: int

    def live(self, totals: Totals, rss_kib: int = 0) -> Point:
        """The bucket in progress, from the agent's current totals."""
        added = totals.since(self.base)
        return Point(self.base_ms, round(added.beats), round(added.tokens), added.cost, rss_kib)


def _pack(bucket: int, totals: Totals, ring: bytearray) -> bytes:
    return _HEADER.pack(bucket, totals.beats, totals.tokens, totals.cost) + bytes(ring)


def sample(raw: bytes | None, bucket: int, now: Sample, points: int) -> bytes | None:
    """The agent's record after sampling ``now`` at the start of ``bucket`` (an index: ms //
    bucket_ms); None when it already holds this bucket (nothing to write)."""
    size = _HEADER.size + points * _POINT.size
    if raw is None or len(raw) != size:  # first sample, or a changed span: start afresh
        return _pack(bucket, now.totals, bytearray(points * _POINT.size))
    last, *base = _HEADER.unpack_from(raw)
    if bucket <= last:
        return None
    ring = bytearray(raw[_HEADER.size :])
    for gone in range(max(last, bucket - points), bucket - 1):  # buckets no sweep took: zero
        _POINT.pack_into(ring, (gone % points) * _POINT.size, 0, 0, 0.0, 0)
    added = now.totals.since(Totals(*base))
    _POINT.pack_into(
        ring,
        ((bucket - 1) % points) * _POINT.size,
        min(round(added.beats), _U32),
        min(round(added.tokens), _U32),
        added.cost,
        min(now.rss_kib, _U32),
    )
    return _pack(bucket, now.totals, ring)


def unpack(raw: bytes, bucket_ms: int, points: int, now_ms: int, window: int | None = None) -> Series | None:
    """Decode a record (its last ``window`` points only, when given); points older than the
    span (or from a differently sized ring) vanish."""
    if len(raw) != _HEADER.size + points * _POINT.size:
        return None
    last, beats, tokens, cost = _HEADER.unpack_from(raw)
    current = now_ms // bucket_ms
    out = []
    for index in range(current - min(window or points, points), current):
        if index >= last or index < 0:
            values: tuple[int, int, float, int] = (0, 0, 0.0, 0)
        else:
            values = _POINT.unpack_from(raw, _HEADER.size + (index % points) * _POINT.size)
        out.append(Point(index * bucket_ms, *values))
    return Series(bucket_ms, out, Totals(beats, tokens, cost), last * bucket_ms)


def empty(bucket_ms: int, points: int, now_ms: int, window: int | None = None) -> Series:
    """The series of an agent no sweep has sampled yet (it is younger than the current bucket,
    or no detector worker has run since it appeared): zeros, and all of its totals live."""
    current = now_ms // bucket_ms
    first = current - min(window or points, points)
    zeros = [Point(index * bucket_ms, 0, 0, 0.0, 0) for index in range(first, current)]
    return Series(bucket_ms, zeros, Totals(), current * bucket_ms)


def read_series(
    client: Client,
    keys: Keys,
    agents: Sequence[str],
    *,
    bucket_s: float,
    span_s: float,
    now_ms: int,
    window_s: float | None = None,
) -> dict[str, Series]:
    """The series of ``agents`` (:func:`empty` for those without one), one HMGET per shard;
    with ``window_s``, only the points of that last stretch (a sparkline's hour)."""
    redis: Any = client
    bucket_ms, points = int(bucket_s * 1000), points_of(bucket_s, span_s)
    window = None if window_s is None else points_of(bucket_s, window_s)
    out: dict[str, Series] = {}
    by_shard: dict[int, list[str]] = {}
    for agent in agents:
        by_shard.setdefault(shard_of(agent, keys.shards), []).append(agent)
    for shard, names in by_shard.items():
        for name, raw in zip(names, redis.hmget(keys.series(shard), names), strict=True):
            found = unpack(raw, bucket_ms, points, now_ms, window) if raw else None
            out[name] = found or empty(bucket_ms, points, now_ms, window)
    return out


def points_of(bucket_s: float, span_s: float) -> int:
    return max(1, round(span_s / bucket_s))


class SeriesRecorder(Handler[Event]):
    """Detector-worker handler: samples every agent at each bucket boundary, a slice per tick."""

    name = "series"

    def __init__(self, client: Client, keys: Keys, *, bucket_s: float, span_s: float, owner: str) -> None:
        self.client: Any = client
        self.keys = keys
        self.bucket_ms = int(bucket_s * 1000)
        self.points = points_of(bucket_s, span_s)
        self.owner = owner
        self._done: dict[int, int] = {}  # shard -> last bucket swept completely by this worker

    def on_tick(self, now_ms: int) -> None:
        bucket = now_ms // self.bucket_ms
        for shard in range(max(self.keys.shards, 1)):
            if self._done.get(shard) != bucket:
                self.advance(shard, bucket)

    def advance(self, shard: int, bucket: int) -> bool:
        """Sample the next slice of ``shard`` for ``bucket``; True once the sweep is complete."""
        redis, keys = self.client, self.keys
        progress = keys.series_sweep(shard)
        state = {k.decode(): int(v) for k, v in redis.hgetall(progress).items()}
        if state.get("done") == bucket:
            self._done[shard] = bucket
            return True
        lock = keys.series_lock(shard)
        if not redis.set(lock, self.owner, nx=True, px=_LOCK_MS):
            return False  # another worker is on it
        try:
            cursor = state.get("cursor", 0) if state.get("bucket") == bucket else 0
            cursor, found = scan_totals(redis, keys, shard, cursor)
            names = list(found)
            rows = {}
            if names:
                for name, raw in zip(names, redis.hmget(keys.series(shard), names), strict=True):
                    packed = sample(raw, bucket, found[name], self.points)
                    if packed is not None:
                        rows[name] = packed
            pipe = redis.pipeline(transaction=False)
            if rows:
                pipe.hset(keys.series(shard), mapping=rows)
            if cursor == 0:
                pipe.hset(progress, mapping={"done": bucket, "bucket": bucket, "cursor": 0})
            else:
                pipe.hset(progress, mapping={"bucket": bucket, "cursor": cursor})
            pipe.execute()
            if cursor == 0:
                self._drop_forgotten(shard, state.get("orphans", 0))
        finally:
            if redis.get(lock) == self.owner.encode():
                redis.delete(lock)
        if cursor == 0:
            self._done[shard] = bucket
            return True
        return False

    def _drop_forgotten(self, shard: int, cursor: int) -> None:
        """One slice of the series hash per completed sweep: drop agents the detectors forgot."""
        redis, keys = self.client, self.keys
        cursor, pairs = redis.hscan(keys.series(shard), cursor, count=1000)
        names = list(pairs)
        gone = set(names) - known_agents(redis, keys, shard, names)
        if gone:
            redis.hdel(keys.series(shard), *gone)
        redis.hset(keys.series_sweep(shard), "orphans", int(cursor))
