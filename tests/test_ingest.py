"""The server-side event writer (agentwatch/ingest.py) on a real Redis: runs and seqs the way a
producer numbers them, coordinated between servers; flood limits; and the detectors treating
what it writes exactly like a producer's events."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
import redis
import redis.asyncio
from agents_detect.kit import fired, pipeline_for, resolved, transitions, worker_for

from agentwatch import codec, signing
from agentwatch.embedded import EmbeddedRedis
from agentwatch.errors import InvalidEntry
from agentwatch.fleet import fleet_status
from agentwatch.ingest import (
    BACKOFF_CAP_S,
    CONTENDED_FOR_S,
    Contended,
    EventWriter,
    Flooded,
    FloodLimit,
    Written,
    retry_pause_s,
)
from agentwatch.ingest_link import Link
from agentwatch.ingest_records import Call, Record, merged
from agentwatch.keys import BUCKETS, Keys

from helpers import running, wait_for

T = TypeVar("T")
ROOMY = FloodLimit(rate_per_s=1000.0, burst=1000)


def writer(r: redis.Redis, keys: Keys, limit: FloodLimit = ROOMY, **kwargs: Any) -> EventWriter:
    return EventWriter(r, keys, limit=limit, run_ttl_s=kwargs.pop("run_ttl_s", 3600.0), **kwargs)


def events(r: redis.Redis, keys: Keys, agent: str = "cron") -> list[dict[str, Any]]:
    decoded = [codec.decode(fields[b"d"]) for _, fields in r.xrange(keys.events_for(agent))]
    return [event for event in decoded if event["agent"] == agent]


def shape(evs: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
    return [(e["kind"], e["run"], e["seq"]) for e in evs]


def test_the_first_call_starts_a_run_and_later_calls_continue_it(r: redis.Redis, keys: Keys) -> None:
    w = writer(r, keys)
    first = w.write("cron", "beat", {"tokens": 5}, interval_s=60.0)
    w.write("cron", "beat", {"tokens": 7})
    evs = events(r, keys)
    run = first.run
    assert first.started and first.seq == 1 and first.events == 2
    assert shape(evs) == [("start", run, 0), ("beat", run, 1), ("beat", run, 2)]
    assert evs[0]["interval"] == 60.0 and evs[0]["version"].startswith("agentwatch-http/")
    assert [e.get("tokens") for e in evs[1:]] == [5, 7]


def test_start_and_exit_delimit_runs_and_the_interval_is_remembered(r: redis.Redis, keys: Keys) -> None:
    w = writer(r, keys)
    one = w.write("cron", "start", interval_s=300.0)
    w.write("cron", "exit", {"reason": "exit", "code": 2})
    two = w.write("cron", "beat")  # the run after a failure is a new one
    three = w.write("cron", "start")
    evs = events(r, keys)
    assert len({one.run, two.run, three.run}) == 3
    assert shape(evs) == [
        ("start", one.run, 0), ("exit", one.run, 1),
        ("start", two.run, 0), ("beat", two.run, 1),
        ("start", three.run, 0),
    ]  # fmt: skip
    assert [e.get("interval") for e in evs if e["kind"] == "start"] == [300.0, 300.0, 300.0]


def test_a_new_interval_is_announced_by_a_pulse(r: redis.Redis, keys: Keys) -> None:
    w = writer(r, keys)
    w.write("cron", "beat", interval_s=60.0)
    w.write("cron", "beat", interval_s=60.0)  # unchanged: no pulse
    w.write("cron", "beat", interval_s=120.0)
    kinds = [(e["kind"], e["seq"], e.get("interval")) for e in events(r, keys)]
    assert kinds == [("start", 0, 60.0), ("beat", 1, None), ("beat", 2, None), ("pulse", 3, 120.0),
                     ("beat", 4, None)]  # fmt: skip


def test_bad_input_writes_nothing_and_costs_no_seq(r: redis.Redis, keys: Keys) -> None:
    w = writer(r, keys)
    w.write("cron", "beat")
    with pytest.raises(InvalidEntry, match="'tokens' must be an integer >= 0"):
        w.write("cron", "beat", {"tokens": -1})
    with pytest.raises(InvalidEntry, match="outside A-Za-z0-9"):
        w.write("<script>", "beat")
    with pytest.raises(InvalidEntry, match="'interval' must be a finite number"):
        w.write("cron", "beat", interval_s=float("nan"))
    w.write("cron", "beat")
    assert [e["seq"] for e in events(r, keys)] == [0, 1, 2]


def test_a_flood_is_refused_per_agent_with_a_time_to_come_back(r: redis.Redis, keys: Keys) -> None:
    w = writer(r, keys, FloodLimit(rate_per_s=0.5, burst=3))
    for _ in range(3):
        w.write("noisy", "beat")
    with pytest.raises(Flooded) as refused:
        w.write("noisy", "beat")
    assert 0 < refused.value.retry_after_s <= 2.0
    w.write("quiet", "beat")  # another agent has its own bucket
    assert len(events(r, keys, "noisy")) == 4  # start + 3 beats: the refused one wrote nothing


def test_servers_behind_a_load_balancer_share_one_sequence(
    spawn_redis: Callable[..., EmbeddedRedis], keys: Keys
) -> None:
    # Eight writers on one agent over TCP (servers behind a load balancer): enough contention
    # that, without the random back-off between attempts (ingest.retry_pause_s), a writer lost 50
    # attempts in a row 2-3 times per run of 8 x 100, and even with it, on a loaded machine, 6
    # times once: a write now gives up only after losing for CONTENDED_FOR_S.
    url = spawn_redis().url
    r = redis.Redis.from_url(url)
    clients = [r, *(redis.Redis.from_url(url) for _ in range(7))]
    writers = [writer(c, keys) for c in clients]
    writers[0].write("shared", "start")
    refused: list[Exception] = []

    def pump(w: EventWriter) -> None:
        for _ in range(100):
            try:
                w.write("shared", "beat", {"tokens": 1})
            except Contended as exc:
                refused.append(exc)

    threads = [threading.Thread(target=pump, args=(w,)) for w in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert refused == []
    evs = events(r, keys, "shared")
    assert len({e["run"] for e in evs}) == 1
    assert sorted(e["seq"] for e in evs) == list(range(801))
    for c in clients:
        c.close()


def record(r: redis.Redis, keys: Keys, agent: str) -> Record | None:
    raw = r.hget(keys.ingest_for(agent), agent)
    return Record.parse(raw) if raw else None


def test_its_record_expires_when_the_agent_goes_quiet_and_is_swept(r: redis.Redis, keys: Keys) -> None:
    w = writer(r, keys, run_ttl_s=1.0)
    first = w.write("cron", "beat")
    found = record(r, keys, "cron")
    assert found is not None and time.time() < found.exp_s <= time.time() + 2
    w.write("weekly", "start", interval_s=7 * 86400.0)
    weekly = record(r, keys, "weekly")
    assert weekly is not None and weekly.exp_s > time.time() + 4 * 7 * 86400 - 5  # outlives its interval
    wait_for(
        lambda: (w.sweep(), record(r, keys, "cron") is None)[1], timeout=10, what="the quiet agent swept"
    )
    assert record(r, keys, "weekly") is not None
    again = w.write("cron", "beat")  # the next call after the expiry starts a new run
    assert again.started and again.run != first.run
    assert shape(events(r, keys))[-2:] == [("start", again.run, 0), ("beat", again.run, 1)]


def test_a_stale_record_starts_a_new_run_even_before_it_is_swept(r: redis.Redis, keys: Keys) -> None:
    w = writer(r, keys, run_ttl_s=1.0)
    first = w.write("cron", "beat")
    wait_for(lambda: time.time() > first_exp(r, keys), timeout=10, what="the record to go stale")
    second = w.write("cron", "beat")
    assert second.started and second.run != first.run
    assert sum(r.hlen(keys.ingest(0, bucket)) for bucket in range(BUCKETS)) == 1  # the same record, renewed


def first_exp(r: redis.Redis, keys: Keys) -> float:
    found = record(r, keys, "cron")
    return found.exp_s if found else 0.0


def test_the_detectors_treat_written_events_like_a_producers(
    redis_url: str, prefix: str, r: redis.Redis
) -> None:
    # (2 s: between the beats and the exit the test reads `status`, which shows the detectors'
    # checkpoint, saved every half second: on a loaded box that can take longer than 600 ms)
    pipeline = pipeline_for(prefix, redis_url, silence={"after": "2s"}, exit={"clean_exit": False})
    keys = pipeline.keys
    w = writer(r, keys)
    with running(worker_for(pipeline, redis_url)):
        for tokens in (10, 20, 30):
            w.write("job", "beat", {"tokens": tokens, "cost": 0.01})

        def totals() -> Any:
            found = [a for a in fleet_status(r, pipeline)["agents"] if a["agent"] == "job"]
            return found and found[0]["tokens_total"] == 60 and found[0]

        agent = wait_for(totals, timeout=10, what="tokens counted")
        assert agent["beats_total"] == 3 and agent["cost_total"] == pytest.approx(0.03)
        w.write("job", "exit", {"reason": "exit", "code": 1, "error": "backup failed"})
        wait_for(lambda: fired(r, keys, "exit", "job"), timeout=10, what="exit alert")
        w.write("job", "beat")  # the next run: the exit incident resolves
        wait_for(lambda: resolved(r, keys, "exit", "job"), timeout=10, what="exit resolved")
        wait_for(lambda: fired(r, keys, "silence", "job"), timeout=10, what="silence once it stops")
    assert transitions(r, keys) == [("job", "exit", "firing"), ("job", "exit", "resolved"),
                                    ("job", "silence", "firing")]  # fmt: skip


LOOP_PATHS = ["thread", "link"]
"""How :meth:`EventWriter.awrite` reaches Redis: redis-py in a worker thread (a cluster), or the
event loop's own connection (agentwatch/ingest_link.py: the HTTP server's)."""


def link_to(url: str, path: str) -> dict[str, Any]:
    """``writer()``'s keyword for ``path``."""
    return (
        {"link": Link(redis.asyncio.ConnectionPool.from_url(url, socket_timeout=5))} if path == "link" else {}
    )


