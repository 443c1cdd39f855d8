"""The tokens and loop detector's decisions, beat by beat, without Redis: a hand-built Agent, the
real config model, and RecordedDecisions. The numbers follow tests/test_detect_tokens.py (the
same scenarios through the old engine)."""

from __future__ import annotations

from typing import Any, cast

import pytest
import redis

from agentwatch.alerts import Incidents
from agentwatch.halts import Halts
from agentwatch.keys import Keys
from detectors.agent import Agent, ChildRun, pack, unpack
from detectors.base import DetectorContext, RecordedDecisions
from detectors.tokens import FP_TEXT_CHARS, Tokens, TokensConfig, TokenState

T0 = 60_000 * 20_000
"""A Redis time at the start of a minute (and of every shorter window)."""


class Bot:
    """One agent fed beat by beat as the engine would: totals first, then the detector."""

    def __init__(self, ctx: DetectorContext | None = None, **config: Any) -> None:
        self.detector = Tokens("tokens", TokensConfig.model_validate(config), cast(DetectorContext, ctx))
        self.agent = Agent("bot", run="r1")
        self.now = T0

    @property
    def ops(self) -> list[tuple[str, str, dict[str, Any]]]:
        return cast(RecordedDecisions, self.detector.decisions).ops

    @property
    def state(self) -> TokenState:
        return cast(TokenState, self.agent.states["tokens"])

    def beat(self, gap_ms: int = 1000, child: ChildRun | None = None, **fields: Any) -> int:
        self.now += gap_ms
        self.agent.beats += 1
        tokens = fields.get("tokens")
        if tokens is None and ("tokens_in" in fields or "tokens_out" in fields):
            tokens = fields.get("tokens_in", 0) + fields.get("tokens_out", 0)
        self.agent.tokens += tokens or 0
        self.agent.cost += fields.get("cost") or 0
        event = {"agent": "bot", "kind": "beat", "run": "r1", "seq": self.agent.beats, **fields}
        self.detector.on_event(self.agent, event, self.now, child)
        return self.now

    def beats(self, count: int, gap_ms: int = 1000, **fields: Any) -> None:
        for _ in range(count):
            self.beat(gap_ms, **fields)

    def render(self, index: int = -1) -> tuple[str, str, dict[str, Any]]:
        _, kind, op = self.ops[index]
        return self.detector.render("bot", kind, op)


def test_nothing_is_judged_during_warm_up() -> None:
    bot = Bot(warmup=20)
    bot.beats(5, tokens=200)
    bot.beat(tokens=90_000)
    assert bot.ops == []
    assert bot.state.learned == 6  # (not judged, so learned)


def test_a_beat_spike_fires_and_the_baseline_never_learns_while_open() -> None:
    bot = Bot(warmup=5, recover_after=3)
    bot.beats(10, tokens=100)
    at = bot.beat(tokens=5000)
    ((agent, kind, op),) = bot.ops
    assert (agent, kind, op["o"], op["at"]) == ("bot", "tokens", "f", at)
    assert op["f"] == {
        "why": "beat",
        "tokens": 5000,
        "base": pytest.approx(100),
        "factor": 10.0,
        "total": 6000,
    }
    severity, summary, details = bot.render()
    assert severity == "error"
    assert summary == "bot: token use 5,000 in one beat, 50x its baseline of 100/beat"
    assert details == {"why": "beat", "factor": 10.0, "baseline": 100.0, "total_tokens": 6000, "tokens": 5000}
    learned = (bot.state.tokens_num, bot.state.tokens_weight, bot.state.learned)
    bot.beats(5, tokens=30_000)  # the runaway goes on: one incident, nothing learned
    bot.beats(2, tokens=100)  # calm, but open: still nothing learned
    assert (bot.state.tokens_num, bot.state.tokens_weight, bot.state.learned) == learned
    assert len(bot.ops) == 1


