"""Shard leases: each event shard has at most one owner worker at a time, fenced by a token.

The engine keeps every agent's state in memory, so two workers must never apply the same shard's
events at once: each would decide on half the truth. A worker therefore *leases* a shard before
it reads the shard's stream:

* The lease is one string key per shard (:meth:`Keys.lease`), ``<token>:<owner>``, with a PX
  expiry of ``lease_ms``. The owner renews it on every :meth:`ShardLeases.refresh`; a worker
  that dies, hangs or is frozen (SIGSTOP) past its lease simply stops renewing, Redis expires the
  key and another worker takes the shard.
* The token comes from a per-shard counter (:meth:`Keys.epoch`) INCRed on every acquisition, so
  a later owner always holds a higher token. Every write the owner makes to shared state (a
  checkpoint, an alert) first checks, in the same atomic step, that the lease still holds its
  token (*fencing*). A holder that wakes up after losing its lease can therefore neither renew
  it nor write anything: it finds the shard in ``lost`` at its next refresh.
* Workers share the shards fairly: each registers in a sorted set of live engines
  (:attr:`Keys.engines`) scored by when its registration expires, counts the live ones, and
  holds at most ``ceil(shards / live)``. A newcomer takes free shards; a worker above its share
  releases its extras, which the others then take. A worker that stops gracefully releases
  everything (:meth:`ShardLeases.release_all`) so the others take over at once, not after the
  lease runs out.

Losing a shard never loses anything: its new owner loads the last checkpoint and applies the
stream from the entry after it (detectors/checkpoint.py). The only cost of a handover is that
replay, so a worker releasing extras gives its engine a last chance to checkpoint first
(``before_release``).

The few Lua scripts here are compare-and-set steps on one shard's lease (same hash tag, so they
run on Redis Cluster too); no detector logic lives in Lua.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import Any, Final

from agentwatch.keys import Keys
from agentwatch.redisconn import Client

# KEYS: lease, epoch. ARGV: owner, lease ms. The new token, or 0 if someone holds the lease.
_ACQUIRE: Final = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token .. ':' .. ARGV[1], 'PX', ARGV[2])
return token
"""
# KEYS: lease. ARGV: our value, lease ms. 1 if renewed, 0 if the lease is not ours any more.
_RENEW: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
# KEYS: lease. ARGV: our value. 1 if released, 0 if it was not ours.
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""


def lease_value(token: int, owner: str) -> str:
    """What the lease key holds: the token first, so a fence can compare it without the owner."""
    return f"{token}:{owner}"


def parse_lease(raw: bytes | str | None) -> tuple[int, str] | None:
    """(token, owner) of a lease key's value, or None for no lease (or not one of ours)."""
    if raw is None:
        return None
    text = raw.decode() if isinstance(raw, bytes) else raw
    token, sep, owner = text.partition(":")
    if not sep or not token.isdigit():
        return None
    return int(token), owner


