"""Token anomalies and work loops: the runaway that burns money while every beat looks healthy.

**tokens** — each agent has a baseline: an exponentially weighted moving average of tokens per
beat (and of cost per beat, where beats carry ``cost``), with span ``warmup`` (so
``alpha = 2 / (warmup + 1)``) and bias-corrected, so it is usable from the first beats. After
``warmup`` beats an observation is anomalous when

* one beat uses more than ``factor`` x the baseline and at least ``min_tokens`` (or
  ``min_cost``): a floor, so 2 -> 40 tokens is not an incident; or
* the tokens of the current ``window`` exceed ``factor`` x what the baseline rate (tokens per
  second of past windows) predicts for a whole window, and ``min_tokens``: many normal-sized
  beats in quick succession.

``fire_after`` anomalous observations in a row open the incident; it resolves after
``recover_after`` calm beats in a row: each back under ``recover_factor`` x the baseline, and the
tokens of the last window-length (sliding over the current and the previous window) back under
``recover_factor`` x what the baseline rate predicts, so a runaway of normal-sized beats cannot
look calm at the start of every window. The baseline never learns while an incident is open or
from an anomalous beat, so a runaway cannot become normal.

**loop** — the same ``fp`` (work-item fingerprint) on ``repeat`` beats in a row: an agent retrying
one item forever. Its own incident (detector name ``loop``, dedup key ``<agent>/loop``), configured
here; it resolves after ``recover_after`` beats without that fingerprint, or on a restart.

The shard owner (detectors/engine.py) hands this detector every beat of the agent, its child
processes' beats included (a worker's usage is the agent's), once each and in stream order; so
every beat is judged on its own, after the one before it, and how the stream was cut into
batches cannot change a verdict. The agent's totals (``agent.tokens``, quoted as ``total``) are
the engine's: it adds a beat's usage before calling :meth:`Tokens.on_event`.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Final, Literal, NamedTuple

from pydantic import Field

from agentwatch.config import Seconds, format_duration
from agentwatch.halts import Halts
from detectors.base import Agent, ChildRun, Detector, DetectorConfig, Event, Op

Severity = Literal["info", "warning", "error", "critical"]

FP_TEXT_CHARS: Final = 80
"""How much of a fingerprint a loop alert quotes."""


class TokensConfig(DetectorConfig):
    factor: float = Field(10.0, gt=1, description="x the baseline is anomalous")
    warmup: int = Field(20, ge=1, le=100_000, description="beats before judging; the EWMA span")
    min_tokens: int = Field(500, ge=0, description="absolute floor for a beat or a window")
    min_cost: float = Field(0.10, ge=0, description="absolute floor for a beat's cost (USD)")
    window_s: Seconds = Field(60.0, alias="window", gt=0, description="short window for the rate check")
    fire_after: int = Field(1, ge=1, le=1000, description="anomalous observations in a row to fire")
    recover_after: int = Field(5, ge=1, le=10_000, description="normal beats in a row to resolve")
    recover_factor: float = Field(2.0, gt=0, description="a beat under this x baseline is normal")
    repeat: int = Field(20, ge=2, le=1_000_000, description="same fp this many beats in a row: loop")
    loop: bool = Field(True, description="raise loop incidents at all")
    severity: Severity = "error"
    halt: bool = Field(False, description="halt the agent when a tokens incident fires (it stops itself)")

    @cached_property
    def alpha(self) -> float:
        """The EWMA's weight of the newest observation (span ``warmup``). (Cached: read for
        every beat; settings never change once loaded.)"""
        return 2.0 / (self.warmup + 1)

    @cached_property
    def window_ms(self) -> int:
        """The rate window in whole ms (at least 1): windows start at multiples of it."""
        return max(1, round(self.window_s * 1000))


@dataclass(slots=True)
class TokenState:
    """One agent's token baselines, rate windows and fingerprint run (see the module docstring).

    A baseline is an EWMA kept as numerator and weight: their quotient is bias-corrected (the
    weight starts at 0 and tends to 1), so the first beats already give a usable mean."""

    tokens_num: float = 0.0
    """Tokens per beat: EWMA numerator."""
    tokens_weight: float = 0.0
    cost_num: float = 0.0
    """Cost per beat (USD): EWMA numerator."""
    cost_weight: float = 0.0
    learned: int = 0
    """Beats with usage the baselines learned: judging starts at ``warmup`` of them."""
    hot: int = 0
    """Anomalous observations in a row (``fire_after``)."""
    calm: int = 0
    """Calm beats in a row while the incident is open (``recover_after``)."""
    ended_ms: int = 0
    """When the last tokens incident ended (recovery or shutdown)."""
    about_cost: bool = False
    """The open tokens incident fired on a beat's cost (its recovery quotes the cost baseline)."""
    window_start: int = 0
    """The current rate window (ms, a multiple of the window length); 0: none yet."""
    window_tokens: float = 0.0
    rate_num: float = 0.0
    """Tokens per second over closed windows: EWMA numerator."""
    rate_weight: float = 0.0
    rate_windows: int = 0
    """Windows the rate baseline learned: it predicts nothing before two."""
    closed_start: int = 0
    """The window closed last (the sliding window of a recovery overlaps it); 0: none."""
    closed_folded: bool = False
    """Whether the rate baseline learned that window (it does not while anything is anomalous)."""
    closed_tokens: float = 0.0
    fp_hash: int = 0
    """crc32 of the last beat's fingerprint (never 0 for one); 0: that beat had none."""
    fp_count: int = 0
    """Beats in a row with that fingerprint."""
    loop_hash: int = 0
    """The fingerprint the open loop incident is about; 0: none."""
    loop_text: str = ""
    """What the alert quoted of it (for views)."""
    loop_quiet: int = 0
    """Beats in a row without it while the loop is open (``recover_after``)."""

    def base_tokens(self) -> float:
        """Tokens per beat, the baseline (0 before any)."""
        return self.tokens_num / self.tokens_weight if self.tokens_weight > 0 else 0.0

    def base_cost(self) -> float:
        """Cost per beat, the baseline (0 before any)."""
        return self.cost_num / self.cost_weight if self.cost_weight > 0 else 0.0


