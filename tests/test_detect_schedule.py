"""Schedules (cron agents): expected once per slot, judged by their schedule and not the interval
rule. A slot missed past its grace pages once (one incident while the agent stays away, naming
the slot), resolves when the agent runs again; a run over ``max_runtime`` pages on its own; a
clean exit between runs is normal; bad schedules are config errors.

Time is driven three ways, each honest about what it shows: the decision function with explicit
times; the real engine on a real Redis fed hand-made batches and ticked at explicit Redis times
(``Feed``); and one end-to-end run of real producer processes launched at the slots of a
seconds-resolution schedule (cronsim's optional sixth field), against a running worker."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from agents.testkit import agent_env
from agents_detect.kit import Agent as KitAgent
from agents_detect.kit import Feed, alerts, fired, pipeline_for, resolved, transitions, worker_for
from redis.cluster import RedisCluster
from typer.testing import CliRunner

from agentwatch import codec
from agentwatch.alerts import decode_alert
from agentwatch.cli import app
from agentwatch.cron import Cron
from agentwatch.facts import FactsRecorder
from agentwatch.keys import Keys, shard_of
from agentwatch.redisconn import server_time_ms
from detectors.agent import Agent
from detectors.schedule import MISSED, OVERRAN, Plan, Runs, Watch, decide, render
from notifiers.routing import known_detectors

from helpers import caught_up, running, wait_for

DAY = "2026-12-07"


def T(clock: str, day: str = DAY) -> int:
    """Milliseconds (UTC) of ``HH:MM[:SS[.fff]]`` on ``day``."""
    return round(datetime.fromisoformat(f"{day}T{clock}+00:00").timestamp() * 1000)


QUARTER = Plan(Cron.parse("*/15 * * * *"), grace_ms=300_000, max_runtime_ms=600_000)


def ran(start: str, last: str, *, finished: bool = True, run: str = "r1", day: str = DAY) -> Runs:
    return Runs(seen=T(last, day), start=T(start, day), run=run, finished=finished)


# -- the decision, with explicit times -------------------------------------------------------


def test_on_time_nothing_is_decided_and_the_next_look_is_the_slot_plus_grace() -> None:
    got = decide(QUARTER, ran("03:00:02", "03:00:40"), None, T("03:19:59.999"))
    assert got.ops == [] and got.due == T("03:20:00")
    assert got.watch == Watch(ran("03:00:02", "03:00:40"))


def test_a_slot_missed_past_its_grace_fires_once_naming_the_slot_and_resolves_when_it_runs() -> None:
    runs = ran("03:00:02", "03:00:40")
    first = decide(QUARTER, runs, None, T("03:20:00"))
    assert [(det, o) for det, o, _ in first.ops] == [(MISSED, "f")]
    facts = first.ops[0][2]
    assert facts["slot"] == T("03:15") and facts["start"] == T("03:00:02") and facts["expr"] == "*/15 * * * *"
    # Three more slots go by: still the one incident, nothing more to decide until it runs again.
    later = decide(QUARTER, runs, first.watch, T("03:58"))
    assert later.ops == [] and later.watch == first.watch
    assert later.due == 0  # only its events can change anything now (they wake it: Schedule.on_event)
    back = decide(QUARTER, ran("04:01:00", "04:01:00", finished=False, run="r2"), later.watch, T("04:01:01"))
    assert [(det, o) for det, o, _ in back.ops] == [(MISSED, "r")]
    assert back.ops[0][2]["missed"] == 3  # 03:15, 03:30 and 03:45 went by past their grace
    assert back.due == T("04:11")  # the sooner of max_runtime (04:11) and the next slot (04:15 + 5m)
    assert back.watch is not None and back.watch.missed is None


def test_a_run_that_starts_just_before_its_slot_counts_for_it() -> None:
    early = decide(QUARTER, ran("03:14:59.400", "03:14:59.900"), None, T("03:20:00"))
    assert early.ops == [] and early.due == T("03:35")
    # ...but a run a few seconds early is the previous slot's, late
    before = decide(QUARTER, ran("03:14:55", "03:14:56"), None, T("03:20:00"))
    assert [(det, o) for det, o, _ in before.ops] == [(MISSED, "f")]


def test_after_a_gap_nobody_watched_the_owed_slot_counts_from_its_end() -> None:
    """Redis (or every worker) was down 03:10-03:21: the 03:15 run may have had nowhere to go."""
    got = decide(QUARTER, ran("03:00:02", "03:00:40"), None, T("03:21:00"), sight_ms=T("03:21"))
    assert got.ops == [] and got.due == T("03:35")


def test_a_run_over_max_runtime_is_its_own_incident() -> None:
    running_ = ran("03:15:00", "03:15:05", finished=False)
    assert decide(QUARTER, running_, None, T("03:24:59")).due == T("03:25:00")
    over = decide(QUARTER, running_, None, T("03:25:00"))
    assert [(det, o) for det, o, _ in over.ops] == [(OVERRAN, "f")]
    assert over.watch is not None and over.watch.over == "r1"
    done = decide(QUARTER, ran("03:15:00", "03:27:00"), over.watch, T("03:27:01"))
    assert [(det, o, f["how"]) for det, o, f in done.ops] == [(OVERRAN, "r", "finished")]
    next_run = ran("03:30:00", "03:30:00", finished=False, run="r2")
    replaced = decide(QUARTER, next_run, over.watch, T("03:30:01"))
    assert [(det, o, f["how"]) for det, o, f in replaced.ops] == [(OVERRAN, "r", "replaced")]


def test_no_longer_scheduled_resolves_what_is_open_and_drops_the_watch() -> None:
    watch = Watch(ran("03:00:00", "03:00:00"), missed={"slot": T("03:15"), "seen": T("03:00")}, over="r1")
    got = decide(None, None, watch, T("04:00"))
    assert got.watch is None and got.due == 0
    assert [(det, o) for det, o, _ in got.ops] == [(MISSED, "r"), (OVERRAN, "r")]


def test_an_agent_never_seen_is_not_expected_and_a_forgotten_one_still_is() -> None:
    assert decide(QUARTER, None, None, T("09:00")).ops == []
    kept = Watch(ran("03:00:02", "03:00:40"))
    forgotten = decide(QUARTER, None, kept, T("03:20"))  # its record deleted by forget
    assert [(det, o) for det, o, _ in forgotten.ops] == [(MISSED, "f")]


def test_the_summary_names_the_slot_the_schedule_and_the_last_run() -> None:
    facts = decide(QUARTER, ran("03:00:02", "03:00:40"), None, T("03:20")).ops[0][2]
    summary, details = render("backup", MISSED, {"o": "f", "at": T("03:20:00.100"), "f": facts})
    assert (
        summary
        == "backup: missed a scheduled run: expected at 03:15 (*/15 * * * *, grace 5m), last run 03:00:02"
    )
    assert details["slot"] == "2026-12-07T03:15:00.000Z" and details["grace_s"] == 300
    # In the operator's zone: 03:00 in Berlin is 02:00 UTC; a date where it is not the slot's day.
    berlin = Plan(Cron.parse("0 3 * * *", "Europe/Berlin"), 600_000, None)
    late = decide(berlin, ran("02:00:01", "02:02:00", day="2026-12-05"), None, T("02:10", "2026-12-06"))
    summary, _ = render("nightly", MISSED, {"o": "f", "at": T("02:10", "2026-12-06"), "f": late.ops[0][2]})
    assert summary == (
        "nightly: missed a scheduled run: expected at 03:00 (0 3 * * * Europe/Berlin, grace 10m), "
        "last run 2026-12-05 03:00:01"
    )


def test_the_schedule_is_in_the_report_timezone_unless_it_names_its_own() -> None:
    from detectors.silence import SilenceConfig  # noqa: PLC0415

    plain = SilenceConfig.model_validate({"schedule": "0 3 * * *"})
    own = SilenceConfig.model_validate({"schedule": "0 3 * * *", "timezone": "Asia/Tokyo"})
    assert Plan.of(plain, "Europe/Berlin").cron.tz.key == "Europe/Berlin"  # type: ignore[union-attr]
    assert Plan.of(own, "Europe/Berlin").cron.tz.key == "Asia/Tokyo"  # type: ignore[union-attr]
    assert Plan.of(SilenceConfig(), "UTC") is None


# -- bad input: check-config names the key and the parse error -------------------------------


def test_check_config_refuses_bad_schedules_naming_the_key_and_why(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.toml"
    path.write_text(
        '[detectors.silence.agents."backup-*"]\nschedule = "61 * * * *"\ngrace = "0s"\nmax_runtime = "0s"\n'
        '[detectors.silence.agents."nightly"]\nschedule = "0 3 * * *"\ntimezone = "Mars/Olympus"\n'
        '[detectors.silence.agents."x"]\nschedule = "* * *"\n'
    )
    result = CliRunner().invoke(app, ["check-config", str(path)])
    assert result.exit_code == 2
    where = '[detectors.silence.agents."backup-*"]'
    for line in (
        f"{where} schedule: invalid cron expression '61 * * * *': Bad minute",
        f"{where} grace: must be more than 0ms, got 0ms",
        f"{where} max_runtime: Input should be greater than 0 (got '0s')",
        "[detectors.silence.agents.nightly] timezone: unknown timezone 'Mars/Olympus'",
        "[detectors.silence.agents.x] schedule: invalid cron expression '* * *': Wrong number of fields",
    ):
        assert line in result.output, result.output


def test_schedule_and_after_on_one_glob_schedule_wins_and_the_worker_says_so(
    redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    agents = {"backup-*": {"schedule": "*/15 * * * *", "after": "10m"}, "chat-*": {"grace": "1m"}}
    with caplog.at_level("WARNING", logger="agentwatch.detectors"):
        worker = worker_for(pipeline_for(prefix, redis_url, silence={"agents": agents}), redis_url)
    assert (
        '[detectors.silence.agents."backup-*"]: schedule wins; after is not used for these agents'
        in caplog.text
    )
    assert '[detectors.silence.agents."chat-*"]: grace without schedule has no effect' in caplog.text
    feed = Feed(worker)
    silence: Any = feed.engine.get("Silence")
    assert not silence.watches(Agent("backup-1"))  # no interval rule for it
    assert silence.watches(Agent("chat-1"))
    clean: dict[str, Any] = {"reason": "exit", "code": 0}
    feed.apply([feed.event("backup-1", "start", pid=1), feed.event("backup-1", "exit", **clean),
                feed.event("chat-1", "start", pid=2), feed.event("chat-1", "exit", **clean)])  # fmt: skip
    held = {name: agent for shard in feed.engine.shards.values() for name, agent in shard.agents.items()}
    assert held["backup-1"].open == set()  # a clean exit ends a run
    assert held["chat-1"].open == {"exit"}  # (clean_exit: for an unscheduled agent, a warning)
    assert {"schedule", "runtime"} <= known_detectors({})  # notifiers may route and mute them
    worker.client.close()


# -- the real engine on a real Redis, at explicit Redis times ---------------------------------

CRON_AGENTS = {"backup-*": {"schedule": "*/15 * * * *", "grace": "5m", "max_runtime": "10m"}}
NO_GAPS = {"after": "30d", "blind_after": "30d"}  # ticks minutes apart are not outages here


class CronFeed(Feed):
    """Hand-made batches, applied as a worker applies them: start facts first (FactsRecorder:
    whether a run is a process), then the detectors."""

    def __init__(self, worker: Any, t0_ms: int) -> None:
        super().__init__(worker, t0_ms)
        self.facts = FactsRecorder(self.engine.client, self.engine.keys)
        self._last_tick: int | None = None

    def apply(self, messages: list[tuple[bytes, dict[str, Any]]]) -> None:
        self.facts.on_batch(messages)
        super().apply(messages)

    def tick(self, now_ms: int | None = None) -> None:
        """Ticks at most 30 s apart up to ``now_ms``, as a running worker's: a longer gap between
        checks than the shortest silence allowance is an outage nobody watched (engine.sight_ms)."""
        target = now_ms if now_ms is not None else self.now
        if self._last_tick is not None:
            for at in range(self._last_tick + 30_000, target, 30_000):
                super().tick(at)
        super().tick(target)
        self._last_tick = target


def engine_feed(redis_url: str, prefix: str, **silence: Any) -> CronFeed:
    pipeline = pipeline_for(
        prefix, redis_url, silence={"after": "60s", "agents": CRON_AGENTS, **silence}, lag=NO_GAPS
    )
    feed = CronFeed(worker_for(pipeline, redis_url), t0_ms=T("02:59:59"))
    feed.tick(T("03:00"))  # the detectors watch from 03:00 on
    return feed


def cron_run(feed: Feed, agent: str, run: str, at: str, *, end: dict[str, Any] | None = None) -> None:
    """One run of a producer agent launched by cron at ``at``: start, pulse, beat, a clean exit."""
    feed.apply([
        feed.event(agent, "start", run=run, at=T(at) + 300, interval=5.0, pid=4242),
        feed.event(agent, "pulse", run=run, at=T(at) + 400),
        feed.event(agent, "beat", run=run, at=T(at) + 20_000, tokens=10),
        feed.event(agent, "exit", run=run, at=T(at) + 30_000, **(end or {"reason": "exit", "code": 0})),
    ])  # fmt: skip


def tick_every_minute(feed: Feed, start: str, end: str) -> None:
    for at in range(T(start), T(end) + 1, 60_000):
        feed.tick(at)


def test_on_time_cron_runs_page_nothing_while_an_interval_agent_still_goes_silent(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    feed = engine_feed(redis_url, prefix)
    feed.apply(
        [
            feed.event("chat-1", "start", at=T("03:00:01")),
            feed.event("backup-2", "start", at=T("03:00:01"), pid=4243),
        ]
    )
    feed.apply([feed.event("backup-2", "pulse", at=T("03:00:02"))])  # pulses, no beat: stall arms its timer
    for i, slot in enumerate(("03:00", "03:15", "03:30", "03:45")):
        cron_run(feed, "backup-1", f"run-{i}", slot)
        tick_every_minute(feed, slot, f"03:{int(slot[3:]) + 14}")
    # backup-2 sent nothing for 45 minutes: no silence (it is scheduled); its run never finished
    # (runtime) and its 03:15 slot went by (schedule). backup-1 ran on time: nothing.
    assert sorted(transitions(r, keys)) == [
        ("backup-2", "runtime", "firing"),
        ("backup-2", "schedule", "firing"),
        ("chat-1", "silence", "firing"),
    ]


def test_a_late_cron_agent_pages_once_naming_the_slot_and_resolves_when_it_runs_again(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    feed = engine_feed(redis_url, prefix)
    cron_run(feed, "backup-1", "run-0", "03:00:02")
    feed.tick(T("03:19:59"))
    assert alerts(r, keys) == []
    feed.tick(T("03:20:00"))
    (alert,) = fired(r, keys, "schedule")
    assert alert.summary == (
        "backup-1: missed a scheduled run: expected at 03:15 (*/15 * * * *, grace 5m), last run 03:00:02"
    )
    assert (alert.dedup_key, alert.severity, alert.details["last_run"]) == (
        "backup-1/schedule", "critical", "2026-12-07T03:00:02.300Z",
    )  # fmt: skip
    tick_every_minute(feed, "03:21", "03:59")  # three more slots go by: still one page
    cron_run(feed, "backup-1", "run-1", "04:00")
    feed.tick(T("04:00:31"))
    assert transitions(r, keys) == [("backup-1", "schedule", "firing"), ("backup-1", "schedule", "resolved")]
    assert (
        resolved(r, keys, "schedule")[0].summary
        == "backup-1: ran again at 04:00:00, 3 slots missed since 03:15"
    )
    tick_every_minute(feed, "04:01", "04:19")
    assert len(alerts(r, keys)) == 2
    feed.engine.client.close()


def test_a_run_over_max_runtime_pages_and_resolves_when_it_finishes(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    feed = engine_feed(redis_url, prefix)
    feed.apply([
        feed.event("backup-1", "start", at=T("03:15:00"), interval=5.0, pid=4244),
        feed.event("backup-1", "pulse", at=T("03:15:01")),
        feed.event("backup-1", "beat", at=T("03:15:02")),
    ])  # fmt: skip
    feed.tick(T("03:24:59"))
    assert alerts(r, keys) == []
    feed.tick(T("03:25:00"))
    (alert,) = fired(r, keys, "runtime")
    assert alert.summary == (
        "backup-1: run started at 03:15 still not finished after 10m (max_runtime 10m); last seen 03:15:02"
    )
    feed.apply([feed.event("backup-1", "exit", at=T("03:27:00"), reason="exit", code=0)])
    feed.tick(T("03:27:01"))
    assert transitions(r, keys) == [("backup-1", "runtime", "firing"), ("backup-1", "runtime", "resolved")]
    assert resolved(r, keys, "runtime")[0].summary == "backup-1: the run finished after 12m"
    feed.engine.client.close()


def test_a_run_killed_mid_way_is_caught_by_max_runtime_and_ends_with_the_next_run(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    feed = engine_feed(redis_url, prefix)
    feed.apply(
        [
            feed.event("backup-1", "start", at=T("03:15:00.5"), pid=4245),
            feed.event("backup-1", "pulse", at=T("03:15:01")),
        ]
    )
    tick_every_minute(feed, "03:16", "03:29")  # SIGKILLed at 03:15:01: no silence, no stall for it
    assert transitions(r, keys) == [("backup-1", "runtime", "firing")]
    cron_run(feed, "backup-1", "run-2", "03:30")
    feed.tick(T("03:30:31"))
    assert transitions(r, keys) == [("backup-1", "runtime", "firing"), ("backup-1", "runtime", "resolved")]
    assert resolved(r, keys, "runtime")[0].summary == "backup-1: a new run started"
    feed.engine.client.close()


def test_a_crashed_cron_run_still_pages_exit_and_a_ping_job_finishes_with_its_success_ping(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    feed = engine_feed(redis_url, prefix)
    cron_run(
        feed, "backup-1", "run-0", "03:00", end={"reason": "exception", "code": 1, "error": "OSError: disk"}
    )
    # An HTTP ping job: /start, then the success ping (a beat) 5 minutes later; no pulses. Without
    # the success ping ending its run, max_runtime (10m) would page at 03:10:01.
    feed.apply([feed.event("backup-ping", "start", at=T("03:00:01"), version="agentwatch-http/1")])
    tick_every_minute(feed, "03:01", "03:04")
    feed.apply([feed.event("backup-ping", "beat", at=T("03:05:00"))])
    tick_every_minute(feed, "03:06", "03:14")
    assert transitions(r, keys) == [("backup-1", "exit", "firing")]
    assert fired(r, keys, "exit")[0].summary == "backup-1: crashed with OSError: disk"
    feed.engine.client.close()


def test_a_ping_job_over_max_runtime_resolves_at_its_success_ping_not_at_its_next_slot(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    """The engine asks the schedule's due time at a beat only when the beat woke it
    (``wakes_on_beats``): the success ping of a job whose ``runtime`` incident is open wakes it,
    so the resolve comes at the next check, not when the agent's next slot falls due."""
    feed = engine_feed(redis_url, prefix)
    feed.apply([feed.event("backup-ping", "start", at=T("03:15:00"), version="agentwatch-http/1")])
    tick_every_minute(feed, "03:16", "03:25")
    assert transitions(r, keys) == [("backup-ping", "runtime", "firing")]
    feed.apply([feed.event("backup-ping", "beat", at=T("03:27:00"))])  # its success ping, late
    feed.tick(T("03:27:01"))
    assert transitions(r, keys) == [
        ("backup-ping", "runtime", "firing"),
        ("backup-ping", "runtime", "resolved"),
    ]
    feed.engine.client.close()