def test_recover_after_calm_beats_in_a_row() -> None:
    bot = Bot(warmup=5, recover_after=3)
    bot.beats(10, tokens=100)
    bot.beat(tokens=5000)
    bot.beats(2, tokens=100)
    bot.beat(tokens=300)  # under factor x, over recover_factor x: not calm, the count restarts
    bot.beats(2, tokens=190)
    assert len(bot.ops) == 1
    at = bot.beat(tokens=90)
    _, kind, op = bot.ops[-1]
    assert (kind, op["o"], op["at"]) == ("tokens", "r", at)
    assert op["f"] == {"base": pytest.approx(100), "cost": 0, "tokens": 90, "total": bot.agent.tokens}
    assert bot.render()[1] == "bot: token use back near its baseline of 100/beat"
    assert bot.state.ended_ms == at
    before = bot.state.learned
    bot.beat(tokens=100)  # closed: learning again (the closing beat was learned too)
    assert bot.state.learned == before + 1


def test_the_floor_keeps_small_numbers_quiet() -> None:
    bot = Bot(min_tokens=500)
    bot.beats(20, tokens=2)
    bot.beat(tokens=40)  # 20x, but tiny
    assert bot.ops == []
    bot.beat(tokens=5000)
    assert [kind for _, kind, _ in bot.ops] == ["tokens"]


def test_fire_after_counts_anomalous_beats_in_a_row() -> None:
    bot = Bot(warmup=5, fire_after=3)
    bot.beats(10, tokens=100)
    bot.beats(2, tokens=5000)
    bot.beat(tokens=100)  # the run is broken
    bot.beats(2, tokens=5000)
    assert bot.ops == []
    at = bot.beat(tokens=6000)
    assert [(kind, op["o"], op["at"], op["f"]["tokens"]) for _, kind, op in bot.ops] == [
        ("tokens", "f", at, 6000)
    ]


def test_a_cost_spike_fires_and_its_recovery_quotes_the_cost_baseline() -> None:
    bot = Bot(warmup=5, min_cost=0.5)
    bot.beats(10, cost=0.01)
    bot.beat(cost=2.5)
    ((_, kind, op),) = bot.ops
    assert op["f"] == {"why": "cost", "cost": 2.5, "base": pytest.approx(0.01), "factor": 10.0, "total": 0}
    assert bot.render()[1] == "bot: $2.50 in one beat, 250x its baseline of $0.010/beat"
    assert bot.render()[2]["cost"] == 2.5
    bot.beats(5, cost=0.01)
    _, kind, op = bot.ops[-1]
    assert (kind, op["o"]) == ("tokens", "r")
    assert op["f"] == {"base": pytest.approx(0.01), "cost": 1, "tokens": 0, "total": 0}
    assert bot.render()[1] == "bot: cost back near its baseline of $0.010/beat"
    assert bot.state.about_cost is False


def test_many_normal_beats_in_a_short_window_trip_the_rate() -> None:
    bot = Bot(warmup=5, window="1s", factor=10)
    bot.beats(40, gap_ms=100, tokens=100)  # windows of 900, 1000, 1000, 1000 closed; a 5th open
    # the rate baseline, tokens per second: an EWMA (alpha 1/3) of 900, 1000, 1000, 1000
    num = weight = 0.0
    for rate in (900, 1000, 1000, 1000):
        num, weight = num * 2 / 3 + rate / 3, weight * 2 / 3 + 1 / 3
    expected = num / weight
    assert bot.state.rate_windows == 4
    for _ in range(97):
        bot.beat(2, tokens=100)
    assert bot.ops == []  # 9,800 tokens in this window: not yet over 10x 987.7
    at = bot.beat(2, tokens=100)
    ((_, kind, op),) = bot.ops
    assert (kind, op["at"]) == ("tokens", at)
    assert op["f"] == {
        "why": "rate",
        "tokens": 9900,
        "base": pytest.approx(expected),
        "factor": 10.0,
        "window": 1000,
        "total": bot.agent.tokens,
    }
    assert bot.render()[1] == "bot: 9,900 tokens in under 1s, over 10x the usual 987.7 per 1s"
    assert bot.render()[2]["window_s"] == 1.0
    # normal-sized beats that go on at the runaway's pace are not calm (the sliding window)
    bot.beats(10, gap_ms=2, tokens=100)
    assert len(bot.ops) == 1
    # later, at the usual pace: the runaway window is not learned, and calm beats resolve
    bot.now += 3000
    bot.beats(5, gap_ms=100, tokens=100)
    assert bot.state.rate_windows == 4
    _, kind, op = bot.ops[-1]
    assert (kind, op["o"], op["f"]["tokens"]) == ("tokens", "r", 100)


