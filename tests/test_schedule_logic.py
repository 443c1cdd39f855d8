"""The schedule detector's logic (detectors/schedule.py), without Redis: a hand-built
:class:`Agent`, the real config model (silence's section, per glob), :class:`RecordedDecisions`,
and a small :class:`Owner` that calls the hooks as the shard's owner does (a new run before its
first event, every due check until nothing is due). Times are explicit Redis ms.

The pure decision function's own cases are in tests/test_detect_schedule.py; here the watch kept
in memory feeds it: a slot missed past its grace opens ``schedule`` and resolves when the agent
is seen again, naming the slots missed; on-time runs raise nothing; ``max_runtime`` opens
``runtime`` for a process run that does not exit and resolves at its exit (or its replacement);
an HTTP ping job's run ends with its success beat; after a gap nobody watched, the owed slot
counts from the gap's end."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

import pytest

from agentwatch import plugins
from agentwatch.config import PipelineSettings
from agentwatch.handler import Stats
from agentwatch.keys import Keys
from detectors.agent import Agent, ChildRun, pack, unpack
from detectors.base import DetectorConfig, DetectorContext, RecordedDecisions
from detectors.schedule import MISSED, OVERRAN, Schedule, ScheduleConfig, ScheduleState, render

DAY = "2026-12-07"
CRON_AGENTS = {"backup-*": {"schedule": "*/15 * * * *", "grace": "5m", "max_runtime": "10m"}}
NO_RUNTIME = {"backup-*": {"schedule": "*/15 * * * *", "grace": "5m"}}


def T(clock: str, day: str = DAY) -> int:
    """Milliseconds (UTC) of ``HH:MM[:SS[.fff]]`` on ``day``."""
    return round(datetime.fromisoformat(f"{day}T{clock}+00:00").timestamp() * 1000)


def silence_config(**section: Any) -> ScheduleConfig:
    """The silence section as a worker loads it (per-glob overrides attached)."""
    loaded, problems = plugins.load_detectors({"silence": section})
    assert not problems, problems
    (config,) = [p.config for p in loaded if p.name == "silence"]
    assert isinstance(config, ScheduleConfig)
    return config


def context(timezone: str = "UTC") -> DetectorContext:
    """Only ``settings`` is read (the default timezone); nothing here touches Redis."""
    settings = PipelineSettings.model_validate({"report": {"timezone": timezone}})
    none = cast(Any, None)
    return DetectorContext(client=none, keys=Keys("t"), incidents=none, settings=settings, stats=Stats())


class Owner:
    """Drives one agent through the detector's hooks as the shard owner does."""

    def __init__(
        self, agent: str = "backup-1", config: DetectorConfig | None = None, tz: str = "UTC"
    ) -> None:
        self.detector = Schedule(
            "schedule", cast(ScheduleConfig, config or silence_config(agents=CRON_AGENTS)), context(tz)
        )
        self.decisions = RecordedDecisions()
        self.detector.decisions = self.decisions
        self.agent = Agent(agent)

    def event(
        self, kind: str, at: int, run: str = "r1", child: ChildRun | None = None, **fields: Any
    ) -> None:
        agent = self.agent
        if child is None and run != agent.run:  # the engine's run classification, simplified
            agent.prev_run, agent.run = agent.run, run
            self.detector.on_new_run(agent, at)
        agent.seen_ms = max(agent.seen_ms, at)
        event = {"v": 1, "agent": agent.name, "kind": kind, "run": run, "seq": 0, **fields}
        self.detector.on_event(agent, event, at, child)

    def cron_run(self, at: int, run: str) -> None:
        """A producer's run launched by cron at ``at``: start, pulse, a beat, a clean exit."""
        self.event("start", at + 300, run, interval=5.0, pid=4242)
        self.event("pulse", at + 400, run)
        self.event("beat", at + 20_000, run, tokens=10)
        self.event("exit", at + 30_000, run, reason="exit", code=0)

    def tick(self, now: int, sight: int = 0) -> None:
        """One check at ``now`` (every event applied): on_due while something is due."""
        for _ in range(10):
            due = self.detector.due_ms(self.agent)
            if due == 0 or due > now:
                return
            self.detector.on_due(self.agent, now, now, sight)
        raise AssertionError("still due after 10 checks: the watch re-arms at a time already past")

    def ticks(self, start: int, end: int, step_ms: int = 60_000) -> None:
        for at in range(start, end + 1, step_ms):
            self.tick(at)

    @property
    def ops(self) -> list[tuple[str, str]]:
        return [(kind, op["o"]) for _, kind, op in self.decisions.ops]

    def summary(self, index: int) -> str:
        _, kind, op = self.decisions.ops[index]
        return render(self.agent.name, kind, op)[0]


