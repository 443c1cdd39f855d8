"""Schedules (cron agents): what they cost a detector worker, and how soon a missed slot pages.

Two measurements, same private server, same run:

* **throughput, every agent scheduled vs none** - a detector worker (``detector_worker``, every
  built-in) catches up on a backlog of a fleet's events (``--agents`` agents, one event per
  simulated second each, a new run every ``--restart-every`` events of an agent), once with a
  glob that schedules every agent (``0 0 1 1 *``: a yearly job, so nothing is ever due and only
  the bookkeeping costs: every batch's agents are queued for the schedule check, and each tick
  decides them) and once without. Figure: scheduled / unscheduled (goal >= 0.9).
* **missed-slot delay** - ``--late`` scheduled agents (a seconds schedule, ``*/4 * * * * *``,
  grace 1 s) each run once, then miss their next slot; with a running worker (tick 250 ms, the
  default), the time from each agent's deadline (slot + grace) to its ``schedule`` alert on the
  alerts stream (both Redis time). Figure: p99 (goal <= 1 s, as silence's).

Each round measures both throughputs back to back, in alternating order (on-off, off-on, ...);
the figure is the median of the rounds' own ratios (``_common.paired_ratio``; the spread is in
the table).

    python benchmarks/detectors_schedules.py [--events 50000] [--late 1000] [--rounds 5] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    abba,
    drain_timed,
    drop_prefix,
    figure,
    median,
    paired_ratio,
    percentile,
    redis_server,
    report,
    warm_up,
)
from fleet_grouping import fill_events

from agentwatch import codec, config, plugins
from agentwatch.alerts import decode_alert
from agentwatch.codec import entry_ms
from agentwatch.config import Pipeline
from agentwatch.cron import Cron
from agentwatch.keys import Keys
from agentwatch.redisconn import connect, server_time_ms
from agentwatch.workers import detector_worker

SECONDS_SCHEDULE = "*/4 * * * * *"


def pipeline_for(prefix: str, silence: dict[str, Any], tick: str) -> Pipeline:
    base = config.PipelineSettings()
    redis_section = base.redis.model_copy(update={"prefix": prefix})
    worker = config.WorkerSection.model_validate({"tick": tick, "block": "50ms"})
    settings = base.model_copy(
        update={"redis": redis_section, "worker": worker, "detectors": {"silence": silence}}
    )
    loaded, problems = plugins.load_detectors({"silence": silence})
    assert not problems, problems
    return Pipeline(settings=settings, source="bench", detectors=loaded)


# -- throughput ---------------------------------------------------------------------------------
def throughput(
    url: str, prefix: str, events: int, agents: int, restart_every: int, scheduled: bool
) -> tuple[float, float]:
    """Events/s, and the draining thread's CPU µs per event (``_common.drain_timed``)."""
    client = redis.Redis.from_url(url)
    keys = Keys(prefix)
    fill_events(client, keys, events, agents, restart_every, labelled=False)
    silence: dict[str, Any] = {"agents": {"agent-*": {"schedule": "0 0 1 1 *"}}} if scheduled else {}
    pipeline = pipeline_for(prefix, silence, tick="50ms")
    worker_client = connect(pipeline.settings, url)
    worker = detector_worker(pipeline, worker_client)
    timed = drain_timed(worker, events)
    worker_client.close()
    drop_prefix(client, prefix)
    client.close()
    return timed


