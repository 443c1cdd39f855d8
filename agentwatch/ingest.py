"""Writing protocol events on an agent's behalf: the HTTP ping API and the OTLP receiver.

An agent that embeds the producer numbers its own events: a run id per process start, a
``seq`` from 0, each signed with its agent key when the pipeline asks for it. An agent known
only through HTTP (a cron job with ``curl``, a span exporter) has no process of ours to keep
that state, and several ``agentwatch serve`` may stand behind a load balancer, so the state
lives in Redis, one record per agent (agentwatch/ingest_records.py), and this writer does what
the producer would have done:

* **Run.** The first call for an agent, an explicit ``start``, a run that has exited, a record
  gone stale (``[http] run_ttl`` unused; ``[otlp] forget`` for OTel agents), or a run named by
  the caller that is not the current one, begin a new run: the events written then open with a
  ``start`` (carrying the interval the agent declared, remembered across runs), exactly what a
  producer sends when a process starts. So the detectors treat an HTTP agent like any other.
* **Seq and signature.** The writer numbers the events from the record it last saw, signs them
  with the agent's key (``[security] agent_keys``: the key ``agentwatch agent-key`` prints,
  derived from ``[security] secret``, so the detectors accept them like a signed producer's),
  and one script appends them only if the record is still the one they were numbered from
  (compare and set). Another server wrote in between: the script says so and returns the
  record, and the writer numbers again. Seqs reach the stream in order however many servers
  write for one agent, and a server that made the last write itself needs no read: one round
  trip per call.
* **Interval.** A call that declares a new interval for a running run is preceded by a
  ``pulse`` carrying it (PROTOCOL.md: pulses repeat the interval), so the silence allowance
  follows without starting a new run.
* **Flood limit.** Per agent, ``rate`` calls per second, ``burst`` at once, on Redis time,
  shared by every server; a refused call writes nothing and says when to come back.

Events from a ping are validated with the protocol's own codec before anything is written, so
a bad input costs nothing and nothing written here can become a dead letter. Events the OTLP
receiver builds (``trusted``) are made of values it has already bounded (agentwatch/otlp/
values.py), and are not checked twice.

**Several agents, one call.** The OTLP receiver writes all of an export's agents of one stream
in one call (:meth:`EventWriter.commit`), each agent's events costing one flood token, together
with compare-and-set guards on its own per-process state (the stream's OTLP buckets), so an export
is one round trip.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

import msgpack

from agentwatch import __version__, codec
from agentwatch.errors import AgentwatchError, InvalidEntry
from agentwatch.ingest_records import (
    SWEEP,
    WRITE,
    Batches,
    Cache,
    Call,
    Record,
    _Missing,
    numbering,
    pack_entries,
    predicted,
    raw_packer,
    run_calls,
    stored,
)
from agentwatch.keys import BUCKETS, OTLP_COUNT_FIELD, Keys, bucket_of, shard_of
from agentwatch.redisconn import Client
from agentwatch.signing import Signer, agent_key
from producers._config import DEFAULT_MAXLEN

if TYPE_CHECKING:
    from agentwatch.ingest_link import Link

Kind = Literal["start", "beat", "pulse", "exit"]

SOURCE_VERSION: Final = f"agentwatch-http/{__version__}"
"""The ``version`` fact of runs started here (``status`` shows it), unless the caller names one."""
CONTENDED_FOR_S: Final = 5.0
"""How long a write may keep losing to other writers of its agent before it gives up (each lost
attempt means another writer succeeded). A time, not a count of attempts: on a loaded machine a
writer can lose many attempts in a row, each to a writer that was already numbering while it
waited for the CPU; a ping or an OTLP exporter still gets its answer well within its own timeout."""
BACKOFF_CAP_S: Final = 0.02
"""The longest random pause before a contended write tries again (see :func:`retry_pause_s`)."""


def retry_pause_s(attempt: int, since: float, agent: str) -> float:
    """A random pause before attempt ``attempt + 1`` of a write of ``agent`` another writer beat,
    first tried at ``since`` (``time.monotonic()``): up to 0.25 ms after the first loss, doubling
    to :data:`BACKOFF_CAP_S`. Raises :class:`Contended` once the write has been losing for
    :data:`CONTENDED_FOR_S`. Without the jitter, writers hammering one agent (servers behind a
    load balancer, an exporter's retries) starve one of them: one writer lost 50 attempts in a
    row. Jitter spreads the retries, as in any compare-and-set loop."""
    if time.monotonic() - since > CONTENDED_FOR_S:
        raise Contended(
            f"{agent}: its record changed under every attempt for {CONTENDED_FOR_S:g}s; retry later"
        )
    return random.uniform(0.0, min(BACKOFF_CAP_S, 0.00025 * 2 ** (attempt - 1)))


CACHE_SIZE: Final = 100_000
"""Agents whose record a server remembers (about 200 bytes each); others are read first."""
SWEEP_COUNT: Final = 1000


class Flooded(AgentwatchError):
    """The agent sent more than its flood limit allows; nothing was written."""

    def __init__(self, agent: str, retry_after_s: float) -> None:
        self.agent = agent
        self.retry_after_s = retry_after_s
        super().__init__(f"{agent}: too many events; retry in {retry_after_s:.1f}s")


class Contended(AgentwatchError):
    """Other writers changed the agent's record before every attempt of this one; nothing was
    written, and the caller should retry later (503)."""


@dataclass(slots=True)
class Written:
    """What one call put on the agent's stream. Never changed once made (not frozen: that costs
    a microsecond per write, a hundredth of a ping)."""

    run: str
    seq: int
    """The seq of the last event written (the call's own event)."""
    started: bool
    """A new run began with this call (a ``start`` event led)."""
    events: int


@dataclass(frozen=True, slots=True)
class FloodLimit:
    rate_per_s: float
    burst: int


@dataclass(slots=True)
class Item:
    """One agent's events in one write."""

    agent: str
    events: Sequence[tuple[Kind, Mapping[str, Any]]]
    run: str | None = None
    """A run named by the caller (``service.instance.id``): when it is not the current run, a new
    run begins with it. None: the current run, or a new random one."""
    interval_s: float | None = None
    start_facts: Mapping[str, Any] | None = None
    ttl_s: float | None = None
    """How long the record outlives its last use (None: ``[http] run_ttl``)."""
    counted: bool = False
    """The agent counts toward ``[otlp] max_agents`` (an OTel agent)."""
    trusted: bool = False
    """Built from values already bounded (OTLP): not validated again."""


@dataclass(slots=True)
class Group:
    """One script call: agents of one stream, and guards on that stream's OTLP buckets (field,
    value expected or None for absent, new value or None to delete), all or nothing."""

    shard: int
    items: list[Item] = field(default_factory=list)
    guards: list[tuple[bytes, bytes | None, bytes | None]] = field(default_factory=list)


@dataclass(slots=True)
class Result:
    """What became of a :class:`Group`: the guards that failed (with the values in Redis now;
    nothing was written), or one outcome per item."""

    conflicts: dict[bytes, bytes | None] = field(default_factory=dict)
    outcomes: list[Written | Flooded] = field(default_factory=list)


@dataclass(slots=True)
class _Prepared:
    item: Item
    before: Record | None
    expected: Record
    args: list[Any]
    written: Written
    bucket: int
    """The agent's bucket (:func:`agentwatch.keys.bucket_of`)."""


_STALE: Final = object()


class _ScriptKeys:
    """The key names the write script takes for one stream, made once: the stream and its count
    hash first, then one bucket per guard and per agent, picked from these."""

    __slots__ = ("head", "ingest", "otlp")

    def __init__(self, keys: Keys, shard: int) -> None:
        self.head = (keys.events(shard), keys.otlp_count(shard))
        self.ingest = [keys.ingest(shard, bucket) for bucket in range(BUCKETS)]
        self.otlp = [keys.otlp(shard, bucket) for bucket in range(BUCKETS)]


class EventWriter:
    """Writes protocol events for agents that do not run a producer (see the module docstring).

    Thread-safe; one instance serves every request of a server. Redis errors propagate (the
    caller answers 503, ``Retry-After``): nothing is buffered here, because an HTTP client that
    is told "try later" keeps the event and the truth.
    """

    def __init__(
        self,
        client: Client,
        keys: Keys,
        *,
        limit: FloodLimit,
        run_ttl_s: float,
        maxlen: int = DEFAULT_MAXLEN,
        version: str = SOURCE_VERSION,
        secret: str | None = None,
        cache_size: int = CACHE_SIZE,
        link: Link | None = None,
    ) -> None:
        self.client: Any = client
        self.keys = keys
        self.limit = limit
        self.run_ttl_s = run_ttl_s
        self.maxlen = maxlen
        self.version = version
        self.secret = secret
        """``[security] secret`` when ``agent_keys`` is on: events are signed per agent."""
        self.records: Cache[str, Record | None] = Cache(cache_size)
        """Each agent's record as this server last saw it (its lock also guards the encoder)."""
        self._signers: Cache[str, Signer] = Cache(cache_size)
        self._encode = codec.encoder()
        self._pack_raw = raw_packer()
        self._pack_numbering: Callable[[Any], bytes] = msgpack.Packer().pack
        self._write = self.client.register_script(WRITE)
        self._sweep = self.client.register_script(SWEEP)
        self.link = link
        self._script_keys: dict[int, _ScriptKeys] = {}
        self._batches = Batches(self.client, self._write, link=link)
        """:meth:`awrite`'s round trips: on ``link`` from the event loop when given (the HTTP
        server's, agentwatch/ingest_link.py), else through ``client`` in a worker thread."""

    # -- one agent, one call: the ping API ---------------------------------------------------
    def write(
        self,
        agent: str,
        kind: Kind,
        fields: Mapping[str, Any] | None = None,
        *,
        interval_s: float | None = None,
        start_facts: Mapping[str, Any] | None = None,
    ) -> Written:
        """Write one ``kind`` event (with ``fields``) for ``agent``, led by a ``start`` when a
        run begins, or by a ``pulse`` when ``interval_s`` changes the declared interval.

        Raises :class:`agentwatch.errors.InvalidEntry` (a bad name or field; nothing written),
        :class:`Flooded`, :class:`Contended`, or a Redis error."""
        item = Item(agent, [(kind, fields or {})], interval_s=interval_s, start_facts=start_facts)
        (result,) = self.commit([Group(shard_of(agent, self.keys.shards), [item])])
        return _raised(result.outcomes[0])

    async def awrite(
        self,
        agent: str,
        kind: Kind,
        fields: Mapping[str, Any] | None = None,
        *,
        interval_s: float | None = None,
        start_facts: Mapping[str, Any] | None = None,
    ) -> Written:
        """:meth:`write` from an event loop (an HTTP server): the writes of concurrent requests
        share one round trip (:class:`~agentwatch.ingest_records.Batches`)."""
        item = Item(agent, [(kind, fields or {})], interval_s=interval_s, start_facts=start_facts)
        shard = shard_of(agent, self.keys.shards)
        since = time.monotonic()
        for attempt in itertools.count(1):
            prepared = self._prepare([item])
            reply = await self._batches.submit(self._call(shard, prepared, []))
            outcome = self._settle(prepared, reply)[0]
            if outcome is not _STALE:
                break
            await asyncio.sleep(retry_pause_s(attempt, since, agent))
        return _raised(outcome)  # type: ignore[arg-type]

    # -- several agents and guards per call: the OTLP receiver -------------------------------
    def commit(
        self, groups: Sequence[Group], *, attempt: int = 1, since: float | None = None
    ) -> list[Result]:
        """Write ``groups`` in one round trip (from a worker thread), one :class:`Result` each.
        Items numbered from a record another server had just changed are numbered again and
        written in a further round trip; a group whose guards failed writes nothing. Raises
        InvalidEntry (before anything is written), :class:`Contended` or a Redis error.
        ``attempt`` and ``since`` (its first attempt's ``time.monotonic()``): a renumbered write's."""
        since = time.monotonic() if since is None else since
        prepared = [self._prepare(group.items) for group in groups]
        calls = [self._call(group.shard, p, group.guards) for group, p in zip(groups, prepared, strict=True)]
        replies = run_calls(self.client, self._write, calls)
        results: list[Result] = []
        for group, items, reply in zip(groups, prepared, replies, strict=True):
            result = Result()
            if isinstance(reply, BaseException) or int(reply[0]) == 0:
                self._forget(items)
                if isinstance(reply, BaseException):
                    raise reply
                flat = reply[1]
                pairs = zip(flat[::2], flat[1::2], strict=True)
                result.conflicts = {bytes(name): bytes(now) or None for name, now in pairs}
                results.append(result)
                continue
            outcomes = self._settle(items, reply)
            stale = [p.item for p, outcome in zip(items, outcomes, strict=True) if outcome is _STALE]
            if stale:  # numbered again from the records the script returned
                time.sleep(retry_pause_s(attempt, since, stale[0].agent))
                retried = self.commit([Group(group.shard, stale)], attempt=attempt + 1, since=since)[0]
                again = iter(retried.outcomes)
                outcomes = [next(again) if outcome is _STALE else outcome for outcome in outcomes]
            result.outcomes = outcomes  # type: ignore[assignment]
            results.append(result)
        return results

    # -- what this server knows, and reading what it does not -----------------------------------
    def known(self, agent: str) -> Record | _Missing | None:
        """The agent's record as this server last saw it, None if it had none, or
        :data:`~agentwatch.ingest_records.MISSING` if this server has not seen it."""
        with self.records.lock:
            return self.records.get(agent)

    def load(self, agents: Sequence[str], pipe: Any) -> None:
        """Queue reads of ``agents``' records on ``pipe``; :meth:`loaded` takes the replies."""
        for agent in agents:
            pipe.hget(self.keys.ingest_for(agent), agent)

    def loaded(self, agents: Sequence[str], replies: Sequence[Any]) -> None:
        with self.records.lock:
            for agent, raw in zip(agents, replies, strict=True):
                self.records.put(agent, Record.parse(raw) if raw else None)

    def counted(self) -> int:
        """How many agents count toward ``[otlp] max_agents`` (summed over the streams)."""
        pipe = self.client.pipeline(transaction=False)
        for shard in range(max(self.keys.shards, 1)):
            pipe.hget(self.keys.otlp_count(shard), OTLP_COUNT_FIELD)
        return sum(int(value or 0) for value in pipe.execute())

    def sweep(self, count: int = SWEEP_COUNT) -> int:
        """Delete the records (and OTLP process states) whose expiry has passed, a slice at a
        time; the number deleted. The HTTP server runs it periodically (memory only: a stale
        record is treated as absent whether or not it has been swept). Every bucket's slice goes
        in one round trip (a pipeline of script calls; one by one on a cluster)."""
        deleted = 0
        shards = range(max(self.keys.shards, 1))
        pending = {(shard, bucket): ["0", "0"] for shard in shards for bucket in range(BUCKETS)}
        while pending:
            slices = list(pending)
            calls = [Call([self.keys.ingest(shard, bucket), self.keys.otlp(shard, bucket),
                           self.keys.otlp_count(shard)], [*pending[shard, bucket], count])
                     for shard, bucket in slices]  # fmt: skip
            for at, reply in zip(slices, run_calls(self.client, self._sweep, calls), strict=True):
                if isinstance(reply, BaseException):
                    raise reply
                cursors = [_text(reply[0]), _text(reply[1])]
                deleted += int(reply[2])
                if cursors == ["-", "-"]:
                    del pending[at]
                else:
                    pending[at] = cursors
        return deleted

    # -- numbering, encoding, signing ----------------------------------------------------------
    def _prepare(self, items: Sequence[Item]) -> list[_Prepared]:
        """Each item's script arguments, numbered from the record last seen (or, for an item
        after another of the same agent, from what that one will leave). Raises InvalidEntry
        before anything is remembered."""
        now = time.time()
        out: list[_Prepared] = []
        with self.records.lock:
            planned: dict[str, Record | None] = {}
            for item in items:
                if item.trusted:  # others' names are checked with their events (codec.validate)
                    codec.check_agent(item.agent)
                known = planned[item.agent] if item.agent in planned else self.records.get(item.agent)
                # an agent unknown here is numbered as new: the script says so if it is not
                before = None if isinstance(known, _Missing) else known
                prepared = self._number(item, before, now)
                planned[item.agent] = prepared.expected
                out.append(prepared)
            for prepared in out:  # a later write of the same agent chains on these
                self.records.put(prepared.item.agent, prepared.expected)
        return out

    def _number(self, item: Item, before: Record | None, now: float) -> _Prepared:
        own: Sequence[tuple[Kind, Mapping[str, Any]]] = item.events
        opens = len(own) == 1 and own[0][0] == "start"
        fresh = before is None or before.ended or before.exp_s < now
        new_run = opens or fresh or (item.run is not None and item.run != before.run)  # type: ignore[union-attr]
        interval = item.interval_s if item.interval_s is not None else (before.interval_s if before else None)
        leading: list[tuple[Kind, dict[str, Any]]] = []
        if new_run:
            run = item.run if item.run is not None else "h" + os.urandom(8).hex()
            seq = 0
            facts = {"version": self.version, **(item.start_facts or {})}
            if interval is not None:  # the interval declared, remembered across runs
                facts["interval"] = interval
            if opens:
                own = [("start", {**facts, **own[0][1]})]
            else:
                leading.append(("start", facts))
        else:
            assert before is not None
            run, seq = before.run, before.seq
            if item.interval_s is not None and item.interval_s != before.interval_s:
                leading.append(("pulse", {"interval": interval}))
        signer = None
        if self.secret is not None:
            signer = self._signer(item.agent, self.keys.events(shard_of(item.agent, self.keys.shards)), now)
        entries: list[Any] = []
        ended = False
        for kind, fields in (*leading, *own) if leading else own:
            event = {"v": codec.VERSION, "agent": item.agent, "ts": now, "kind": kind, **fields, "run": run,
                     "seq": seq}  # fmt: skip
            if not item.trusted:
                codec.validate(event)
            try:
                data = self._encode(event)
            except UnicodeEncodeError:  # JSON's "\ud800": a lone surrogate, which UTF-8 cannot hold
                raise InvalidEntry("text holds a lone surrogate (such as \\ud800)") from None
            entries += (data, signer.sign(data) if signer is not None else b"")
            seq += 1
            ended = ended or kind == "exit"
        packed = numbering(run, seq, interval, ended, self._pack_numbering)
        ttl_s = max(item.ttl_s if item.ttl_s is not None else self.run_ttl_s, 4 * (interval or 0.0))
        as_float = None if interval is None else float(interval)
        exp_s = int(now + ttl_s) + 1
        expected = predicted(before, packed, exp_s=exp_s, run=run, seq=seq, interval_s=as_float, ended=ended)
        events = len(entries) // 2
        args = [item.agent, before.numbering if before else b"", packed, 1 if item.counted else 0,
                int(ttl_s * 1000), pack_entries(entries, self._pack_raw)]  # fmt: skip
        return _Prepared(item, before, expected, args, Written(run, seq - 1, new_run, events),
                         bucket_of(item.agent.encode()))  # fmt: skip

    def _signer(self, agent: str, stream: str, now: float) -> Signer:
        assert self.secret is not None
        with_stream = f"{stream}\x00{agent}"
        signer = self._signers.get(with_stream)
        if isinstance(signer, _Missing):
            signer = Signer(agent_key(self.secret, agent), stream)
            self._signers.put(with_stream, signer)
        signer.stamp(now)
        return signer

    def _call(self, shard: int, prepared: Sequence[_Prepared], guards: Sequence[tuple[bytes, bytes | None,
              bytes | None]]) -> Call:  # fmt: skip
        args: list[Any] = [self.maxlen, 1000 / self.limit.rate_per_s, self.limit.burst, len(guards)]
        names = self._script_keys.get(shard)
        if names is None:  # the same names for every call of a shard: made once
            names = self._script_keys[shard] = _ScriptKeys(self.keys, shard)
        keys = list(names.head)
        for name, expected, new in guards:
            args += (name, expected or b"", new or b"")
            keys.append(names.otlp[bucket_of(name)])
        for p in prepared:
            args += p.args
            keys.append(names.ingest[p.bucket])
        return Call(keys, args)

    def _settle(self, prepared: Sequence[_Prepared], reply: Any) -> list[Written | Flooded | object]:
        """Each item's outcome from the script's reply, the records remembered accordingly."""
        if isinstance(reply, BaseException):
            self._forget(prepared)
            raise reply
        outcomes: list[Written | Flooded | object] = []
        with self.records.lock:
            for index, p in enumerate(prepared):
                status, payload = int(reply[1 + 2 * index]), reply[2 + 2 * index]
                agent = p.item.agent
                if status == 1:  # unless something was prepared after it
                    self.records.replace(agent, p.expected, stored(p.expected, payload))
                    outcomes.append(p.written)
                elif status == 2:
                    self.records.put(agent, Record.parse(payload) if payload else None)
                    outcomes.append(_STALE)
                else:
                    self.records.replace(agent, p.expected, p.before)
                    outcomes.append(Flooded(agent, int(payload) / 1000))
        return outcomes

    def _forget(self, prepared: Sequence[_Prepared]) -> None:
        """After a call whose outcome is unknown (an error) or that wrote nothing (a guard): the
        records are read again before the next write of these agents."""
        with self.records.lock:
            for p in prepared:
                self.records.drop(p.item.agent)


def _raised(outcome: Written | Flooded) -> Written:
    if isinstance(outcome, Flooded):
        raise outcome
    return outcome


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
