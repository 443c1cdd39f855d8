"""Labels and grouping: what they cost the workers, and how soon a group's notification goes out.

Three measurements, same private server, same run:

* **detectors, labels on vs off** - a detector worker (``detector_worker``, every built-in)
  catches up on a backlog of a fleet's events (``--agents`` agents, one event per simulated
  second each, a new run every ``--restart-every`` events of an agent: labels cost per
  ``start`` only, and real agents start far less often than every 100 s), with and without
  four labels on every ``start``. Figure: on / off (goal >= 0.9), with the draining thread's
  CPU per event (off / on) beside it, which other processes' load moves less.
* **notifiers, grouping on vs off** - a notifier worker with one webhook notifier (a receiver in
  this process answering 200) routes a backlog of ``--alerts`` firing alerts spread over 50
  hosts (as ``Incidents.fire`` publishes them, labels included), with ``[grouping]`` enabled vs
  disabled; timed until every alert is routed and queued or grouped. Figure: on / off (>= 0.9).
* **group latency** - 10 agents of one host fire within half a second; the time from the first
  alert to the grouped notification at the receiver, with ``group_wait = 2s``. Figure: that
  time (goal <= group_wait + 1 s = 3 s).

Each round measures both sides of each throughput back to back (the detector sides, then the
notifier sides), in alternating order (on-off, off-on, ...; the detector sides twice, ABBA,
each side's mean kept), and each figure is the median of the rounds' own on / off ratios
(``_common.paired_ratio``): the per-round spread is in the table. One round alone said little
on a shared 2-core machine (the grouping ratio read anywhere from 0.77 to 1.15 between runs).

    python benchmarks/fleet_grouping.py [--events 50000] [--alerts 5000] [--rounds 5] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
    redis_server,
    report,
    sides,
    warm_up,
)

from agentwatch import codec, config, plugins
from agentwatch.alerts import Incidents
from agentwatch.config import GroupingSection, Pipeline
from agentwatch.keys import Keys
from agentwatch.redisconn import connect
from agentwatch.workers import DETECTORS_GROUP, NOTIFIERS_GROUP, detector_worker, notifier_worker

LABELS = {"team": "search", "tier": "1", "region": "eu-west-1", "owner": "ml-platform"}


class Receiver:
    """Answers 200 to every POST; records when each body arrived."""

    def __init__(self) -> None:
        self.arrived: list[tuple[float, bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.arrived.append((time.perf_counter(), body))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def settings_for(prefix: str, **update: Any) -> config.PipelineSettings:
    base = config.PipelineSettings()
    redis_section = base.redis.model_copy(update={"prefix": prefix})
    worker = config.WorkerSection.model_validate({"tick": "50ms", "block": "50ms"})
    return base.model_copy(update={"redis": redis_section, "worker": worker, **update})


# -- detectors: labels on vs off ------------------------------------------------------------------
def fill_events(
    client: redis.Redis, keys: Keys, events: int, agents: int, restart_every: int, labelled: bool
) -> None:
    stream = keys.events()
    base_ms = int(time.time() * 1000) - events - 60_000
    pipe = client.pipeline(transaction=False)
    for n in range(events):
        agent_no, round_no = n % agents, n // agents
        run = round_no // restart_every
        event: dict[str, Any] = {"v": 1, "agent": f"agent-{agent_no:05d}", "ts": 0.0,
                                 "run": f"r{agent_no}-{run}", "seq": round_no % restart_every}  # fmt: skip
        if round_no % restart_every == 0:
            event.update(kind="start", interval=1.0, pid=1000 + agent_no, host=f"host-{agent_no % 50}")
            if labelled:
                event["labels"] = LABELS
        else:
            event.update(kind="beat", tokens=300 + n % 700, model="gpt-4o")
        pipe.xadd(stream, {"d": codec.encode(event)}, id=f"{base_ms + n}-0")
        if n % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    client.xgroup_create(stream, DETECTORS_GROUP, id="0")


def detectors_rate(
    url: str, prefix: str, events: int, agents: int, restart_every: int, labelled: bool
) -> tuple[float, float]:
    """Events/s, and the draining thread's CPU µs per event (``_common.drain_timed``)."""
    client = redis.Redis.from_url(url)
    keys = Keys(prefix)
    fill_events(client, keys, events, agents, restart_every, labelled)
    loaded, problems = plugins.load_detectors({})
    assert not problems, problems
    pipeline = Pipeline(settings=settings_for(prefix), source="bench", detectors=loaded)
    worker_client = connect(pipeline.settings, url)
    worker = detector_worker(pipeline, worker_client)
    timed = drain_timed(worker, events)
    worker_client.close()
    drop_prefix(client, prefix)
    client.close()
    return timed


