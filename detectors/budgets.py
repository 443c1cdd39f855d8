"""Budgets (``[[budgets]]``, SPEC section 7): warn, then exceed, then halt; and pace.

Every decision about a budget is made here, in plain Python, from the exact window totals of the
batch just applied: the detector engine adds each beat it applies to its agent's spend windows
(agentwatch/spend.py) and hands what the batch changed to :meth:`BudgetKeeper.decide`:

* **exceeded** -- the window's spend reached ``limit``: a ``critical`` alert; with
  ``halt = true`` the agent (``scope = "each"``) or the glob (``"together"``) is halted until the
  window ends (``agentwatch resume`` lifts it sooner; the budget does not halt it again in that
  window).
* **warning** -- the spend reached ``warn_at`` x ``limit``, or **pace**: the window's spend rate
  so far projects past the limit before the window ends (``spent / elapsed fraction > limit``).
  Pace waits until 10 % of the window has gone by and 5 % of the limit is spent
  (:data:`PACE_MIN_ELAPSED`, :data:`PACE_MIN_SPENT`), so one early expensive call does not trip
  it; after that, the slow chronic overspend is seen early in the window, not at 100 %.

One incident per budget, target and window (detector ``budget``; dedup key ``<agent>/budget``,
or ``budget:<glob>`` for ``together``; a second budget covering the same agent adds
``#<its index in [[budgets]]>``). The warning opens it, the exceeded alert raises it (same dedup
key, stages only ever go up: :meth:`agentwatch.alerts.Incidents.escalate`, one atomic step, so
several workers racing publish each stage once and in order), and it resolves when its window
ends. The halt is set once per incident: by the worker that first marks the exceeded incident
as halted (so a worker dying between the alert and the halt leaves it to the next batch).
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from agentwatch.alerts import Incidents
from agentwatch.codec import Event
from agentwatch.config import Budget, PipelineSettings, format_duration
from agentwatch.halts import Halts
from agentwatch.handler import Handler, Message
from agentwatch.keys import Keys
from agentwatch.prices import PriceBook
from agentwatch.redisconn import Client, server_time_ms
from agentwatch.spend import PERS, Applied, Ledger, Spending, Spent, Tally, Window, price_events

log = logging.getLogger("agentwatch.detectors.budget")

DETECTOR: Final = "budget"
PACE_MIN_ELAPSED: Final = 0.10
"""Pace is judged once this fraction of the window has gone by..."""
PACE_MIN_SPENT: Final = 0.05
"""...and this fraction of the limit is spent."""
WARNING, EXCEEDED = 1, 2
_RESOLVE_EVERY_MS: Final = 2000
_CACHE_MAX: Final = 100_000


@dataclass(frozen=True)
class Verdict:
    """What one budget's window total means: a stage to reach (or None), and why."""

    rank: int | None
    why: str = ""
    projected: float = 0.0


def usd(value: float) -> str:
    """Money in alerts: cents from $1 up, tenths of a cent below (small budgets, demo-sized)."""
    return f"${value:,.2f}" if value >= 1 or value == 0 else f"${value:.4f}"


def judge(budget: Budget, spent: float, window: Window, now_ms: int) -> Verdict:
    """The stage ``spent`` puts ``budget`` at in ``window`` at ``now_ms`` (see the module doc)."""
    if spent >= budget.limit:
        return Verdict(EXCEEDED, "exceeded")
    if spent >= budget.warn_at * budget.limit:
        return Verdict(WARNING, "warn_at")
    elapsed = window.elapsed(now_ms)
    early = elapsed < PACE_MIN_ELAPSED or spent < PACE_MIN_SPENT * budget.limit
    if not early and spent / elapsed > budget.limit:
        return Verdict(WARNING, "pace", spent / elapsed)
    return Verdict(None)


