"""The error-rate detector's logic, without Redis or an engine: beats go straight to
``on_event`` of a hand-built Agent, decisions land in a RecordedDecisions, ``render`` words them.
The numbers are those of the end-to-end test: a window of 20, fire at 50 %, resolve at 25 %."""

from __future__ import annotations

from typing import Any, cast

from agentwatch_errorrate import ErrorRate, ErrorRateConfig, ErrorRateState

from detectors.agent import Agent, ChildRun, pack, unpack
from detectors.base import DetectorContext, RecordedDecisions

T0 = 1_765_000_000_000


class Bench:
    """One detector and one agent; ``beat`` plays the engine's part (Redis time, once, in order)."""

    def __init__(self, **settings: Any) -> None:
        self.detector = ErrorRate(
            "errorrate", ErrorRateConfig.model_validate(settings), cast(DetectorContext, None)
        )
        self.recorded = RecordedDecisions()
        self.detector.decisions = self.recorded
        self.agent = Agent("bot", run="r1")
        self.now = T0

    def beat(self, ok: bool | None, child: ChildRun | None = None) -> None:
        self.now += 100
        event: dict[str, Any] = {"kind": "beat", "agent": "bot", "run": "r1", "seq": 0}
        if ok is not None:
            event["ok"] = ok
        self.detector.on_event(self.agent, event, self.now, child)

    def texts(self) -> list[tuple[str, str, str, dict[str, Any]]]:
        """(o, severity, summary, details) of every decision, in order."""
        return [(op["o"], *self.detector.render(name, kind, op)) for name, kind, op in self.recorded.ops]

    @property
    def state(self) -> ErrorRateState:
        found: ErrorRateState = self.detector.state(self.agent)
        return found


def test_hysteresis_fires_at_half_and_resolves_at_a_quarter() -> None:
    bench = Bench()
    for i in range(20):
        bench.beat(ok=i % 3 != 0)  # 7 of 20 failed: 35 %
    bench.beat(ok=True)
    assert bench.recorded.ops == []
    for _ in range(5):
        bench.beat(ok=False)  # 10 of the last 20
    fired_at = bench.now
    for _ in range(3):
        bench.beat(ok=False)  # worse: still one incident
    for _ in range(16):
        bench.beat(ok=True)  # 40 %, 35 %... (between the thresholds: stays open) ... down to 5 of 20
    first = bench.recorded.ops[0]
    assert (first[1], first[2]["o"], first[2]["at"]) == ("errorrate", "f", fired_at)
    assert bench.texts() == [
        ("f", "warning", "bot: 10 of its last 20 beats failed (ok=False)",
         {"failures": 10, "beats": 20, "share": 0.5}),
        ("r", "warning", "bot: failures down to 5 of its last 20 beats", {}),
    ]  # fmt: skip
    assert bench.agent.open == set()


def test_beats_without_ok_say_nothing_and_the_window_counts_only_what_it_saw() -> None:
    bench = Bench(window=4, fire_at=0.5, severity="error")
    bench.beat(ok=None)
    bench.beat(ok=False)
    assert bench.recorded.ops == [] and (bench.state.mask, bench.state.seen) == (0b1, 1)
    bench.beat(ok=False)  # 2 of 4 (the share is of the window, not of the beats seen)
    assert bench.texts() == [
        ("f", "error", "bot: 2 of its last 2 beats failed (ok=False)",
         {"failures": 2, "beats": 2, "share": 0.5}),
    ]  # fmt: skip


def test_a_child_runs_beats_are_the_agents_work() -> None:
    bench = Bench(window=4)
    child = ChildRun(parent="r1")
    bench.beat(ok=False, child=child)
    bench.beat(ok=False)
    assert [op["o"] for _, _, op in bench.recorded.ops] == ["f"]


def test_a_restart_or_a_shutdown_closes_the_incident_and_empties_the_window() -> None:
    bench = Bench(window=4)
    bench.beat(ok=False)
    bench.beat(ok=False)
    bench.detector.on_new_run(bench.agent, bench.now + 1)  # the engine calls it before the new run's fields
    assert "errorrate" not in bench.agent.states
    bench.beat(ok=False)  # 1 of 4: the old run's failures are gone
    bench.beat(ok=False)
    bench.detector.on_retire(bench.agent, bench.now + 1)
    assert [(o, summary) for o, _, summary, _ in bench.texts()] == [
        ("f", "bot: 2 of its last 2 beats failed (ok=False)"),
        ("r", "bot: restarted; its failed beats were the previous run's"),
        ("f", "bot: 2 of its last 2 beats failed (ok=False)"),
        ("r", "bot: shut down"),
    ]


def test_the_state_survives_a_checkpoint() -> None:
    """What the engine writes and a new owner loads: the window carries on after a failover."""
    bench = Bench()
    for ok in (False, True, False, False):
        bench.beat(ok=ok)
    loaded = unpack("bot", pack(bench.agent), {"errorrate": ErrorRateState})
    assert loaded is not None and loaded.states["errorrate"] == ErrorRateState(mask=0b1011, seen=4)


def test_a_smaller_window_in_the_config_keeps_only_the_newest_outcomes() -> None:
    bench = Bench(window=20)
    for _ in range(10):
        bench.beat(ok=False)
    bench.detector.config = ErrorRateConfig.model_validate({"window": 4})
    bench.beat(ok=True)
    assert (bench.state.mask, bench.state.seen) == (0b1110, 4)