def run(w: EventWriter, work: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(work)``, the writer's link closed before its event loop ends (as the HTTP
    server closes it at shutdown)."""

    async def closing() -> T:
        try:
            return await work
        finally:
            if w.link is not None:
                await w.link.close()

    return asyncio.run(closing())


@pytest.mark.parametrize("path", LOOP_PATHS)
def test_concurrent_writes_from_an_event_loop_share_round_trips(
    r: redis.Redis, keys: Keys, redis_url: str, path: str
) -> None:
    w = writer(r, keys, **link_to(redis_url, path))

    async def burst() -> list[Any]:
        return await asyncio.gather(*(w.awrite("async-agent", "beat", {"tokens": 1}) for _ in range(100)))

    written = run(w, burst())
    assert sorted(x.seq for x in written) == list(range(1, 101))  # seq 0: the run's start
    assert [e["seq"] for e in events(r, keys, "async-agent")] == list(range(101))


@pytest.mark.parametrize("path", LOOP_PATHS)
def test_concurrent_writes_for_many_agents_are_joined_into_one_script_call(
    r: redis.Redis, keys: Keys, redis_url: str, path: str
) -> None:
    w = writer(r, keys, **link_to(redis_url, path))
    agents = [f"joined-{n}" for n in range(10)]

    async def burst() -> list[Any]:
        calls = [w.awrite(agent, "beat", {"tokens": n}) for n in range(5) for agent in agents]
        return await asyncio.gather(*calls)

    def evalsha_calls() -> int:
        return int(r.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))

    run(w, w.awrite("joined-warm", "beat"))  # the script is loaded: EVALSHA from here on
    before = evalsha_calls()
    written = run(w, burst())
    assert evalsha_calls() - before < len(written) / 2  # joined: far fewer calls than writes
    for agent in agents:  # each agent's events in its order, with its own usage, seq by seq
        mine = events(r, keys, agent)
        assert [e["seq"] for e in mine] == list(range(6))
        assert [e.get("tokens") for e in mine[1:]] == list(range(5))
    assert sorted(x.seq for x in written if x.run == written[0].run) == list(range(1, 6))


def test_a_joined_call_answers_each_write_as_its_own_call_would() -> None:
    # Pure logic: which calls are joined, and how the joined reply is split back.
    def call(shard: str, *agents: str, guards: int = 0) -> Call:
        head: list[Any] = [1000, 1.0, 10, guards, *(["g", "", "v"] * guards)]
        return Call([shard, "s", "o"], head + [x for a in agents for x in (a, "", "n", 0, 1000, b"e")])

    calls = [call("k1", "a"), call("k2", "b"), call("k1", "c", "d"), call("k1", "e", guards=1)]
    calls.append(call("k1", "f"))
    joined = merged(calls)
    assert [len(c.args) for c in joined.calls] == [4 + 6 * 4, 4 + 6, 4 + 3 + 6]
    assert [c.args[4::6] for c in joined.calls[:2]] == [["a", "c", "d", "f"], ["b"]]
    replies = [[1, 1, b"ra", 3, 5, 2, b"rd", 1, b"rf"], RuntimeError("away"), [0, [b"g", b"x"]]]
    assert joined.split(replies) == [
        [1, 1, b"ra"],
        replies[1],
        [1, 3, 5, 2, b"rd"],
        [0, [b"g", b"x"]],
        [1, 1, b"rf"],
    ]


@pytest.mark.parametrize("path", LOOP_PATHS)
def test_a_server_that_lost_the_script_gets_it_again(spawn_redis: Any, path: str) -> None:
    server = spawn_redis()
    client = redis.Redis.from_url(server.url)
    w = writer(client, Keys("t"), **link_to(server.url, path))
    run(w, w.awrite("a", "beat"))
    client.script_flush()  # what a restarted server without persistence has lost
    assert run(w, w.awrite("a", "beat")).seq == 2
    client.close()


def _unpackable_call(maxlen: int) -> Call:
    """A write script's call with an argument hiredis cannot pack: the link fails to send it."""
    return Call(["k1", "k2", "k3"], [maxlen, 1.0, 10, 0, "x", b"", b"", 0, 1000, object()])


