"""What the demo runs: its timings, its agents and the pipeline.toml it writes for them.

The pipeline is configured the way a user would configure theirs, as a file that goes through
``loading.load`` and ``--config``, only with thresholds short enough to watch: silence and stall
after a few seconds instead of minutes, a warm-up of a few beats instead of twenty. Everything
else (the workers, the detectors, the alerts) is the real thing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

PREFIX: Final = "aw-demo"
"""A prefix of its own, so the demo's keys can never be mistaken for a real deployment's."""


@dataclass(frozen=True)
class Timings:
    """Every duration of one demo run, in seconds (``normal`` for people, ``fast`` for CI)."""

    interval: float  # between beats, for every agent
    pulse: float  # between the producer's pulses
    warmup: int  # beats the tokens detector learns from before it judges
    silence_after: float
    stall_after: float
    leak_mb: int  # per beat...
    leak_to_mb: int  # ...up to this
    stagger: float  # between the three failures, so their alerts can be told apart
    settle: float  # watched after the last detection: the healthy agents must stay quiet
    detect_timeout: float  # per failure, before it counts as missed
    start_timeout: float  # for the worker and the agents to come up

    @property
    def ready_beats(self) -> int:
        """Beats before an agent is ready: the warm-up plus two, so it is over when we strike."""
        return self.warmup + 2


NORMAL: Final = Timings(
    interval=1.0, pulse=0.5, warmup=8, silence_after=5.0, stall_after=5.0,
    leak_mb=16, leak_to_mb=160, stagger=2.0, settle=3.0, detect_timeout=30.0, start_timeout=30.0,
)  # fmt: skip
FAST: Final = Timings(
    interval=0.3, pulse=0.15, warmup=6, silence_after=2.0, stall_after=2.0,
    leak_mb=16, leak_to_mb=112, stagger=0.0, settle=1.0, detect_timeout=20.0, start_timeout=30.0,
)  # fmt: skip

NORMAL_RATE: Final = 200  # tokens per minute: a careful agent
MODEL: Final = "claude-opus-4-1"  # what every demo agent calls: $15 / $75 per 1M tokens in / out
BUDGET_USD: Final = 0.05  # the runaway's daily budget: a few beats of runaway use
RUNAWAY_RATE: Final = 40_000  # tokens per minute: the same agent stuck re-asking the model


@dataclass(frozen=True)
class Role:
    """One demo agent: its name, what it does (agents.py), and the failure it stands for."""

    agent: str
    role: str  # healthy, leaky, stuck, runaway
    rate: int = NORMAL_RATE


HEALTHY: Final = (
    Role("healthy-1", "healthy", 150),
    Role("healthy-2", "healthy"),
    Role("healthy-3", "healthy", 300),
)
LEAKY: Final = Role("leaky", "leaky")
STUCK: Final = Role("stuck", "stuck")
RUNAWAY: Final = Role("runaway", "runaway")
FLEET: Final = (*HEALTHY, LEAKY, STUCK, RUNAWAY)


def _s(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def pipeline_toml(t: Timings, redis_url: str) -> str:
    """The demo's pipeline file: real keys, demo-sized values, comments saying why."""
    window = max(2.0, 8 * t.interval)
    return f"""\
# Written by `agentwatch demo`: the real pipeline with thresholds short enough to watch.
[redis]
url = "{redis_url}"                  # the demo's private server, never yours
prefix = "{PREFIX}"

[worker]
tick = "100ms"                       # silence and stall checks ten times a second
block = "100ms"
claim_idle = "5s"

[detectors.silence]
after = "{_s(t.silence_after)}"

[detectors.stall]
after = "{_s(t.stall_after)}"

[detectors.tokens]
warmup = {t.warmup}                  # learn each agent's normal use from this many beats
min_tokens = 100                     # a beat under this is never a runaway
fire_after = 1

[detectors.memory]                   # the leak, seen while it grows (an early warning)
window = "{_s(window)}"
points = 8
min_points = 4
limit = "1GB"
horizon = "2m"

[[budgets]]                          # the brake: the runaway stops itself at its budget
agents = "{RUNAWAY.agent}"
per = "day"
limit = {BUDGET_USD}                         # USD; its tokens are priced from the model it names
halt = true                          # heartbeat() raises producers.Halted from then on
"""
