"""The pipeline-lag detector's decisions (detectors/lag.py) as pure logic: ticks by hand,
decisions recorded. Redis only holds what ``status`` reads (the trimmed count) and the marks."""

from __future__ import annotations

from typing import Any, cast

import redis

from agentwatch.alerts import PIPELINE_AGENT
from agentwatch.keys import Keys
from detectors import agent as agent_state
from detectors.base import Agent, DetectorContext, RecordedDecisions
from detectors.horizon import Positions
from detectors.lag import Lag, LagConfig, LagState

T0 = 5_000_000
AFTER, RECOVER = 1000, 300  # ms


def detector(r: redis.Redis, keys: Keys, **config: str) -> Lag:
    ctx = DetectorContext(
        client=r, keys=keys, incidents=cast(Any, None), settings=cast(Any, None), stats=cast(Any, None)
    )
    settings = {"after": f"{AFTER}ms", "recover": f"{RECOVER}ms", **config}
    return Lag("lag", LagConfig.model_validate(settings), ctx)


def ops(lag: Lag) -> list[tuple[str, str, str, int, dict[str, Any]]]:
    """(agent, kind, "f"/"r", at, facts) of every decision so far."""
    recorded = cast(RecordedDecisions, lag.decisions).ops
    return [(name, kind, op["o"], op["at"], op["f"]) for name, kind, op in recorded]


def tick(
    lag: Lag, pipeline: Agent, now: int, behind: int, *, gap: int = 0, waiting: int = 0,
    lost: list[int | None] | None = None,
) -> None:  # fmt: skip
    lag.check(
        pipeline, now, behind, gap, Positions(horizons=[now - behind], waiting=waiting, lost=lost or [0])
    )


def texts(lag: Lag, kind: str) -> list[tuple[str, str, dict[str, Any]]]:
    recorded = cast(RecordedDecisions, lag.decisions).ops
    return [lag.render(name, k, op) for name, k, op in recorded if k == kind]