def test_an_agent_no_glob_schedules_gets_no_state_and_is_never_due() -> None:
    owner = Owner("chat-1")
    owner.event("start", T("03:00"), pid=1)
    owner.event("beat", T("03:00:05"))
    assert owner.agent.states == {} and owner.detector.due_ms(owner.agent) == 0
    owner.ticks(T("03:01"), T("05:00"))
    assert owner.ops == []


def test_the_companion_is_needed_only_when_a_glob_or_the_section_schedules() -> None:
    assert Schedule.needed(silence_config(agents=CRON_AGENTS))
    assert Schedule.needed(silence_config(schedule="0 3 * * *"))
    assert not Schedule.needed(silence_config(agents={"chat-*": {"after": "5m"}}))


def test_on_time_runs_raise_nothing() -> None:
    owner = Owner()
    for i, slot in enumerate(("03:00", "03:15", "03:30", "03:45")):
        owner.cron_run(T(slot), f"run-{i}")
        owner.ticks(T(slot) + 31_000, T(slot) + 14 * 60_000 + 59_000, 30_000)
    assert owner.ops == []
    assert owner.detector.due_ms(owner.agent) == T("04:05")  # the 04:00 slot's grace


def test_a_run_just_before_its_slot_counts_for_it_but_not_one_seconds_early() -> None:
    early = Owner(config=silence_config(agents={"backup-*": {"schedule": "*/15 * * * *"}}))
    early.event("start", T("03:14:59.400"), pid=1)
    early.tick(T("03:20"))
    assert early.ops == [] and early.detector.due_ms(early.agent) == T("03:35")
    before = Owner(config=silence_config(agents={"backup-*": {"schedule": "*/15 * * * *"}}))
    before.event("start", T("03:14:55"), pid=1)
    before.tick(T("03:20"))
    assert before.ops == [(MISSED, "f")]


def test_a_missed_slot_opens_after_its_grace_once_and_resolves_when_seen_with_the_count() -> None:
    owner = Owner()
    owner.cron_run(T("03:00:02"), "run-0")
    owner.tick(T("03:19:59"))
    assert owner.ops == []
    owner.tick(T("03:20:00"))
    assert owner.ops == [(MISSED, "f")]
    _, _, op = owner.decisions.ops[0]
    assert op["at"] == T("03:20:00")
    assert op["f"] == {
        "slot": T("03:15"), "expr": "*/15 * * * *", "tz": "UTC", "grace": 300_000,
        "start": T("03:00:02.300"), "seen": T("03:00:32"),
    }  # fmt: skip
    assert owner.summary(0) == (
        "backup-1: missed a scheduled run: expected at 03:15 (*/15 * * * *, grace 5m), last run 03:00:02"
    )
    assert owner.agent.is_open(MISSED)
    assert owner.detector.due_ms(owner.agent) == 0  # only news of the agent can change it now
    owner.ticks(T("03:21"), T("03:59"))  # three more slots go by: still the one incident
    assert owner.ops == [(MISSED, "f")]
    owner.cron_run(T("04:00"), "run-1")
    owner.tick(T("04:00:31"))
    assert owner.ops == [(MISSED, "f"), (MISSED, "r")]
    assert owner.decisions.ops[1][2]["f"]["missed"] == 3  # 03:15, 03:30 and 03:45
    assert owner.summary(1) == "backup-1: ran again at 04:00:00, 3 slots missed since 03:15"
    assert not owner.agent.is_open(MISSED)
    owner.ticks(T("04:01"), T("04:19"))
    assert len(owner.ops) == 2


def test_a_new_agent_without_max_runtime_is_first_judged_when_its_first_slots_grace_ends() -> None:
    """Nothing about a new agent can page before its first slot's grace is over: it is due then
    (not at once), and pages at the first check from then on, as any watch does."""
    owner = Owner(config=silence_config(agents=NO_RUNTIME))
    owner.event("start", T("03:00:02"), pid=1)
    owner.event("beat", T("03:00:40"))
    assert owner.detector.due_ms(owner.agent) == T("03:20")
    owner.tick(T("03:19:59"))
    assert owner.ops == []
    owner.tick(T("03:20"))
    assert owner.ops == [(MISSED, "f")]
    assert owner.summary(0) == (
        "backup-1: missed a scheduled run: expected at 03:15 (*/15 * * * *, grace 5m), last run 03:00:02"
    )


def test_a_new_agent_read_from_a_backlog_past_its_grace_pages_at_the_first_check() -> None:
    owner = Owner(config=silence_config(agents=NO_RUNTIME))
    owner.event("start", T("02:00:02"), pid=1)  # applied late: the slot of 02:15 went by long ago
    owner.tick(T("03:00"))
    assert owner.ops == [(MISSED, "f")] and owner.decisions.ops[0][2]["f"]["slot"] == T("02:15")