def _unjoinable_call(maxlen: int) -> Call:
    """A call that is not one of the write script's: joining the batch fails before sending."""
    return Call(["k1", "k2"], None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("bad_call", "error"),
    [(_unpackable_call, Exception), (_unjoinable_call, TypeError)],
    ids=["cannot-be-sent", "cannot-be-joined"],
)
def test_a_bad_batch_answers_its_writes_and_the_next_batch_goes(
    r: redis.Redis, keys: Keys, redis_url: str, bad_call: Callable[[int], Call], error: type[Exception]
) -> None:
    """A batch is joined and sent from a callback, not a task: a fault there (an argument hiredis
    cannot pack, a call that cannot be joined) must still answer the writes that were waiting,
    with the error, and the server's later pings are still written."""
    w = writer(r, keys, **link_to(redis_url, "link"))

    async def scenario() -> tuple[Any, Written]:
        reply = await asyncio.wait_for(w._batches.submit(bad_call(w.maxlen)), 5)
        after = await asyncio.wait_for(w.awrite("after-a-bad-batch", "beat"), 5)
        return reply, after

    reply, after = run(w, scenario())
    assert isinstance(reply, error)
    assert after.seq == 1 and [e["seq"] for e in events(r, keys, "after-a-bad-batch")] == [0, 1]


