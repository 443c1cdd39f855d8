"""Redis ACL roles: who may read or write each key of keys.py, in one table.

``agentwatch acl`` turns :data:`ACCESS` into one Redis user per role (``<prefix>-<role>``), so a
key added to keys.py later gets a role by adding one row here (tests/test_acl.py fails until it
has one). Key patterns are not written by hand: each comes from calling the ``Keys`` method with
``*`` for every argument, in both the unsharded and the sharded spelling.

The roles (docs/security.md has the threat model):

* **producer** - what every agent holds, so the narrowest: ``XADD`` to the event streams and
  reading its halt state (a Redis 7 selector), nothing else; it cannot even read the events.
* **detector** / **notifier** - the workers: read and write their own keys, read what reports
  need; neither can write the other's queue, and only they read the pipeline secret.
* **operator** - read-only views (``status``, ``alerts``, ``report``): reads every key but the
  secret, writes nothing.
* **http** - the HTTP server (dashboard, ping API, OTLP): the operator's reads, plus writing
  events (ingest), mutes and halts, and the (signed) alerts of the halts and the OTLP agent cap.

Administrative commands (``mute``, ``forget``, ``halt``, ``acl --apply``) run with an admin
credential (the default user, or your own), which this table does not describe.
"""

from __future__ import annotations

import inspect
from typing import Final

from agentwatch.keys import Keys

ROLES: Final = ("producer", "detector", "notifier", "operator", "http")
R: Final = "r"
RW: Final = "rw"

_WORKERS_RW: Final = {"detector": RW, "notifier": RW, "operator": R, "http": R}
_DETECTOR_STATE: Final = {"detector": RW, "notifier": R, "operator": R, "http": R}
"""Per-shard state: written by detectors; read by status, reports (notifiers send scheduled ones)."""
_NOTIFIER_STATE: Final = {"notifier": RW, "operator": R, "http": R}

ACCESS: Final[dict[str, dict[str, str]]] = {
    # streams of the protocol
    "events": {"producer": RW, "detector": RW, "notifier": R, "operator": R, "http": RW},
    "alerts": {"detector": RW, "notifier": RW, "operator": R, "http": RW},
    "deadletter": _WORKERS_RW,
    # worker runtime
    "worker": _WORKERS_RW,
    "workers": _WORKERS_RW,
    "stats": _WORKERS_RW,
    "secret": {"detector": RW, "notifier": RW, "http": R},  # never the operator
    # per-shard detector state; incidents and outbox also by whatever else raises alerts: notifiers
    # (restart_loop) and the HTTP server (halts from the dashboard, the OTLP agent cap)
    "incidents": {"detector": RW, "notifier": RW, "operator": R, "http": RW},
    "outbox": {"detector": RW, "notifier": RW, "operator": R, "http": RW},
    "states": _DETECTOR_STATE,
    "clock": _DETECTOR_STATE,
    "detector": _DETECTOR_STATE,
    "facts": _DETECTOR_STATE,
    "snapshot": _DETECTOR_STATE,
    "spend": _DETECTOR_STATE,
    "snapshots": _DETECTOR_STATE,
    "snapshot_progress": _DETECTOR_STATE,
    "snapshot_lock": _DETECTOR_STATE,
    "series": _DETECTOR_STATE,
    "series_sweep": _DETECTOR_STATE,
    "series_lock": _DETECTOR_STATE,
    # the engine's shard leases and checkpoints (detectors/leases.py, detectors/checkpoint.py);
    # status shows who owns which shard
    "lease": _DETECTOR_STATE,
    "epoch": _DETECTOR_STATE,
    "checkpoint": _DETECTOR_STATE,
    "decided": _DETECTOR_STATE,
    "engines": _DETECTOR_STATE,
    # events the HTTP server writes for an agent (ping API, OTLP): its run, seq and flood bucket;
    # the OTLP receiver's per-process state and count of OTel agents
    "ingest": {"http": RW, "operator": R},
    "otlp": {"http": RW, "operator": R},
    "otlp_count": {"http": RW, "operator": R},
    # notifiers
    "notifier_queue": _NOTIFIER_STATE,
    "notifier_jobs": _NOTIFIER_STATE,
    "notifier_retrying": _NOTIFIER_STATE,
    "notifier_leases": _NOTIFIER_STATE,
    "notifier_order": _NOTIFIER_STATE,
    "notifier_seen": _NOTIFIER_STATE,
    "notifier_limits": _NOTIFIER_STATE,
    "notifier_repeat": _NOTIFIER_STATE,
    "notifier_repeat_alerts": _NOTIFIER_STATE,
    "notifier_held": _NOTIFIER_STATE,
    "notifier_groups": _NOTIFIER_STATE,
    "notifier_groups_due": _NOTIFIER_STATE,
    "notifier_group_members": _NOTIFIER_STATE,
    "notifier_starts": _NOTIFIER_STATE,
    "notify_failed": _NOTIFIER_STATE,
    "notify_log": _NOTIFIER_STATE,
    "notify_audit": _NOTIFIER_STATE,
    "notify_stats": _NOTIFIER_STATE,
    "reports_sent": _NOTIFIER_STATE,
    "mutes": {"detector": R, "notifier": R, "operator": R, "http": RW},
    # maintenance windows: set by the CLI (admin); notifiers read them and delete ones a day over
    "maintenance": {"notifier": RW, "operator": R, "http": R},
    "dependents": _NOTIFIER_STATE,  # silences held for a parent that is down (notifiers/holds.py)
    # the brake: every producer polls its stream's copy; detectors expire halts, the CLI (admin)
    # and the HTTP server set them
    "halts": {"producer": R, "detector": RW, "notifier": R, "operator": R, "http": RW},
}
"""``Keys`` member -> role -> access. A role not named has no access to the key."""