def test_two_workers_deciding_the_same_slot_page_once(redis_url: str, prefix: str, r: redis.Redis) -> None:
    """Two detector workers running: the shard has one owner, which pages the missed slot; when
    it stops, the other takes the shard over from its checkpoint and does not page it again."""
    keys = Keys(prefix)
    agents = {"cron-*": {"schedule": "*/2 * * * * *", "grace": "1s"}}  # a slot every 2 s
    pipeline = pipeline_for(prefix, redis_url, silence={"after": "1s", "agents": agents})
    workers = [worker_for(pipeline, redis_url, consumer=f"w{i}") for i in (1, 2)]
    engines = [Feed(worker).engine for worker in workers]
    with contextlib.ExitStack() as first, contextlib.ExitStack() as second:
        stacks = [first, second]
        for worker, stack in zip(workers, stacks, strict=True):
            stack.enter_context(running(worker))
        wait_for(lambda: sum(bool(e.shards) for e in engines) == 1, 10, what="one owner of the shard")
        owner = next(i for i, e in enumerate(engines) if e.shards)
        job = KitAgent(r, keys, "cron-1")
        job.start(pid=4242)
        job.beat()
        job.exit("exit", 0)  # ran once, then never again
        wait_for(lambda: fired(r, keys, "schedule"), 15, what="the missed slot paged")
        stacks[owner].close()  # the owner stops: the other worker takes the shard over
        wait_for(lambda: bool(engines[1 - owner].shards), 10, what="the other worker to take over")
        until = server_time_ms(r) + 5000  # more slots go by under the new owner
        wait_for(lambda: server_time_ms(r) > until, 10)
        wait_for(lambda: caught_up(r, keys), 10, what="every event applied")
    assert transitions(r, keys) == [("cron-1", "schedule", "firing")]


