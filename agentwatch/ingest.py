"""Writing protocol events on an agent's behalf: the HTTP ping API today, OTLP ingest next.

An agent that embeds the producer numbers its own events: a run id per process start, a
``seq`` from 0. An agent known only through HTTP (a cron job with ``curl``, a span exporter)
has no process of ours to keep that state, and several ``agentwatch serve`` may stand behind
a load balancer, so the state lives in Redis, one small hash per agent
(:meth:`agentwatch.keys.Keys.ingest`), and one script per call decides and writes everything:

* **Flood limit.** A token bucket per agent (``rate`` per second, ``burst`` at once), on Redis
  time, shared by every server. A refused call writes nothing and says when to come back.
* **Run.** The first call for an agent, an explicit ``start``, or any call after an ``exit``
  begins a new run: the events written then open with a ``start`` (carrying the interval the
  agent declared, remembered across runs), exactly what a producer sends when a process
  starts. So the detectors treat an HTTP agent like any other: silence, exit and token anomalies
  all work, and an ``exit`` incident resolves when the next run starts.
* **Seq.** The same script numbers the events and appends them to the agent's stream (the
  agent's ingest hash shares the stream's Cluster slot), so seqs reach the stream in order
  however many servers write for one agent at once: the detectors see exactly what one
  producer would have sent.
* **Interval.** A call that declares a new interval for a running run is preceded by a
  ``pulse`` carrying it (PROTOCOL.md: pulses repeat the interval), so the silence allowance
  follows without starting a new run.
* **Memory.** The hash expires after ``run_ttl`` unused (at least 4 x the agent's interval):
  about 170 bytes per agent while it is active, nothing once it has gone quiet. An agent
  that comes back after that simply starts a new run.

Events are validated with the protocol's own codec before anything is reserved, so a bad
input costs neither a seq nor a flood token, and nothing written here can become a dead letter.

**Several events, a run of the caller's.** The OTLP receiver writes all of one agent's events of
an export in one call (:meth:`EventWriter.write_events`): they cost one flood token (the limit
bounds exports, whose size the exporter bounds), and get consecutive seqs. It may name the run
itself (``service.instance.id``): a call naming another run than the current one starts it.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from redis.cluster import RedisCluster
from redis.exceptions import NoScriptError

from agentwatch import __version__, codec
from agentwatch.errors import AgentwatchError
from agentwatch.keys import Keys
from agentwatch.redisconn import Client
from producers._config import DEFAULT_MAXLEN

Kind = Literal["start", "beat", "pulse", "exit"]

SOURCE_VERSION: Final = f"agentwatch-http/{__version__}"
"""The ``version`` fact of runs started here (``status`` shows it), unless the caller names one."""

# KEYS[1] = the agent's ingest hash, KEYS[2] = its event stream (one slot: see Keys.ingest).
# ARGV: 1 candidate run id, 2 force a new run (1), or a run named by the caller that starts when
#       it is not the current one (2), or neither (0), 3 this call ends the run (0/1),
#       4 declared interval in s (-1: none), 5 rate per ms, 6 burst, 7 ttl ms, 8 stream MAXLEN,
#       then events, each as (entry count, msgpack map entries without header, run and seq):
#       the start, the pulse, and the call's own events (one whose count is 0 for a start).
# Appends run, seq (and interval, to the start and the pulse) to each event it writes: a start
# and the event when a run begins (mode 1), a pulse and the event when the interval changes
# (mode 2), else the event alone (mode 0). Returns {0, retry-after ms} when flooded, else
# {1, run, seq of the last event, mode, events written}.
_WRITE: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HMGET', KEYS[1], 'run', 'seq', 'tk', 'tat', 'iv', 'end')
local rate, burst = tonumber(ARGV[5]), tonumber(ARGV[6])
local tk = tonumber(h[3]) or burst
local tat = tonumber(h[4]) or now
tk = math.min(burst, tk + math.max(0, now - tat) * rate)
if tk < 1 then return {0, math.ceil((1 - tk) / rate)} end
local run, seq, iv = h[1], tonumber(h[2]) or 0, tonumber(h[5]) or -1
local want = tonumber(ARGV[4])
local mode = 0
if ARGV[2] == '1' or not run or h[6] == '1' or (ARGV[2] == '2' and run ~= ARGV[1]) then
  run, seq, mode = ARGV[1], 0, 1
elseif want >= 0 and want ~= iv then
  mode = 2
end
if want >= 0 then iv = want end
local function header(n)
  if n < 16 then return string.char(0x80 + n) end
  return string.char(0xde, math.floor(n / 256), n % 256)
end
local function add(at, declare)
  local n, body = tonumber(ARGV[at]), ARGV[at + 1]
  if n == 0 then return end
  local tail = cmsgpack.pack('run') .. cmsgpack.pack(run) .. cmsgpack.pack('seq') .. cmsgpack.pack(seq)
  n = n + 2
  if declare and iv >= 0 then
    tail = tail .. cmsgpack.pack('interval') .. cmsgpack.pack(iv)
    n = n + 1
  end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*', 'd', header(n) .. body .. tail)
  seq = seq + 1
end
local first = seq
if mode == 1 then add(9, true) elseif mode == 2 then add(11, true) end
for at = 13, #ARGV, 2 do add(at, ARGV[2] == '1' and at == 13) end
redis.call('HSET', KEYS[1], 'run', run, 'seq', seq, 'tk', tk - 1, 'tat', now, 'iv', iv, 'end', ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.max(tonumber(ARGV[7]), math.floor(4000 * iv)))
return {1, run, seq - 1, mode, seq - first}
"""