class Budgets:
    """The ``[[budgets]]`` of a pipeline: which cover an agent, and their incidents' keys."""

    def __init__(self, budgets: Sequence[Budget]) -> None:
        self.budgets = list(budgets)
        self.pers = sorted({b.per for b in self.budgets})
        self._covering: dict[str, list[int]] = {}

    def covering(self, agent: str) -> list[int]:
        """Indexes of the budgets whose glob matches ``agent``, in file order."""
        found = self._covering.get(agent)
        if found is None:
            if len(self._covering) >= _CACHE_MAX:
                self._covering.clear()
            found = self._covering[agent] = [
                i for i, b in enumerate(self.budgets) if fnmatch.fnmatchcase(agent, b.agents)
            ]
        return found

    def groups_of(self, agent: str) -> list[tuple[str, str]]:
        """``(glob, per)`` of the ``together`` budgets covering ``agent`` (the ledger's groups)."""
        return [(self.budgets[i].agents, self.budgets[i].per) for i in self.covering(agent)
                if self.budgets[i].scope == "together"]  # fmt: skip

    def target(self, index: int, agent: str) -> tuple[str, str]:
        """(alert agent, dedup key) of budget ``index``'s incident for ``agent``."""
        budget = self.budgets[index]
        if budget.scope == "together":
            glob = budget.agents
            first = next(i for i, b in enumerate(self.budgets) if b.scope == "together" and b.agents == glob)
            return budget.agents, f"budget:{budget.agents}" + ("" if first == index else f"#{index}")
        first = next(i for i in self.covering(agent) if self.budgets[i].scope == "each")
        return agent, f"{agent}/{DETECTOR}" + ("" if first == index else f"#{index}")


