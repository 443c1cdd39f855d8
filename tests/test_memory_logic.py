"""Memory detector logic, without Redis or an engine: pulses go straight to ``on_event`` of a
hand-built Agent, decisions land in a RecordedDecisions. The numbers are those of the end-to-end
tests (tests/test_detect_memory.py): a 1 s window of ten 100 ms buckets, 1 GB limit, 10 s horizon.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import numpy as np
import pytest

from detectors.agent import Agent, ChildRun, pack, unpack
from detectors.base import DetectorContext, RecordedDecisions
from detectors.memory import BETWEEN, COOL, HOT, Memory, MemoryConfig, MemoryState, judge

MB = 1024 * 1024
SETTINGS = {"window": "1s", "points": 10, "min_points": 5, "limit": "1GB", "horizon": "10s", "fire_after": 2}
T0 = 1_765_000_000_000
"""A Redis time on a bucket boundary (a multiple of 100 ms)."""


class Bench:
    """One detector and one agent, with the engine core's part of a pulse played by hand."""

    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        config = MemoryConfig.model_validate(SETTINGS if settings is None else settings)
        self.memory = Memory("memory", config, cast(DetectorContext, None))
        self.recorded = RecordedDecisions()
        self.memory.decisions = self.recorded
        self.agent = Agent("bot", run="run-1")
        self.now = T0

    def pulse(self, rss: int, at_ms: int) -> None:
        """The shared RSS fields as the engine keeps them (first, last, peak), then the detector."""
        agent = self.agent
        if agent.rss_first == 0:
            agent.rss_first, agent.rss_first_ms = rss, at_ms
        agent.rss_last, agent.rss_peak = rss, max(agent.rss_peak, rss)
        self.memory.on_event(agent, {"kind": "pulse", "rss": rss}, at_ms, None)

    def pulses(self, rss_at: Callable[[int], float], seconds: float, every_ms: int = 20) -> None:
        for _ in range(int(seconds * 1000 / every_ms)):
            self.now += every_ms
            self.pulse(int(rss_at(self.now)), self.now)

    def new_run(self, at_ms: int) -> None:
        """A restart as the engine plays it: the detectors first, then the run's RSS fields."""
        self.memory.on_new_run(self.agent, at_ms)
        self.agent.run = "run-2"
        self.agent.rss_first = self.agent.rss_first_ms = self.agent.rss_last = self.agent.rss_peak = 0

    @property
    def state(self) -> MemoryState:
        found: MemoryState = self.memory.state(self.agent)
        return found

    def ops(self) -> list[tuple[str, int]]:
        return [(op["o"], op["at"]) for _, _, op in self.recorded.ops]

    def render(self, index: int) -> tuple[str, str, dict[str, Any]]:
        _, kind, op = self.recorded.ops[index]
        return self.memory.render("bot", kind, op)


def leak(t: int) -> float:
    """+100 MB/s from 200 MB at T0: 1 GB in 8 s."""
    return 200 * 10**6 + (t - T0) * 100 * 10**3


def test_a_steady_leak_fires_after_fire_after_hot_evaluations_with_the_projection() -> None:
    bench = Bench()
    # Bucket k is [T0 + 100 k, T0 + 100 (k + 1)); the pulse at T0 + 100 k closes bucket k - 1.
    bench.pulses(leak, seconds=0.5)  # five buckets closed: the first evaluation, hot
    assert bench.state.hot == 1 and bench.ops() == []
    bench.pulses(leak, seconds=0.1)  # the sixth closes at T0 + 600: hot twice
    assert bench.ops() == [("f", T0 + 600)]  # at the end of the bucket whose closing made it hot
    facts = bench.recorded.ops[0][2]["f"]
    assert (facts["r0"], facts["t0"], facts["rl"]) == (202 * 10**6, T0 + 20, leak(T0 + 600))
    assert facts["at"] == T0 + 600 and facts["limit"] == 10**9
    assert facts["slope_per_h"] == pytest.approx(3.6e11, rel=1e-6)  # bytes per hour
    # A bucket's minimum is its first pulse, 100 ms before the bucket's end: the trend is the
    # leak 100 ms late, so at the last end (T0 + 600) it stands at the leak's T0 + 500.
    assert facts["level"] == pytest.approx(leak(T0 + 500), rel=1e-6)
    assert facts["eta_s"] == pytest.approx((10**9 - facts["level"]) / 1e5 / 1000)
    severity, summary, details = bench.render(0)
    assert severity == "warning"
    assert summary == "bot: RSS 202 MB -> 260 MB over 580ms; 1.0 GB limit in ~8s"  # eta 7.5 s
    assert details["rss"] == leak(T0 + 600) and details["rss_start"] == 202 * 10**6
    assert 0 < details["eta_s"] <= 10 and details["trend_per_h"] == pytest.approx(3.6e11, rel=0.01)

    bench.pulses(leak, seconds=1.5)  # still hot: one incident, no repeat
    assert [o for o, _ in bench.ops()] == ["f"] and bench.agent.is_open("memory")


