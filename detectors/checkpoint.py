"""Checkpoints: a shard owner's in-memory agents, saved to Redis under its lease, loaded by the next.

The owner of a shard (detectors/leases.py) keeps every agent of the shard in memory and applies
the shard's events in stream order. Now and then it saves what changed, all in ONE fenced
transaction (:meth:`Checkpoints.save`):

* the changed agents into the shard's ``states`` hash (one packed record per agent,
  :func:`detectors.agent.pack`), forgotten agents deleted from it;
* the checkpoint hash (:meth:`Keys.checkpoint`): the id of the last stream entry applied, the
  engine's meta (its watch clock...) as JSON, when it was saved and under which token;
* the decisions taken since the last save, appended to the shard's ``decided`` list;
* the spend of the agents whose spend changed, and the shard's shares of ``together`` budgets,
  into the shard's spend ledger (agentwatch/spend.py: the hash ``status``, reports and the
  dashboard read), so a window's total counts every beat up to ``last_id`` exactly once.

Because the three go together, a checkpoint is always consistent: the states are exactly those
after applying the stream up to ``last_id``, and every decision those events produced is either
in ``decided`` or already published. The transaction WATCHes the lease key and checks it still
holds the caller's token: a worker that lost its lease (it was frozen, another took over) writes
nothing at all, so it can never overwrite its successor's newer checkpoint with an older one.

The next owner calls :meth:`Checkpoints.load` and carries on from the entry after ``last_id``;
it publishes the ``decided`` ops its predecessor had no time to publish, then drops them with
:meth:`Checkpoints.pop_decided` (fenced as well). Decided ops are opaque bytes here: the engine
chooses their format.
"""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Final

import msgpack
import redis

from agentwatch.keys import Keys
from agentwatch.redisconn import Client, server_time_ms
from agentwatch.spend import GROUPS_FIELD, Tally, unpack_shares, unpack_tally
from detectors.agent import Agent, pack, unpack
from detectors.leases import parse_lease

log = logging.getLogger("agentwatch.detectors.checkpoint")

START_ID: Final = "0-0"
"""``last_id`` of a shard never checkpointed: apply its stream from the beginning."""
SCAN_COUNT: Final = 2000
"""Agents per HSCAN step when loading (each step is one short command, never one huge reply)."""
WRITE_CHUNK: Final = 1000
"""Agents per HSET / HDEL command when saving (all in the same transaction)."""
WATCH_RETRIES: Final = 3
"""A save whose WATCH fired (the lease key was touched, e.g. renewed by another thread of the
same worker) is tried again this many times while the lease is still ours."""

# KEYS: lease, decided. ARGV: token, count, then ops to keep at the head (in order).
# 1 if trimmed, 0 if the lease is not ours.
_POP_DECIDED: Final = """
local lease = redis.call('GET', KEYS[1])
if not lease or string.match(lease, '^[^:]*') ~= ARGV[1] then return 0 end
redis.call('LTRIM', KEYS[2], tonumber(ARGV[2]), -1)
for i = #ARGV, 3, -1 do redis.call('LPUSH', KEYS[2], ARGV[i]) end
return 1
"""


@dataclass(slots=True)
class Loaded:
    """A shard as its last owner left it."""

    agents: dict[str, Agent] = field(default_factory=dict)
    last_id: str = START_ID
    """The last stream entry whose effects the agents contain: apply from the entry after it."""
    meta: dict[str, Any] = field(default_factory=dict)
    """What the engine saved with the checkpoint (its watch clock: ``tick_ms``, ``sight_ms``...)."""
    decided: list[bytes] = field(default_factory=list)
    """Decisions saved but not yet published, oldest first."""
    saved_at: int = 0
    """When the checkpoint was saved (Redis ms); 0 if the shard has none."""
    token: int = 0
    """The fencing token it was saved under."""
    skipped: int = 0
    """Records that could not be read (damaged, or of another layout): those agents start afresh."""
    shares: Tally = field(default_factory=Tally)
    """The shard's shares of the ``together`` budgets."""
    unclaimed: dict[str, Tally] = field(default_factory=dict)
    """Spend of agents the shard has no record of (forgotten ones): theirs again if they return."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@contextmanager
def _no_gc() -> Iterator[None]:
    """The cyclic garbage collector off while a shard loads: every object made then lives on
    (the agents and their states), yet each collection the allocations trigger would walk all of
    them again. Measured (benchmarks/engine_takeover.py): 100,000 agents load 2-3x faster."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _chunks(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