class BudgetKeeper(Handler[Event]):
    """Detector-worker handler, first in line: prices every beat (spend.price_events) before any
    other handler reads it. The detector engine adds each beat it applies to the agent's spend
    (:attr:`spending`, in its one pass over the batch) and hands what the batch changed to
    :meth:`decide` (module docstring); :meth:`on_tick` resolves the windows that are over."""

    name = "budgets"

    def __init__(
        self, client: Client, keys: Keys, settings: PipelineSettings, incidents: Incidents, halts: Halts
    ) -> None:
        self.client = client
        self.book = PriceBook(settings.prices)
        self.ledger = Ledger(client, keys, settings.report.zone)
        self.budgets = Budgets(settings.budgets)
        groups_of = self.budgets.groups_of if any(b.scope == "together" for b in settings.budgets) else None
        self.spending = Spending(
            settings.report.zone, self.budgets.pers, groups_of, noting=bool(self.budgets.budgets)
        )
        self.incidents = incidents
        self.halts = halts
        self.unpriced = 0
        self._next_resolve = 0

    def on_start(self) -> None:
        if not self.budgets.budgets:
            return
        from agentwatch.halts import known_agents  # noqa: PLC0415

        agents = known_agents(self.client, self.ledger.keys)
        for index, budget in enumerate(self.budgets.budgets):
            if agents and not any(fnmatch.fnmatchcase(a, budget.agents) for a in agents):
                log.warning("[budgets.%d] agents = %r matches none of the %d agents seen so far",
                            index, budget.agents, len(agents))  # fmt: skip

    def on_batch(self, messages: Sequence[Message[Event]]) -> None:
        self.unpriced += price_events(messages, self.book)

    def decide(self, applied: Applied, now: int, held: Mapping[int, Tally]) -> None:
        """Judge every budget window the engine's batch added to (``applied``), at ``now`` (the
        batch's newest entry time); ``held``: the ``together`` shares of the shards the engine
        owns (the others are read as last checkpointed)."""
        budgets = self.budgets
        if not budgets.budgets:
            return
        for (agent, wid), tally in applied.agents.items():
            for index in budgets.covering(agent):
                budget = budgets.budgets[index]
                if budget.scope == "each" and wid[0] == PERS[budget.per]:
                    self._decide(index, agent, tally.spent(wid), wid, now)
        if applied.groups:
            totals = self.ledger.groups(applied.groups, held)
            for index, budget in enumerate(budgets.budgets):
                key = (budget.agents, self.ledger.clock(budget.per, now).id)
                if budget.scope == "together" and key in totals:
                    self._decide(index, budget.agents, totals[key], key[1], now)

    def _decide(self, index: int, agent: str, spent: Spent, wid: str, now: int) -> None:
        budget = self.budgets.budgets[index]
        window = self.ledger.clock(budget.per, now)
        if window.id != wid:
            return  # a batch reaching back into the window before: that one is over
        verdict = judge(budget, spent.cost, window, now)
        if verdict.rank is None:
            return
        if verdict.rank == EXCEEDED and budget.warn_at < 1:
            # Every stage is told, in order, however the batches fall: a backlog applied at
            # once (a worker's successor catching up) crosses the warning and the limit together.
            # (A no-op when the warning, or more, is open already: escalate publishes rises only.)
            self._tell(index, agent, spent, wid, window, now, Verdict(WARNING, "warn_at"))
        self._tell(index, agent, spent, wid, window, now, verdict)

    def _tell(  # noqa: PLR0917 - one decision's parts
        self, index: int, agent: str, spent: Spent, wid: str, window: Window, now: int, verdict: Verdict
    ) -> None:
        budget = self.budgets.budgets[index]
        assert verdict.rank is not None
        target, dedup = self.budgets.target(index, agent)
        who = target if budget.scope == "each" else f"agents {budget.agents} together"
        share = spent.cost / budget.limit
        details: dict[str, Any] = {
            "budget": index, "agents": budget.agents, "scope": budget.scope, "per": budget.per,
            "window": wid, "limit": budget.limit, "spent": round(spent.cost, 6), "used": round(share, 4),
            "unpriced_beats": spent.unpriced, "why": verdict.why,
        }  # fmt: skip
        per = f"{usd(budget.limit)}/{budget.per}"
        if verdict.rank == EXCEEDED:
            severity = "critical"
            summary = f"{who}: budget {per} exceeded: {usd(spent.cost)} spent ({share:.0%})"
            if budget.halt:
                summary += "; halting"
        elif verdict.why == "pace":
            severity = "warning"
            details["projected"] = round(verdict.projected, 6)
            gone = window.elapsed(now)
            summary = (f"{who}: on pace to spend {usd(verdict.projected)} against the budget of {per} "
                       f"({usd(spent.cost)} spent, {gone:.0%} of the {budget.per} gone)")  # fmt: skip
        else:
            severity = "warning"
            summary = f"{who}: {share:.0%} of the budget of {per} spent ({usd(spent.cost)})"
        if spent.unpriced:
            summary += f" (+{spent.unpriced} unpriced beats)"
        self.incidents.escalate(
            target, DETECTOR, rank=verdict.rank, severity=severity, summary=summary, at_ms=now,
            details=details, dedup_key=dedup, extra={"until_ms": window.end_ms, "detector": DETECTOR},
        )  # fmt: skip
        # The halt, once per incident: whichever worker marks it first (a worker that died
        # after raising the incident leaves it unmarked, and the next batch's worker halts).
        # A resume by hand is not undone: the mark stays until the window's incident ends.
        if verdict.rank == EXCEEDED and budget.halt and self.incidents.mark(target, dedup, "halted"):
            for_s = max(1.0, (window.end_ms - server_time_ms(self.client)) / 1000)
            reason = (f"budget {per} exceeded: {usd(spent.cost)} spent; halted until the {budget.per} "
                      f"ends (in {format_duration(for_s)})")  # fmt: skip
            self.halts.add(target, reason, by=DETECTOR, for_s=for_s)

    def on_tick(self, now_ms: int) -> None:
        """Resolve the incidents of windows that are over (every 2 s)."""
        if not self.budgets.budgets or now_ms < self._next_resolve:
            return
        self._next_resolve = now_ms + _RESOLVE_EVERY_MS
        for key, incident in self.incidents.all_open().items():
            if incident.get("detector") != DETECTOR or int(incident.get("until_ms") or now_ms + 1) > now_ms:
                continue
            self.incidents.resolve(
                str(incident["agent"]), DETECTOR, dedup_key=key, at_ms=now_ms,
                summary=f"{incident['agent']}: budget window over; spending starts afresh",
            )  # fmt: skip