# -- notifiers: grouping on vs off ----------------------------------------------------------------
def fill_alerts(client: redis.Redis, keys: Keys, alerts: int) -> None:
    incidents = Incidents(client, keys)
    now = int(time.time() * 1000)
    for n in range(alerts):
        labels = {"host": f"host-{n % 50}", **LABELS}
        incidents.fire(f"agent-{n:05d}", "silence", severity="critical", summary=f"agent-{n:05d}: silent",
                       at_ms=now, details={"labels": labels})  # fmt: skip
    client.xgroup_create(keys.alerts, NOTIFIERS_GROUP, id="0")


def notifiers_rate(url: str, prefix: str, alerts: int, hook: str, grouped: bool) -> tuple[float, float]:
    grouping = GroupingSection.model_validate({"enabled": grouped, "group_wait": "1h"})
    return webhook_drain(url, settings_for(prefix, grouping=grouping), alerts, hook)


def webhook_drain(
    url: str,
    settings: config.PipelineSettings,
    alerts: int,
    hook: str,
    before: Callable[[redis.Redis, Keys], object] | None = None,
) -> tuple[float, float]:
    """Alerts/s one notifier worker with a webhook routes of ``alerts`` fired ones, and the
    routing thread's CPU µs per alert (``_common.drain_timed``), under ``settings`` (``before``:
    more set-up once the alerts are in). The prefix is dropped after."""
    prefix = settings.redis.prefix
    client = redis.Redis.from_url(url)
    keys = Keys(prefix)
    fill_alerts(client, keys, alerts)
    if before is not None:
        before(client, keys)
    loaded, problems = plugins.load_notifiers([{"type": "webhook", "url": hook}])
    assert not problems, problems
    pipeline = Pipeline(settings=settings, source="bench", notifiers=loaded)
    worker_client = connect(pipeline.settings, url)
    worker = notifier_worker(pipeline, worker_client)
    timed = drain_timed(worker, alerts, hooks=True)
    worker_client.close()
    drop_prefix(client, prefix)
    client.close()
    return timed