def test_any_event_resolves_a_missed_slot_even_a_pulse_of_an_old_run() -> None:
    """Seen is seen: a job that hung since 03:00 and pulses again is back (runtime judges it)."""
    owner = Owner(config=silence_config(agents={"backup-*": {"schedule": "*/15 * * * *"}}))
    owner.event("start", T("03:00:01"), pid=1)
    owner.tick(T("03:20"))
    owner.event("pulse", T("03:22"))
    owner.tick(T("03:22:01"))
    assert owner.ops == [(MISSED, "f"), (MISSED, "r")]
    assert owner.summary(1) == "backup-1: ran again at 03:22, 1 slot missed since 03:15"


def test_a_process_run_over_max_runtime_opens_runtime_and_its_exit_resolves_it() -> None:
    owner = Owner()
    owner.event("start", T("03:15:00"), interval=5.0, pid=4244)
    owner.event("pulse", T("03:15:01"))
    owner.event("beat", T("03:15:02"))
    owner.tick(T("03:24:59"))
    assert owner.ops == []
    owner.tick(T("03:25:00"))
    assert owner.ops == [(OVERRAN, "f")]
    assert owner.summary(0) == (
        "backup-1: run started at 03:15 still not finished after 10m (max_runtime 10m); last seen 03:15:02"
    )
    owner.event("exit", T("03:27:00"), reason="exit", code=0)
    owner.tick(T("03:27:01"))
    assert owner.ops == [(OVERRAN, "f"), (OVERRAN, "r")]
    assert owner.decisions.ops[1][2]["f"]["how"] == "finished"
    assert owner.summary(1) == "backup-1: the run finished after 12m"
    assert owner.agent.open == set()


def test_a_run_killed_mid_way_stays_over_until_a_new_run_replaces_it() -> None:
    owner = Owner()
    owner.event("start", T("03:15:00.5"), pid=4245)
    owner.event("pulse", T("03:15:01"))
    owner.ticks(T("03:16"), T("03:29"))  # SIGKILLed at 03:15:01: no exit ever comes
    assert owner.ops == [(OVERRAN, "f")]
    owner.cron_run(T("03:30"), "run-2")
    owner.tick(T("03:30:31"))
    assert owner.ops == [(OVERRAN, "f"), (OVERRAN, "r")]
    assert owner.summary(1) == "backup-1: a new run started"


def test_shutdown_finishes_a_run() -> None:
    owner = Owner()
    owner.event("start", T("03:15:00"), pid=1)
    owner.tick(T("03:25"))
    owner.detector.on_retire(owner.agent, T("03:26"))
    owner.tick(T("03:26"))
    assert owner.ops == [(OVERRAN, "f"), (OVERRAN, "r")]
    assert owner.decisions.ops[1][2]["f"]["how"] == "finished"


def test_a_ping_job_run_finishes_with_its_first_beat_or_its_fail() -> None:
    """An HTTP ping job (/start: a start without pid, then /ping: a beat, or /fail: an exit)."""
    owner = Owner("backup-ping")
    owner.event("start", T("03:00:01"), "p1", version="agentwatch-http/1")
    owner.ticks(T("03:01"), T("03:04"))
    owner.event("beat", T("03:05:00"), "p1")
    owner.ticks(T("03:06"), T("03:14"))
    assert owner.ops == []  # without the success beat ending it, runtime would open at 03:10:01
    owner.event("start", T("03:15:01"), "p2", version="agentwatch-http/1")
    owner.event("exit", T("03:16:00"), "p2", reason="exit", error="reported as failed (/fail)")
    owner.ticks(T("03:17"), T("03:29"))
    assert owner.ops == []
    owner.event("start", T("03:30:01"), "p3", version="agentwatch-http/1")  # and nothing more
    owner.ticks(T("03:31"), T("03:41"))
    assert owner.ops == [(OVERRAN, "f")]
    # ...while a producer's run (its start has a pid) does not end with a beat
    process = Owner()
    process.event("start", T("03:00:01"), pid=7)
    process.event("beat", T("03:05:00"))
    process.tick(T("03:10:01"))
    assert process.ops == [(OVERRAN, "f")]


def test_a_child_process_is_a_sign_of_life_but_its_exit_does_not_end_the_run() -> None:
    owner = Owner()
    owner.event("start", T("03:15:00"), pid=1)
    child = ChildRun(parent="r1", started_ms=T("03:15:02"))
    owner.event("start", T("03:15:02"), "c1", child=child, pid=2, parent="r1")
    owner.event("exit", T("03:16:00"), "c1", child=child, reason="exit", code=0)
    owner.tick(T("03:25"))
    assert owner.ops == [(OVERRAN, "f")]
    state = owner.agent.states["schedule"]
    assert state.seen_ms == T("03:16:00") and state.run == "r1"