def test_workers_behind_past_after_is_one_lag_incident_until_caught_up_for_recover(
    r: redis.Redis, keys: Keys
) -> None:
    lag, pipeline = detector(r, keys), Agent(PIPELINE_AGENT)
    tick(lag, pipeline, T0, AFTER, waiting=10)  # exactly after: not yet
    assert ops(lag) == []
    tick(lag, pipeline, T0 + 100, 2000, waiting=1234)
    tick(lag, pipeline, T0 + 200, 3000, waiting=2000)  # worse: no second alert, a new peak
    assert ops(lag) == [(PIPELINE_AGENT, "lag", "f", T0 + 100, {"behind": 2000, "gap": 0, "waiting": 1234})]
    assert texts(lag, "lag") == [(
        "error",
        "agentwatch pipeline lagging: detector workers are 2s behind (1,234 events waiting); silence and "
        "stall alerts held back until they catch up",
        {"behind_s": 2.0, "gap_s": 0.0, "waiting": 1234},
    )]  # fmt: skip
    tick(lag, pipeline, T0 + 300, AFTER // 2)  # under after / 2 from here...
    tick(lag, pipeline, T0 + 400, 600)  # ...but not for long: the recover clock restarts
    tick(lag, pipeline, T0 + 500, 100)
    tick(lag, pipeline, T0 + 700, 100)
    assert len(ops(lag)) == 1 and pipeline.is_open("lag")
    tick(lag, pipeline, T0 + 800, 80)  # recover (300 ms) under after / 2
    assert ops(lag)[1:] == [(PIPELINE_AGENT, "lag", "r", T0 + 800, {"behind": 80, "peak": 3000})]
    assert texts(lag, "lag")[1] == (
        "error",
        "agentwatch pipeline caught up (detectors 80ms behind, at worst 3s)",
        {"behind_s": 0.08, "peak_s": 3.0},
    )
    assert not pipeline.is_open("lag")
    state = cast(LagState, pipeline.states["lag"])
    assert (state.calm_ms, state.peak_ms) == (0, 0)


def test_a_gap_with_nobody_watching_past_after_fires_it_too(r: redis.Redis, keys: Keys) -> None:
    lag, pipeline = detector(r, keys, severity="critical"), Agent(PIPELINE_AGENT)
    tick(lag, pipeline, T0, 0, gap=5000, waiting=0)
    assert ops(lag) == [(PIPELINE_AGENT, "lag", "f", T0, {"behind": 0, "gap": 5000, "waiting": 0})]
    assert texts(lag, "lag") == [(
        "critical",
        "agentwatch pipeline lagging: no detector worker ran for 5s; "
        "silence and stall checks restart from now",
        {"behind_s": 0.0, "gap_s": 5.0, "waiting": 0},
    )]  # fmt: skip
    for step in range(1, 5):  # calm from the tick after it fired
        tick(lag, pipeline, T0 + step * 100, 0)
    assert [(kind, o, at, facts) for _, kind, o, at, facts in ops(lag)][1:] == [
        ("lag", "r", T0 + 400, {"behind": 0, "peak": 5000})  # the peak was the gap
    ]


def test_recover_zero_resolves_at_the_first_calm_tick(r: redis.Redis, keys: Keys) -> None:
    lag, pipeline = detector(r, keys, recover="0s"), Agent(PIPELINE_AGENT)
    tick(lag, pipeline, T0, 1500)
    tick(lag, pipeline, T0 + 100, 400)
    assert [(kind, o) for _, kind, o, _, _ in ops(lag)] == [("lag", "f"), ("lag", "r")]


def test_events_trimmed_unread_are_counted_once_per_stream_against_a_high_water_mark(
    r: redis.Redis, keys: Keys
) -> None:
    lag, pipeline = detector(r, keys), Agent(PIPELINE_AGENT)
    clock = keys.clock(0)
    tick(lag, pipeline, T0, 0, lost=[0, None])
    assert ops(lag) == [] and r.hget(clock, "trimmed") is None
    tick(lag, pipeline, T0 + 100, 0, lost=[400, None])  # stream 1 not known now: counts nothing
    assert ops(lag) == [(PIPELINE_AGENT, "trimmed", "f", T0 + 100, {"count": 400})]
    assert texts(lag, "trimmed") == [(
        "error",
        "agentwatch pipeline lost events: 400 events were trimmed before detectors read them: raise the "
        "producers' MAXLEN (AGENTWATCH_MAXLEN) or add detector workers",
        {"trimmed": 400},
    )]  # fmt: skip
    tick(lag, pipeline, T0 + 200, 0, lost=[400, 50])  # the same 400 again, and 50 new: no second alert
    tick(lag, pipeline, T0 + 300, 0, lost=[None, 50])
    assert len(ops(lag)) == 1
    assert int(r.hget(clock, "trimmed") or 0) == 450  # what `status` shows
    assert (cast(LagState, pipeline.states["lag"]).trim_marks, r.hget(clock, "trim_mark:1")) == (
        [400, 50],
        b"50",
    )
    tick(lag, pipeline, T0 + 400, 0, lost=[400, 50])
    tick(lag, pipeline, T0 + 600, 0, lost=[400, 50])
    assert ops(lag)[1:] == [
        (PIPELINE_AGENT, "trimmed", "r", T0 + 600, {"count": 450})
    ]  # 300 ms since T0 + 300
    assert texts(lag, "trimmed")[1] == (
        "error",
        "agentwatch pipeline caught up; 450 events were trimmed unread in all",
        {"trimmed": 450},
    )
    tick(lag, pipeline, T0 + 700, 0, lost=[410, 50])  # a new loss: a new incident with the new count
    assert ops(lag)[2:] == [(PIPELINE_AGENT, "trimmed", "f", T0 + 700, {"count": 10})]
    assert int(r.hget(clock, "trimmed") or 0) == 460


def test_trimmed_resolves_only_once_the_workers_caught_up(r: redis.Redis, keys: Keys) -> None:
    lag, pipeline = detector(r, keys), Agent(PIPELINE_AGENT)
    tick(lag, pipeline, T0, 2000, lost=[100])  # both at once
    tick(lag, pipeline, T0 + 100, 900, lost=[100])  # no loss, but behind more than after / 2
    tick(lag, pipeline, T0 + 500, 900, lost=[100])
    assert [(kind, o) for _, kind, o, _, _ in ops(lag)] == [("lag", "f"), ("trimmed", "f")]
    tick(lag, pipeline, T0 + 600, 100, lost=[100])
    tick(lag, pipeline, T0 + 700, 600, lost=[100])  # the recover clock restarts
    tick(lag, pipeline, T0 + 800, 100, lost=[100])
    tick(lag, pipeline, T0 + 1000, 100, lost=[100])
    assert [(kind, o) for _, kind, o, _, _ in ops(lag)] == [("lag", "f"), ("trimmed", "f")]
    tick(lag, pipeline, T0 + 1100, 100, lost=[100])
    assert [(kind, o, at) for _, kind, o, at, _ in ops(lag)][2:] == [
        ("lag", "r", T0 + 1100),
        ("trimmed", "r", T0 + 1100),
    ]


def test_a_fresh_state_takes_the_marks_back_from_the_clock_hash(r: redis.Redis, keys: Keys) -> None:
    """The old engine (or a checkpoint of another layout) counted 400 already: they are not new."""
    r.hset(keys.clock(0), mapping={"trimmed": 400, "trim_mark:0": 400, "lag_open": 0, "owner": "w-1"})
    lag, pipeline = detector(r, keys), Agent(PIPELINE_AGENT)
    tick(lag, pipeline, T0, 0, lost=[400])
    assert ops(lag) == []
    tick(lag, pipeline, T0 + 100, 0, lost=[425])
    assert ops(lag) == [(PIPELINE_AGENT, "trimmed", "f", T0 + 100, {"count": 25})]
    assert int(r.hget(keys.clock(0), "trimmed") or 0) == 425


def test_a_check_replayed_from_an_older_checkpoint_counts_the_same_total(r: redis.Redis, keys: Keys) -> None:
    """The owner wrote the count, then died before its checkpoint: the next owner, from the
    checkpoint before, sees the same losses again and writes the same total (not twice as many)."""
    lag, pipeline = detector(r, keys), Agent(PIPELINE_AGENT)
    tick(lag, pipeline, T0, 0, lost=[100])
    saved = agent_state.pack(pipeline)
    tick(lag, pipeline, T0 + 100, 0, lost=[300])
    assert int(r.hget(keys.clock(0), "trimmed") or 0) == 300
    again = agent_state.unpack(PIPELINE_AGENT, saved, {"lag": LagState})
    assert again is not None and cast(LagState, again.states["lag"]).trim_marks == [100]
    tick(detector(r, keys), again, T0 + 100, 0, lost=[300])
    assert int(r.hget(keys.clock(0), "trimmed") or 0) == 300


def test_the_state_is_checkpointed_with_the_pipeline_agent(r: redis.Redis, keys: Keys) -> None:
    lag, pipeline = detector(r, keys), Agent(PIPELINE_AGENT)
    tick(lag, pipeline, T0, 2500, lost=[7])
    tick(lag, pipeline, T0 + 100, 100, lost=[7])
    back = agent_state.unpack(PIPELINE_AGENT, agent_state.pack(pipeline), {"lag": LagState})
    assert back is not None and back.open == {"lag", "trimmed"}
    assert back.states["lag"] == LagState(
        calm_ms=T0 + 100,
        peak_ms=2500,
        trim_marks=[7],
        trim_calm_ms=T0 + 100,
        trim_count=7,
        trimmed=7,
        seeded=True,
    )
    tick(lag, back, T0 + 400, 100, lost=[7])  # the next owner goes on where it stopped
    assert [(kind, o) for _, kind, o, _, _ in ops(lag)][2:] == [("lag", "r"), ("trimmed", "r")]