@pytest.mark.parametrize("path", LOOP_PATHS)
def test_bad_input_and_floods_reach_only_their_own_request(
    r: redis.Redis, keys: Keys, redis_url: str, path: str
) -> None:
    w = writer(r, keys, FloodLimit(rate_per_s=0.01, burst=2), **link_to(redis_url, path))

    async def mixed() -> list[Any]:
        calls = [w.awrite("limited", "beat") for _ in range(3)] + [w.awrite("other", "beat")]
        return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = run(w, mixed())
    assert [type(o).__name__ for o in outcomes] == ["Written", "Written", "Flooded", "Written"]


def test_the_event_loops_link_reconnects_after_a_lost_connection_and_a_silent_server(
    spawn_redis: Any,
) -> None:
    """Its connection killed between writes: the next write opens a new one. A server that stops
    answering (SIGSTOP): the writes waiting get redis-py's TimeoutError (a 503 for a ping) within
    the socket timeout, the loop is never blocked, and once the server answers again the next
    write goes through on a new connection, numbered after the last one written."""
    server = spawn_redis()
    client = redis.Redis.from_url(server.url)
    link = Link(redis.asyncio.ConnectionPool.from_url(server.url, socket_timeout=1, client_name="aw-link"))
    w = writer(client, Keys("t"), link=link)

    async def scenario() -> list[Any]:
        seen: list[Any] = [(await w.awrite("a", "beat")).seq]
        assert client.client_kill_filter(_type="normal", skipme=True) >= 1  # our link among them
        seen.append((await w.awrite("a", "beat")).seq)
        server.process.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            ticks = asyncio.create_task(_count_ticks())
            outcome = await asyncio.gather(w.awrite("a", "beat"), return_exceptions=True)
            seen += [type(outcome[0]), time.monotonic() - started, await ticks]
        finally:
            server.process.send_signal(signal.SIGCONT)
        seen.append((await w.awrite("a", "beat")).seq)
        return seen

    first, second, error, waited, ticks, after = run(w, scenario())
    assert (first, second) == (1, 2)
    assert error is redis.TimeoutError and waited < 5
    assert ticks > 5  # the loop went on running while the write waited
    # the timed-out write reached Redis's socket before it stopped: whether Redis ran it is for
    # Redis to say, so the record was read again, and the next seq follows whatever it holds
    assert after in (3, 4)
    seqs = [e["seq"] for e in events(r=client, keys=Keys("t"), agent="a")]
    assert seqs == list(range(after + 1))
    client.close()