def test_min_points_holds_judgement_until_enough_buckets() -> None:
    """fire_after 1: the first evaluation with ``min_points`` buckets fires, not one before."""
    bench = Bench({**SETTINGS, "fire_after": 1, "min_points": 7})
    bench.pulses(leak, seconds=0.6)  # six buckets closed: too few, each a cool evaluation
    assert bench.ops() == [] and (bench.state.hot, bench.state.cool) == (0, 6)
    bench.pulses(leak, seconds=0.1)
    assert bench.ops() == [("f", T0 + 700)]


def test_the_window_keeps_points_buckets_of_their_minima() -> None:
    bench = Bench()
    bench.pulses(lambda t: 300 * MB + abs(t % 100 - 40) * MB, seconds=2)  # lowest 40 ms in
    closed = bench.state.closed
    assert len(closed) == 10  # ``points``: the oldest ones fell out
    assert closed == [[T0 + 1100 + 100 * k, 300 * MB] for k in range(10)]  # T0 + 2000 closed the last
    assert (bench.state.bucket, bench.state.bucket_low) == ((T0 + 2000) // 100, 340 * MB)
    assert bench.ops() == []


def test_growth_that_stops_resolves_after_recover_after_cool_evaluations() -> None:
    bench = Bench()
    bench.pulses(leak, seconds=2)
    assert [o for o, _ in bench.ops()] == ["f"]
    verdicts: list[tuple[int, int]] = []
    for _ in range(100):  # flat at 400 MB, 100 ms at a time
        bench.pulses(lambda t: 400 * 10**6, seconds=0.1)
        verdicts.append((bench.state.hot, bench.state.cool))
        if not bench.agent.is_open("memory"):
            break
    assert [o for o, _ in bench.ops()] == ["f", "r"]
    assert verdicts[-1] == (0, 3)  # recover_after (default 3) cool evaluations in a row
    _, summary, details = bench.render(1)
    assert summary == "bot: RSS no longer on course for 1.0 GB"
    assert details["rss"] == 400 * 10**6 and details["trend_per_h"] < 3.6e11 / 2


@pytest.mark.parametrize(
    "shape",
    [
        lambda t: 300 * MB + (150 * MB if (t // 50) % 7 == 0 else 0),  # flat with GC spikes
        lambda t: 300 * MB + (t % 400) * MB // 2,  # sawtooth: grows, collected, grows
        lambda t: 300 * MB + (t % 10_000) * 10,  # growing, but nowhere near 1 GB in 10 s
    ],
    ids=["spikes", "sawtooth", "slow"],
)
def test_spikes_sawtooth_and_slow_growth_stay_quiet(shape: Callable[[int], float]) -> None:
    bench = Bench()
    bench.pulses(shape, seconds=3)
    assert bench.ops() == [] and bench.state.hot <= 1


def test_a_restart_resolves_quoting_the_old_run_and_starts_over() -> None:
    bench = Bench()
    bench.pulses(leak, seconds=1)
    rss_was = bench.agent.rss_last
    bench.new_run(bench.now + 5)
    assert bench.ops()[-1] == ("r", bench.now + 5)
    facts = bench.recorded.ops[-1][2]["f"]
    assert facts == {"at": bench.now + 5, "restarted": 1, "rl": rss_was, "r0": 202 * 10**6}
    assert bench.render(1)[1] == "bot: restarted (RSS was 300 MB)"
    assert bench.state == MemoryState()  # the new run's trend starts from nothing
    bench.new_run(bench.now + 10)  # nothing open: nothing to close
    assert len(bench.ops()) == 2


def test_a_shutdown_resolves() -> None:
    bench = Bench()
    bench.pulses(leak, seconds=1)
    bench.memory.on_retire(bench.agent, bench.now)
    assert bench.recorded.ops[-1][2] == {"o": "r", "at": bench.now, "f": {"at": bench.now, "shutdown": 1}}
    assert bench.render(1)[1] == "bot: shut down"


def test_child_pulses_and_pulses_without_rss_are_not_the_agents_memory() -> None:
    bench = Bench()
    child = bench.agent.children.setdefault("w1", ChildRun("run-1"))
    for k in range(100):
        bench.memory.on_event(bench.agent, {"kind": "pulse", "rss": 10**6 * k}, T0 + 20 * k, child)
        bench.memory.on_event(bench.agent, {"kind": "pulse"}, T0 + 20 * k, None)
    assert bench.ops() == [] and bench.memory.name not in bench.agent.states


def test_between_breaks_both_counts() -> None:
    """A trend reaching the limit between one and two horizons away is neither hot nor cool."""
    config = MemoryConfig.model_validate(SETTINGS)
    agent = Agent("bot", rss_first=100, rss_first_ms=T0, rss_last=100)
    slope = 10**9 / 15_000  # bytes per ms: 1 GB in 15 s from 0, the horizon being 10 s
    closed = [[float(T0 + 100 * k), slope * 100 * k] for k in range(1, 11)]
    shifted = [[t - T0, y] for t, y in closed]  # small times: the fit's level is exact
    verdict, facts = judge(shifted, config, agent)
    assert verdict == BETWEEN and facts["eta_s"] == -1
    assert judge(shifted[:4], config, agent)[0] == COOL  # fewer than min_points
    steeper = [[t, 2 * y] for t, y in shifted]
    assert judge(steeper, config, agent)[0] == HOT


@pytest.mark.parametrize(
    ("verdicts", "ops"),
    [
        ([HOT, BETWEEN, HOT, HOT], ["f"]),  # fires at the 4th: the 2nd broke the count
        ([HOT, BETWEEN, HOT, BETWEEN], []),
        ([HOT, HOT, COOL, COOL, BETWEEN, COOL, COOL], ["f"]),  # recover_after 3: broken
        ([HOT, HOT, COOL, COOL, BETWEEN, COOL, COOL, COOL], ["f", "r"]),
        ([HOT, HOT, HOT, COOL, HOT, COOL, COOL, COOL], ["f", "r"]),  # a hot one breaks the cool count
    ],
)
def test_counts_in_a_row(monkeypatch: pytest.MonkeyPatch, verdicts: list[int], ops: list[str]) -> None:
    """The transitions alone (fire_after 2, recover_after 3), whatever the window says."""
    told = iter(verdicts)

    def judged(closed: list[list[float]], cfg: MemoryConfig, agent: Agent) -> tuple[int, dict[str, Any]]:
        return next(told), {"at": closed[-1][0]}

    monkeypatch.setattr("detectors.memory.judge", judged)
    bench = Bench()
    bench.pulses(leak, seconds=len(verdicts) / 10)
    assert [o for o, _ in bench.ops()] == ops


def test_state_survives_a_checkpoint_mid_window() -> None:
    bench = Bench()
    bench.pulses(leak, seconds=0.65)
    restored = unpack("bot", pack(bench.agent), {"memory": MemoryState})
    assert restored is not None and restored.states["memory"] == bench.state
    bench.agent = restored
    bench.pulses(leak, seconds=0.1)
    assert [o for o, _ in bench.ops()] == ["f"]


def test_a_noisy_leak_fires_once_and_stays_open_while_it_goes_on() -> None:
    """A replay with default settings (limit 4 GB, horizon 6 h, window 1 h): RSS grows linearly
    from 210 MB to 3.9 GB over 3 days with 0.3% noise, a pulse every 30 s. Near the horizon the
    noisy projection wanders around it: it must neither resolve nor fire twice."""
    bench = Bench({})
    rng = np.random.default_rng(1)
    every, steps = 30_000, 3 * 86400 // 30
    rss = (210e6 + (3.9e9 - 210e6) * np.arange(1, steps + 1) / steps) * (1 + rng.normal(0, 0.003, steps))
    for k in range(steps):
        bench.pulse(int(rss[k]), T0 + (k + 1) * every)
    assert [o for o, _ in bench.ops()] == ["f"]
    at_ms = bench.ops()[0][1]
    assert 60 < (at_ms - T0) / 3_600_000 < 70
    assert "4.0 GB limit in ~" in bench.render(0)[1]


def test_past_the_limit_and_still_growing() -> None:
    bench = Bench()
    bench.pulses(lambda t: 1.2e9 + (t - T0) * 10**5, seconds=0.6)
    (_, _, op), *_ = bench.recorded.ops
    assert op["f"]["level"] > 10**9 and op["f"]["eta_s"] == 0.0
    _, summary, details = bench.render(0)
    assert summary == "bot: RSS 1.2 GB -> 1.3 GB over 580ms; over the 1.0 GB limit and still growing"
    assert details["eta_s"] == 0.0
