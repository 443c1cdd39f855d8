"""The built-in detectors' shared machinery, one per worker: one state update per batch, one
set of timer checks per tick, whichever built-ins are enabled.

Each built-in (silence, stall, exit, tokens, memory, lag) is a :class:`BuiltinDetector`: it owns
its config, the Lua that decides its incidents, and the words of its alerts. They register with
the worker's :class:`Engine`, which runs the work they share *once*: the runtime hands every
handler the same batch, and the first built-in to see it applies it for all (the state of an
agent is one record, updated by one script per shard; see state.py). A plugin detector of your
own does not need any of this: see base.py and docs/writing-a-detector.md.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Sequence
from typing import Any, ClassVar, Final, Generic, TypeVar

import msgpack
import numpy as np

from agentwatch.codec import Event
from agentwatch.config import format_duration
from agentwatch.halts import Halts
from agentwatch.redisconn import RECOVERABLE
from agentwatch.worker import Message
from detectors import horizon, intents, layout, record, schedule, segments, state
from detectors.base import Detector, DetectorConfig, DetectorContext

log = logging.getLogger("agentwatch.detectors")

C = TypeVar("C", bound=DetectorConfig)

DEFAULT_PROFILE: Final[dict[str, float]] = {
    "sil_on": 0, "sil_after": 60_000, "sil_recover": 1, "stall_on": 0, "stall_after": 120_000,
    "stall_recover": 1, "exit_on": 0,
    "exit_clean": 1, "tok_on": 0, "factor": 10.0, "min_tokens": 500, "min_cost": 0.1, "warmup": 20,
    "alpha": 0.1, "fire_after": 1, "recover_after": 5, "recover_factor": 2.0, "window": 60_000,
    "loop_on": 0, "repeat": 20, "loop_recover": 5, "mem_on": 0, "bucket": 300_000, "points": 12,
}  # fmt: skip
"""What the update script uses for a detector that is not enabled."""

QUIET_WHEN_HALTED: Final = frozenset({"silence", "stall", "exit", schedule.MISSED, schedule.OVERRAN})
"""Incidents a halt explains: not paged while the agent is halted (agentwatch/halts.py)."""
BLIND_AFTER_MS: Final = 5000
"""Default for ``[detectors.lag] blind_after`` when the lag detector is disabled."""
SIGHT_FLOOR_MS: Final = 1500
"""A gap between timer checks shorter than this never counts as an outage (Engine.sight_ms),
however short the silence allowances: a worker that a loaded machine holds up for a moment at
each check must still judge its agents, not restart their clocks every time."""
_FORGET_EVERY_S: Final = 60.0
_CLAIM_ROUNDS: Final = 50


class BuiltinDetector(Detector[C], Generic[C]):
    """A built-in: registers with the worker's engine; its hooks drive the shared work."""

    kinds: ClassVar[tuple[str, ...]] = ()
    """The ``detector`` names of the alerts this detector words (see :meth:`render`)."""

    def __init__(self, name: str, config: C, ctx: DetectorContext) -> None:
        super().__init__(name, config, ctx)
        self.engine = Engine.of(ctx)
        self.engine.register(self)

    def on_batch(self, messages: Sequence[Message[Event]]) -> None:
        self.engine.batch(messages)

    def on_tick(self, now_ms: int) -> None:
        self.engine.tick(now_ms)

    def profile(self, config: DetectorConfig) -> dict[str, Any]:
        """This detector's entries of an agent's profile (state.PROFILE) under ``config``."""
        return {}

    def render(self, agent: str, kind: str, op: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
        """(severity, summary, details) of one decided op; ``op["f"]`` holds the facts."""
        verb = "started" if op["o"] == "f" else "ended"
        return "warning", f"{agent}: {kind} incident {verb}", dict(op.get("f") or {})


class Engine:
    """Per-worker runner of the built-ins' shared work (see the module docstring)."""

    @classmethod
    def of(cls, ctx: DetectorContext) -> Engine:
        engine = ctx.shared.get("builtins")
        if engine is None:
            engine = ctx.shared["builtins"] = cls(ctx)
        assert isinstance(engine, Engine)
        return engine

    def __init__(self, ctx: DetectorContext) -> None:
        self.ctx = ctx
        self.client: Any = ctx.client
        self.keys = ctx.keys
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self.detectors: dict[str, BuiltinDetector[Any]] = {}
        self.renderers: dict[str, BuiltinDetector[Any]] = {}
        self.lease_ms = intents.lease_for(ctx.settings.worker.claim_idle_s)
        self.publisher = intents.Publisher(
            self.client, self.keys, ctx.incidents, self.owner, self.render,
            lease_ms=self.lease_ms, on_error=self._publish_failed, quiet=self._halted,
        )  # fmt: skip
        self.halts = Halts(self.client, self.keys, ctx.incidents)
        self._ready = False
        self._overrides = False
        self._profiles: list[tuple[float, ...]] = []
        self._profile_ids: dict[tuple[float, ...], int] = {}
        self._agent_profiles: dict[str, int] = {}
        self._packed_profiles = b""
        self._profile_array = np.zeros((0, len(state.PROFILE)))
        self._alphas: list[float] = []
        self._windows: list[float] = []
        self._last_batch: Sequence[Message[Event]] | None = None
        self._last_tick = -1
        self._next_forget = 0.0
        self.horizons: list[int] = []
        self._lost = [0] * len(self.keys.event_streams())  # per stream: trimmed unread, last known
        self.last_gap_ms = 0
        self.use_fast_path = True
        """False: every segment goes through the update script (tests compare the two)."""
        self.fast: Any = None
        self.fast_errors = 0
        self.schedules: schedule.Schedules | None = None
        """The schedule checks (detectors/schedule.py), when the silence detector has a schedule."""

    def _halted(self, agent: str, detector: str) -> bool:
        """A halted agent stops, exits or idles on purpose: no silence, stall or exit page."""
        return detector in QUIET_WHEN_HALTED and bool(self.halts.halting(agent))

    def _publish_failed(self) -> None:
        stats = self.ctx.stats.handler_errors
        stats["intents"] = stats.get("intents", 0) + 1

    # -- registration ------------------------------------------------------------------------
    def register(self, detector: BuiltinDetector[Any]) -> None:
        kind = type(detector).__name__
        if kind in self.detectors:
            first = self.detectors[kind].name
            log.warning(
                "built-in %s is configured twice (%r, %r); using %r", kind, first, detector.name, first
            )
            return
        self.detectors[kind] = detector
        for name in detector.kinds:
            self.renderers[name] = detector
        self._ready = False

    def blind_ms(self) -> int:
        """``[detectors.lag] blind_after`` in ms (its default when the lag detector is off)."""
        lag = self.get("Lag")
        return int(lag.config.blind_after_s * 1000) if lag is not None else BLIND_AFTER_MS

    def sight_ms(self) -> int:
        """How long without a timer check means nobody was watching (timers.py: *sight*):
        :meth:`blind_ms`, or the shortest silence ``after`` in force if that is shorter (but not
        below :data:`SIGHT_FLOOR_MS`). A gap shorter than blind_after but longer than an
        allowance (a Redis restart of 3 s against 1 s silences) would otherwise judge agents on
        time nobody watched, and page every one of them falsely."""
        on, after = state.PROFILE.index("sil_on"), state.PROFILE.index("sil_after")
        allowances = [int(p[after]) for p in self._profiles if p[on] and p[after] > 0]
        if not allowances:
            return self.blind_ms()
        return min(self.blind_ms(), max(min(allowances), SIGHT_FLOOR_MS))

    def get(self, kind: str) -> BuiltinDetector[Any] | None:
        """The registered built-in of class name ``kind`` (e.g. "Silence"), if enabled."""
        return self.detectors.get(kind)

    def _prepare(self) -> None:
        if self._ready:
            return
        from detectors import fastpath, timers  # noqa: PLC0415 - they import this module

        self._overrides = any(d.config.agents for d in self.detectors.values())
        self._profiles, self._profile_ids, self._agent_profiles, self._alphas, self._windows = (
            [],
            {},
            {},
            [],
            [],
        )
        self._add_profile(self._profile_for(None))
        self._update = register(self.client, _compose_update())
        self.timers = timers.Timers(self)
        if self.use_fast_path:
            self.fast = fastpath.FastPath(self.client, self.keys)
        self.schedules = schedule.Schedules.of(self)
        if self.schedules is not None:
            self.schedules.resync()
        self._ready = True

    def _profile_for(self, agent: str | None) -> tuple[float, ...]:
        values = dict(DEFAULT_PROFILE)
        for detector in self.detectors.values():
            config = detector.config if agent is None else detector.config.for_agent(agent)
            values.update(detector.profile(config))
        silence = self.detectors.get("Silence")
        if silence is not None:  # a scheduled agent: its schedule judges it, not the interval rule
            config = silence.config if agent is None else silence.config.for_agent(agent)
            values.update(schedule.profile(config))
        return tuple(float(values[name]) for name in state.PROFILE)

    def _add_profile(self, profile: tuple[float, ...]) -> int:
        found = self._profile_ids.get(profile)
        if found is None:
            self._profiles.append(profile)
            found = self._profile_ids[profile] = len(self._profiles)
            self._alphas.append(profile[state.PROFILE.index("alpha")])
            self._windows.append(max(1.0, profile[state.PROFILE.index("window")]))
            self._packed_profiles = msgpack.packb([list(p) for p in self._profiles])
            self._profile_array = np.array(self._profiles, dtype=np.float64)
        return found

    def profile_of(self, agent: str) -> int:
        """Index (1-based) of the profile that applies to ``agent``."""
        if not self._overrides:
            return 1
        found = self._agent_profiles.get(agent)
        if found is None:
            if len(self._agent_profiles) > 100_000:
                self._agent_profiles.clear()
            found = self._agent_profiles[agent] = self._add_profile(self._profile_for(agent))
        return found

    def profile_values(self, agent: str) -> dict[str, float]:
        return dict(zip(state.PROFILE, self._profiles[self.profile_of(agent) - 1], strict=True))

    # -- the batch ---------------------------------------------------------------------------
    def batch(self, messages: Sequence[Message[Event]]) -> None:
        """Apply a batch once per worker, whichever built-in's hook sees it first."""
        if messages is self._last_batch:
            return
        self._prepare()
        profile_of = self.profile_of if self._overrides else None
        shards: dict[int, Any] = {}

        def read_ahead(agents: list[str]) -> None:  # the fast path reads records while we fold
            shards.update(segments.by_shard(agents, self.keys.shards))
            if self.fast is not None:
                self._fast(self.fast.prefetch, agents, shards)

        try:
            folded = segments.build_segments(
                messages, profile_of, self._alphas, self._windows, on_agents=read_ahead
            )
            self._apply(folded, shards)
        finally:
            if self.fast is not None:
                self.fast.discard()
        if self.schedules is not None:
            self.schedules.seen(messages)
        self._last_batch = messages

    def _apply(self, folded: segments.Segments, shards: dict[int, Any]) -> None:
        memory = self.get("Memory")
        for shard, shard_rows in shards.items():
            rows = shard_rows
            if self.fast is not None:  # the common segments first; the script takes the rest
                rows = self._fast(self.fast.apply, shard, folded, rows, self._profile_array, failed=rows)
            if not len(rows):
                continue
            reply = self._update(
                keys=[
                    self.keys.states(shard), self.keys.timers(shard), self.keys.agents(shard),
                    self.keys.stacks(shard), self.keys.rss(shard), self.keys.intents(shard),
                    self.keys.clock(shard), self.keys.children(shard),
                ],
                args=[self.owner, self.lease_ms, self._packed_profiles, segments.pack(folded, rows),
                      self.blind_ms()],
            )  # fmt: skip
            owned, windows = msgpack.unpackb(reply, raw=False)
            if owned:
                self.publisher.publish(shard, owned)
            if windows and memory is not None:
                memory.evaluate(shard, windows)  # type: ignore[attr-defined]

    def _fast(self, step: Any, *args: Any, failed: Any = None) -> Any:
        """A step of the fast path; if it fails, ``failed`` (for apply: every row, so the update
        script applies them; the fast path wrote nothing then, or what it wrote the script
        skips as already applied)."""
        try:
            return step(*args)
        except RECOVERABLE:
            raise
        except Exception:
            self.fast_errors += 1
            if self.fast_errors == 1 or self.fast_errors % 1000 == 0:
                log.exception(
                    "fast path failed %d times; the update script applies its batches", self.fast_errors
                )
            self.fast.discard()
            return failed

    # -- the tick ----------------------------------------------------------------------------
    def tick(self, now_ms: int) -> None:
        """Timer checks, pipeline health and the intents sweep: once per tick per worker."""
        if now_ms == self._last_tick:
            return
        self._last_tick = now_ms
        self._prepare()
        positions = horizon.read_positions(self.client, self.keys.event_streams(), now_ms, self._lost)
        self.horizons = positions.horizons
        known = zip(positions.lost, self._lost, strict=True)
        self._lost = [new if new is not None else old for new, old in known]
        gaps = [self.timers.check(shard, now_ms, min(now_ms, self.horizons[shard]))
                for shard in range(self.keys.shards)]  # fmt: skip
        self.last_gap_ms = max(gaps)
        if self.schedules is not None:
            for shard in range(self.keys.shards):
                self.schedules.check(shard, now_ms, min(now_ms, self.horizons[shard]))
        lag = self.get("Lag")
        if lag is not None:
            behind = now_ms - min(self.horizons)
            lag.check(now_ms, behind, self.last_gap_ms, positions)  # type: ignore[attr-defined]
        self.publisher.sweep(now_ms)
        if time.monotonic() >= self._next_forget:
            self._next_forget = time.monotonic() + _FORGET_EVERY_S
            self.timers.forget(now_ms)

    # -- alerts ------------------------------------------------------------------------------
    def render(self, agent: str, kind: str, op: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
        """(severity, summary, details) of one decided op. Never raises: a decision must reach
        the alerts stream even if its wording fails (a bug, facts of an older version), so a
        failing renderer is logged and counted, and the op is published in plain words."""
        detector = self.renderers.get(kind)
        try:
            facts = op.get("f") or {}
            if op["o"] == "r" and facts.get("forgotten"):
                return self._forgotten(detector, agent, kind, op)
            if detector is None:  # decided while enabled, published after being disabled
                return BuiltinDetector.render(detector, agent, kind, op)  # type: ignore[arg-type]
            return detector.render(agent, kind, op)
        except Exception:
            name = detector.name if detector is not None else kind
            self.ctx.stats.handler_errors[name] = self.ctx.stats.handler_errors.get(name, 0) + 1
            log.exception("could not word the %s alert of %s (op %r); publishing it plainly", kind, agent, op)
            verb = "started" if op.get("o") == "f" else "ended"
            facts = op.get("f")
            return (
                _severity(detector, agent),
                f"{agent}: {kind} incident {verb}",
                dict(facts if isinstance(facts, dict) else {}),
            )

    @staticmethod
    def _forgotten(
        detector: BuiltinDetector[Any] | None, agent: str, kind: str, op: dict[str, Any]
    ) -> tuple[str, str, dict[str, Any]]:
        """The resolve of an incident still open when its agent was forgotten (timers.forget):
        worded here once for every kind, from the facts every kind's forget op carries."""
        seen = float(op["f"].get("seen") or 0)
        silent_s = max(0.0, (op["at"] - seen) / 1000) if seen else 0.0
        summary = f"{agent}: forgotten after {format_duration(silent_s)} of silence; {kind} incident closed"
        return _severity(detector, agent), summary, {"forgotten": True, "silent_s": round(silent_s, 3)}


def _severity(detector: BuiltinDetector[Any] | None, agent: str) -> str:
    """The severity ``detector`` is configured with for ``agent`` ("error" when unknown)."""
    if detector is None:
        return "error"
    severity = getattr(detector.config.for_agent(agent), "severity", "error")
    return severity if isinstance(severity, str) else "error"


def _compose_update() -> str:
    from detectors import exit, memory, silence, stall, tokens  # noqa: PLC0415 - they import this module

    parts = (silence.LUA, stall.LUA, exit.LUA, memory.LUA, tokens.LUA)
    return "\n".join([lua_prelude(), *parts, state.LUA_MAIN])


def register(client: Any, *parts: str) -> Any:
    """Register a deciding script made of ``parts`` (record fields compiled to indexes)."""
    return client.register_script(record.compile("\n".join(parts)))


def lua_prelude() -> str:
    """What every deciding script starts with: record codec, emit/flush, constants, helpers."""
    return "\n".join(
        [
            record.lua(),
            intents.LUA_EMIT,
            state.profile_lua(),
            layout.segment_lua(),
            state.flags_lua(),
            state.LUA_COMMON,
        ]
    )
