"""An agent that spends a fixed amount per beat until a budget halts it: ``python spender.py``.

Configured from ``AGENTWATCH_*`` and: ``AW_COST`` (USD per beat, default 0.05), ``AW_PERIOD``
(seconds between beats, default 0.05), ``AW_STUBBORN`` (beats it goes on making after the first
``Halted``, each of which must raise again; default 0), ``AW_MAX_BEATS`` (give up, default 2000).
It prints one JSON line: ``beats`` (heartbeat() calls, every one carrying ``AW_COST``),
``raised`` (how many of them raised Halted), ``reason``; and exits with code 3 once halted (a
failing exit code, which must page nobody: a halted agent is meant to stop), 4 if never halted.
"""

from __future__ import annotations

import json
import os
import sys
import time

from producers import Halted, heartbeat

COST = float(os.environ.get("AW_COST", "0.05"))
PERIOD = float(os.environ.get("AW_PERIOD", "0.05"))
STUBBORN = int(os.environ.get("AW_STUBBORN", "0"))
MAX_BEATS = int(os.environ.get("AW_MAX_BEATS", "2000"))


def main() -> int:
    beats = raised = 0
    reason = None
    while beats < MAX_BEATS:
        beats += 1
        try:
            heartbeat(cost=COST)
        except Halted as halt:
            raised += 1
            reason = halt.reason
            if raised > STUBBORN:
                break
        time.sleep(PERIOD)
    print(json.dumps({"beats": beats, "raised": raised, "reason": reason}), flush=True)
    return 3 if raised else 4


if __name__ == "__main__":
    sys.exit(main())
