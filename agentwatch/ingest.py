"""Writing protocol events on an agent's behalf: the HTTP ping API today, OTLP ingest next.

An agent that embeds the producer numbers its own events: a run id per process start, a
``seq`` from 0. An agent known only through HTTP (a cron job with ``curl``, a span exporter)
has no process of ours to keep that state, and several ``agentwatch serve`` may stand behind
a load balancer, so the state lives in Redis, one small hash per agent
(:meth:`agentwatch.keys.Keys.ingest`), and one script per call decides everything at once:

* **Flood limit.** A token bucket per agent (``rate`` per second, ``burst`` at once), on Redis
  time, shared by every server. A refused call writes nothing and says when to come back.
* **Run.** The first call for an agent, an explicit ``start``, or any call after an ``exit``
  begins a new run: the events written then open with a ``start`` (carrying the interval the
  agent declared, remembered across runs), exactly what a producer sends when a process
  starts. So the detectors treat an HTTP agent like any other: silence, exit and token anomalies
  all work, and an ``exit`` incident resolves when the next run starts.
* **Seq.** Every call reserves as many consecutive numbers as it writes events. Two servers
  writing for one agent at once may land their entries out of order; the detectors take a
  late seq as a late batch (the same as a reclaimed one), so nothing is lost or counted twice.
* **Interval.** A call that declares a new interval for a running run is preceded by a
  ``pulse`` carrying it (PROTOCOL.md: pulses repeat the interval), so the silence allowance
  follows without starting a new run.
* **Memory.** The hash expires after ``run_ttl`` unused (at least 4 x the agent's interval):
  about 150 bytes per agent while it is active, nothing once it has gone quiet. An agent
  that comes back after that simply starts a new run.

Events are validated with the protocol's own codec before anything is reserved, so a bad
input costs neither a seq nor a flood token, and nothing written here can become a dead letter.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from agentwatch import __version__, codec
from agentwatch.errors import AgentwatchError
from agentwatch.keys import Keys
from agentwatch.redisconn import Client
from producers._config import DEFAULT_MAXLEN

Kind = Literal["start", "beat", "pulse", "exit"]

SOURCE_VERSION: Final = f"agentwatch-http/{__version__}"
"""The ``version`` fact of runs started here (``status`` shows it), unless the caller names one."""

# KEYS[1] = the agent's ingest hash.
# ARGV: 1 candidate run id, 2 force a new run (0/1), 3 this call ends the run (0/1),
#       4 declared interval in s (-1: none), 5 rate per ms, 6 burst, 7 ttl ms,
#       8/9/10 events this call writes when the run goes on / is new / gets a new interval.
# Returns {0, retry-after ms} when flooded, else {1, run, first seq, mode, interval as text}
# with mode 0 (same run), 1 (new run: a start leads), 2 (new interval: a pulse leads).
_RESERVE: Final = """
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
if ARGV[2] == '1' or not run or h[6] == '1' then
  run, seq, mode = ARGV[1], 0, 1
elseif want >= 0 and want ~= iv then
  mode = 2
end
if want >= 0 then iv = want end
local n = tonumber(ARGV[8 + mode])
redis.call('HSET', KEYS[1], 'run', run, 'seq', seq + n, 'tk', tk - 1, 'tat', now, 'iv', iv, 'end', ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.max(tonumber(ARGV[7]), math.floor(4000 * iv)))
return {1, run, seq, mode, tostring(iv)}
"""


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
        self._reserve = self.client.register_script(_RESERVE)

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
        codec.check_agent(agent)
        body = {**(fields or {}), "v": codec.VERSION, "agent": agent, "kind": kind, "ts": 0.0}
        body.update(run="-", seq=0)
        if interval_s is not None:
            codec.validate({**body, "interval": interval_s})
        codec.validate(body)  # a bad field must cost neither a seq nor a flood token
        facts = {"version": self.version, **(start_facts or {})}
        if kind == "start":
            body.update(facts)
            codec.validate(body)
        plain = 1
        reply = self._reserve(
            keys=[self.keys.ingest(agent)],
            args=[
                "h" + os.urandom(8).hex(),
                1 if kind == "start" else 0,
                1 if kind == "exit" else 0,
                -1 if interval_s is None else interval_s,
                self.limit.rate_per_s / 1000,
                self.limit.burst,
                self.run_ttl_ms,
                plain,
                1 if kind == "start" else 2,
                2,
            ],
        )
        if int(reply[0]) == 0:
            raise Flooded(agent, int(reply[1]) / 1000)
        run = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
        seq, mode = int(reply[2]), int(reply[3])
        interval = float(reply[4])
        declared = {"interval": interval} if interval >= 0 and math.isfinite(interval) else {}
        now = time.time()
        head = {"v": codec.VERSION, "agent": agent, "ts": now}
        events: list[dict[str, Any]] = []
        if mode == 1 and kind != "start":
            events.append({**head, "kind": "start", **facts, **declared})
        elif mode == 2:
            events.append({**head, "kind": "pulse", **declared})
        own = {**body, "ts": now}
        if kind == "start":
            own.update(declared)
        events.append(own)
        stream = self.keys.events_for(agent)
        pipe = self.client.pipeline(transaction=False)
        for offset, event in enumerate(events):
            event.update(run=run, seq=seq + offset)
            pipe.xadd(stream, {codec.FIELD: codec.encode(event)}, maxlen=self.maxlen, approximate=True)
        pipe.execute()
        return Written(run=run, seq=seq + len(events) - 1, started=mode == 1, events=len(events))