def test_a_halted_cron_agent_is_not_paged_for_the_runs_it_does_not_make(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    feed = engine_feed(redis_url, prefix)
    feed.engine.halts.add("backup-*", "budget spent", by="test")
    cron_run(feed, "backup-1", "run-0", "03:00")
    feed.apply([feed.event("backup-2", "start", at=T("03:00:01"), pid=4246)])  # and hangs
    tick_every_minute(feed, "03:01", "03:40")
    assert fired(r, keys, "schedule") == [] and fired(r, keys, "runtime") == []
    assert [a.detector for a in alerts(r, keys)] == ["halt"]  # the halt's own alert only
    feed.engine.client.close()


# -- end to end: real producer processes, launched at the slots, and a running worker --------

JOB = """
import sys, time
from producers import heartbeat
print("ready", flush=True)
sys.stdin.readline()        # cron: "it is the slot"
heartbeat(tokens=1)
time.sleep(float(sys.argv[1]))
heartbeat(tokens=1)
"""


class CronJob:
    """One run of a cron job: a real producer process, its interpreter started (and producers
    imported) ahead of time, woken at its slot; it beats, works ``work_s`` and ends normally
    (exit code 0, no shutdown()). Interpreter start-up on a loaded box takes seconds, longer than
    the grace: a cron host's start-up is not what this test measures."""

    def __init__(self, redis_url: str, prefix: str, agent: str, work_s: float = 0.1) -> None:
        env = agent_env(redis_url, prefix, agent, AGENTWATCH_INTERVAL="0.5")
        self.agent = agent
        pipe = subprocess.PIPE
        self.process = subprocess.Popen(
            [sys.executable, "-c", JOB, str(work_s)], env=env, text=True, stdin=pipe, stdout=pipe, stderr=pipe
        )

    def ready(self) -> bool:
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip() == "ready"

    def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def done(self) -> str:
        """Wait for the run's end; its stderr, or an error if it failed."""
        _, err = self.process.communicate(timeout=20)
        assert self.process.returncode == 0, err
        return err

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate()


@pytest.mark.slow
def test_cron_agents_end_to_end_on_time_late_and_overrunning(
    redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    """A schedule every 4 s (a seconds field first: cronsim's six-field form), grace 3 s, four
    slots S0..S3 and real producer processes run at them: ``cron-ok`` at every slot pages nothing
    (its clean exits neither); ``cron-late`` runs at S0 and S3 only: one ``schedule`` page for
    S1 (S2 adds none), resolved by the S3 run; ``cron-slow`` (a yearly job, max_runtime 2 s)
    works 4 s at S0: one ``runtime`` page, resolved when it ends. About 25 s: four real slots
    of a real schedule, plus the processes' start-up (seconds each on a loaded 2-core box). The
    grace is 3 s, not 2: a woken process's first event can take over a second to reach Redis
    while the suite's parallel workers load the box, and an on-time run must never page."""
    agents = {
        "cron-slow": {"schedule": "0 0 1 1 *", "max_runtime": "2s"},
        "cron-*": {"schedule": "*/4 * * * * *", "grace": "3s"},
    }
    worker = worker_for(pipeline_for(prefix, redis_url, silence={"after": "1s", "agents": agents}), redis_url)
    plan = Plan(Cron.parse("*/4 * * * * *"), 3000, None)
    runs = {
        0: [CronJob(redis_url, prefix, name) for name in ("cron-ok", "cron-late")]
        + [CronJob(redis_url, prefix, "cron-slow", work_s=4.0)],
        1: [CronJob(redis_url, prefix, "cron-ok")],
        2: [CronJob(redis_url, prefix, "cron-ok")],
        3: [CronJob(redis_url, prefix, name) for name in ("cron-ok", "cron-late")],
    }
    jobs = [job for batch in runs.values() for job in batch]
    with running(worker), contextlib.ExitStack() as cleanup:
        for job in jobs:
            cleanup.callback(job.close)
        assert all(job.ready() for job in jobs)
        first = plan.owed(server_time_ms(r) + 1000)
        slots = [first + 4000 * i for i in range(4)]
        for i, slot in enumerate(slots):
            time.sleep(max(0.0, (slot - server_time_ms(r)) / 1000))  # cron waits for the slot
            for job in runs[i]:
                job.go()
        for job in jobs:
            job.done()
        wait_for(lambda: resolved(r, keys, "schedule"), timeout=15, what="cron-late back at S3")
        wait_for(lambda: resolved(r, keys, "runtime"), timeout=15, what="cron-slow finished")
        # S3 + grace passes for cron-ok too: still nothing for it
        wait_for(lambda: server_time_ms(r) > slots[3] + 3500, timeout=10)
        wait_for(lambda: caught_up(r, keys), timeout=10, what="every event applied")
    assert sorted(transitions(r, keys)) == [
        ("cron-late", "schedule", "firing"), ("cron-late", "schedule", "resolved"),
        ("cron-slow", "runtime", "firing"), ("cron-slow", "runtime", "resolved"),
    ]  # fmt: skip
    (late,) = fired(r, keys, "schedule")
    slot1 = datetime.fromtimestamp(slots[1] / 1000, UTC)
    expected_at = slot1.strftime("%H:%M" if slot1.second == 0 else "%H:%M:%S")  # 11:31, 11:31:03
    assert late.summary.startswith(
        f"cron-late: missed a scheduled run: expected at {expected_at} (*/4 * * * * *, grace 3s), last run "
    )
    assert resolved(r, keys, "schedule")[0].summary.endswith(f"2 slots missed since {expected_at}")
    assert fired(r, keys, "runtime")[0].summary.startswith("cron-slow: run started at ")
    assert re.fullmatch(r"cron-slow: the run finished after \d+s", resolved(r, keys, "runtime")[0].summary)


@pytest.mark.cluster
def test_schedule_checks_on_a_three_master_cluster(cluster_ports: list[int]) -> None:
    """Every schedule script's keys share one shard's hash tag: on a cluster with 3 event shards
    on different nodes, an overlong run pages and resolves on each."""
    url = f"redis://127.0.0.1:{cluster_ports[0]}/0"
    prefix = f"sc{int(time.time() * 1000) % 10**8}"
    agents_cfg = {"cron-*": {"schedule": "0 0 1 1 *", "max_runtime": "1s"}}
    pipeline = pipeline_for(prefix, url, worker={"tick": "50ms"}, silence={"agents": agents_cfg})
    redis_section = pipeline.settings.redis.model_copy(update={"cluster": True, "shards": 3})
    pipeline = type(pipeline)(settings=pipeline.settings.model_copy(update={"redis": redis_section}),
                              source="test", detectors=pipeline.detectors)  # fmt: skip
    keys = Keys(prefix, shards=3)
    worker = worker_for(pipeline, url)
    client: Any = worker.client
    agents = ["cron-alpha", "cron-bravo", "cron-charlie", "cron-delta", "cron-echo", "cron-fox"]
    assert len({shard_of(a, 3) for a in agents}) == 3

    def send(agent: str, kind: str, seq: int, **fields: Any) -> None:
        event = {"v": 1, "agent": agent, "kind": kind, "ts": 0.0, "run": "r1", "seq": seq, **fields}
        client.xadd(keys.events_for(agent), {"d": codec.encode(event)})

    def found() -> set[tuple[str, str, str]]:
        return {
            (a.agent, a.detector, a.status)
            for a in (decode_alert(f[b"d"]) for _, f in client.xrange(keys.alerts))
        }

    try:
        with running(worker):
            for agent in agents:
                send(agent, "start", 0, pid=4242)
            firing = {(a, "runtime", "firing") for a in agents}
            wait_for(lambda: found() >= firing, timeout=15, what="a runtime page on every shard")
            for agent in agents:
                send(agent, "exit", 1, reason="exit", code=0)
            done = firing | {(a, "runtime", "resolved") for a in agents}
            wait_for(lambda: found() >= done, timeout=15, what="every run finished")
        assert found() == done
    finally:
        for key in client.scan_iter(match=f"{prefix}:*", target_nodes=RedisCluster.ALL_NODES):
            client.delete(key)
        client.close()


def test_status_shows_a_cron_agent_between_runs_as_ok_and_a_missed_slot_as_down() -> None:
    """``status``/the dashboard: a scheduled agent is judged by its schedule, not its interval
    (a scheduled agent is one with a ``schedule`` state in its checkpoint)."""
    from agentwatch.fleet import _state  # noqa: PLC0415

    watch = [31_000, "r1", 1_000, True, True, None, 0, None, 0]  # a ScheduleState, as read_agents gives it
    hour_ago: dict[str, Any] = {"beat_ms": 1_000, "started_ms": 1_000, "seen_ms": 31_000,
                                "states": {"schedule": watch}}  # fmt: skip
    unscheduled = {**hour_ago, "states": {}}
    at, stall = 3_600_000, 120_000
    assert _state(hour_ago, {}, muted=False, interval=5.0, at=at, stall_after_ms=stall) == "ok"
    assert _state(unscheduled, {}, muted=False, interval=5.0, at=at, stall_after_ms=stall) == "late"
    assert (
        _state(hour_ago, {"schedule": {}}, muted=False, interval=5.0, at=at, stall_after_ms=stall) == "down"
    )
    assert (
        _state(hour_ago, {"runtime": {}}, muted=False, interval=5.0, at=at, stall_after_ms=stall) == "stalled"
    )