# -- latency of a group -----------------------------------------------------------------------------
def group_latency(url: str, prefix: str, receiver: Receiver, wait_s: float) -> float:
    client = redis.Redis.from_url(url)
    keys = Keys(prefix)
    loaded, problems = plugins.load_notifiers([{"type": "webhook", "url": receiver.url}])
    assert not problems, problems
    grouping = GroupingSection.model_validate({"enabled": True, "group_wait": f"{wait_s}s"})
    pipeline = Pipeline(settings=settings_for(prefix, grouping=grouping), source="bench", notifiers=loaded)
    worker_client = connect(pipeline.settings, url)
    worker = notifier_worker(pipeline, worker_client)
    thread = threading.Thread(target=worker.run, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    time.sleep(0.5)  # the worker reads from the stream's end: let it start first
    seen = len(receiver.arrived)
    incidents = Incidents(client, keys)
    first = time.perf_counter()
    for n in range(10):
        seconds, micros = client.time()
        incidents.fire(f"w-{n}", "silence", severity="critical", summary="silent",
                       at_ms=int(seconds) * 1000 + int(micros) // 1000,
                       details={"labels": {"host": "worker-3"}})  # fmt: skip
        time.sleep(0.05)
    deadline = time.perf_counter() + wait_s + 30
    while len(receiver.arrived) == seen and time.perf_counter() < deadline:
        time.sleep(0.005)
    arrived = receiver.arrived[seen][0] if len(receiver.arrived) > seen else float("inf")
    worker.stop()
    thread.join(10)
    worker_client.close()
    drop_prefix(client, prefix)
    client.close()
    return arrived - first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument(
        "--restart-every", type=int, default=100, help="one start per this many events of an agent"
    )
    parser.add_argument("--alerts", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--group-wait", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true", help="small sizes, 5 short rounds")
    parser.add_argument("--redis-url", default=None, help="default: a private server (embedded launcher)")
    args = parser.parse_args()
    if args.quick:
        args.events, args.alerts, args.rounds, args.agents = 5000, 1000, 5, 200
    rows: list[dict[str, Any]] = []
    receiver = Receiver()
    try:
        with redis_server(args.redis_url) as url:
            det: dict[bool, list[float]] = {True: [], False: []}
            det_cpu: dict[bool, list[float]] = {True: [], False: []}
            notif: dict[bool, list[float]] = {True: [], False: []}
            notif_cpu: dict[bool, list[float]] = {True: [], False: []}
            latency: list[float] = []
            warm_up(lambda on: (
                detectors_rate(url, f"benchfg-wd{int(on)}", min(args.events, 5000), args.agents,
                               args.restart_every, on),
                notifiers_rate(url, f"benchfg-wn{int(on)}", min(args.alerts, 1000), receiver.url, on),
            ))  # fmt: skip
            for round_no in range(args.rounds):
                # Each pair back to back (ABBA): a detector side run right after a notifier worker
                # (its delivery threads winding down) read the other side's rate after a detector.
                got = abba(round_no, lambda on, n, r=round_no: detectors_rate(
                    url, f"benchfg-d{r}{n}", args.events, args.agents, args.restart_every, on))  # fmt: skip
                for on, (rate, cpu_us) in got.items():
                    det[on].append(rate)
                    det_cpu[on].append(cpu_us)
                for on in sides(round_no):
                    rate, cpu_us = notifiers_rate(url, f"benchfg-n{round_no}{int(on)}", args.alerts,
                                                  receiver.url, on)  # fmt: skip
                    notif[on].append(rate)
                    notif_cpu[on].append(cpu_us)
                latency.append(group_latency(url, f"benchfg-l{round_no}", receiver, args.group_wait))
    finally:
        receiver.close()
    det_ratio = paired_ratio(det[True], det[False])
    det_cpu_ratio = paired_ratio(det_cpu[False], det_cpu[True])  # off / on: as a rate ratio reads
    notif_ratio = paired_ratio(notif[True], notif[False])
    cpu_ratio = paired_ratio(notif_cpu[False], notif_cpu[True])  # off / on: as a rate ratio reads
    det_rounds = [round(a / b, 3) for a, b in zip(det[True], det[False], strict=True)]
    notif_rounds = [round(a / b, 3) for a, b in zip(notif[True], notif[False], strict=True)]
    for on in (True, False):
        rows.append({"worker": "detectors", "labels": "on" if on else "off", "events/s (median)":
                     median(det[on]), "rounds": [round(x) for x in det[on]],
                     "CPU us/event (median)": median(det_cpu[on])})  # fmt: skip
    rows.append({"worker": "detectors", "labels": "on / off", "rounds": det_rounds,
                 "ratio (median of rounds)": round(det_ratio, 3)})  # fmt: skip
    for on in (True, False):
        rows.append({"worker": "notifiers", "grouping": "on" if on else "off", "alerts/s (median)":
                     median(notif[on]), "rounds": [round(x) for x in notif[on]],
                     "routing CPU us/alert (median)": median(notif_cpu[on])})  # fmt: skip
    rows.append({"worker": "notifiers", "grouping": "on / off", "rounds": notif_rounds,
                 "ratio (median of rounds)": round(notif_ratio, 3)})  # fmt: skip
    rows.append({"worker": "group latency", "group_wait s": args.group_wait,
                 "first alert -> grouped notification s (median)": median(latency),
                 "rounds": [round(x, 3) for x in latency]})  # fmt: skip
    figures = [
        figure("detectors, labels on / off", round(det_ratio, 3), "ratio", goal=0.9, better="higher",
               issue=16),
        figure("detectors, labels off / on, CPU per event", round(det_cpu_ratio, 3), "ratio", issue=16),
        figure("notifiers, grouping on / off", round(notif_ratio, 3), "ratio", goal=0.9, better="higher",
               issue=16),
        figure("notifiers, grouping off / on, routing CPU per alert", round(cpu_ratio, 3), "ratio",
               issue=16),
        figure("first alert -> grouped notification", round(median(latency), 3), "s",
               goal=args.group_wait + 1.0, better="lower", issue=16),
    ]  # fmt: skip
    report("fleet_grouping", rows, {"args": vars(args)}, figures)
    for item in figures:
        goal = f" (goal {item['better']} than {item['goal']})" if item["goal"] is not None else ""
        print(f"{item['figure']}: {item['value']} {item['unit']}{goal}")


if __name__ == "__main__":
    main()
