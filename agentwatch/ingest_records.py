"""What a server writing events on agents' behalf keeps in Redis, and the scripts that change it.

agentwatch/ingest.py decides what to write (runs, seqs, signatures); this module is where it is
kept and how it is changed, in one place for both languages involved (Python and the Lua of the
scripts below):

* **Run records.** Per event stream, the hashes :meth:`agentwatch.keys.Keys.ingest` (small
  buckets, :data:`agentwatch.keys.BUCKETS` of them, that Redis keeps as packed listpacks) map
  each agent to one record: ``exp`` (Unix seconds after which the record is stale: ``[http]
  run_ttl`` unused, ``[otlp] forget`` for an OTel agent), ``tat`` (the flood limit's
  theoretical arrival time, ms: GCRA, one number instead of a token bucket's two), ``flags``
  (bit 0: counted toward ``[otlp] max_agents``), then the *numbering*: msgpack ``[run, next
  seq, declared interval or nil, the run has exited]``, which only Python reads.
* **Compare and set.** The writer numbers and signs events in Python (an HMAC cannot be made
  inside Redis), from the record it last saw, and the write script appends them only if the
  record's numbering is still exactly that. Otherwise it writes nothing for that agent and
  returns the record as it is; the writer numbers again from it. So several servers behind a
  load balancer still append one agent's seqs in order, and a server that saw the last write
  itself (the usual case) needs no read before writing: one round trip.
* **Guards.** The same script can compare-and-set fields of the stream's OTLP buckets
  (:meth:`~agentwatch.keys.Keys.otlp`: the receiver's per-process state) before writing
  anything, all or nothing: the events an export becomes are written only if the state they
  were folded from is still the state in Redis.
* **Expiry.** A record carries its expiry instead of a key TTL (a hash field has none before
  Redis 7.4): the writer treats a stale record as absent, and :data:`SWEEP` deletes stale
  records (and processes) in slices, which the HTTP server runs periodically.
"""

from __future__ import annotations

import asyncio
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

import msgpack
from redis.cluster import RedisCluster
from redis.exceptions import NoScriptError

from agentwatch.keys import OTLP_COUNT_FIELD

if TYPE_CHECKING:  # the link (and redis.asyncio) only where an event loop writes: the HTTP server
    from agentwatch.ingest_link import Link

HEADER: Final = struct.Struct(">IdB")
"""``exp`` (uint32 s), ``tat`` (double ms), ``flags`` (uint8): what the scripts read and write."""
COUNTED: Final = 1
"""``flags`` bit: the agent counts toward ``[otlp] max_agents`` (once, in ``#agents``)."""

WRITE_HEAD: Final = 4
"""The write script's arguments before its guards and agents (see below)."""
WRITE_ITEM: Final = 6
"""The write script's arguments per agent."""