def _entries(event: Mapping[str, Any]) -> tuple[int, bytes]:
    """(entry count, the msgpack map's entries without its header) for the script to complete:
    it adds ``run`` and ``seq`` (and the interval) and writes the header for the new count."""
    if not event:
        return 0, b""
    packed = codec.encode(dict(event))
    return len(event), packed[1 if len(event) < 16 else 3 :]  # fixmap, or map16


class Flooded(AgentwatchError):
    """The agent sent more than its flood limit allows; nothing was written."""

    def __init__(self, agent: str, retry_after_s: float) -> None:
        self.agent = agent
        self.retry_after_s = retry_after_s
        super().__init__(f"{agent}: too many events; retry in {retry_after_s:.1f}s")


@dataclass(frozen=True, slots=True)
class Written:
    """What one :meth:`EventWriter.write` put on the agent's stream."""

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


class EventWriter:
    """Writes protocol events for agents that do not run a producer (see the module docstring).

    Thread-safe as far as its Redis client is; one instance serves every request of a server.
    Redis errors propagate (the caller answers 503, ``Retry-After``): nothing is buffered here,
    because an HTTP client that is told "try later" keeps the event and the truth.
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
    ) -> None:
        self.client: Any = client
        self.keys = keys
        self.limit = limit
        self.run_ttl_ms = int(run_ttl_s * 1000)
        self.maxlen = maxlen
        self.version = version
        self._write = self.client.register_script(_WRITE)
        self._batches = _Batches(self.client, self._write)

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
        :class:`Flooded`, or a Redis error."""
        keys, args = self._prepare(agent, [(kind, fields or {})], interval_s, start_facts, None)
        return self._written(agent, self._write(keys=keys, args=args))

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
        share one pipeline and one thread hop per round trip (:class:`_Batches`)."""
        keys, args = self._prepare(agent, [(kind, fields or {})], interval_s, start_facts, None)
        return await self._submit(agent, keys, args)

    async def awrite_events(
        self,
        agent: str,
        events: Sequence[tuple[Kind, Mapping[str, Any]]],
        *,
        run: str | None = None,
        interval_s: float | None = None,
        start_facts: Mapping[str, Any] | None = None,
    ) -> Written:
        """Write several events of ``agent`` in one call, with consecutive seqs, for one flood
        token (the OTLP receiver: one call per agent and export). ``run`` names the run (a
        ``service.instance.id``); when it is not the agent's current run, a new run begins with
        it. None: the current run, as :meth:`write` does. No event may be a ``start`` or an
        ``exit`` (runs begin here, and OTLP cannot tell an exit)."""
        if any(kind in ("start", "exit") for kind, _ in events):
            raise ValueError("write_events writes beats and pulses; runs begin by themselves")
        keys, args = self._prepare(agent, events, interval_s, start_facts, run)
        return await self._submit(agent, keys, args)

    async def _submit(self, agent: str, keys: list[str], args: list[Any]) -> Written:
        if isinstance(self.client, RedisCluster):  # a cluster pipeline cannot reload scripts
            return self._written(agent, await asyncio.to_thread(self._write, keys=keys, args=args))
        return self._written(agent, await self._batches.submit(keys, args))

    def _prepare(
        self,
        agent: str,
        calls: Sequence[tuple[Kind, Mapping[str, Any]]],
        interval_s: float | None,
        start_facts: Mapping[str, Any] | None,
        run: str | None,
    ) -> tuple[list[str], list[Any]]:
        """The script's keys and arguments; raises InvalidEntry before anything is reserved."""
        codec.check_agent(agent)
        now = time.time()
        head: dict[str, Any] = {"v": codec.VERSION, "agent": agent, "ts": now}
        facts = {"version": self.version, **(start_facts or {})}
        start = {**head, "kind": "start", **facts}
        own: list[dict[str, Any]] = [{**head, "kind": kind, **fields} for kind, fields in calls]
        opens = len(own) == 1 and own[0]["kind"] == "start"
        if opens:
            start, own = {**start, **own[0]}, [{}]  # the run's own start, with the caller's fields
        declared = {} if interval_s is None else {"interval": interval_s}
        for event in (start, *own):  # nothing bad may cost a seq or a flood token: check first
            if event:
                codec.validate({**event, "run": run or "-", "seq": 0, **declared})
        events: list[Any] = []
        for event in (start, {**head, "kind": "pulse"}, *own):
            events += _entries(event)
        exits = any(event.get("kind") == "exit" for event in own)
        args = [
            run if run is not None else "h" + os.urandom(8).hex(),
            1 if opens else (2 if run is not None else 0),
            1 if exits else 0,
            -1 if interval_s is None else interval_s,
            self.limit.rate_per_s / 1000,
            self.limit.burst,
            self.run_ttl_ms,
            self.maxlen,
            *events,
        ]
        return [self.keys.ingest(agent), self.keys.events_for(agent)], args

    @staticmethod
    def _written(agent: str, reply: Any) -> Written:
        if int(reply[0]) == 0:
            raise Flooded(agent, int(reply[1]) / 1000)
        run = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
        return Written(run=run, seq=int(reply[2]), started=int(reply[3]) == 1, events=int(reply[4]))


