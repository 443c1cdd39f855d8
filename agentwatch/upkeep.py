"""A worker's upkeep: reclaiming what dead consumers left, health and counters, trimming.

These run from the worker's tick, not per entry, so they live apart from the read-process-ack
loop in worker.py: a reader of that loop sees only the hot path.

* **Reclaiming.** XAUTOCLAIM takes over entries another consumer has held unacknowledged for
  ``[worker] claim_idle`` (it died, or hangs), and they are processed like any batch. An entry
  already delivered more than ``max_attempts`` times is dead-lettered instead: it is probably
  what kills workers. Consumers that are idle and own nothing are forgotten after an hour,
  because every worker process joins under a new, unique name.
* **Health.** Every second the worker refreshes ``<prefix>:worker:<consumer>`` (a hash with a
  TTL: a worker that stops refreshing it disappears from ``agentwatch status`` by itself) and
  its score in ``<prefix>:workers``, both stamped with Redis server time (the clock
  ``agentwatch status`` compares them with: a worker host with a skewed clock must not look
  dead), and adds its counter deltas to the pipeline-wide ``<prefix>:stats``. Registry entries
  whose health key has expired (a SIGKILLed worker) are pruned by the workers still alive.
* **Trimming.** Streams are trimmed by age (``[streams] *_retention``), but never past an entry
  that some consumer group has not yet read or acknowledged: trimming must not lose data.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Final

from agentwatch import __version__
from agentwatch.codec import entry_ms

if TYPE_CHECKING:
    from agentwatch.worker import Stats, Worker

log = logging.getLogger("agentwatch.worker")

_FORGET_CONSUMER_IDLE_MS: Final = 3600_000
_PRUNE_EVERY: Final = 10
"""Health refreshes between two prunings of the worker registry."""
_PRUNE_BATCH: Final = 100
_RESETTABLE: Final = (
    "processed", "deadlettered", "reclaimed", "errors", "skipped", "batches", "trimmed_pending", "rejected",
)  # fmt: skip


class Upkeep:
    """The tick-time chores of one :class:`~agentwatch.worker.Worker`."""

    def __init__(self, worker: Worker[Any]) -> None:
        self.w = worker
        self.published: Stats = type(worker.stats)()  # all zero: nothing published yet
        """Counters as last added to ``<prefix>:stats`` (so each publish adds only the delta)."""
        self._refreshes = 0

    def reclaim(self, streams: list[str] | None = None, idle_ms: int | None = None) -> None:
        """Take over entries that a dead (or hung) consumer left pending, and process them.
        ``streams`` and ``idle_ms``: a shard taken over claims all of its stream's pending
        entries at once (detectors/engine.py), whoever holds them."""
        if idle_ms is None:
            idle_ms = int(self.w.opts.claim_idle_s * 1000)
        for stream in self.w.streams if streams is None else streams:
            cursor: bytes | str = "0-0"
            for _ in range(100):  # bounded: at most 100 batches per reclaim round
                reply = self.w.client.xautoclaim(
                    stream, self.w.group, self.w.consumer, idle_ms, cursor, count=self.w.opts.batch
                )
                cursor, claimed = reply[0], reply[1]
                gone = reply[2] if len(reply) > 2 else []
                if gone:
                    self.w.stats.trimmed_pending += len(gone)
                    log.error(
                        "%d pending entries of %s were trimmed before any worker processed them; "
                        "raise [streams] events_retention or add workers",
                        len(gone), stream,
                    )  # fmt: skip
                if claimed:
                    self._process_claimed(stream, [(e[0], e[1]) for e in claimed])
                if cursor in (b"0-0", "0-0"):
                    break
        self._forget_dead_consumers()

    def _process_claimed(self, stream: str, claimed: list[tuple[bytes, Any]]) -> None:
        self.w.stats.reclaimed += len(claimed)
        log.info("reclaimed %d entries of %s from a dead or stuck consumer", len(claimed), stream)
        first, last = claimed[0][0], claimed[-1][0]
        pending = self.w.client.xpending_range(
            stream, self.w.group, min=first, max=last, count=len(claimed), consumername=self.w.consumer
        )
        deliveries = {p["message_id"]: p["times_delivered"] for p in pending}
        entries, dead = [], []
        for entry_id, fields in claimed:
            times = deliveries.get(entry_id, 1)
            if times > self.w.opts.max_attempts:
                reason = f"delivered {times} times without an ack (it may crash workers)"
                dead.append((stream, entry_id, fields, reason))
            else:
                entries.append((stream, entry_id, fields))
        if dead:
            self.w.acknowledge([(s, e, f) for s, e, f, _ in dead], dead)
        self.w.process(entries)

    def _forget_dead_consumers(self) -> None:
        """Consumer names are unique per process, so dead ones pile up; drop the idle, empty ones."""
        for stream in self.w.streams:
            for info in self.w.client.xinfo_consumers(stream, self.w.group):
                name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
                if (
                    name != self.w.consumer
                    and info["pending"] == 0
                    and info["idle"] > _FORGET_CONSUMER_IDLE_MS
                ):
                    self.w.client.xgroup_delconsumer(stream, self.w.group, name)

    def refresh_health(self, now_ms: int) -> None:
        lag = pending = 0
        oldest = 0
        for stream in self.w.streams:
            here = 0
            for info in self.w.client.xinfo_groups(stream):
                if info["name"] in (self.w.group, self.w.group.encode()):
                    lag += int(info.get("lag") or 0)
                    here = int(info["pending"])
            pending += here
            if here:  # this stream's own pending entries, not the running total
                summary = self.w.client.xpending(stream, self.w.group)
                if summary and summary.get("min"):
                    first = entry_ms(summary["min"])
                    oldest = max(oldest, now_ms - first)
        self.w.stats.lag, self.w.stats.pending, self.w.stats.oldest_pending_ms = lag, pending, oldest
        pipe = self.w.client.pipeline(transaction=False)
        self.publish_stats(pipe, now_ms)
        pipe.execute()
        self._refreshes += 1
        if self._refreshes % _PRUNE_EVERY == 1:
            self.prune_registry(now_ms)

    def publish_stats(self, pipe: Any, now_ms: int) -> None:
        """Queue the health hash, the registry score and the counter deltas on ``pipe``.

        ``now_ms`` is Redis server time (what ``agentwatch status`` compares ``seen_ms`` and the
        registry scores with), not this host's clock.
        """
        stats = asdict(self.w.stats)
        handler_errors = stats.pop("handler_errors")
        handler_skipped = stats.pop("handler_skipped")
        broken = stats.pop("broken")
        health = {
            **stats,
            **{f"errors:{name}": count for name, count in handler_errors.items()},
            **{f"skipped:{name}": count for name, count in handler_skipped.items()},
            "broken": ",".join(broken),
            "kind": self.w.kind,
            "group": self.w.group,
            "streams": ",".join(self.w.streams),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "version": __version__,
            "started_ms": self.w.started_ms,
            "seen_ms": now_ms,
            "state": "stopping" if self.w.stopping else "running",
        }
        key = self.w.keys.worker(self.w.consumer)
        pipe.hset(key, mapping=health)
        pipe.pexpire(key, int(self.w.opts.health_ttl_s * 1000))
        pipe.zadd(self.w.keys.workers, {self.w.consumer: now_ms})
        self._publish_totals(pipe)

    def publish_final(self, pipe: Any) -> None:
        """On a graceful stop: the last counter deltas, and out of the registry at once."""
        self._publish_totals(pipe)
        pipe.zrem(self.w.keys.workers, self.w.consumer)
        pipe.delete(self.w.keys.worker(self.w.consumer))

    def _publish_totals(self, pipe: Any) -> None:
        for name in _RESETTABLE:  # pipeline-wide totals: add what changed since the last publish
            delta = getattr(self.w.stats, name) - getattr(self.published, name)
            if delta:
                pipe.hincrby(self.w.keys.stats, f"{self.w.kind}:{name}", delta)
                setattr(self.published, name, getattr(self.w.stats, name))

    def prune_registry(self, now_ms: int) -> None:
        """Drop registry entries of workers whose health key has expired (SIGKILLed, or lost
        with their host): nothing else removes them. An entry is only a candidate once it is
        older than our own health TTL, and is removed only if its health key is gone, so a
        worker with a longer TTL than ours is never dropped while alive."""
        stale_before = now_ms - int(self.w.opts.health_ttl_s * 1000)
        names = self.w.client.zrangebyscore(
            self.w.keys.workers, "-inf", f"({stale_before}", start=0, num=_PRUNE_BATCH
        )
        if not names:
            return
        pipe = self.w.client.pipeline(transaction=False)
        for name in names:
            pipe.exists(self.w.keys.worker(name.decode() if isinstance(name, bytes) else name))
        gone = [name for name, exists in zip(names, pipe.execute(), strict=True) if not exists]
        if gone:
            self.w.client.zrem(self.w.keys.workers, *gone)
            log.info("forgot %d dead worker(s) whose health key expired", len(gone))

    def trim(self, now_ms: int) -> None:
        """Trim by age, but never past what any consumer group has yet to read or acknowledge,
        nor what a handler still needs (``Worker.trim_floor``)."""
        cutoff = now_ms - int(self.w.retention_s * 1000)
        for stream in self.w.streams:
            limit = cutoff
            for info in self.w.client.xinfo_groups(stream):
                limit = min(limit, entry_ms(info["last-delivered-id"]))
                if info["pending"]:
                    summary = self.w.client.xpending(stream, info["name"])
                    if summary.get("min"):
                        limit = min(limit, entry_ms(summary["min"]))
            floor = self.w.trim_floor(stream) if self.w.trim_floor is not None else None
            if floor is not None:
                limit = min(limit, floor)
            if limit > 0:
                self.w.client.xtrim(stream, minid=f"{limit}-0", approximate=True)
