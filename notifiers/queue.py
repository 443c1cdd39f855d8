"""One notifier's pending deliveries, in Redis, shared by every notifier worker.

Why not deliver straight from the alerts stream: the worker runtime acknowledges a batch when
its handlers return and retries a raising handler at once, which suits detectors but not HTTP
(a webhook down for ten minutes needs retries spread over ten minutes, and must not hold up
PagerDuty meanwhile). So the runtime handler only *queues* each alert per notifier, and each
notifier's own delivery threads drain its queue. The state, all under the tag ``{n:<name>}``:

* ``queue`` (zset): delivery id -> when it is next due, in Redis server time (ms);
* ``jobs`` (hash): delivery id -> JSON (the alert, attempts that ended with an outcome, last error);
* ``retrying`` (zset): delivery id -> when its last attempt failed: the deliveries whose last
  attempt failed and that wait for the next, so ``status`` and ``alerts`` show a receiver that
  is down long before ``retry_for`` turns its deliveries into failures;
* ``leases`` (hash): delivery id -> token of the thread delivering it, and ``n:<id>`` -> how many
  times it was claimed, which numbers its attempts. Claiming a delivery pushes its due time out
  by the lease, so if that worker is SIGKILLed the delivery simply becomes due again and any
  other worker claims it (as the next attempt): nothing is lost, and no timer or heartbeat is needed;
* ``order`` (hash): per dedup key, deliveries form a chain, so a ``resolved`` never overtakes
  the ``firing`` it closes, even while the firing waits out a backoff;
* ``seen`` (zset): alert ids already queued: an alert the stream redelivers (a worker crashed
  before acking) is queued once;
* ``limits`` (hash): the token bucket of the rate limit, and ``paused_until`` after a 429;
* ``held`` (hash): per dedup key, the latest alert a mute held back that the receiver has not
  seen (a firing, or the resolve of an incident whose firing it did get). When the mute ends,
  the alert is queued if it still tells the truth (notifiers/base.py); a resolve whose firing
  was held is never sent (the receiver never heard of that incident), unless the receiver is
  still owed a resolve from before the mute (``#owed <dedup key>``: the incident resolved,
  fired again and resolved again, all while muted).

Every state change is one Lua script on those keys, so concurrent workers never claim the same
delivery twice while its lease holds, and a rate limit holds across all workers together.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import redis

from agentwatch.keys import Keys
from agentwatch.redisconn import Client

log = logging.getLogger("agentwatch.notifiers")

_pack: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _pack
except ImportError:  # redis-py without its hiredis extra: roundtrip() uses a pipeline
    _pack = None


def _script(body: str) -> str:
    """Prefix a script with ``now``: Redis server time in ms (effects replication, the default
    since Redis 5, makes TIME safe before writes), so every worker shares one clock."""
    clock = (
        "local t = redis.call('TIME')\nlocal now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)"
    )
    return f"{clock}\n{body}"


# ARGV[5], the mode: "send" (a routed alert), "resolve" (a routed resolve: not sent, returning
# 2, when its firing is held, never sent), "release" (a held alert whose mute ended: only if it
# is still the one held, ARGV[6], else 3). Any of them supersedes what was held for the key.
# ARGV[7]: how long a resolve whose firing was not queued here waits for it (PARKED_NOTE; 4: a
# firing that came after its resolve went out, not sent).
_ENQUEUE: Final = _script("""
local held = redis.call('HGET', KEYS[5], ARGV[3])
local owed = '#owed ' .. ARGV[3]
if ARGV[5] == 'release' then
  if held ~= ARGV[6] then return 3 end
elseif ARGV[5] == 'resolve' and held and cjson.decode(held)['status'] == 'firing'
    and redis.call('HEXISTS', KEYS[5], owed) == 0 then
  redis.call('HDEL', KEYS[5], ARGV[3])
  return 2