class _Batches:
    """Coalesces the writes of concurrent requests: while one pipeline is in flight, the writes
    that arrive wait for it and go together in the next one. One request alone still goes at
    once; a busy server makes fewer, larger round trips (and fewer thread hops) instead of
    queueing one round trip per request. Each write gets its own reply or its own error."""

    def __init__(self, client: Any, script: Any, max_batch: int = 256) -> None:
        self.client = client
        self.script = script
        self.max_batch = max_batch
        self._pending: list[tuple[list[str], list[Any], asyncio.Future[Any]]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, keys: list[str], args: list[Any]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((keys, args, future))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            try:
                replies = await asyncio.to_thread(self._execute, [(k, a) for k, a, _ in batch])
            except Exception as exc:  # each waiting request gets the error (Redis away, say)
                replies = [exc] * len(batch)
            for (_, _, future), reply in zip(batch, replies, strict=True):
                if future.done():
                    continue  # the request was cancelled (its client went away)
                if isinstance(reply, BaseException):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)

    def _execute(self, batch: list[tuple[list[str], list[Any]]]) -> list[Any]:
        replies = self._pipeline(batch)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:  # a restarted server lost the script: those writes did not run, so run them
            self.script.sha = self.client.script_load(self.script.script)
            for i, reply in zip(missing, self._pipeline([batch[i] for i in missing]), strict=True):
                replies[i] = reply
        return replies

    def _pipeline(self, batch: list[tuple[list[str], list[Any]]]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for keys, args in batch:
            pipe.evalsha(self.script.sha, len(keys), *keys, *args)
        replies: list[Any] = pipe.execute(raise_on_error=False)
        return replies