# -- missed-slot delay --------------------------------------------------------------------------
def missed_delays(url: str, prefix: str, late: int) -> list[float]:
    """Seconds from each agent's deadline to its schedule alert on the stream."""
    client = redis.Redis.from_url(url)
    keys = Keys(prefix)
    pipeline = pipeline_for(prefix, {"agents": {"late-*": {"schedule": SECONDS_SCHEDULE, "grace": "1s"}}},
                            tick="250ms")  # fmt: skip
    worker_client = connect(pipeline.settings, url)
    worker = detector_worker(pipeline, worker_client)
    thread = threading.Thread(target=worker.run, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    stop = time.monotonic() + 30
    while not client.hget(keys.clock(0), "tick") and time.monotonic() < stop:  # it reads and ticks
        time.sleep(0.01)
    cron = Cron.parse(SECONDS_SCHEDULE)
    # Run right after a slot, so every agent's run lands in it (not across the next one).
    slot = cron.next_after(server_time_ms(client) / 1000 + 0.3)
    time.sleep(max(0.0, slot + 0.05 - server_time_ms(client) / 1000))
    pipe = client.pipeline(transaction=False)
    for n in range(late):
        start = {"v": 1, "agent": f"late-{n:05d}", "kind": "start", "ts": 0.0, "run": f"r{n}", "seq": 0,
                 "pid": 1000 + n}  # fmt: skip
        pipe.xadd(keys.events(), {"d": codec.encode(start)})
    pipe.execute()
    deadline_ms = (cron.next_after(slot) + 1.0) * 1000  # the next slot, + grace
    stop = time.monotonic() + 30
    while client.xlen(keys.alerts) < late and time.monotonic() < stop:
        time.sleep(0.05)
    worker.stop()
    thread.join(10)
    found = [(entry_id, decode_alert(fields[b"d"])) for entry_id, fields in client.xrange(keys.alerts)]
    delays = [
        (entry_ms(entry_id) - deadline_ms) / 1000 for entry_id, alert in found if alert.detector == "schedule"
    ]
    worker_client.close()
    drop_prefix(client, prefix)
    client.close()
    if len(delays) < late:
        delays += [float("inf")] * (late - len(delays))  # not paged within 30 s: counted as never
    return delays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument(
        "--restart-every", type=int, default=10, help="one start per this many events of an agent"
    )
    parser.add_argument("--late", type=int, default=1000, help="agents that miss a slot together")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small sizes, 5 short rounds")
    parser.add_argument("--redis-url", default=None, help="default: a private server (embedded launcher)")
    args = parser.parse_args()
    if args.quick:
        args.events, args.agents, args.late, args.rounds = 5000, 200, 100, 5
    rates: dict[bool, list[float]] = {True: [], False: []}
    cpu: dict[bool, list[float]] = {True: [], False: []}
    delays: list[float] = []
    per_round: list[float] = []
    with redis_server(args.redis_url) as url:
        warm_up(lambda on: throughput(url, f"benchsc-w{int(on)}", min(args.events, 5000), args.agents,
                                      args.restart_every, on))  # fmt: skip
        for round_no in range(args.rounds):
            got = abba(round_no, lambda on, n, r=round_no: throughput(
                url, f"benchsc-t{r}{n}", args.events, args.agents, args.restart_every, on))  # fmt: skip
            for on, (rate, cpu_us) in got.items():
                rates[on].append(rate)
                cpu[on].append(cpu_us)
            found = missed_delays(url, f"benchsc-d{round_no}", args.late)
            delays += found
            per_round.append(percentile(found, 99))
    ratio = paired_ratio(rates[True], rates[False])
    cpu_ratio = paired_ratio(cpu[False], cpu[True])  # none / scheduled: as a rate ratio reads
    pairs = [round(a / b, 3) for a, b in zip(rates[True], rates[False], strict=True)]
    rows: list[dict[str, Any]] = [
        {"measure": f"detector events/s, every agent scheduled={'yes' if on else 'no'}",
         "median": median(rates[on]), "rounds": [round(x) for x in rates[on]],
         "CPU us/event (median)": median(cpu[on])}
        for on in (True, False)
    ]  # fmt: skip
    rows.append({"measure": "scheduled / none", "median": ratio, "rounds": pairs})
    rows.append({"measure": f"deadline -> schedule alert s, {args.late} agents missing one slot",
                 "median": median(delays), "p99": percentile(delays, 99), "max": max(delays),
                 "rounds (p99)": [round(x, 3) for x in per_round]})  # fmt: skip
    figures = [
        figure("detectors, every agent scheduled / none", round(ratio, 3), "ratio", goal=0.9, better="higher",
               issue=16),
        figure("detectors, none / every agent scheduled, CPU per event", round(cpu_ratio, 3), "ratio",
               issue=16),
        figure("missed slot: deadline -> alert p99", round(percentile(delays, 99), 3), "s", goal=1.0,
               better="lower", issue=16),
    ]  # fmt: skip
    report("detectors_schedules", rows, {"args": vars(args)}, figures)
    for item in figures:
        goal = f" (goal {item['better']} than {item['goal']})" if item["goal"] is not None else ""
        print(f"{item['figure']}: {item['value']} {item['unit']}{goal}")


if __name__ == "__main__":
    main()