class Usage(NamedTuple):
    """What one beat used, at its entry's Redis time; None: not told."""

    at_ms: int
    tokens: float | None
    cost: float | None


def fp_hash(fp: str | None) -> int:
    """A fingerprint's crc32, never 0 (0 means "this beat had no fingerprint")."""
    return (zlib.crc32(fp.encode()) or 1) if fp else 0


def fp_text(fp: str | None) -> str:
    """What a loop alert quotes of a fingerprint."""
    return fp[:FP_TEXT_CHARS] if fp else ""


def beat_tokens(event: Event) -> int | None:
    """A beat's tokens: ``tokens``, or the two parts a producer may send instead; None: not told."""
    tokens = event.get("tokens")
    if tokens is None and ("tokens_in" in event or "tokens_out" in event):
        tokens = event.get("tokens_in", 0) + event.get("tokens_out", 0)
    return tokens


def _ewma(num: float, weight: float, alpha: float, value: float) -> tuple[float, float]:
    """One observation into an EWMA kept as (numerator, weight)."""
    return (1 - alpha) * num + alpha * value, (1 - alpha) * weight + alpha


def _n(value: float) -> str:
    if value >= 10_000:
        return f"{value:,.0f}"
    return f"{value:,.1f}".removesuffix(".0")


class Tokens(Detector[TokensConfig]):
    """Anomalous token (or cost) use per beat or per short window; and work loops (``loop``)."""

    Config = TokensConfig
    State = TokenState
    kinds = ("tokens", "loop")
    listens = frozenset({"beat"})

    _halts: Halts | None = None

    # -- the hooks ------------------------------------------------------------------------------
    def on_event(self, agent: Agent, event: Event, at_ms: int, child: ChildRun | None) -> None:
        """A beat of the agent or of one of its child processes (their usage is the agent's)."""
        cfg = self.config.for_agent(agent.name)
        tokens, cost = beat_tokens(event), event.get("cost")
        used = tokens is not None or cost is not None
        if used or cfg.loop:
            state: TokenState = agent.states.get(self.name) or self.state(agent)
            if used:
                self._judge(agent, state, cfg, Usage(at_ms, tokens, cost))
            if cfg.loop:
                self._track_loop(agent, state, cfg, at_ms, event.get("fp"))

    def on_new_run(self, agent: Agent, at_ms: int) -> None:
        """A restart ends a loop (the new process starts its work afresh); a tokens incident goes
        on: the new run may burn as the old one did. (An agent that never beat has no state:
        none is made for it here.)"""
        if "loop" in agent.open:  # (most new runs have nothing to close: no facts to make)
            self.decisions.close(agent, "loop", at_ms, {"at": at_ms, "restarted": 1})
        state: TokenState | None = agent.states.get(self.name)
        if state is not None:
            state.fp_hash = state.fp_count = state.loop_hash = state.loop_quiet = 0
            state.loop_text = ""

    def on_retire(self, agent: Agent, at_ms: int) -> None:
        """``shutdown()``: it stopped on purpose, nothing is burning or looping any more."""
        facts = {"at": at_ms, "shutdown": 1}
        if self.decisions.close(agent, "tokens", at_ms, dict(facts)):
            state: TokenState = self.state(agent)
            state.ended_ms = at_ms
            state.about_cost = False
        self.decisions.close(agent, "loop", at_ms, dict(facts))

    # -- tokens ---------------------------------------------------------------------------------
    def _judge(self, agent: Agent, state: TokenState, cfg: TokensConfig, beat: Usage) -> None:
        """One beat with usage: is it (or its window) anomalous, does the incident fire, does it
        recover; then the baselines learn it if nothing is anomalous or open."""
        at_ms, tokens, cost = beat
        factor = cfg.factor
        warm = state.learned >= cfg.warmup
        facts: dict[str, Any] | None = None
        if warm:  # (the baselines judge nothing before: not even computed)
            if tokens is not None and tokens >= cfg.min_tokens and tokens > factor * state.base_tokens():
                facts = {"why": "beat", "tokens": tokens, "base": state.base_tokens(), "factor": factor}
            elif cost is not None and cost >= cfg.min_cost and cost > factor * state.base_cost():
                facts = {"why": "cost", "cost": cost, "base": state.base_cost(), "factor": factor}
        is_open = "tokens" in agent.open
        window = cfg.window_ms
        start = at_ms // window * window
        if tokens is not None and start > 0:  # (a window starting at 0 reads as "none yet")
            if start > state.window_start:
                # A window closing now is learned only if nothing is anomalous: a runaway's
                # rate must not become the usual one.
                self._next_window(state, cfg, start, learn=facts is None and not is_open)
            state.window_tokens += tokens
            expected = self._expected(state, cfg) if warm and facts is None else None
            used = state.window_tokens
            if expected is not None and used >= cfg.min_tokens and used > factor * expected:
                facts = {"why": "rate", "tokens": used, "base": expected, "factor": factor, "window": window}

        if facts is not None:
            state.hot += 1
            state.calm = 0
            if state.hot >= cfg.fire_after:
                facts["total"] = agent.tokens
                if self.decisions.open(agent, "tokens", at_ms, facts):
                    state.about_cost = facts["why"] == "cost"
            return
        state.hot = 0
        if is_open:
            self._recover(agent, state, cfg, beat)
            if "tokens" in agent.open:
                return
        self._learn(state, cfg, beat)

    def _recover(self, agent: Agent, state: TokenState, cfg: TokensConfig, beat: Usage) -> None:
        """A beat that is not anomalous while the incident is open: calm if it is back under
        ``recover_factor`` x the baselines, and so is the rate of the last window-length (a rate
        runaway is made of normal-sized beats); ``recover_after`` calm ones in a row resolve.
        (The baselines are those before this beat: nothing learns while the incident is open.)"""
        tokens, cost = beat.tokens, beat.cost
        base_tokens, base_cost = state.base_tokens(), state.base_cost()
        ratio = cfg.recover_factor
        calm = (tokens is None or tokens <= ratio * base_tokens) and (
            cost is None or cost <= ratio * base_cost
        )
        if calm:
            expected = self._expected(state, cfg)
            if expected is not None and self._recent(state, cfg.window_ms, beat.at_ms) > ratio * expected:
                calm = False
        state.calm = state.calm + 1 if calm else 0
        if state.calm < cfg.recover_after:
            return
        state.calm = 0
        about_cost, state.about_cost = state.about_cost, False
        facts = {
            "base": base_cost if about_cost else base_tokens,
            "cost": 1 if about_cost else 0,
            "tokens": tokens if tokens is not None else 0,
            "total": agent.tokens,
        }
        if self.decisions.close(agent, "tokens", beat.at_ms, facts):
            state.ended_ms = beat.at_ms

    @staticmethod
    def _learn(state: TokenState, cfg: TokensConfig, beat: Usage) -> None:
        alpha = cfg.alpha
        _, tokens, cost = beat
        if tokens is not None:
            num, weight = state.tokens_num, state.tokens_weight
            state.tokens_num, state.tokens_weight = _ewma(num, weight, alpha, tokens)
        if cost is not None:
            state.cost_num, state.cost_weight = _ewma(state.cost_num, state.cost_weight, alpha, cost)
        state.learned += 1

    @staticmethod
    def _next_window(state: TokenState, cfg: TokensConfig, start: int, *, learn: bool) -> None:
        """Close the current rate window (``learn``: into the rate baseline) and open window
        ``start``, a later one. Empty windows in between are not learned: a burst after an idle
        spell is compared with the rate while busy, not with one diluted by idling. (Beats come
        in stream order, so a beat's window is never an earlier one than the current one.)"""
        if state.window_start > 0:
            closed = state.window_tokens
            folded = learn and closed > 0
            if folded:
                per_s = closed * 1000 / cfg.window_ms
                state.rate_num, state.rate_weight = _ewma(state.rate_num, state.rate_weight, cfg.alpha, per_s)
                state.rate_windows += 1
            state.closed_start, state.closed_folded, state.closed_tokens = state.window_start, folded, closed
        state.window_start, state.window_tokens = start, 0

    @staticmethod
    def _expected(state: TokenState, cfg: TokensConfig) -> float | None:
        """Tokens per window at the baseline rate, once two windows have been learned (else None)."""
        if state.rate_windows >= 2 and state.rate_weight > 0:
            return state.rate_num / state.rate_weight * cfg.window_ms / 1000
        return None

    @staticmethod
    def _recent(state: TokenState, window: int, at_ms: int) -> float:
        """The tokens of the last window-length before ``at_ms``: the current window's and the
        share of the window closed last that overlaps it (a sliding window, so a burst that goes
        on into a fresh window does not look calm at the window's start)."""
        current = min(1.0, max(0.0, (state.window_start + 2 * window - at_ms) / window))
        previous = min(1.0, max(0.0, (state.closed_start + 2 * window - at_ms) / window))
        return state.window_tokens * current + state.closed_tokens * previous

    # -- loop -----------------------------------------------------------------------------------
    def _track_loop(
        self, agent: Agent, state: TokenState, cfg: TokensConfig, at_ms: int, fp: str | None
    ) -> None:
        """One beat's fingerprint (a beat without one breaks any run): the open loop resolves
        after ``recover_after`` beats in a row without its fingerprint; ``repeat`` in a row of
        one fingerprint open it."""
        found = fp_hash(fp)
        if found != 0 and found == state.fp_hash:
            state.fp_count += 1
        else:
            state.fp_hash, state.fp_count = found, 1
        if "loop" in agent.open:
            state.loop_quiet = 0 if found == state.loop_hash else state.loop_quiet + 1
            if state.loop_quiet >= cfg.recover_after:
                self.decisions.close(
                    agent, "loop", at_ms, {"count": state.fp_count, "quiet": state.loop_quiet}
                )
                state.loop_hash = state.loop_quiet = 0
                state.loop_text = ""
        if found != 0 and "loop" not in agent.open and state.fp_count >= cfg.repeat:
            state.loop_hash, state.loop_quiet, state.loop_text = found, 0, fp_text(fp)
            self.decisions.open(agent, "loop", at_ms, {"fp": state.loop_text, "count": state.fp_count})

    # -- alerts ---------------------------------------------------------------------------------
    def _halt(self, agent: str, why: str) -> None:
        """``halt = true``: stop the runaway in its own loop (once: not when a halt covers it)."""
        if self._halts is None:
            self._halts = Halts(self.ctx.client, self.ctx.keys, self.ctx.incidents)
        if not self._halts.halting(agent):
            self._halts.add(agent, why.removeprefix(f"{agent}: "), by="tokens")

    def render(self, agent: str, kind: str, op: Op) -> tuple[str, str, dict[str, Any]]:
        f = op["f"]
        cfg = self.config.for_agent(agent)
        if kind == "loop":
            if op["o"] == "f":
                summary = (
                    f"{agent}: work loop: the same work item (fp {f['fp']!r}) {f['count']} beats in a row"
                )
                return cfg.severity, summary, {"fp": f["fp"], "count": f["count"]}
            if f.get("shutdown"):
                return cfg.severity, f"{agent}: shut down while looping", {}
            if f.get("restarted"):
                return cfg.severity, f"{agent}: restarted; the loop is over", {}
            return cfg.severity, f"{agent}: work items vary again", {"count": f.get("count", 0)}
        if op["o"] == "f":
            why = f["why"]
            details = {
                "why": why,
                "factor": f["factor"],
                "baseline": round(f["base"], 3),
                "total_tokens": f["total"],
            }
            if why == "beat":
                ratio = f["tokens"] / f["base"] if f["base"] else float("inf")
                summary = (f"{agent}: token use {_n(f['tokens'])} in one beat, {ratio:,.0f}x its "
                           f"baseline of {_n(f['base'])}/beat")  # fmt: skip
                details["tokens"] = f["tokens"]
            elif why == "cost":
                ratio = f["cost"] / f["base"] if f["base"] else float("inf")
                summary = (f"{agent}: ${f['cost']:.2f} in one beat, {ratio:,.0f}x its baseline of "
                           f"${f['base']:.3f}/beat")  # fmt: skip
                details["cost"] = f["cost"]
            else:
                window = format_duration(f["window"] / 1000)
                summary = (f"{agent}: {_n(f['tokens'])} tokens in under {window}, over "
                           f"{f['factor']:g}x the usual {_n(f['base'])} per {window}")  # fmt: skip
                details["tokens"] = f["tokens"]
                details["window_s"] = f["window"] / 1000
            if cfg.halt:
                self._halt(agent, summary)
            return cfg.severity, summary, details
        if f.get("shutdown"):
            return cfg.severity, f"{agent}: shut down", {}
        details = {"baseline": round(f["base"], 3), "total_tokens": f.get("total", 0)}
        if f.get("cost"):
            return cfg.severity, f"{agent}: cost back near its baseline of ${f['base']:.3f}/beat", details
        return cfg.severity, f"{agent}: token use back near its baseline of {_n(f['base'])}/beat", details