HELPERS: Final = frozenset({"prefix", "shards", "event_streams", "events_for", "tag", "tag_for", "all_tags",
                            "notifier_tag", "halts_for", "all_halts", "ingest_for", "otlp_for"})  # fmt: skip
"""``Keys`` members that build names or list keys rather than name one key."""

_HANDSHAKE: Final = "+ping +echo +select +hello +client|setname +client|getname +client|id +time"
_PRODUCER_READS: Final = "+hget +hmget +hgetall +hexists"
"""What a producer reads its halts with (producers/_halts.py): ``HGET`` of the epoch, ``HGETALL``."""
COMMANDS: Final[dict[str, str]] = {
    "producer": f"+xadd {_HANDSHAKE}",
    "detector": "+@read +@write +@scripting +@transaction +@connection +time -@dangerous -@admin -function "
    "-script|flush",
    "notifier": "+@read +@write +@scripting +@transaction +@connection +time -@dangerous -@admin -function "
    "-script|flush",
    "operator": "+@read +@connection +time -@dangerous -@admin",
    "http": "+@read +@write +@scripting +@transaction +@connection +time -@dangerous -@admin -function "
    "-script|flush",
}
"""Commands per role. Keys decide where a command may read or write; the producer, whose
credential is on every agent's host, also gets only the commands it needs."""

DESCRIPTIONS: Final = {
    "producer": "agents: XADD to the event streams, read their halt state; nothing else",
    "detector": "detector workers: read events, write detector state and alerts",
    "notifier": "notifier workers: read alerts, write delivery state and the journal",
    "operator": "people and scripts: read-only views (status, alerts, report)",
    "http": "the HTTP server: the operator's reads, plus events (ping, OTLP), mutes, halts and their alerts",
}


class _AnyShard(Keys):
    """The sharded spelling, with every per-agent route leading to the wildcard shard."""

    def events_for(self, agent: str) -> str:
        return self.events("*")  # type: ignore[arg-type]

    def tag_for(self, agent: str) -> str:
        return self.tag("*")  # type: ignore[arg-type]

    def halts_for(self, agent: str) -> str:
        return self.halts("*")  # type: ignore[arg-type]

    def ingest_for(self, agent: str) -> str:
        return self.ingest("*", "*")  # type: ignore[arg-type]

    def otlp_for(self, shard: int, process: bytes) -> str:
        return self.otlp("*", "*")  # type: ignore[arg-type]


def user_name(prefix: str, role: str) -> str:
    return f"{prefix}-{role}"


def patterns(keys: Keys, member: str) -> list[str]:
    """Every glob pattern of the key(s) ``member`` names, unsharded and sharded alike."""
    attribute = getattr(Keys, member)
    found = set()
    for spelled in (Keys(keys.prefix, 1), _AnyShard(keys.prefix, 2)):
        if isinstance(attribute, property):
            found.add(getattr(spelled, member))
        else:
            arguments = len(inspect.signature(attribute).parameters) - 1  # self
            found.add(getattr(spelled, member)(*["*"] * arguments))
    return sorted(found)


def rules(keys: Keys, role: str) -> list[str]:
    """The ``ACL SETUSER`` rules (after ``resetkeys resetchannels -@all``) of one role."""
    reads, writes = [], []
    for member, access in ACCESS.items():
        level = access.get(role)
        if level == RW:
            writes += patterns(keys, member)
        elif level == R:
            reads += patterns(keys, member)
    if role == "producer":  # writes: the event streams; reads only through a selector
        return [*(f"~{p}" for p in writes), *COMMANDS[role].split(),
                "(" + " ".join([*(f"%R~{p}" for p in reads), *_PRODUCER_READS.split()]) + ")"]  # fmt: skip
    return [*(f"~{p}" for p in writes), *(f"%R~{p}" for p in reads), *COMMANDS[role].split()]
