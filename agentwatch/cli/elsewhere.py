"""What ``status`` adds about the wiring: where the Redis URL came from, events nobody reads,
events dropped as repeats.

The mistakes a new user makes are silent ones: agents without ``AGENTWATCH_PREFIX`` write to
``aw:events`` while the pipeline reads ``nc1:events``, and every view shows an empty fleet; a
hand-written producer repeats its ``seq`` and every event after the first is dropped as a
redelivery. Neither is an error anywhere, so ``status`` looks for them:

* event streams of *other* prefixes on the same Redis (``SCAN`` for ``*:events*`` stream keys,
  bounded by :data:`SCAN_BUDGET` keys) whose newest entry is recent and that no consumer group
  keeps up with: events arriving that no pipeline reads. A stream some other pipeline reads
  (another deployment sharing the server) is not mentioned;
* the detectors' count of events dropped because their ``seq`` was not above their run's highest
  (``duplicates`` in each shard's clock hash, detectors/engine.py).
"""

from __future__ import annotations

import re
from typing import Any, Final

import redis

from agentwatch.cli.common import origin_of
from agentwatch.config import Pipeline
from agentwatch.keys import PREFIX_RE, Keys
from agentwatch.redisconn import Client, describe

SCAN_BUDGET: Final = 20_000
"""Keys ``SCAN`` may walk looking for other event streams: a few ms on a shared server."""
RECENT_S: Final = 3600.0
"""A stream whose newest entry is older than this is an old experiment, not a live mistake."""
UNREAD_S: Final = 30.0
"""A reader this far behind the newest entry is not keeping up: not a pipeline reading it."""
_STREAM_KEY: Final = re.compile(rf"^({PREFIX_RE.pattern}):events(?::(\d+))?$")


def unread_streams(client: Client, prefix: str, now_ms: int) -> list[dict[str, Any]]:
    """Event streams of other prefixes with recent entries that no consumer group has read."""
    found = []
    try:
        candidates = _event_keys(client)
    except redis.ResponseError:  # an ACL user without SCAN: nothing to say, rather than no status
        return []
    for key in candidates:
        match = _STREAM_KEY.match(key)
        if match is None or match.group(1) == prefix:
            continue
        try:
            newest: Any = client.xrevrange(key, count=1)
            if not newest:
                continue
            newest_ms = _id_ms(newest[0][0])
            age_s = max(0.0, (now_ms - newest_ms) / 1000)
            if age_s > RECENT_S or _read_by_someone(client, key, newest_ms):
                continue
        except redis.ResponseError:  # NOPERM: another deployment's keys, out of this user's reach
            continue
        found.append({"stream": key, "prefix": match.group(1), "newest_age_s": round(age_s, 1)})
    return sorted(found, key=lambda s: s["newest_age_s"])


def _event_keys(client: Client) -> list[str]:
    """Stream keys named like event streams, walking at most about :data:`SCAN_BUDGET` keys."""
    found: list[Any] = []
    if isinstance(client, redis.Redis):
        cursor, walked = 0, 0
        while walked < SCAN_BUDGET:
            cursor, batch = client.scan(cursor, match="*:events*", count=1000, _type="STREAM")
            found += batch
            walked += 1000
            if not cursor:
                break
    else:  # a cluster client walks every node in turn
        for raw in client.scan_iter(match="*:events*", count=1000, _type="STREAM"):
            found.append(raw)
            if len(found) >= SCAN_BUDGET // 10:
                break
    return [raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw) for raw in found]


def _read_by_someone(client: Client, key: str, newest_ms: int) -> bool:
    """Whether a consumer group keeps up with the stream: it has been handed entries up to within
    :data:`UNREAD_S` of the newest (a pipeline that reads it, perhaps another deployment's). A
    group left behind by a pipeline that moved to another prefix does not count."""
    try:
        groups: Any = client.xinfo_groups(key)
    except redis.ResponseError:
        return False
    for group in groups:
        last = group.get("last-delivered-id") or group.get(b"last-delivered-id") or b"0-0"
        if newest_ms - _id_ms(last) <= UNREAD_S * 1000:
            return True
    return False


def duplicates_dropped(client: Client, keys: Keys) -> int:
    """Events the detectors dropped since the prefix was created because their ``seq`` was not
    above their run's highest (PROTOCOL.md, "Redelivery")."""
    pipe: Any = client.pipeline(transaction=False)
    for shard in range(max(keys.shards, 1)):
        pipe.hget(keys.clock(shard), "duplicates")
    return sum(int(value or 0) for value in pipe.execute())


def wiring(client: Client, pipeline: Pipeline, now_ms: int) -> dict[str, Any]:
    """The ``status --json`` fields: ``redis`` (url, source), ``unread_streams``, ``duplicates_dropped``."""
    settings = pipeline.settings
    origin = origin_of(client)
    url, source = origin if origin else (settings.redis.url or "", "")
    return {
        "redis": {"url": describe(url) if url else "", "source": source, "prefix": settings.redis.prefix},
        "unread_streams": unread_streams(client, settings.redis.prefix, now_ms),
        "duplicates_dropped": duplicates_dropped(client, Keys(settings.redis.prefix, settings.redis.shards)),
    }


def wiring_notes(document: dict[str, Any]) -> list[str]:
    """The text ``status`` prints under its board for :func:`wiring`'s fields."""
    lines = []
    where = document.get("redis") or {}
    if where.get("url"):
        # The source may be a long file path: on a line of its own, indented, so the board fits.
        lines.append(f"redis: {where['url']}, prefix {where['prefix']!r}")
        if where.get("source"):
            lines.append(f"    from {where['source']}")
    ours = where.get("prefix", "aw")
    for stream in document.get("unread_streams", []):
        lines.append(
            f"note: events are arriving on prefix {stream['prefix']!r} ({stream['stream']}, newest "
            f"{stream['newest_age_s']:g}s ago) but this pipeline reads {ours!r} and nobody reads "
            f"that stream: set AGENTWATCH_PREFIX={ours} in the agents (or [redis] prefix = "
            f'"{stream["prefix"]}" here)'
        )
    dropped = document.get("duplicates_dropped", 0)
    if dropped:
        lines.append(
            f"note: {dropped:,} events dropped as repeats: their seq was not above the highest of their "
            'run (a redelivery, or a producer that does not count seq up: PROTOCOL.md, "Redelivery")'
        )
    return lines


def _id_ms(entry_id: Any) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    try:
        return int(text.split("-", 1)[0])
    except ValueError:
        return 0
