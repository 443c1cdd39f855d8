"""Coming back on time: the ``recover_after`` count silence and stall share.

An incident about an agent that went quiet (silence) or whose work loop stopped (stall) resolves
once ``recover_after`` events (or beats) in a row came on time, each within the allowance of
the one before, so an agent that only limps back does not flap between open and resolved.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Recovery:
    """While an incident is open: how the agent is coming back (a detector's per-agent State)."""

    on_time: int = 0
    """Events on time in a row since it came back."""
    away_ms: int = 0
    """How long it was away (until its first event back)."""

    def step(self, at_ms: int, last_ms: int, allowance_ms: int) -> int:
        """One more event at ``at_ms``, the one before it at ``last_ms``: the count so far. An
        event later than the allowance starts the count again at itself."""
        if not self.on_time:
            self.away_ms = at_ms - last_ms
        if self.on_time and at_ms - last_ms > allowance_ms:
            self.on_time = 1
        else:
            self.on_time = min(self.on_time + 1, 65535)
        return self.on_time

    def reset(self) -> None:
        self.on_time = self.away_ms = 0