def test_after_a_gap_nobody_watched_the_owed_slot_counts_from_its_end() -> None:
    """Redis (or every worker) was down 03:10-03:21: the 03:15 run may have had nowhere to go."""
    owner = Owner()
    owner.cron_run(T("03:00:02"), "run-0")
    owner.tick(T("03:21:00"), sight=T("03:21"))
    assert owner.ops == [] and owner.detector.due_ms(owner.agent) == T("03:35")
    owner.tick(T("03:35:00"), sight=T("03:21"))
    assert owner.ops == [(MISSED, "f")]
    assert owner.decisions.ops[0][2]["f"]["slot"] == T("03:30")


def test_the_runtime_clock_also_restarts_after_a_gap_nobody_watched() -> None:
    owner = Owner()
    owner.event("start", T("03:15:00"), pid=1)
    owner.tick(T("03:25:00"), sight=T("03:20"))
    assert owner.ops == [] and owner.detector.due_ms(owner.agent) == T("03:30")


def test_no_longer_scheduled_resolves_what_is_open_and_drops_the_watch() -> None:
    owner = Owner()
    owner.event("start", T("03:00:00"), pid=1)
    owner.tick(T("03:20"))
    assert set(owner.ops) == {(MISSED, "f"), (OVERRAN, "f")}
    # The worker restarts with a config that no longer schedules it; the agent is restored.
    later = Owner(config=silence_config())
    later.decisions.ops.clear()
    later.agent = owner.agent
    assert later.detector.due_ms(later.agent) > 0
    later.tick(T("03:30"))
    assert set(later.ops) == {(MISSED, "r"), (OVERRAN, "r")}
    assert {later.summary(0), later.summary(1)} == {"backup-1: no longer scheduled"}
    assert later.agent.states == {} and later.agent.open == set()
    assert later.detector.due_ms(later.agent) == 0


def test_the_watch_survives_a_checkpoint() -> None:
    owner = Owner()
    owner.cron_run(T("03:00:02"), "run-0")
    owner.tick(T("03:20"))
    restored = unpack("backup-1", pack(owner.agent), {"schedule": ScheduleState})
    assert restored is not None and restored.states == owner.agent.states
    owner.agent = restored
    owner.cron_run(T("04:00"), "run-1")
    owner.tick(T("04:00:31"))
    assert owner.ops == [(MISSED, "f"), (MISSED, "r")]


def test_the_schedule_is_in_the_report_timezone_unless_it_names_its_own() -> None:
    agents = {
        "nightly": {"schedule": "0 3 * * *"},
        "tokyo": {"schedule": "0 3 * * *", "timezone": "Asia/Tokyo"},
    }
    detector = Owner(config=silence_config(agents=agents), tz="Europe/Berlin").detector
    assert detector.plan_for("nightly").cron.tz.key == "Europe/Berlin"  # type: ignore[union-attr]
    assert detector.plan_for("tokyo").cron.tz.key == "Asia/Tokyo"  # type: ignore[union-attr]
    assert detector.plan_for("other") is None
    assert detector.plan_for("nightly") is detector.plan_for("nightly")  # one plan per glob


def test_a_missed_slot_in_the_operators_zone_is_worded_there() -> None:
    owner = Owner(
        "nightly",
        silence_config(agents={"nightly": {"schedule": "0 3 * * *", "grace": "10m"}}),
        "Europe/Berlin",
    )
    owner.event("start", T("02:00:01", "2026-12-05"), pid=1)
    owner.event("exit", T("02:02:00", "2026-12-05"), reason="exit", code=0)
    owner.tick(T("02:10", "2026-12-06"))
    assert owner.summary(0) == (
        "nightly: missed a scheduled run: expected at 03:00 (0 3 * * * Europe/Berlin, grace 10m), "
        "last run 2026-12-05 03:00:01"
    )


@pytest.mark.parametrize(("severity", "expected"), [(None, "critical"), ("warning", "warning")])
def test_render_carries_silences_severity(severity: str | None, expected: str) -> None:
    section: dict[str, Any] = {"agents": CRON_AGENTS} | ({"severity": severity} if severity else {})
    owner = Owner(config=silence_config(**section))
    owner.cron_run(T("03:00:02"), "run-0")
    owner.tick(T("03:20"))
    _, kind, op = owner.decisions.ops[0]
    got = owner.detector.render("backup-1", kind, op)
    assert got == (expected, *render("backup-1", kind, op))
