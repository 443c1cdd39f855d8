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

import re
import zlib
from dataclasses import dataclass
from typing import Final

PREFIX_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,32}")
"""What a key prefix may be (``[redis] prefix``, ``AGENTWATCH_PREFIX``): safe in every key name and
in the producer's environment. The producer imports it from here (no pydantic on its side)."""


HALT_EPOCH_FIELD: Final = "#epoch"
"""Field of the halts hash whose value every change replaces (producers poll it). ``#`` appears
in no agent name nor in any pattern ``agentwatch halt`` accepts, so it collides with neither."""

DETECTORS_GROUP: Final = "detectors"
NOTIFIERS_GROUP: Final = "notifiers"
"""Consumer groups of the detector workers (on event streams) and of the notifier workers (on the
alerts stream). Here, at the bottom, because detectors read their group's position too
(detectors/horizon.py); agentwatch.workers re-exports them."""

OTLP_COUNT_FIELD: Final = "#agents"
"""Field of a stream's OTLP count hash (:meth:`Keys.otlp_count`) counting the stream's agents
known through OTLP."""

BUCKETS: Final = 32
"""Hashes per event stream holding the run records (:meth:`Keys.ingest`), and as many holding
the OTLP process states (:meth:`Keys.otlp`). Small hashes stay listpacks (a packed array, a few
bytes per field) up to Redis's ``hash-max-listpack-entries`` (512 by default; Debian's
redis.conf says 128): 32 of them keep 10,000 agents (the ``[otlp] max_agents`` default) of one
stream listpacks at 512, 4,096 at 128. Beyond, or once one of its fields or values passes
``hash-max-listpack-value`` (64 bytes: an agent name or run id of more than about 40
characters), a bucket becomes a hashtable, as one big hash would (about twice the bytes per
field), and nothing else changes. Part of the key layout every
server behind a load balancer must share (PROTOCOL.md)."""