async def _count_ticks() -> int:
    ticks = 0
    for _ in range(20):
        await asyncio.sleep(0.05)
        ticks += 1
    return ticks


SECRET = "a-pipeline-secret-for-the-tests-" + "0123456789"


def test_with_agent_keys_every_event_is_signed_with_its_agents_key(r: redis.Redis, keys: Keys) -> None:
    w = writer(r, keys, secret=SECRET)
    w.write("signed-bot", "start", interval_s=30.0)
    w.write("signed-bot", "beat", {"tokens": 3}, interval_s=60.0)  # a pulse declares the new interval
    entries = [fields for _, fields in r.xrange(keys.events_for("signed-bot"))]
    assert [codec.decode(f[b"d"])["kind"] for f in entries] == ["start", "pulse", "beat"]
    key = signing.agent_key(SECRET, "signed-bot")
    for fields in entries:
        signed_s = signing.check(key, keys.events_for("signed-bot"), fields[b"d"], fields[b"s"])
        assert abs(signed_s - time.time()) < 60
    with pytest.raises(signing.BadSignature):  # another agent's key does not verify them
        signing.check(
            signing.agent_key(SECRET, "other"), keys.events_for("x"), entries[0][b"d"], entries[0][b"s"]
        )


def test_a_server_that_missed_the_last_writes_numbers_again_from_the_record(
    r: redis.Redis, keys: Keys
) -> None:
    one, two = writer(r, keys), writer(r, keys)  # two servers behind a load balancer, each its own memory
    one.write("lb", "beat")
    two.write("lb", "beat")  # two has never seen lb: numbered as new, told otherwise, numbered again
    one.write("lb", "beat")  # one's memory is two writes behind
    two.write("lb", "exit", {"reason": "exit", "code": 0})
    after = one.write("lb", "beat")  # the run exited on the other server: this one starts the next
    evs = events(r, keys, "lb")
    run = evs[0]["run"]
    assert shape(evs) == [("start", run, 0), ("beat", run, 1), ("beat", run, 2), ("beat", run, 3),
                          ("exit", run, 4), ("start", after.run, 0), ("beat", after.run, 1)]  # fmt: skip
    assert after.started and after.run != run


def test_a_contended_write_backs_off_with_jitter_and_gives_up_only_after_its_time() -> None:
    now = time.monotonic()
    pauses = [retry_pause_s(attempt, now, "shared") for attempt in (1, 1, 1, 8, 8, 8, 30)]
    assert all(0.0 <= p <= 0.00025 for p in pauses[:3])  # the first loss: a short pause
    assert all(0.0 <= p <= BACKOFF_CAP_S for p in pauses[3:]) and len(set(pauses)) > 1
    retry_pause_s(1000, now - CONTENDED_FOR_S + 1, "shared")  # many attempts, still within its time
    with pytest.raises(Contended, match=r"^shared: its record changed under every attempt for 5s"):
        retry_pause_s(2, now - CONTENDED_FOR_S - 0.1, "shared")