class ShardLeases:
    """The leases one engine worker (``owner``, unique per process) holds on the event shards."""

    def __init__(self, client: Client, keys: Keys, owner: str, lease_ms: int) -> None:
        if ":" in owner:
            raise ValueError(f"a lease owner may not contain ':' (got {owner!r})")
        if lease_ms < 1:
            raise ValueError("lease_ms must be positive")
        self.client: Any = client  # untyped: redis-py's stubs do not model scripts well
        self.keys = keys
        self.owner = owner
        self.lease_ms = lease_ms
        self.held: dict[int, int] = {}
        """Shard -> our fencing token, for every shard we believe we hold."""
        self._acquire = self.client.register_script(_ACQUIRE)
        self._renew = self.client.register_script(_RENEW)
        self._release = self.client.register_script(_RELEASE)

    @property
    def shards(self) -> int:
        return max(self.keys.shards, 1)

    def holds(self, shard: int) -> bool:
        return shard in self.held

    def fence(self, shard: int) -> tuple[str, str] | None:
        """(lease key, our token) for a fenced write to ``shard`` (``Incidents.fire(fence=...)``,
        :meth:`detectors.checkpoint.Checkpoints.save`); None if we do not hold it."""
        token = self.held.get(shard)
        return None if token is None else (self.keys.lease(shard), str(token))

    def refresh(
        self, now_ms: int, before_release: Callable[[int, int], None] | None = None
    ) -> tuple[set[int], set[int]]:
        """Renew, rebalance and take leases; call it well within ``lease_ms`` (a third of it).

        ``now_ms``: Redis server time (the live-engine scores are compared with it, never with a
        host clock). Returns (gained, lost): shards newly ours (load their checkpoint before
        applying anything), and shards no longer ours (drop their agents from memory; any
        fenced write to them is refused already). A shard can be in both: our lease ran out
        (we were frozen) and we took it again under a new token; another owner may have
        applied events meanwhile, so handle ``lost`` first (drop), then ``gained`` (load).
        ``before_release(shard, token)`` is called for each extra shard we are about to give up,
        while it is still ours (a last checkpoint)."""
        lost: set[int] = set()
        for shard, token in sorted(self.held.items()):
            if not self._renew(
                keys=[self.keys.lease(shard)], args=[lease_value(token, self.owner), self.lease_ms]
            ):
                lost.add(shard)
        for shard in lost:
            del self.held[shard]
        share = math.ceil(self.shards / self._live_engines(now_ms))
        for shard in sorted(self.held, reverse=True)[: max(len(self.held) - share, 0)]:
            if before_release is not None:
                before_release(shard, self.held[shard])
            self._give_up(shard)
            lost.add(shard)
        gained: set[int] = set()
        for shard in self._candidates():
            if len(self.held) >= share:
                break
            token = int(self._acquire(keys=[self.keys.lease(shard), self.keys.epoch(shard)],
                                      args=[self.owner, self.lease_ms]))  # fmt: skip
            if token:
                self.held[shard] = token
                gained.add(shard)
        return gained, lost

    def release_all(self) -> None:
        """Graceful stop: give every shard up and leave the live set, so the other workers take
        the shards at their next refresh instead of after the lease runs out."""
        for shard in list(self.held):
            self._give_up(shard)
        self.client.zrem(self.keys.engines, self.owner)

    def owners(self) -> dict[int, dict[str, Any]]:
        """Every leased shard -> ``{"owner", "token", "ms_left"}`` (for ``agentwatch status``)."""
        pipe = self.client.pipeline(transaction=False)
        for shard in range(self.shards):
            pipe.get(self.keys.lease(shard))
            pipe.pttl(self.keys.lease(shard))
        replies = pipe.execute()
        found: dict[int, dict[str, Any]] = {}
        for shard in range(self.shards):
            lease = parse_lease(replies[2 * shard])
            if lease is not None:
                found[shard] = {
                    "owner": lease[1],
                    "token": lease[0],
                    "ms_left": max(int(replies[2 * shard + 1]), 0),
                }
        return found

    def _give_up(self, shard: int) -> None:
        token = self.held.pop(shard)
        self._release(keys=[self.keys.lease(shard)], args=[lease_value(token, self.owner)])

    def _live_engines(self, now_ms: int) -> int:
        """Register ourselves until ``now_ms + lease_ms``, forget engines whose registration ran
        out, and count the rest (at least one: us)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(self.keys.engines, {self.owner: now_ms + self.lease_ms})
        pipe.zremrangebyscore(self.keys.engines, "-inf", now_ms)
        pipe.zcard(self.keys.engines)
        return max(int(pipe.execute()[-1]), 1)

    def _candidates(self) -> list[int]:
        """Shards we do not hold, starting at an owner-dependent place: workers starting together
        try different shards first instead of all racing for shard 0."""
        start = zlib.crc32(self.owner.encode()) % self.shards
        order = [(start + step) % self.shards for step in range(self.shards)]
        return [shard for shard in order if shard not in self.held]
