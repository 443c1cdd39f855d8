"""The fast path: the common segment applied with numpy and one optimistic transaction.

In a healthy fleet almost every segment is *nothing happens*: the next beats and pulses of the
agent's current run, in order, with no incident open and none about to open. For those the
update script (state.py) only does arithmetic on the record: marks, times, totals, the EWMA
baselines, the RSS bucket, the timer. That arithmetic costs ~10 us of Lua per agent; here it
costs well under one, for the whole batch at once:

1. ``WATCH`` the shard's states hash and read the candidates' records (one HMGET).
2. Decode them with a numpy dtype generated from record.FIELDS, and apply each segment exactly
   as ``apply()`` in the update script would, with the same float64 operations in the same order
   (float32 fields rounded the same way, ``pow`` taken from the server itself: :class:`Decays`).
3. Keep a segment only when the script's run of it provably decides nothing: same run, in
   order (seq above the mark), no flag but HAS_RSS set, no retro gap possible whatever the
   shard's clock (the largest gap it could see is within the allowance), no beat or rate
   window that judged one by one could be anomalous (tokens.py ``tok_safe``, so the script
   would fold the beats at once too), no loop, no RSS bucket closing. Everything else (and
   every segment of an agent with two runs in the batch, or without a record) goes to the
   update script, unchanged.
4. ``MULTI``: write the kept records, their timer and fleet-index scores; ``EXEC``. If anything
   wrote the states hash since step 1 (another worker, a timer check, a memory verdict), Redis
   refuses the transaction and the whole set goes to the update script instead.

So a record is only ever written from the exact bytes the script would have read, with the
exact bytes it would have written, and only where the script would have emitted nothing else
(no op, no stack, no RSS window): the fast path is the script, restricted. Every write of a
record (the script, the timer checks, memory verdicts, forgetting) goes through the states hash,
which is what the transaction watches. tests/test_detect_fastpath.py runs random batches through
both and compares records, timers, incidents and alerts byte for byte.

A batch may now land in two steps (this transaction, then the script for the rest); each agent's
update is still atomic, and a batch redelivered after a crash between the two finds the first
step's agents marked as applied (their seq marks), exactly as after a crash of the script.

Why a watched transaction rather than a compare-and-set script per agent: for the benchmark's
1,000 agents a batch, a Lua CAS (read the records inside the script, compare each with the one
read here, write) took ~2 ms of Redis time, because Lua makes a string of every record read
and every record passed in; MULTI/EXEC of the same writes takes ~0.4 ms. The cost of WATCH is
coarser conflicts: a write to *any* agent of the shard in between refuses the whole set, so with
several workers on one shard some batches do this work and then the script's. Correctness is
the same either way.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from itertools import compress
from typing import Any, Final

import numpy as np
from redis.cluster import RedisCluster

from agentwatch.keys import Keys
from detectors import record, resp
from detectors.fastplan import DTYPE, Plan, plan_batch
from detectors.segments import Segments

# The server's pow: KEYS none; ARGV: packed doubles alpha, n, alpha, n, ... -> packed doubles.
_POW: Final = """
local out = {}
for i = 1, #ARGV[1] / 16 do
  local alpha, n = struct.unpack('<dd', ARGV[1], (i - 1) * 16 + 1)
  out[i] = struct.pack('<d', math.pow(1 - alpha, n))
