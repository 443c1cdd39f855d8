"""A plain work loop. The one line that matters is ``heartbeat(...)`` after each unit of work.

    python examples/agents/loop_agent.py

Runs against Redis at AGENTWATCH_REDIS_URL (default redis://127.0.0.1:6379/0); if Redis is not
there, the agent runs exactly the same and agentwatch logs one warning.
"""

import random
import time

import producers
from producers import heartbeat


def handle(ticket: int) -> int:
    """The real work: call a model, a tool, an API... Returns the tokens it used."""
    time.sleep(0.1)
    return random.randint(200, 800)


def main() -> None:
    # Optional: without init() the producer configures itself from AGENTWATCH_* variables.
    # `interval` tells the pipeline how often to expect a beat.
    producers.init(agent="loop-agent", interval=0.1)
    for ticket in range(20):
        tokens = handle(ticket)
        heartbeat(tokens=tokens, fp=f"ticket-{ticket}")  # from the loop itself, not a thread

    # This agent ends on purpose once its tickets are done: say so. Without shutdown() the run
    # ends with a plain exit, which the pipeline reports as "exited without shutdown()" (for a
    # service that should run for ever, an exit is news). A loop that never ends needs neither.
    producers.shutdown()


if __name__ == "__main__":
    main()