def test_the_loop_fires_after_repeat_beats_and_resolves_after_others() -> None:
    bot = Bot(repeat=20, recover_after=3)
    for i in range(30):
        bot.beat(fp=f"job-{i}")
    bot.beats(19, fp="job-42")
    assert bot.ops == []
    at = bot.beat(fp="job-42")
    assert bot.ops == [("bot", "loop", {"o": "f", "at": at, "f": {"fp": "job-42", "count": 20}})]
    assert bot.render() == ("error", "bot: work loop: the same work item (fp 'job-42') 20 beats in a row",
                            {"fp": "job-42", "count": 20})  # fmt: skip
    bot.beats(100, fp="job-42")
    bot.beat(fp="job-43")
    bot.beat(fp="job-42")  # the quiet count starts over
    bot.beat(fp="job-44")
    bot.beat()  # a beat without a fingerprint is not the loop's either
    assert len(bot.ops) == 1
    at = bot.beat(fp="job-45")
    assert bot.ops[-1] == ("bot", "loop", {"o": "r", "at": at, "f": {"count": 1, "quiet": 3}})
    assert bot.render() == ("error", "bot: work items vary again", {"count": 1})
    assert (bot.state.loop_hash, bot.state.loop_quiet, bot.state.loop_text) == (0, 0, "")


def test_a_beat_without_fp_breaks_the_run_and_loop_off_decides_nothing() -> None:
    bot = Bot(repeat=5)
    bot.beats(4, fp="x")
    bot.beat()
    bot.beats(4, fp="x")
    assert bot.ops == []
    bot.beat(fp="x")
    assert [kind for _, kind, _ in bot.ops] == ["loop"]
    quiet = Bot(repeat=5, loop=False)
    quiet.beats(50, fp="x")
    assert quiet.ops == []


def test_the_loop_quotes_a_long_fingerprint_truncated() -> None:
    bot = Bot(repeat=2)
    long = "x" * 500
    bot.beats(2, fp=long)
    assert bot.ops[-1][2]["f"]["fp"] == "x" * FP_TEXT_CHARS == bot.state.loop_text


def test_a_restart_closes_the_loop_but_not_the_tokens_incident() -> None:
    bot = Bot(warmup=5, repeat=5)
    bot.beats(10, tokens=100, fp="same")
    assert [kind for _, kind, _ in bot.ops] == ["loop"]
    bot.beat(tokens=5000, fp="same")
    assert bot.agent.open == {"loop", "tokens"}
    bot.now += 1000
    bot.detector.on_new_run(bot.agent, bot.now)
    assert bot.ops[-1] == ("bot", "loop", {"o": "r", "at": bot.now, "f": {"at": bot.now, "restarted": 1}})
    assert bot.render()[1] == "bot: restarted; the loop is over"
    assert bot.agent.open == {"tokens"}
    assert (bot.state.fp_hash, bot.state.fp_count) == (0, 0)
    bot.beats(4, tokens=5000, fp="same")  # the run starts over: 4 is not 5 yet
    assert [kind for _, kind, _ in bot.ops] == ["loop", "tokens", "loop"]