end
return table.concat(out)
"""


class Decays:
    """(1 - alpha)^n as the update script computes it (``math.pow``, the server's libm), cached:
    the EWMA of k beats at once must round exactly as it does there."""

    def __init__(self, client: Any) -> None:
        self._script = client.register_script(_POW)
        self._known: dict[tuple[float, float], float] = {}

    def __call__(self, alpha: np.ndarray, n: np.ndarray) -> np.ndarray:
        pairs = list(zip(alpha.tolist(), n.tolist(), strict=True))
        missing = sorted({pair for pair in pairs if pair not in self._known})
        if missing:
            if len(self._known) > 100_000:  # (alpha, n) pairs repeat; this only bounds the cache
                self._known.clear()
            packed = struct.pack(f"<{2 * len(missing)}d", *(x for pair in missing for x in pair))
            values = struct.unpack(f"<{len(missing)}d", self._script(args=[packed]))
            self._known.update(zip(missing, values, strict=True))
        out: np.ndarray = np.array([self._known[pair] for pair in pairs], dtype=np.float64)
        return out


class FastPath:
    """One per worker engine (see the module docstring)."""

    def __init__(self, client: Any, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self.decays = Decays(client)
        self.applied = 0
        self.refused = 0
        self._scratch = np.empty((0, record.SIZE), dtype=np.uint8)
        self.packer = resp.Packer()
        self._pending: dict[int, tuple[_Link, np.ndarray]] = {}

    def prefetch(self, agents: list[str], shards: dict[int, np.ndarray]) -> None:
        """Start reading the records of every agent of the batch (``shards``: their rows per
        shard), before the batch is folded: Redis reads while Python folds."""
        self.discard()
        for shard, rows in shards.items():
            link = self._read(self.keys.states(shard), [agents[i] for i in rows.tolist()])
            self._pending[shard] = (link, rows)

    def discard(self) -> None:
        """Forget reads :meth:`apply` did not take (a batch that failed half-way)."""
        for link, _ in self._pending.values():
            link.drop()
        self._pending.clear()

    def apply(self, shard: int, segs: Segments, rows: np.ndarray, profiles: np.ndarray) -> np.ndarray:
        """Apply what it can of segments ``rows`` (of ``shard``); returns the rows left for the
        update script, in batch order."""
        chosen = _candidates(segs, rows)
        key = self.keys.states(shard)
        pending = self._pending.pop(shard, None)
        for _ in range(2):  # refused (another worker wrote the shard meanwhile): once more, afresh
            if pending is None:
                if not len(chosen):
                    return rows
                pending = (self._read(key, segs.agents_of(chosen)), chosen)
            (link, read), pending = pending, None
            try:
                link.read()
                raws = link.read()
                kept: np.ndarray | None = chosen[:0]
                if len(chosen):
                    if len(read) != len(chosen):  # records of every row were read: the candidates'
                        raws = [raws[k] for k in np.searchsorted(read, chosen).tolist()]
                    kept = self._write(link, key, shard, segs, chosen, raws, profiles)
                else:
                    link.send([resp.pack(("UNWATCH",))])
                    link.read()
            except BaseException:
                link.drop()
                raise
            link.release()
            if kept is not None:
                self.applied += len(kept)
                return rows[~np.isin(rows, kept)] if len(kept) else rows
            self.refused += 1
        return rows

    def _read(self, key: str, names: list[str]) -> _Link:
        """WATCH the states hash and ask for ``names``' records (read the replies later)."""
        link = _Link(self.client, key)
        try:
            link.send([resp.pack(("WATCH", key)), *self.packer.names(("HMGET", key), names)])
        except BaseException:
            link.drop()
            raise
        return link

    def _write(  # noqa: PLR0917 - one shard's batch
        self,
        link: _Link,
        key: str,
        shard: int,
        segs: Segments,
        chosen: np.ndarray,
        raws: list[Any],
        profiles: np.ndarray,
    ) -> np.ndarray | None:
        """Plan the candidates ``chosen`` on their records ``raws`` and write what is kept in
        one transaction: the rows written, or None if Redis refused the transaction."""
        names = segs.agents_of(chosen)
        size = np.fromiter(
            map(len, raws if None not in raws else [raw or b"" for raw in raws]), np.int64, len(raws)
        )
        found = size == record.SIZE  # absent or of another layout: the script starts it afresh
        if found.all():
            old = np.frombuffer(b"".join(raws), DTYPE)
        else:
            chosen, names = chosen[found], list(compress(names, found.tolist()))
            old = np.frombuffer(b"".join(compress(raws, found.tolist())), DTYPE)
        if len(self._scratch) < len(old):  # reused: a fresh 250 kB buffer per batch is page faults
            self._scratch = np.empty((2 * len(old), record.SIZE), dtype=np.uint8)
        plan = plan_batch(old, segs, chosen, profiles, self.decays, self._scratch)
        if not plan.ok.any():
            link.send([resp.pack(("UNWATCH",))])
            link.read()
            return chosen[:0]
        kept = list(compress(names, plan.ok.tolist()))
        records = plan.records.view(np.uint8).reshape(len(kept), record.SIZE)
        self.packer.begin()
        writes = [self.packer.pairs(("HSET", key), kept, records, name_first=True),
                  *_timer_writes(self.packer, self.keys, shard, kept, plan)]  # fmt: skip
        link.send([resp.pack(("MULTI",)), *(piece for command in writes for piece in command),
                   resp.pack(("EXEC",))])  # fmt: skip
        for _ in range(len(writes) + 1):
            link.read()  # OK, QUEUED...
        replies = link.read()
        if replies is None:  # the states hash changed since WATCH: refused
            return None
        failed = [reply for reply in replies if isinstance(reply, Exception)]
        if failed:  # (a key of the wrong type): say so; the script skips what did land
            raise failed[0]
        written: np.ndarray = chosen[plan.ok]
        return written


class _Link:
    """One connection held for a WATCH ... EXEC exchange; commands go out already packed."""

    def __init__(self, client: Any, key: str) -> None:
        if isinstance(client, RedisCluster):
            client = client.get_redis_connection(client.get_node_from_key(key))  # type: ignore[no-untyped-call]
        self.pool = client.connection_pool
        try:
            self.conn = self.pool.get_connection()
        except TypeError:  # redis-py < 5.3 wants a command name
            self.conn = self.pool.get_connection("MULTI")

    def send(self, pieces: list[Any]) -> None:
        """Packed commands (bytes, or views of a packer's buffer), in one go."""
        self.conn.send_packed_command(pieces)

    def read(self) -> Any:
        return self.conn.read_response()

    def release(self) -> None:
        self.pool.release(self.conn)

    def drop(self) -> None:
        """After a failure half-way: a fresh connection next time (no WATCH or MULTI left over)."""
        self.conn.disconnect()
        self.pool.release(self.conn)


def _candidates(segs: Segments, rows: np.ndarray) -> np.ndarray:
    """Simple segments of agents with one segment in ``rows`` (two runs: the script orders them)."""
    chosen = rows[segs.simple[rows]]
    agents = segs.agents
    if len(set(agents)) == len(agents):
        out: np.ndarray = chosen
        return out
    seen: set[str] = set()
    twice: set[str] = set()
    for i in rows.tolist():
        (twice if agents[i] in seen else seen).add(agents[i])
    once: np.ndarray = np.array([i for i in chosen.tolist() if agents[i] not in twice], dtype=np.int64)
    return once


def _timer_writes(
    packer: resp.Packer, keys: Keys, shard: int, names: list[str], plan: Plan
) -> list[list[Any]]:
    """The timers and fleet-index writes of the kept agents, as the script would make them."""
    out: list[list[Any]] = []
    add, remove, index = plan.due > 0, plan.due < 0, plan.seen > 0
    for chosen, scores, head in ((add, plan.due, ("ZADD", keys.timers(shard))),
                                 (index, plan.seen, ("ZADD", keys.agents(shard), "GT"))):  # fmt: skip
        if chosen.any():
            members = names if chosen.all() else list(compress(names, chosen.tolist()))  # (packer reuses)
            digits = resp.score_digits(scores[chosen])
            if digits is None:
                out.append([resp.pack((*head, *_pairs(scores[chosen], members)))])
            else:
                out.append(packer.pairs(head, members, digits, name_first=False))
    if remove.any():
        out.append(packer.names(("ZREM", keys.timers(shard)), list(compress(names, remove.tolist()))))
    return out


def _pairs(scores: np.ndarray, names: Iterable[str]) -> list[Any]:
    """[score, name, ...] with scores Redis parses back to exactly these doubles."""
    members = list(names)
    out: list[Any] = [None] * (2 * len(members))
    if (scores == np.floor(scores)).all() and (np.abs(scores) < 2**53).all():
        out[0::2] = list(map(str, scores.astype(np.int64).tolist()))
    else:
        out[0::2] = [repr(score) for score in scores.tolist()]
    out[1::2] = members
    return out