end
if held then redis.call('HDEL', KEYS[5], ARGV[3], owed) end
if redis.call('ZSCORE', KEYS[4], ARGV[1]) then return 0 end
local due = now + tonumber(ARGV[4])
local fired, parked = 'fired:' .. ARGV[3], 'parked:' .. ARGV[3]
local status = ARGV[5] == 'resolve' and 'resolved' or 'firing'
if ARGV[5] == 'release' then status = cjson.decode(ARGV[2])['alert']['status'] end
if status == 'resolved' then
  if redis.call('ZREM', KEYS[4], fired) == 0 and ARGV[5] == 'resolve' then
    due = now + tonumber(ARGV[7])  -- parked (PARKED_NOTE)
    redis.call('HSET', KEYS[3], parked, cjson.decode(ARGV[2])['alert']['at'] .. ' ' .. ARGV[1])
  end
else
  local p = redis.call('HGET', KEYS[3], parked)
  local at, rid
  if p then at, rid = string.match(p, '^(%S+) (%S+)$') end
  if rid and cjson.decode(ARGV[2])['alert']['at'] <= at then
    redis.call('HDEL', KEYS[3], parked)
    if redis.call('HEXISTS', KEYS[2], rid) == 0 then return 4 end  -- its resolve went out already
    -- the parked resolve's own firing: it goes just before it, in its place in the chain
    redis.call('ZADD', KEYS[4], now, ARGV[1])
    redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
    local prev = redis.call('HGET', KEYS[3], 'after:' .. rid)
    if prev and redis.call('HEXISTS', KEYS[2], prev) == 1 then
      redis.call('HSET', KEYS[3], 'after:' .. ARGV[1], prev, 'next:' .. prev, ARGV[1])
    end
    redis.call('HSET', KEYS[3], 'after:' .. rid, ARGV[1], 'next:' .. ARGV[1], rid)
    redis.call('ZADD', KEYS[1], due, ARGV[1])
    redis.call('ZADD', KEYS[1], 'LT', now, rid)
    return 1
  end
  redis.call('ZADD', KEYS[4], now, fired)
end
redis.call('ZADD', KEYS[4], now, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
local head = redis.call('HGET', KEYS[3], 'head:' .. ARGV[3])
if head and redis.call('HEXISTS', KEYS[2], head) == 1 then
  redis.call('HSET', KEYS[3], 'after:' .. ARGV[1], head)
  redis.call('HSET', KEYS[3], 'next:' .. head, ARGV[1])
end
redis.call('HSET', KEYS[3], 'head:' .. ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[1], due, ARGV[1])
return 1
""")

PARKED_NOTE: Final = """Per-incident order across a notifier worker SIGKILLed holding a firing (issue 11).

The alerts stream hands that firing to another worker only after ``claim_idle``, when its resolve
may have been queued and delivered already: the receiver would keep the incident open for ever.
So every firing queued leaves a mark (``fired:<dedup key>`` in ``seen``, trimmed with it) that its
routed resolve takes away; a routed resolve that finds none is *parked*: due only after the park
time (``parked:<dedup key>`` in ``order`` holds its ``at`` and id). The firing, when it comes, takes
its place in the chain just before the resolve and wakes it. A firing that comes after its parked
resolve went out is not sent (4: the receiver's incident is closed; sending it would reopen it for
ever). A resolve whose firing was never queued here (stale, filtered) merely goes out late, as
does the resolve of an incident open for longer than the marks are kept (``max_age`` + 1 h)."""

# A mute held back an alert: keep it for when the mute ends. A muted resolve of an incident
# whose firing is held cancels both (returns 2): the receiver never heard of that incident;
# unless a resolve was held before that firing (the receiver still has an incident open from
# before the mute, marked OWED_MARK): then the resolve stays held, since it is owed.
_HOLD: Final = """
local held = redis.call('HGET', KEYS[1], ARGV[1])
local owed = '#owed ' .. ARGV[1]
local status = held and cjson.decode(held)['status']
if ARGV[3] == 'resolved' and status == 'firing' then
  if redis.call('HDEL', KEYS[1], owed) == 0 then
    redis.call('HDEL', KEYS[1], ARGV[1])
    return 2
  end
elseif ARGV[3] == 'firing' and status == 'resolved' then
  redis.call('HSET', KEYS[1], owed, 1)
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

_DROP_HELD: Final = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1], '#owed ' .. ARGV[1])
end
return 0
"""
OWED_MARK: Final = "#owed "
"""Field prefix in the held hash: ``#owed <dedup key>`` says the receiver is owed a resolve for
an incident it heard of before the mute (``#`` is not in an agent name, so no dedup key starts
with it)."""

# Returns {1, id, job, claims} for a claimed delivery, or {0, wait_ms} (-1: the queue is empty).
_CLAIM: Final = _script("""
local limits = KEYS[5]
local paused = tonumber(redis.call('HGET', limits, 'paused_until') or '0')
if paused > now then return {0, paused - now} end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 50)
if #due == 0 then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if #first == 0 then return {0, -1} end
  return {0, math.max(1, tonumber(first[2]) - now)}
