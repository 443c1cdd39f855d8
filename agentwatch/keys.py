"""The Redis key schema: every key agentwatch touches is named here and nowhere else.

Designed for Redis Cluster from day one:

* The three streams the protocol names (``<prefix>:events``, ``<prefix>:alerts``,
  ``<prefix>:deadletter``) carry no hash tag, so Cluster spreads them over the nodes.
* With ``shards = N`` the event stream becomes ``<prefix>:events:0`` ... ``<prefix>:events:N-1``;
  an agent's events always go to shard ``crc32(agent name, UTF-8) mod N`` (IEEE CRC-32, as in
  zlib, Go's ``hash/crc32`` and Node's ``zlib.crc32``), so one agent's events stay in order.
* Detector state for the agents of shard ``k`` lives under the hash tag ``{k}``
  (``<prefix>:{k}:...``). A Lua script only ever touches the keys of one shard, so every
  script's keys share a slot.
* Worker health and counters are plain keys; they are written with pipelines, never in one
  script, so they need no tag.

PROTOCOL.md carries the same table for people writing producers in other languages.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass


def shard_of(agent: str, shards: int) -> int:
    """The shard an agent's events and state belong to (documented in PROTOCOL.md)."""
    if shards <= 1:
        return 0
    return zlib.crc32(agent.encode()) % shards


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names for one deployment (one prefix, one shard count)."""

    prefix: str = "aw"
    shards: int = 1

    # -- streams named by the wire protocol -------------------------------------------------
    def events(self, shard: int = 0) -> str:
        """The event stream of one shard (``<prefix>:events`` when unsharded)."""
        if self.shards <= 1:
            return f"{self.prefix}:events"
        return f"{self.prefix}:events:{shard}"

    def event_streams(self) -> list[str]:
        return [self.events(shard) for shard in range(max(self.shards, 1))]

    def events_for(self, agent: str) -> str:
        return self.events(shard_of(agent, self.shards))

    @property
    def alerts(self) -> str:
        """Every alert ever fired or resolved, trimmed by retention: also the alert history."""
        return f"{self.prefix}:alerts"

    @property
    def deadletter(self) -> str:
        """Entries that could not be decoded or processed, each with its reason and origin."""
        return f"{self.prefix}:deadletter"

    # -- worker runtime ----------------------------------------------------------------------
    def worker(self, consumer: str) -> str:
        """Hash of one worker's health and counters; expires when the worker stops refreshing it."""
        return f"{self.prefix}:worker:{consumer}"

    @property
    def workers(self) -> str:
        """Sorted set of worker consumer names scored by last health refresh (ms)."""
        return f"{self.prefix}:workers"

    @property
    def stats(self) -> str:
        """Hash of pipeline-wide counters since the prefix was created (processed, dead-lettered...)."""
        return f"{self.prefix}:stats"

    # -- per-shard detector state (one hash tag per shard) -------------------------------------
    def tag(self, shard: int) -> str:
        """The common start of every key of one shard: ``<prefix>:{<shard>}``."""
        return f"{self.prefix}:{{{shard}}}"

    def tag_for(self, agent: str) -> str:
        return self.tag(shard_of(agent, self.shards))

    def agent(self, agent: str) -> str:
        """Hash of one agent's state: last seen, interval, run, sequence marks, baselines..."""
        return f"{self.tag_for(agent)}:agent:{agent}"

    def agents(self, shard: int) -> str:
        """Sorted set of the agents of a shard, scored by last time seen (ms): the fleet index."""
        return f"{self.tag(shard)}:agents"

    def incidents(self, shard: int) -> str:
        """Hash ``<agent>/<detector>`` -> JSON of the open incident, for every firing incident."""
        return f"{self.tag(shard)}:incidents"

    def outbox(self, shard: int) -> str:
        """Hash alert id -> alert JSON: alerts decided but not yet on the alerts stream."""
        return f"{self.tag(shard)}:outbox"

    def all_tags(self) -> list[str]:
        return [self.tag(shard) for shard in range(max(self.shards, 1))]
