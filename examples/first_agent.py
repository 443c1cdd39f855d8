"""An agent that works for ever: one unit of work a second, one heartbeat after each.

    python examples/first_agent.py

It never calls ``producers.shutdown()``: it runs until something kills it, which is the point.
Kill it with ``kill -9`` and the pipeline raises a ``silence`` alert (README, "Your first alert
in 2 minutes"). The name comes from ``AGENTWATCH_AGENT`` (default ``first-agent``); where the
events go, from ``AGENTWATCH_REDIS_URL`` and ``AGENTWATCH_PREFIX``, as ``agentwatch up`` prints them.
"""

import os
import random
import time

import producers
from producers import heartbeat


def main() -> None:
    # `interval`: how often the pipeline should expect a beat (the silence detector waits for
    # its `after` on top of it). Without init() the producer reads the AGENTWATCH_* variables.
    producers.init(agent=os.environ.get("AGENTWATCH_AGENT", "first-agent"), interval=1.0)
    print(f"first-agent: beating every second (pid {os.getpid()}); kill -9 {os.getpid()} to see an alert")
    ticket = 0
    while True:
        time.sleep(1.0)  # the "work"
        ticket += 1
        heartbeat(tokens=random.randint(200, 800), fp=f"ticket-{ticket}")


if __name__ == "__main__":
    main()
