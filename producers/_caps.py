"""Protocol v1's numeric caps, which the producer enforces before anything reaches the wire.

The pipeline dead-letters an event with a value beyond these (PROTOCOL.md), and a dead-lettered
beat looks exactly like a missed one; so the producer drops or clamps such values first and
warns once. They match what the workers can hold exactly: Lua numbers and JSON readers are IEEE
doubles, exact for integers up to 2**53 - 1.
"""

from __future__ import annotations

from typing import Final

MAX_COUNT: Final = 2**53 - 1
"""Largest ``tokens``/``tokens_in``/``tokens_out``/``rss``/``seq``/``pid`` on the wire."""
MAX_SECONDS: Final = 31_536_000.0
"""Largest ``interval`` or ``extend`` (365 days): anything longer is a mistake, not a plan."""