def bucket_of(field: bytes) -> int:
    """The bucket of a hash field: bits 16-20 of its IEEE CRC-32 (``shard_of`` takes the low
    bits of the same CRC modulo the shard count; other bits keep a stream's agents spread over
    all its buckets)."""
    return (zlib.crc32(field) >> 16) % BUCKETS


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
        """Hash of one worker's health and counters (``errors:<handler>``, ``skipped:<handler>``,
        ``broken`` among them); expires when the worker stops refreshing it."""
        return f"{self.prefix}:worker:{consumer}"

    @property
    def workers(self) -> str:
        """Sorted set of worker consumer names scored by their last health refresh, in Redis
        server time (ms): compare it with TIME, never with a host clock. Live workers prune the
        entries whose health key has expired (upkeep.py)."""
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

    def incidents(self, shard: int) -> str:
        """Hash ``<agent>/<detector>`` -> JSON of the open incident, for every firing incident."""
        return f"{self.tag(shard)}:incidents"

    def outbox(self, shard: int) -> str:
        """Hash alert id -> alert JSON: alerts decided but not yet on the alerts stream."""
        return f"{self.tag(shard)}:outbox"

    def states(self, shard: int) -> str:
        """Hash agent -> that agent's checkpointed state: the shared fields and every detector's
        State, one msgpack list (detectors/agent.py ``pack``; ``read_agents`` decodes it).
        Written by the shard's owner with each checkpoint; read by views and by a new owner."""
        return f"{self.tag(shard)}:states"

    def clock(self, shard: int) -> str:
        """Hash of counters about the shard: ``duplicates`` (repeated events dropped), and for
        the pipeline agent's shard ``trimmed`` (events trimmed unread, detectors/lag.py)."""
        return f"{self.tag(shard)}:clock"

    def lease(self, shard: int) -> str:
        """String ``<token>:<owner>`` with a PX expiry: the engine worker that owns this shard now
        (detectors/leases.py). Only the owner applies the shard's events and publishes its
        decisions; every write it makes is fenced by the token."""
        return f"{self.tag(shard)}:lease"

    def epoch(self, shard: int) -> str:
        """Counter INCRed on every acquisition of the shard's lease: the fencing token, so a
        later owner always holds a higher one than any earlier owner."""
        return f"{self.tag(shard)}:epoch"

    def checkpoint(self, shard: int) -> str:
        """Hash ``last_id``, ``meta`` (JSON), ``saved_at`` (ms), ``token``: how far the shard's
        owner had applied its stream when it last saved the agents' states (detectors/checkpoint.py)."""
        return f"{self.tag(shard)}:checkpoint"

    def decided(self, shard: int) -> str:
        """List of decisions saved with a checkpoint and not yet published (opaque bytes, oldest
        first): a new owner publishes what its predecessor decided but did not get out."""
        return f"{self.tag(shard)}:decided"

    @property
    def engines(self) -> str:
        """Sorted set of live engine workers (lease owners) scored by when their registration
        expires (Redis ms): each computes its fair share of shards from how many are alive."""
        return f"{self.prefix}:engines"

    def detector(self, shard: int, name: str) -> str:
        """Hash agent -> state of the plugin detector ``name`` (for detectors of your own)."""
        return f"{self.tag(shard)}:det:{name}"

    # -- notifiers (notifiers/): per-notifier delivery state under the tag ``{n:<name>}`` ----------
    # The delivery scripts touch only the keys of one notifier, so those share one Cluster slot;
    # the streams and hashes below them are written with plain commands and carry no tag.
    def notifier_tag(self, notifier: str) -> str:
        """The common start of every delivery-state key of one notifier."""
        return f"{self.prefix}:{{n:{notifier}}}"

    def notifier_queue(self, notifier: str) -> str:
        """Sorted set delivery id -> when it is next due (ms); a claimed one is pushed out by its lease."""
        return f"{self.notifier_tag(notifier)}:queue"

    def notifier_jobs(self, notifier: str) -> str:
        """Hash delivery id -> JSON of the pending delivery (the alert, attempts, last error)."""
        return f"{self.notifier_tag(notifier)}:jobs"

    def notifier_retrying(self, notifier: str) -> str:
        """Sorted set delivery id -> when its last attempt failed (ms): the deliveries waiting to
        be tried again, so ``status`` counts them without reading every pending delivery."""
        return f"{self.notifier_tag(notifier)}:retrying"

    def notifier_leases(self, notifier: str) -> str:
        """Hash delivery id -> token of the worker delivering it now; ``n:<id>`` counts its claims."""
        return f"{self.notifier_tag(notifier)}:leases"

    def notifier_order(self, notifier: str) -> str:
        """Hash keeping deliveries of one dedup key in order: ``head:<dedup_key>``, ``after:<id>``,
        ``next:<id>`` (a resolve never overtakes the trigger it closes)."""
        return f"{self.notifier_tag(notifier)}:order"

    def notifier_seen(self, notifier: str) -> str:
        """Sorted set alert id -> when it was queued (ms): de-duplicates redelivered alerts."""
        return f"{self.notifier_tag(notifier)}:seen"

    def notifier_limits(self, notifier: str) -> str:
        """Hash of the notifier's rate-limit bucket (``tokens``, ``tokens_at``) and ``paused_until``."""
        return f"{self.notifier_tag(notifier)}:limits"

    def notifier_repeat(self, notifier: str) -> str:
        """Sorted set dedup key -> when the next reminder of a still-firing incident is due (ms)."""
        return f"{self.notifier_tag(notifier)}:repeat"

    def notifier_repeat_alerts(self, notifier: str) -> str:
        """Hash dedup key -> JSON of the firing alert a reminder repeats, with the reminder count."""
        return f"{self.notifier_tag(notifier)}:repeat-alerts"

    def notifier_held(self, notifier: str) -> str:
        """Hash dedup key -> JSON of the firing alert a mute held back, delivered when the mute ends."""
        return f"{self.notifier_tag(notifier)}:held"

    def notifier_groups(self, notifier: str) -> str:
        """Hash group id (``<detector>|<label>=<value>,...``) -> JSON of an alert group of this
        notifier: its members, which are still open, whether it was sent (notifiers/grouping.py)."""
        return f"{self.notifier_tag(notifier)}:groups"

    def notifier_group_members(self, notifier: str) -> str:
        """Hash alert dedup key -> id of the group its open incident is in (resolves find their
        group by it, whatever labels they carry)."""
        return f"{self.notifier_tag(notifier)}:group-members"

    def notifier_groups_due(self, notifier: str) -> str:
        """Sorted set group id -> when the group's next notification is due (ms)."""
        return f"{self.notifier_tag(notifier)}:groups-due"

    def notifier_starts(self, notifier: str) -> str:
        """Hash agent -> JSON list of restart times (ms) within the start-limit window (restart)."""
        return f"{self.notifier_tag(notifier)}:starts"

    @property
    def notify_failed(self) -> str:
        """Stream of deliveries that failed for good: notifier, alert, HTTP status, body snippet."""
        return f"{self.prefix}:notify:failed"

    @property
    def notify_log(self) -> str:
        """Stream of delivery outcomes (delivered, muted, stale, failed, skipped), capped by length."""
        return f"{self.prefix}:notify:log"

    @property
    def notify_audit(self) -> str:
        """Stream of restart-notifier actions: argv, exit status, output tail, or why it held off."""
        return f"{self.prefix}:notify:audit"

    @property
    def notify_stats(self) -> str:
        """Hash ``<notifier>:<outcome>`` -> count, for ``agentwatch status``."""
        return f"{self.prefix}:notify:stats"

    # -- the brake (agentwatch/halts.py, producers/_halts.py) ----------------------------------------
    def halts(self, shard: int = 0) -> str:
        """Hash of the halts in force: ``<agent or glob>`` -> JSON (reason, by, at_ms, until_ms),
        and ``#epoch`` -> a token replaced on every change. One copy per event stream, named
        with the stream as its hash tag (``<prefix>:halt:{<prefix>:events}``): it shares the
        stream's Cluster slot, so a producer reads it on the connection its events take."""
        return f"{self.prefix}:halt:{{{self.events(shard)}}}"

    def halts_for(self, agent: str) -> str:
        return self.halts(shard_of(agent, self.shards))

    def all_halts(self) -> list[str]:
        return [self.halts(shard) for shard in range(max(self.shards, 1))]

    @property
    def secret(self) -> str:
        """String: the pipeline secret the workers generated because none is configured
        (``[security] secret``); alerts are signed with a key derived from it. Only the detector
        and notifier roles may read it (agentwatch/acl.py)."""
        return f"{self.prefix}:secret"

    @property
    def mutes(self) -> str:
        """Hash ``<agent glob>|<detector or *>`` -> JSON of a mute (until when, why, by whom)."""
        return f"{self.prefix}:mutes"

    @property
    def maintenance(self) -> str:
        """Hash window id -> JSON of an ad-hoc maintenance window (``agentwatch maintenance
        start``): whom it covers, from and until when, why and by whom (agentwatch/maintenance.py)."""
        return f"{self.prefix}:maintenance"

    @property
    def dependents(self) -> str:
        """Hash ``<agent>/silence`` -> JSON of a silence held because an agent it depends on is
        down: the parent, since when, and when its fresh allowance ends (agentwatch/dependencies.py)."""
        return f"{self.prefix}:dependents"

    # -- fleet facts and rollups (agentwatch/facts.py, agentwatch/rollups.py) ----------------------
    def facts(self, shard: int) -> str:
        """Hash agent -> JSON of its latest run's start facts (run, host, pid, version, interval,
        started_ms) and when it was first seen (first_ms): for status, reports and restarts."""
        return f"{self.tag(shard)}:facts"

    def spend(self, shard: int) -> str:
        """Hash agent -> its spend ledger (agentwatch/spend.py): USD and unpriced beats per
        calendar window, saved by the shard's owner with each checkpoint (that keeps each
        event counted once); and ``#g`` -> the shard's shares of the ``scope = "together"``
        budgets (``<glob>|<window>`` -> the same three numbers)."""
        return f"{self.tag(shard)}:spend"

    def snapshot(self, shard: int, bucket_ms: int) -> str:
        """Hash agent -> packed totals (beats, tokens, cost) as of the bucket's start; expires."""
        return f"{self.tag(shard)}:snap:{bucket_ms}"

    def snapshots(self, shard: int) -> str:
        """Sorted set of the buckets whose snapshot is complete (member and score: bucket ms)."""
        return f"{self.tag(shard)}:snaps"

    def snapshot_progress(self, shard: int) -> str:
        """Hash ``bucket``, ``cursor``: a snapshot being taken in slices, and the lock on it."""
        return f"{self.tag(shard)}:snapping"

    def snapshot_lock(self, shard: int) -> str:
        """String, TTL: the worker taking the current snapshot slice (one at a time per shard)."""
        return f"{self.tag(shard)}:snapping:lock"

    # -- events written on an agent's behalf (agentwatch/ingest.py: HTTP ping API, OTLP) ------------
    # All these keys carry the stream's name as their hash tag (as the halts do): one script
    # numbers an agent's events, appends them and keeps what it must remember, in one Cluster
    # slot. Records and process states are fields of BUCKETS small hashes per stream, not one
    # key per agent (a key costs its key object, dict entry and expiry entry) nor one hash per
    # stream (past Redis's hash-max-listpack-entries, 512 fields unless configured, a hash turns
    # into a hashtable: ~190 B per OTel agent instead of ~100, benchmarks/otlp_ingest.py).
    # Records carry their own expiry, and the HTTP server sweeps expired ones
    # (agentwatch/ingest_records.py).
    def ingest(self, shard: int = 0, bucket: int = 0) -> str:
        """Hash (one of :data:`BUCKETS` per stream, :func:`bucket_of` the agent) agent -> the run
        record of an agent whose events a server writes: its current run, next ``seq``, declared
        interval, whether the run has exited, its flood state and expiry (``[http] run_ttl``
        unused; ``[otlp] forget`` for an OTel agent), and whether it counts toward ``[otlp]
        max_agents``. Format in agentwatch/ingest_records.py."""
        return f"{self.prefix}:ingest:{{{self.events(shard)}}}:{bucket}"

    def ingest_for(self, agent: str) -> str:
        return self.ingest(shard_of(agent, self.shards), bucket_of(agent.encode()))

    def otlp(self, shard: int = 0, bucket: int = 0) -> str:
        """Hash (one of :data:`BUCKETS` per stream, :func:`bucket_of` the field) of the OTLP
        receiver (agentwatch/otlp/receiver.py): one field per exporting process (a 12-byte hash
        of its resource) -> what its spans left for the next export and its metrics' cadence and
        totals (agentwatch/otlp/state.py), expiring after ``[otlp] forget`` without an export."""
        return f"{self.prefix}:otlp:{{{self.events(shard)}}}:{bucket}"

    def otlp_for(self, shard: int, process: bytes) -> str:
        return self.otlp(shard, bucket_of(process))

    def otlp_count(self, shard: int = 0) -> str:
        """Hash ``#agents`` -> how many of this stream's agents count toward ``[otlp]
        max_agents`` (one number per stream, kept by the scripts that count and uncount)."""
        return f"{self.prefix}:otlp:{{{self.events(shard)}}}"

    def series(self, shard: int) -> str:
        """Hash agent -> packed per-bucket beats, tokens, cost and RSS over ``[http] series_span``
        (agentwatch/series.py): the dashboard's charts."""
        return f"{self.tag(shard)}:series"

    def series_sweep(self, shard: int) -> str:
        """Hash ``bucket``, ``cursor``, ``done``, ``orphans``: the series sweep in progress."""
        return f"{self.tag(shard)}:series:sweep"

    def series_lock(self, shard: int) -> str:
        """String, TTL: the worker taking the current series sweep (one at a time per shard)."""
        return f"{self.tag(shard)}:series:sweep:lock"

    @property
    def reports_sent(self) -> str:
        """Hash schedule slot -> when its scheduled report was queued to the notifiers (ms)."""
        return f"{self.prefix}:reports"

    def all_tags(self) -> list[str]:
        return [self.tag(shard) for shard in range(max(self.shards, 1))]