def test_a_shutdown_closes_both() -> None:
    bot = Bot(warmup=5, repeat=5)
    bot.beats(10, tokens=100, fp="same")
    bot.beat(tokens=5000, fp="same")
    bot.now += 1000
    bot.detector.on_retire(bot.agent, bot.now)
    facts = {"at": bot.now, "shutdown": 1}
    assert bot.ops[-2:] == [
        ("bot", "tokens", {"o": "r", "at": bot.now, "f": facts}),
        ("bot", "loop", {"o": "r", "at": bot.now, "f": facts}),
    ]
    assert bot.render(-2)[1] == "bot: shut down"
    assert bot.render(-1)[1] == "bot: shut down while looping"
    assert bot.state.ended_ms == bot.now and bot.agent.open == set()


def test_child_beats_count_for_the_agent() -> None:
    bot = Bot(warmup=5, repeat=6)
    worker = ChildRun(parent="r1")
    for _ in range(5):
        bot.beat(tokens=100, fp="item")
        bot.beat(tokens=100, fp="item", child=worker)
    assert bot.state.learned == 10
    assert [kind for _, kind, _ in bot.ops] == ["loop"]  # one run of 6 fps across the two
    assert bot.ops[0][2]["f"]["count"] == 6
    bot.beat(tokens=5000, child=worker)
    _, kind, op = bot.ops[-1]
    assert (kind, op["f"]["why"], op["f"]["total"]) == ("tokens", "beat", 6000)


def test_tokens_in_and_out_are_the_beats_tokens() -> None:
    bot = Bot(warmup=5)
    bot.beats(10, tokens_in=60, tokens_out=40)
    assert bot.state.base_tokens() == pytest.approx(100)
    bot.beat(tokens_in=4000)
    assert bot.ops[-1][2]["f"]["tokens"] == 4000


def test_the_state_survives_a_checkpoint() -> None:
    bot = Bot(warmup=5, repeat=3)
    bot.beats(10, gap_ms=20_000, tokens=100, cost=0.01, fp="a")
    bot.beat(tokens=5000)
    back = unpack("bot", pack(bot.agent), {"tokens": TokenState})
    assert back is not None and back.states["tokens"] == bot.state
    assert back.open == {"tokens", "loop"}


def test_halt_stops_the_runaway_once(r: redis.Redis, keys: Keys) -> None:
    incidents = Incidents(r, keys)
    ctx = DetectorContext(r, keys, incidents, cast(Any, None), cast(Any, None))
    bot = Bot(ctx, warmup=5, halt=True)
    bot.beats(10, tokens=100)
    bot.beat(tokens=5000)
    bot.render()
    bot.render()  # (published twice: still one halt)
    (halt,) = Halts(r, keys).halting("bot")
    assert halt.by == "tokens" and halt.reason.startswith("token use 5,000 in one beat")


def test_an_agent_that_never_beat_gets_no_state() -> None:
    bot = Bot()
    bot.detector.on_new_run(bot.agent, T0)
    bot.detector.on_retire(bot.agent, T0 + 1)
    assert bot.agent.states == {} and bot.ops == []


def test_a_tokens_incident_closed_by_a_shutdown_does_not_leave_its_cost_behind() -> None:
    """(The old engine kept the "about cost" mark after a shutdown closed a cost incident: a later
    tokens incident then recovered as "cost back near its baseline".)"""
    bot = Bot(warmup=5, recover_after=1, min_cost=0.5)
    bot.beats(10, tokens=100, cost=0.01)
    bot.beat(tokens=100, cost=2.5)
    bot.detector.on_retire(bot.agent, bot.now)
    bot.beat(tokens=5000, cost=0.01)
    bot.beat(tokens=100, cost=0.01)
    assert [(kind, op["o"], op["f"].get("why"), op["f"].get("cost")) for _, kind, op in bot.ops] == [
        ("tokens", "f", "cost", 2.5),
        ("tokens", "r", None, None),
        ("tokens", "f", "beat", None),
        ("tokens", "r", None, 0),
    ]
    assert bot.render()[1] == "bot: token use back near its baseline of 100/beat"