end
local rate, burst = tonumber(ARGV[3]), tonumber(ARGV[4])
local tokens = burst
if rate > 0 then
  tokens = tonumber(redis.call('HGET', limits, 'tokens') or burst)
  local since = tonumber(redis.call('HGET', limits, 'tokens_at') or now)
  tokens = math.min(burst, tokens + math.max(0, now - since) * rate)
  redis.call('HSET', limits, 'tokens', tostring(tokens), 'tokens_at', now)
  if tokens < 1 then return {0, math.max(1, math.ceil((1 - tokens) / rate))} end
end
for _, id in ipairs(due) do
  local job = redis.call('HGET', KEYS[2], id)
  local prev = redis.call('HGET', KEYS[3], 'after:' .. id)
  if not job then
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[6], id)
  elseif prev and redis.call('HEXISTS', KEYS[2], prev) == 1 then
    -- wait for the delivery before it in the same chain; finishing it makes this one due
    local behind = tonumber(redis.call('ZSCORE', KEYS[1], prev) or now)
    redis.call('ZADD', KEYS[1], math.max(now, behind) + 1, id)
  else
    if prev then redis.call('HDEL', KEYS[3], 'after:' .. id) end
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), id)
    redis.call('HSET', KEYS[4], id, ARGV[2])
    local claims = redis.call('HINCRBY', KEYS[4], 'n:' .. id, 1)
    if rate > 0 then redis.call('HSET', limits, 'tokens', tostring(tokens - 1)) end
    return {1, id, job, claims}
  end
end
return {0, 1}
""")

# Done (delivered, or failed for good): forget it and wake the next delivery of its chain.
_FINISH: Final = _script("""
if redis.call('HGET', KEYS[4], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1], 'n:' .. ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('HDEL', KEYS[3], 'after:' .. ARGV[1])
local nxt = redis.call('HGET', KEYS[3], 'next:' .. ARGV[1])
if nxt then
  redis.call('HDEL', KEYS[3], 'next:' .. ARGV[1])
  if redis.call('ZSCORE', KEYS[1], nxt) then redis.call('ZADD', KEYS[1], 'LT', now, nxt) end
end
if redis.call('HGET', KEYS[3], 'head:' .. ARGV[3]) == ARGV[1] then
  redis.call('HDEL', KEYS[3], 'head:' .. ARGV[3])