# KEYS[1] = the stream, KEYS[2] = its OTLP count hash, then the OTLP bucket of each guard's
# field, then the ingest bucket of each agent (agentwatch/keys.py: every key a script touches is
# one of its KEYS, all in the stream's slot).
# ARGV: 1 stream MAXLEN, 2 ms per flood token, 3 flood burst, 4 number of guards G, then
#   G x (field of its OTLP bucket, expected value ('' = absent), new value ('' = delete)),
#   then per agent: name, expected numbering ('' = no record), new numbering, counted (0/1),
#   ttl ms, entries: one msgpack array d, s, d, s... (s '' = unsigned; raw strings, which Redis's
#   cmsgpack reads: one argument per agent rather than two per event, each of which costs the
#   client more than Redis's unpacking).
# Returns {0, {field, value now, ...}} if a guard failed (nothing written), else {1, then per
# agent: 1 and its new record (written), 2 and its record now ('' = none: numbered from a stale
# record, nothing written), or 3 and ms to wait (flooded, nothing written)}.
WRITE: Final = f"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local guards = tonumber(ARGV[4])
local at, failed = {WRITE_HEAD + 1}, {{}}
for i = 1, guards do
  local cur = redis.call('HGET', KEYS[2 + i], ARGV[at]) or ''
  if cur ~= ARGV[at + 1] then failed[#failed + 1] = ARGV[at]; failed[#failed + 1] = cur end
  at = at + 3
end
if #failed > 0 then return {{0, failed}} end
for i = 1, guards do
  local g = {WRITE_HEAD + 1} + 3 * (i - 1)
  if ARGV[g + 2] == '' then redis.call('HDEL', KEYS[2 + i], ARGV[g])
  else redis.call('HSET', KEYS[2 + i], ARGV[g], ARGV[g + 2]) end
end
local step, burst = tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {{1}}
local key = 2 + guards
while at <= #ARGV do
  key = key + 1
  local agent = ARGV[at]
  local cur = redis.call('HGET', KEYS[key], agent)
  local tat, flags, numbering = 0, 0, ''
  if cur then
    local _
    _, tat, flags = struct.unpack('{HEADER.format}', cur)
    numbering = string.sub(cur, {HEADER.size + 1})
  end
  tat = math.max(tat, now)
  if numbering ~= ARGV[at + 1] then
    out[#out + 1] = 2; out[#out + 1] = cur or ''
  elseif tat - now > (burst - 1) * step then
    out[#out + 1] = 3; out[#out + 1] = math.ceil(tat - now - (burst - 1) * step)
  else
    local entries = cmsgpack.unpack(ARGV[at + 5])
    for i = 1, #entries, 2 do
      if entries[i + 1] == '' then redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'd', entries[i])
      else redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'd', entries[i], 's', entries[i + 1]) end
    end
    if ARGV[at + 3] == '1' and flags % 2 == 0 then
      flags = flags + {COUNTED}
      redis.call('HINCRBY', KEYS[2], '{OTLP_COUNT_FIELD}', 1)
    end
    local record = struct.pack('{HEADER.format}', math.ceil((now + tonumber(ARGV[at + 4])) / 1000),
      tat + step, flags) .. ARGV[at + 2]
    redis.call('HSET', KEYS[key], agent, record)
    out[#out + 1] = 1; out[#out + 1] = record
  end
  at = at + {WRITE_ITEM}
end
return out
"""
WRITE_KEYS: Final = 2
"""The write script's keys before its guards' and agents' buckets: the stream, its count hash."""

# KEYS[1] = an ingest bucket of a stream, KEYS[2] = its OTLP bucket of the same number, KEYS[3]
# = the stream's OTLP count hash. ARGV: 1 and 2 the buckets' HSCAN cursors ('-' = done), 3
# COUNT. Deletes the records and processes whose exp (the first 4 bytes of every value) has
# passed, uncounting counted agents. Returns {cursor 1, cursor 2, deleted}.
SWEEP: Final = f"""
local now = tonumber(redis.call('TIME')[1])
local deleted = 0
local function sweep(key, cursor, agents)
  if cursor == '-' then return '-' end
  local found = redis.call('HSCAN', key, cursor, 'COUNT', ARGV[3])
  local items = found[2]
  for i = 1, #items, 2 do
    local value = items[i + 1]
    if #value >= 4 and struct.unpack('>I', value) < now then
      redis.call('HDEL', key, items[i])
      deleted = deleted + 1
      if agents and #value >= {HEADER.size} and string.byte(value, {HEADER.size}) % 2 == {COUNTED} then
        if redis.call('HINCRBY', KEYS[3], '{OTLP_COUNT_FIELD}', -1) < 0 then
          redis.call('HSET', KEYS[3], '{OTLP_COUNT_FIELD}', 0)
        end
      end
    end
  end
  if found[1] == '0' then return '-' end
  return found[1]
end
return {{sweep(KEYS[1], ARGV[1], true), sweep(KEYS[2], ARGV[2], false), deleted}}
"""


@dataclass(slots=True)
class Record:
    """One agent's run record as Redis holds it (see the module docstring). Never changed once
    made, and compared by identity (not frozen: that costs a microsecond per write)."""

    numbering: bytes
    """What the write script compares: the part the writer decides from (msgpack, after the
    header; the header itself is never compared, so it is not kept)."""
    exp_s: int
    counted: bool
    run: str
    seq: int
    """The seq the next event gets."""
    interval_s: float | None
    ended: bool

    @classmethod
    def parse(cls, raw: bytes) -> Record | None:
        """A stored record, or None for one this version cannot read (treated as absent: the
        agent starts a new run, as after an expiry)."""
        try:
            exp_s, _tat, flags = HEADER.unpack_from(raw)
            run, seq, interval, ended = msgpack.unpackb(raw[HEADER.size :])
            return cls(raw[HEADER.size :], int(exp_s), bool(flags & COUNTED), str(run), int(seq),
                       None if interval is None else float(interval), bool(ended))  # fmt: skip
        except (struct.error, ValueError, TypeError):
            return None


def numbering(
    run: str, seq: int, interval_s: float | None, ended: bool, pack: Callable[[Any], bytes] | None = None
) -> bytes:
    """The numbering part of a record (msgpack: an integral interval packs in one byte).
    ``pack``: a reused ``msgpack.Packer().pack`` (``packb`` makes a packer per call, which costs
    as much as the packing; the writer's lock guards its own)."""
    pack = pack or msgpack.packb
    if interval_s is not None and interval_s.is_integer():
        return pack([run, seq, int(interval_s), ended])
    return pack([run, seq, interval_s, ended])


def predicted(
    before: Record | None, new_numbering: bytes, *, exp_s: int, run: str, seq: int, interval_s: float | None,
    ended: bool,
) -> Record:  # fmt: skip
    """The record a write will leave if it succeeds (``new_numbering`` is :func:`numbering` of
    the other arguments), for a write prepared before its reply (the next write of the same
    agent is numbered after it). Its expiry is a guess (the script sets it from Redis time)."""
    counted = before.counted if before is not None else False
    return Record(new_numbering, exp_s, counted, run, seq, interval_s, ended)


def stored(expected: Record, raw: bytes) -> Record:
    """The record the write script stored (``raw``) for a write numbered as ``expected``: the
    same numbering (the script stores the one it was given), its header from Redis."""
    numbered = expected.numbering
    if len(raw) != HEADER.size + len(numbered) or not raw.endswith(numbered):
        found = Record.parse(raw)  # cannot happen with this script; read it whole if it does
        assert found is not None
        return found
    exp_s, _tat, flags = HEADER.unpack_from(raw)
    return Record(numbered, int(exp_s), bool(flags & COUNTED), expected.run, expected.seq,
                  expected.interval_s, expected.ended)  # fmt: skip


class _Missing:
    """The type of :data:`MISSING`."""

    __slots__ = ()


MISSING: Final = _Missing()
"""What :meth:`Cache.get` returns for a name the cache does not hold."""

K = TypeVar("K")
V = TypeVar("V")


class Cache(Generic[K, V]):
    """What this server last saw, most recent last, at most ``size`` entries. Thread-safe when
    callers hold :attr:`lock` (HTTP requests and OTLP exports share a writer's)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[K, V] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, name: K) -> V | _Missing:
        """The value, or :data:`MISSING` when this server does not know it."""
        value = self._items.get(name, MISSING)
        if value is not MISSING:
            self._items.move_to_end(name)
        return value

    def replace(self, name: K, expected: V, value: V) -> None:
        """Hold ``value`` instead of ``expected``, if the cache still holds that one, where it is
        (a write's reply replaces the record its preparation put, just now, at the end)."""
        items = self._items
        if items.get(name) is expected:
            items[name] = value

    def put(self, name: K, value: V) -> None:
        self._items[name] = value
        self._items.move_to_end(name)
        if len(self._items) > self.size:
            self._items.popitem(last=False)

    def drop(self, name: K) -> None:
        self._items.pop(name, None)


@dataclass(slots=True)
class Call:
    """One run of a script: its keys and arguments. Never changed once made (not frozen: a
    frozen dataclass's ``__init__`` costs twice as much, and the ping API makes one per ping)."""

    keys: list[str]
    args: list[Any]


def pack_entries(pairs: list[bytes], pack: Callable[[Any], bytes] | None = None) -> bytes:
    """One agent's ``d, s, d, s...`` as the write script takes them (msgpack raw strings).
    ``pack``: a :func:`raw_packer` the caller reuses (a packer per call costs more than the packing)."""
    packed: bytes = (pack or raw_packer())(pairs)
    return packed


def raw_packer() -> Callable[[Any], bytes]:
    """A reusable packer for :func:`pack_entries` (not thread-safe: the writer's lock guards it)."""
    pack: Callable[[Any], bytes] = msgpack.Packer(use_bin_type=False).pack
    return pack


def run_calls(client: Any, script: Any, calls: Sequence[Call]) -> list[Any]:
    """Run ``calls`` of ``script`` (a registered redis-py Script) in one round trip, in order,
    each reply or error in its place. A server that lost the script (restarted without
    persistence) ran none of the calls that failed for it: they are run again after loading it.
    A cluster client runs them one by one (its pipelines cannot reload a script)."""
    if isinstance(client, RedisCluster):
        replies: list[Any] = []
        for call in calls:
            try:
                replies.append(script(keys=call.keys, args=call.args))
            except Exception as exc:  # each call's own error, like a pipeline's
                replies.append(exc)
        return replies
    replies = _pipeline(client, script, calls)
    missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
    if missing:
        script.sha = client.script_load(script.script)
        for i, reply in zip(missing, _pipeline(client, script, [calls[i] for i in missing]), strict=True):
            replies[i] = reply
    return replies


async def arun_calls(
    link: Link, script: Any, calls: Sequence[Call], replies: list[Any] | None = None
) -> list[Any]:
    """:func:`run_calls` on the event loop's own connection (agentwatch/ingest_link.py).
    ``replies``: those of a first round trip already made (:class:`Batches` makes it without
    a coroutine); only the script's reload, if it needs one, is left to do."""
    if replies is None:
        replies = await link.execute(evalshas(script, calls))
    missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
    if missing:
        (sha,) = await link.execute([("SCRIPT", "LOAD", script.script)])
        script.sha = sha.decode() if isinstance(sha, bytes) else sha
        again = await link.execute(evalshas(script, [calls[i] for i in missing]))
        for i, reply in zip(missing, again, strict=True):
            replies[i] = reply
    return replies


def evalshas(script: Any, calls: Sequence[Call]) -> list[tuple[Any, ...]]:
    """The ``EVALSHA`` commands that run ``calls`` of ``script``."""
    return [("EVALSHA", script.sha, len(call.keys), *call.keys, *call.args) for call in calls]


def _pipeline(client: Any, script: Any, calls: Sequence[Call]) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    for call in calls:
        pipe.evalsha(script.sha, len(call.keys), *call.keys, *call.args)
    replies: list[Any] = pipe.execute(raise_on_error=False)
    return replies


_Waiting = list[tuple["Call", asyncio.Future[Any]]]
"""Writes waiting for their replies: each call, and the future its request awaits."""


class Batches:
    """Coalesces the writes of concurrent requests: while one batch is in flight, the writes
    that arrive wait for it and go together in the next one, joined into as few script calls
    as they allow (:func:`merged`). One request alone still goes at once; a busy server makes
    fewer, larger round trips instead of queueing one round trip per request. Each write gets
    its own reply or its own error. With a ``link`` the round trips go from the event loop
    itself (agentwatch/ingest_link.py); without (a Redis Cluster), through ``client`` in a
    worker thread.

    No task runs the batches: a batch's replies are handed out by a callback on its round
    trip's future, which sends the next batch at once (a task woken per round trip, and its
    chain of coroutines resumed, cost the ping API more CPU than the round trip's packing and
    parsing). Only the rare slow ways, the thread's and a script reloaded after NOSCRIPT, run
    a coroutine."""

    def __init__(self, client: Any, script: Any, max_batch: int = 256, link: Link | None = None) -> None:
        self.client = client
        self.script = script
        self.max_batch = max_batch
        self.link = link
        self._pending: _Waiting = []
        self._busy = False
        """A batch is in flight, or about to go (its writes are gathering)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        """The slow ways' tasks, kept until done (the event loop keeps only weak references)."""

    def submit(self, call: Call) -> asyncio.Future[Any]:
        """The reply to ``call`` (or its error), to await: a plain function returning a future,
        not a coroutine, which would cost every ping another frame. The running loop is looked
        up once per round trip, not per write (CPython 3.11 pays a ``getpid`` system call for it)."""
        loop = self._loop
        if not self._busy or loop is None or loop.is_closed():
            self._loop = loop = asyncio.get_running_loop()
            self._busy = False
        future: asyncio.Future[Any] = loop.create_future()  # the batch's loop: the caller's
        self._pending.append((call, future))
        if not self._busy:
            self._busy = True
            loop.call_soon(self._send)  # the writes of this turn of the loop go together
        return future

    def _send(self) -> None:
        """Send the writes waiting, as one batch; or, none waiting, stop until the next."""
        if not self._pending:
            self._busy = False
            return
        batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
        try:
            joined = merged([c for c, _ in batch])
        except Exception as exc:  # a fault here, not Redis': this batch's writes get it, the next still go
            self._answer(batch, [exc] * len(batch))
            return
        loop = self._loop
        assert loop is not None
        if self.link is not None:
            deliver = partial(self._replied, batch, joined)
            try:
                self.link.send(evalshas(self.script, joined.calls), loop, deliver)
            except Exception as exc:  # not sent (an argument hiredis cannot pack): the batch's error
                self._replied(batch, joined, exc)
        else:
            done = loop.run_in_executor(None, run_calls, self.client, self.script, joined.calls)
            done.add_done_callback(partial(self._threaded, batch, joined))

    def _threaded(self, batch: _Waiting, joined: Joined, done: asyncio.Future[Any]) -> None:
        """:meth:`_replied` for a round trip made in a worker thread (cancelled: the loop is closing)."""
        self._replied(
            batch, joined, asyncio.CancelledError() if done.cancelled() else done.exception() or done.result()
        )

    def _replied(
        self, batch: _Waiting, joined: Joined, replies: list[Any] | BaseException, reloaded: bool = False
    ) -> None:
        """Hand each write of ``batch`` its reply (or the round trip's error), then send the next batch."""
        may_reload = self.link is not None and not reloaded and isinstance(replies, list)  # (threads reload)
        if may_reload and any(isinstance(reply, NoScriptError) for reply in replies):  # type: ignore[union-attr]
            self._reload(batch, joined, replies)  # type: ignore[arg-type]  # loaded again, then run again
            return
        try:
            if isinstance(replies, BaseException):
                raise replies
            answers = joined.split(replies)
        except Exception as exc:  # each waiting request gets the error (Redis away, say)
            answers = [exc] * len(batch)
        self._answer(batch, answers)

    def _answer(self, batch: _Waiting, answers: list[Any]) -> None:
        """Hand each write of ``batch`` its answer, then send the next batch."""
        for (_, future), answer in zip(batch, answers, strict=True):
            if not future.done():  # else the request was cancelled (its client went away)
                future.set_result(answer)
        self._send()

    def _reload(self, batch: _Waiting, joined: Joined, replies: list[Any]) -> None:
        """Load the script again (the server lost it), run the calls that failed for it, then
        hand out the replies: a coroutine, the slow way, as it happens once per server restart."""
        link = self.link
        assert link is not None  # a thread's round trip reloads the script itself (run_calls)

        async def reloading() -> None:
            done: list[Any] | BaseException
            try:
                done = await arun_calls(link, self.script, joined.calls, replies)
            except Exception as exc:
                done = exc
            self._replied(batch, joined, done, reloaded=True)

        task = asyncio.ensure_future(reloading())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


@dataclass(slots=True)
class Joined:
    """What :func:`merged` made of a list of calls: the calls to run, and for each original
    call, which of them carries its agents and at which agent they start there."""

    calls: list[Call]
    origin: list[tuple[int, int, int]]
    """Per original call: (index in :attr:`calls`, first agent there, its number of agents)."""

    def split(self, replies: Sequence[Any]) -> list[Any]:
        """The reply each original call would have had on its own (an error: the same error)."""
        out: list[Any] = []
        for index, first, agents in self.origin:
            reply = replies[index]
            if isinstance(reply, BaseException) or int(reply[0]) == 0:
                out.append(reply)  # a guard's failure is only ever a call's own (never joined)
            else:
                out.append([reply[0], *reply[1 + 2 * first : 1 + 2 * (first + agents)]])
        return out


def merged(calls: Sequence[Call]) -> Joined:
    """``calls`` of the write script with those that have no guards and the same stream and head
    (one stream, the same limits: concurrent pings) joined into one call (their agents' buckets
    appended to its keys). The script writes its agents one after the other, in order, so a
    joined call does what the calls did one by one, and one script call of 16 agents costs the
    client far less than 16 calls of one (each call is packed, sent, parsed and answered on its
    own)."""
    out: list[Call] = []
    origin: list[tuple[int, int, int]] = []
    joinable: dict[tuple[Any, ...], int] = {}
    for call in calls:
        head = call.args[:WRITE_HEAD]
        agents = (len(call.args) - WRITE_HEAD) // WRITE_ITEM
        key = (*call.keys[:WRITE_KEYS], *head)
        at = joinable.get(key) if int(head[3]) == 0 else None  # guards: all or nothing, alone
        if at is None:
            if int(head[3]) == 0:
                joinable[key] = len(out)
            out.append(Call(list(call.keys), list(call.args)))
            origin.append((len(out) - 1, 0, agents))
        else:
            first = (len(out[at].args) - WRITE_HEAD) // WRITE_ITEM
            out[at].keys.extend(call.keys[WRITE_KEYS:])
            out[at].args.extend(call.args[WRITE_HEAD:])
            origin.append((at, first, agents))
    return Joined(out, origin)