class Checkpoints:
    """Saving and loading the shards' checkpoints (see the module docstring)."""

    def __init__(self, client: Client, keys: Keys) -> None:
        self.client: Any = client  # untyped: redis-py's stubs do not model scripts and pipelines well
        self.keys = keys
        self._pop_decided = self.client.register_script(_POP_DECIDED)
        self.packb = msgpack.Packer(use_bin_type=True).pack
        """One packer for every record this owner saves (a third cheaper than one per record;
        a packer is not shared between threads: each engine has its own Checkpoints)."""

    def load(self, shard: int, state_classes: dict[str, type[Any]]) -> Loaded:
        """Every agent of ``shard`` with its detectors' states, and how far it had got.

        ``state_classes``: detector name -> its ``State`` class. Unreadable records are skipped
        and counted (``skipped``); their agents start afresh, as new ones would. Load the
        checkpoint *after* taking the lease: nobody else writes it then."""
        loaded = Loaded()
        cursor = 0
        states_key = self.keys.states(shard)
        with _no_gc():
            while True:
                cursor, page = self.client.hscan(states_key, cursor, count=SCAN_COUNT)
                for raw_name, raw in page.items():
                    name = _text(raw_name)
                    agent = unpack(name, raw, state_classes)
                    if agent is None:
                        loaded.skipped += 1
                    else:
                        loaded.agents[name] = agent
                if not cursor:
                    break
        if loaded.skipped:
            log.warning(
                "shard %d: %d unreadable agent records skipped (they start afresh)", shard, loaded.skipped
            )
        self._load_spend(shard, loaded)
        point = self.client.hgetall(self.keys.checkpoint(shard))
        fields = {_text(key): value for key, value in point.items()}
        if "last_id" in fields:
            loaded.last_id = _text(fields["last_id"])
            loaded.meta = json.loads(fields.get("meta") or b"{}")
            loaded.saved_at = int(fields.get("saved_at") or 0)
            loaded.token = int(fields.get("token") or 0)
        loaded.decided = list(self.client.lrange(self.keys.decided(shard), 0, -1))
        return loaded

    def _load_spend(self, shard: int, loaded: Loaded) -> None:
        """Each agent's spend from the shard's ledger onto its record (see :class:`Loaded`)."""
        cursor = 0
        agents = loaded.agents
        with _no_gc():
            while True:
                cursor, page = self.client.hscan(self.keys.spend(shard), cursor, count=SCAN_COUNT)
                for raw_name, raw in page.items():
                    name = _text(raw_name)
                    if name == GROUPS_FIELD:
                        loaded.shares = unpack_shares(raw)
                    elif name in agents:
                        agents[name].spent = unpack_tally(raw)
                    else:
                        loaded.unclaimed[name] = unpack_tally(raw)
                if not cursor:
                    break

    def save(
        self,
        shard: int,
        token: int,
        dirty: Iterable[Agent],
        removed: Iterable[str],
        *,
        last_id: bytes | str,
        meta: dict[str, Any],
        decided: list[bytes],
        spend: dict[str, bytes] | None = None,
    ) -> bool:
        """Save the shard's changes in one transaction fenced by the lease (module docstring).

        ``dirty``: agents changed since the last save; ``removed``: agents forgotten since;
        ``meta``: JSON-able; ``decided``: ops to append to the ``decided`` list; ``spend``:
        spend ledger fields to write (agent or :data:`GROUPS_FIELD` -> packed). False (and
        nothing written) if the lease of ``shard`` no longer holds ``token``."""
        packb = self.packb
        records = [(agent.name, pack(agent, packb)) for agent in dirty]
        gone = list(removed)
        lease_key = self.keys.lease(shard)
        saved_at = server_time_ms(self.client)
        point = {"last_id": _text(last_id), "meta": json.dumps(meta, separators=(",", ":")),
                 "saved_at": saved_at, "token": token}  # fmt: skip
        for _ in range(WATCH_RETRIES + 1):
            with self.client.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(lease_key)
                    lease = parse_lease(pipe.get(lease_key))
                    if lease is None or lease[0] != token:
                        return False
                    pipe.multi()
                    for chunk in _chunks(records, WRITE_CHUNK):
                        pipe.hset(self.keys.states(shard), mapping=dict(chunk))
                    for names in _chunks(gone, WRITE_CHUNK):
                        pipe.hdel(self.keys.states(shard), *names)
                    pipe.hset(self.keys.checkpoint(shard), mapping=point)
                    if decided:
                        pipe.rpush(self.keys.decided(shard), *decided)
                    for chunk in _chunks(spend.items() if spend else (), WRITE_CHUNK):
                        pipe.hset(self.keys.spend(shard), mapping=dict(chunk))
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue
        return False

    def pop_decided(self, shard: int, token: int, count: int, keep: Sequence[bytes] = ()) -> bool:
        """Drop the ``count`` oldest decided ops of ``shard`` once they are published, putting
        ``keep`` (ops of those that could not be published, in order) back at the head; False
        (nothing changed) if the lease of ``shard`` no longer holds ``token``."""
        if count <= 0:
            return True
        keys = [self.keys.lease(shard), self.keys.decided(shard)]
        return bool(self._pop_decided(keys=keys, args=[str(token), count, *keep]))
