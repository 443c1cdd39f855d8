"""Maintenance windows and dependencies: what they cost the notifiers, and how soon what a window
held goes out when it ends.

Two measurements, same private server, same run:

* **notifiers, holds configured vs none** - a notifier worker with one webhook notifier routes a
  backlog of ``--alerts`` firing silence alerts (the backlog of fleet_grouping.py), once with
  nothing configured and once with two recurring ``[[maintenance]]`` windows and an ad-hoc one
  in force (none covering these agents: the cost every alert pays is deciding that) and
  ``depends_on = "db-*"`` on every agent (no parent down: the cost is looking). Each round
  measures both back to back, in alternating order; the figure is the median of the rounds'
  own configured / none ratios (``_common.paired_ratio``; the spread is in the table).
  Figure: configured / none (goal >= 0.9).
* **release after a window** - ``--held`` agents' silences fire inside an ad-hoc window and stay
  open (allowance 0.2 s); the window is stopped; the time from the stop until the receiver has
  every one of them, less the allowance. Figure: that time (goal <= 2 s: the notifier looks
  for releasable alerts every second).

    python benchmarks/maintenance_holds.py [--alerts 5000] [--held 200] [--rounds 5] [--quick]
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
from _common import abba, drop_prefix, figure, median, paired_ratio, redis_server, report, warm_up
from fleet_grouping import Receiver, settings_for, webhook_drain

from agentwatch import plugins
from agentwatch.alerts import Incidents
from agentwatch.config import MaintenanceEntry, Pipeline
from agentwatch.keys import Keys
from agentwatch.maintenance import AdhocWindows
from agentwatch.redisconn import connect
from agentwatch.workers import notifier_worker

ALLOWANCE_S = 0.2


def holds_settings(prefix: str, configured: bool) -> Any:
    if not configured:
        return settings_for(prefix)
    windows = [
        MaintenanceEntry.model_validate({"agents": ["web-*"], "schedule": "0 2 * * *", "duration": "30m"}),
        MaintenanceEntry.model_validate(
            {"labels": {"team": "batch"}, "schedule": "*/15 * * * *", "duration": "5m"}
        ),
    ]
    silence = {"agents": {"agent-*": {"depends_on": "db-*"}}}
    return settings_for(prefix, maintenance=windows, detectors={"silence": silence})


def notifiers_rate(url: str, prefix: str, alerts: int, hook: str, configured: bool) -> tuple[float, float]:
    def adhoc(client: redis.Redis, keys: Keys) -> None:
        if configured:
            AdhocWindows(client, keys).start(3600, agents=["deploy-*"], reason="bench")

    return webhook_drain(url, holds_settings(prefix, configured), alerts, hook, before=adhoc)


def release_after_window(url: str, prefix: str, receiver: Receiver, held: int) -> float:
    client = redis.Redis.from_url(url)
    keys = Keys(prefix)
    loaded, problems = plugins.load_notifiers([{"type": "webhook", "url": receiver.url, "concurrency": 8}])
    assert not problems, problems
    pipeline = Pipeline(settings=settings_for(prefix), source="bench", notifiers=loaded)
    worker_client = connect(pipeline.settings, url)
    worker = notifier_worker(pipeline, worker_client)
    window = AdhocWindows(client, keys).start(3600, agents=["h-*"])
    thread = threading.Thread(target=worker.run, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    time.sleep(0.5)  # the worker reads from the stream's end: let it start first
    seen = len(receiver.arrived)
    incidents = Incidents(client, keys)
    seconds, micros = client.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    for n in range(held):
        incidents.fire(f"h-{n:04d}", "silence", severity="critical", summary="silent", at_ms=now_ms,
                       details={"allowance_s": ALLOWANCE_S})  # fmt: skip
    deadline = time.perf_counter() + 60
    while int(client.xlen(keys.notify_log)) < held and time.perf_counter() < deadline:
        time.sleep(0.01)  # every one recorded as held (maintenance)
    assert len(receiver.arrived) == seen, "a held alert went out during the window"
    stopped = time.perf_counter()
    AdhocWindows(client, keys).stop(window.id)
    while len(receiver.arrived) < seen + held and time.perf_counter() < deadline:
        time.sleep(0.005)
    last = receiver.arrived[-1][0] if len(receiver.arrived) >= seen + held else float("inf")
    worker.stop()
    thread.join(10)
    worker_client.close()
    drop_prefix(client, prefix)
    client.close()
    return last - stopped - ALLOWANCE_S


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--alerts", type=int, default=5000)
    parser.add_argument("--held", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small sizes, 5 short rounds")
    parser.add_argument("--redis-url", default=None, help="default: a private server (embedded launcher)")
    args = parser.parse_args()
    if args.quick:
        args.alerts, args.held, args.rounds = 1000, 20, 5
    receiver = Receiver()
    rates: dict[bool, list[float]] = {True: [], False: []}
    cpu: dict[bool, list[float]] = {True: [], False: []}
    release: list[float] = []
    try:
        with redis_server(args.redis_url) as url:
            size = min(args.alerts, 1000)
            warm_up(lambda on: notifiers_rate(url, f"benchmh-w{int(on)}", size, receiver.url, on))
            for round_no in range(args.rounds):
                got = abba(round_no, lambda on, n, r=round_no: notifiers_rate(
                    url, f"benchmh-n{r}{n}", args.alerts, receiver.url, on))  # fmt: skip
                for on, (rate, cpu_us) in got.items():
                    rates[on].append(rate)
                    cpu[on].append(cpu_us)
                release.append(release_after_window(url, f"benchmh-r{round_no}", receiver, args.held))
    finally:
        receiver.close()
    ratio = paired_ratio(rates[True], rates[False])
    cpu_ratio = paired_ratio(cpu[False], cpu[True])  # none / configured: as a rate ratio reads
    per_round = [round(a / b, 3) for a, b in zip(rates[True], rates[False], strict=True)]
    rows: list[dict[str, Any]] = [
        {"measure": "notifiers", "holds": "configured" if on else "none",
         "alerts/s (median)": median(rates[on]), "rounds": [round(x) for x in rates[on]],
         "routing CPU us/alert (median)": median(cpu[on])}
        for on in (True, False)
    ]  # fmt: skip
    rows.append({"measure": "notifiers", "holds": "configured / none", "rounds": per_round,
                 "ratio (median of rounds)": round(ratio, 3)})  # fmt: skip
    rows.append({"measure": "release after a window", "held": args.held,
                 "stop -> last page, less the allowance, s (median)": median(release),
                 "rounds": [round(x, 3) for x in release]})  # fmt: skip
    figures = [
        figure("notifiers, holds configured / none", round(ratio, 3), "ratio", goal=0.9, better="higher",
               issue=16),
        figure("notifiers, holds none / configured, routing CPU per alert", round(cpu_ratio, 3), "ratio",
               issue=16),
        figure("window stop + allowance -> every held page out", round(median(release), 3), "s",
               goal=2.0, better="lower", issue=16),
    ]  # fmt: skip
    report("maintenance_holds", rows, {"args": vars(args)}, figures)
    for item in figures:
        goal = f" (goal {item['better']} than {item['goal']})" if item["goal"] is not None else ""
        print(f"{item['figure']}: {item['value']} {item['unit']}{goal}")


if __name__ == "__main__":
    main()