end
return 1
""")

# Try again later (ARGV[3] ms from now); ARGV[5] > 0 pauses the whole notifier (Retry-After);
# ARGV[6] = 1: because the attempt failed (indexed in ``retrying``), 0: handed back unfinished.
# The claim counter ``n:<id>`` stays: it numbers the attempts, including the next one.
_RETRY: Final = _script("""
if redis.call('HGET', KEYS[3], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
if ARGV[6] == '1' then redis.call('ZADD', KEYS[5], now, ARGV[1]) end
redis.call('HDEL', KEYS[3], ARGV[1])
local pause = tonumber(ARGV[5])
if pause > 0 then
  local until_ms = now + pause
  local current = tonumber(redis.call('HGET', KEYS[4], 'paused_until') or '0')
  if until_ms > current then redis.call('HSET', KEYS[4], 'paused_until', until_ms) end
end
return 1
""")


@dataclass
class Job:
    """One pending delivery of one alert to one notifier, as stored in ``jobs``."""

    id: str
    alert: dict[str, Any]
    first_ms: int
    attempts: int = 0
    """Attempts that ended with an outcome (or were handed back by a stopping worker). The
    claim count is the attempt number; claims beyond this died with their worker."""
    last_error: str = ""
    last_status: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {"id": self.id, "alert": self.alert, "first_ms": self.first_ms, "attempts": self.attempts,
             "last_error": self.last_error, "last_status": self.last_status, "extra": self.extra},
            separators=(",", ":"), default=str,
        )  # fmt: skip

    @classmethod
    def from_json(cls, raw: bytes | str) -> Job:
        data = json.loads(raw)
        return cls(**data)


@dataclass(frozen=True)
class EnqueueCall:
    """The keys and arguments of one call of the enqueue script (:meth:`DeliveryQueue.enqueue_call`)."""

    keys: list[str]
    args: list[str | int]


def roundtrip(client: Client, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Send ``commands`` (arguments: str, bytes, int or float) in one write and read their
    replies; a reply that is an error is returned, not raised, as ``pipeline.execute(
    raise_on_error=False)`` does. It is that pipeline without redis-py's per-argument encoding:
    packed by hiredis in one call, ~45 us of CPU per delivery instead of ~130 us, on delivery
    threads that share the worker's GIL. A cluster client (or redis-py without hiredis) takes
    the pipeline, which sends each command to its node. A lost connection is retried as redis-py
    retries a pipeline (the connection's ``retry``), then raised."""
    if _pack is None or not isinstance(client, redis.Redis):
        pipe: Any = client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(pipe.execute(raise_on_error=False))
    pool = client.connection_pool
    conn: Any = pool.get_connection()
    packed = [b"".join([_pack(command) for command in commands])]

    def send() -> list[Any]:
        conn.send_packed_command(packed, check_health=False)
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(conn.read_response())
            except redis.exceptions.ResponseError as exc:
                replies.append(exc)
        return replies

    try:
        return conn.retry.call_with_retry(send, lambda _: conn.disconnect())  # type: ignore[no-any-return]
    except BaseException:
        conn.disconnect()  # a reply may still be on its way: never reuse the connection
        raise
    finally:
        pool.release(conn)


def queued(reply: int) -> bool | None:
    """What the enqueue script's reply to a "send" or "resolve" means: True, queued now; False,
    queued before (a redelivered alert); None, not to be sent: a firing whose resolve went out
    before it came (4, :data:`PARKED_NOTE`), or a resolve whose firing a mute held and never sent (2)."""
    return None if reply in (2, 4) else reply == 1


@dataclass(frozen=True)
class Claimed:
    job: Job
    token: str
    claims: int


class DeliveryQueue:
    """The Redis side of one notifier's deliveries (see the module docstring)."""

    def __init__(self, client: Client, keys: Keys, notifier: str) -> None:
        self.client: Any = client  # untyped: redis-py's stubs do not model scripts well
        self.notifier = notifier
        self.queue = keys.notifier_queue(notifier)
        self.jobs = keys.notifier_jobs(notifier)
        self.leases = keys.notifier_leases(notifier)
        self.retrying = keys.notifier_retrying(notifier)
        self.order = keys.notifier_order(notifier)
        self.seen = keys.notifier_seen(notifier)
        self.limits = keys.notifier_limits(notifier)
        self.held = keys.notifier_held(notifier)
        self._enqueue = self.client.register_script(_ENQUEUE)
        self._hold = self.client.register_script(_HOLD)
        self._drop_held = self.client.register_script(_DROP_HELD)
        self._claim = self.client.register_script(_CLAIM)
        self._finish = self.client.register_script(_FINISH)
        self._retry = self.client.register_script(_RETRY)

    def enqueue(self, job: Job, dedup_key: str, *, delay_ms: int = 0) -> bool | None:
        """Queue ``job`` unless its id was queued before (then False: a redelivered alert);
        None: a firing whose resolve went out before it came (:data:`PARKED_NOTE`)."""
        return queued(self.run(self.enqueue_call(job.id, job.to_json(), dedup_key, delay_ms=delay_ms)))

    def enqueue_resolve(self, job: Job, dedup_key: str, *, park_ms: int = 0) -> bool | None:
        """Queue a resolve like :meth:`enqueue`; None: not sent, since its firing never was.
        ``park_ms``: how long it waits for a firing not queued here yet (:data:`PARKED_NOTE`)."""
        call = self.enqueue_call(job.id, job.to_json(), dedup_key, "resolve", park_ms=park_ms)
        return queued(self.run(call))

    def release(self, job: Job, dedup_key: str, held: str) -> bool:
        """Queue a held alert whose mute ended, unless another worker did or it was superseded."""
        return self.run(self.enqueue_call(job.id, job.to_json(), dedup_key, "release", held=held)) == 1

    def enqueue_call(
        self, job_id: str, job_json: str, dedup_key: str, mode: str = "send", *, delay_ms: int = 0,
        held: str = "", park_ms: int = 0,
    ) -> EnqueueCall:  # fmt: skip
        """The enqueue script's call for one job, to :meth:`run` now or :meth:`stage` in a
        pipeline (``mode``: "send" a firing, "resolve" a resolve, "release" a held alert)."""
        keys = [self.queue, self.jobs, self.order, self.seen, self.held]
        return EnqueueCall(keys, [job_id, job_json, dedup_key, delay_ms, mode, held, park_ms])

    def run(self, call: EnqueueCall) -> int:
        """Run one enqueue call (loading the script if Redis does not have it): its reply."""
        return int(self._enqueue(keys=call.keys, args=call.args))

    def load_scripts(self) -> None:
        """Load the enqueue script ahead of :meth:`stage` (else the first batch's EVALSHAs all
        fail with NOSCRIPT and are re-run one by one)."""
        self.client.script_load(_ENQUEUE)

    def stage(self, pipe: Any, call: EnqueueCall) -> None:
        """Add one enqueue call to ``pipe`` as a bare EVALSHA: a batch of alerts for every
        notifier then costs one round trip (notifiers/fanout.py). redis-py's own script calls
        in a pipeline would ask SCRIPT EXISTS before every execute, a second round trip; a reply
        that is a NoScriptError is re-run with :meth:`run` instead."""
        pipe.evalsha(self._enqueue.sha, len(call.keys), *call.keys, *call.args)

    def hold(self, alert_json: str, dedup_key: str, status: str) -> bool:
        """Keep a muted alert for when its mute ends; False: it and the held firing it resolves
        are both dropped (the incident began and ended while muted)."""
        return int(self._hold(keys=[self.held], args=[dedup_key, alert_json, status])) == 1

    def held_alerts(self) -> dict[str, str]:
        """dedup key -> the JSON of the alert held for it."""
        raw = self.client.hgetall(self.held)
        held = {_text(key): _text(value) for key, value in raw.items()}
        return {key: value for key, value in held.items() if not key.startswith(OWED_MARK)}

    def drop_held(self, dedup_key: str, held: str | None = None) -> bool:
        """Forget what is held for ``dedup_key`` (only if it is still ``held``, when given).
        True for the one caller that removed it (a release that hands it to its group)."""
        if held is None:
            return bool(self.client.hdel(self.held, dedup_key, OWED_MARK + dedup_key))
        return bool(self._drop_held(keys=[self.held], args=[dedup_key, held]))

    def stage_drop_held(self, pipe: Any, dedup_key: str) -> None:
        """:meth:`drop_held` without ``held``, added to ``pipe`` (or run, given the client)."""
        pipe.hdel(self.held, dedup_key, OWED_MARK + dedup_key)

    def claim(self, lease_ms: int, *, rate_per_s: float = 0.0, burst: int = 1) -> Claimed | int:
        """The next due delivery, leased to us for ``lease_ms``; else ms to wait (-1: empty)."""
        keys, args = self._claim_call(lease_ms, rate_per_s, burst)
        return self._claimed(self._claim(keys=keys, args=args), args)

    def finish_and_claim(
        self,
        done: Claimed | None,
        lease_ms: int,
        *,
        rate_per_s: float = 0.0,
        burst: int = 1,
        before: Sequence[tuple[Any, ...]] = (),
    ) -> tuple[bool, Claimed | int]:
        """:meth:`finish` ``done`` (if any), then :meth:`claim`, in one round trip: (whether
        ``done`` was finished, the claim). The delivery threads' loop (notifiers/delivery.py):
        one round trip per delivery instead of three, on a GIL the worker's main thread shares.

        ``before``: commands to send first (the log entry of ``done``). Their failures are
        logged, not raised; a failed finish or claim raises as it does alone."""
        keys, args = self._claim_call(lease_ms, rate_per_s, burst)
        commands = list(before)
        if done is not None:
            finish_keys, finish_args = self._finish_call(done)
            commands.append(("EVALSHA", self._finish.sha, len(finish_keys), *finish_keys, *finish_args))
        commands.append(("EVALSHA", self._claim.sha, len(keys), *keys, *args))
        replies = roundtrip(self.client, commands)
        finished = True
        if done is not None:
            *before, finish_reply, reply = replies
            if isinstance(finish_reply, redis.exceptions.NoScriptError):
                finish_reply = self._finish(keys=finish_keys, args=finish_args)  # Redis lost its scripts
            elif isinstance(finish_reply, Exception):
                raise finish_reply
            finished = bool(finish_reply)
        else:
            *before, reply = replies
        for error in before:
            if isinstance(error, Exception):
                log.warning("notifier %s: could not log a delivery: %s", self.notifier, error)
        if isinstance(reply, redis.exceptions.NoScriptError):
            reply = self._claim(keys=keys, args=args)
        elif isinstance(reply, Exception):
            raise reply
        return finished, self._claimed(reply, args)

    def _claim_call(self, lease_ms: int, rate_per_s: float, burst: int) -> tuple[list[str], list[Any]]:
        keys = [self.queue, self.jobs, self.order, self.leases, self.limits, self.retrying]
        return keys, [lease_ms, os.urandom(8).hex(), rate_per_s / 1000.0, burst]

    @staticmethod
    def _claimed(reply: Any, args: list[Any]) -> Claimed | int:
        if int(reply[0]) == 1:
            return Claimed(Job.from_json(reply[2]), args[1], int(reply[3]))
        return int(reply[1])

    def finish(self, claimed: Claimed) -> bool:
        """Forget a delivery that is done (delivered or failed for good). False: lease lost."""
        keys, args = self._finish_call(claimed)
        return bool(self._finish(keys=keys, args=args))

    def _finish_call(self, claimed: Claimed) -> tuple[list[str], list[str]]:
        keys = [self.queue, self.jobs, self.order, self.leases, self.retrying]
        job = claimed.job
        return keys, [job.id, claimed.token, job.alert.get("dedup_key", "")]

    def retry(self, claimed: Claimed, delay_ms: int, *, pause_ms: int = 0, failed: bool = True) -> bool:
        """Make it due again in ``delay_ms``, saving its updated attempts and last error.
        ``failed=False``: handed back unfinished (a stopping worker), not a failed attempt."""
        keys = [self.queue, self.jobs, self.leases, self.limits, self.retrying]
        job = claimed.job
        args: list[Any] = [
            job.id,
            claimed.token,
            max(0, delay_ms),
            job.to_json(),
            max(0, pause_ms),
            int(failed),
        ]
        return bool(self._retry(keys=keys, args=args))

    def trim_seen(self, older_than_ms: int) -> None:
        """Forget alert ids queued before ``older_than_ms`` (redeliveries come within minutes)."""
        self.client.zremrangebyscore(self.seen, "-inf", older_than_ms)

    def pending(self) -> int:
        return int(self.client.hlen(self.jobs))

    def next_due_in_ms(self) -> int:
        """Ms until the earliest delivery is due (<= 0: due now), or -1 when none is pending."""
        first = self.client.zrange(self.queue, 0, 0, withscores=True)
        if not first:
            return -1
        seconds, micros = self.client.time()
        return int(first[0][1]) - (int(seconds) * 1000 + int(micros) // 1000)


# -- what the CLI and the dashboard read ------------------------------------------------------------


@dataclass(frozen=True)
class Retrying:
    """One notifier's deliveries waiting for another attempt after a failed one."""

    notifier: str
    count: int
    last: Job | None
    """The delivery whose attempt failed most recently (its ``last_error``, ``last_status``)."""
    last_ms: int | None
    """When that attempt failed (Redis time, ms)."""


def notifier_names(client: Client, keys: Keys) -> list[str]:
    """Every notifier that ever recorded an outcome or a retry (from ``<prefix>:notify:stats``):
    the CLI need not load the plugins to know which notifiers to look at, and a notifier since
    taken out of the file still shows what it left behind."""
    redis: Any = client
    names = {_text(field).rpartition(":")[0] for field in redis.hkeys(keys.notify_stats)}
    return sorted(name for name in names if name)


def retrying(client: Client, keys: Keys, notifier: str) -> Retrying:
    """How many deliveries of ``notifier`` wait for a retry, and the newest failed attempt."""
    redis: Any = client
    index = keys.notifier_retrying(notifier)
    pipe = redis.pipeline(transaction=False)
    pipe.zcard(index)
    pipe.zrevrange(index, 0, 0, withscores=True)
    count, newest = pipe.execute()
    if not newest:
        return Retrying(notifier, int(count), None, None)
    jobs = pending_jobs(client, keys, notifier, [_text(newest[0][0])])
    return Retrying(notifier, int(count), next(iter(jobs.values()), None), int(newest[0][1]))


def retrying_jobs(
    client: Client, keys: Keys, notifier: str, *, since_ms: int = 0, limit: int = 1000
) -> list[tuple[int, Job]]:
    """Up to ``limit`` deliveries waiting for a retry whose last attempt failed after
    ``since_ms``, newest last, each with when that attempt failed."""
    redis: Any = client
    found = redis.zrevrangebyscore(keys.notifier_retrying(notifier), "+inf", since_ms, start=0, num=limit,
                                   withscores=True)  # fmt: skip
    jobs = pending_jobs(client, keys, notifier, [_text(member) for member, _ in found])
    out = [(int(score), jobs[_text(member)]) for member, score in found if _text(member) in jobs]
    return out[::-1]


def retrying_ids(client: Client, keys: Keys, notifier: str, ids: list[str]) -> set[str]:
    """Those of ``ids`` whose last attempt failed and that wait for the next."""
    redis: Any = client
    pipe = redis.pipeline(transaction=False)
    for delivery_id in ids:
        pipe.zscore(keys.notifier_retrying(notifier), delivery_id)
    return {delivery_id for delivery_id, score in zip(ids, pipe.execute(), strict=True) if score is not None}


def pending_jobs(client: Client, keys: Keys, notifier: str, ids: list[str]) -> dict[str, Job]:
    """The pending deliveries among ``ids`` (absent: delivered, failed or never queued)."""
    redis: Any = client
    out: dict[str, Job] = {}
    for at in range(0, len(ids), 1000):
        chunk = ids[at : at + 1000]
        for delivery_id, raw in zip(chunk, redis.hmget(keys.notifier_jobs(notifier), chunk), strict=True):
            if raw is None:
                continue
            try:
                out[delivery_id] = Job.from_json(raw)
            except (ValueError, TypeError):
                continue  # not ours to judge here: the delivery threads fail it with the reason
    return out


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
