"""Producer against a hung Redis: the worst single ``heartbeat()`` call while nothing answers.

Goal (issues 3 and 17): worst call <= 1 ms, over >= 10 runs of 10 s each. "Hung" is either

* ``accept``: a TCP server that accepts connections and never reads or answers them (a dead
  proxy, a frozen VM): the connect succeeds and only timeouts end each attempt; or
* ``stopped``: a real redis-server, SIGSTOPped before the agent starts (the kernel still
  completes connections into its backlog; nothing ever answers).

Each run is a fresh agent process beating in a tight loop for ``--seconds`` (a little work
between beats), spanning several of the sender's connect / timeout / retry cycles; the kinds
alternate run by run. Every call is timed, and so is a no-op call in the same loop: the
preemption baseline. On a shared VM the worst single call of *any* code is set by the scheduler,
so each slow call (> 20 us) is also classified with ``getrusage(RUSAGE_THREAD)`` read around it:

* *waited*: the agent's thread blocked (a voluntary context switch): it waited for the GIL (or
  a lock) held by another thread of the process, and the only other thread is the producer's
  sender: these stalls are the producer's doing;
* *preempted*: only involuntary context switches: the kernel gave the CPU to another process.

Figures: the worst ``heartbeat()`` per run (median and worst of runs), the worst no-op (context),
and the worst *waited* ``heartbeat()`` (the producer's own share). Also reported: the queue stays
within its cap, interpreter exit time with Redis hung (the exit flush deadline is 2 s), and how
many connections the sender opened. ``--trace`` prints, for each waited call over 200 us, what
the sender thread was doing around it (socket audit events, GC passes): the evidence behind
benchmarks/NOTES.md.

    python benchmarks/producer_hung.py [--runs 10] [--seconds 10] [--kind both] [--quick] [--trace]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import figure, median, report

from agentwatch.embedded import EmbeddedRedis

GOAL_WORST_MS = 1.0
SLOW_NS = 20_000
"""Calls slower than this are kept one by one, with their context-switch counts."""


class HungServer:
    """Accepts TCP connections and never reads from or writes to them."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.url = f"redis://127.0.0.1:{self.listener.getsockname()[1]}/0"
        self.held: list[socket.socket] = []
        self.running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self.running:
            try:
                self.held.append(self.listener.accept()[0])
            except OSError:
                continue

    def close(self) -> None:
        self.running = False
        for conn in self.held:
            conn.close()
        self.listener.close()


class StoppedRedis:
    """A real redis-server on TCP, SIGSTOPped: connections complete, nothing ever answers."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.server = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="aw-hung-")), port=port).start()
        self.url = f"redis://127.0.0.1:{port}/0"
        assert self.server.process is not None
        self.server.process.send_signal(signal.SIGSTOP)

    def close(self) -> None:
        assert self.server.process is not None
        self.server.process.send_signal(signal.SIGCONT)
        self.server.stop()


AGENT = r"""
import gc, json, resource, sys, threading, time
from array import array
seconds, trace_on = float(sys.argv[1]), sys.argv[2] == "trace"
clock = time.perf_counter_ns
trace = []
connects = []
def count_connects(event, args):
    if event == "socket.connect":
        connects.append(1)
sys.addaudithook(count_connects)  # how often the sender (re)connects: its only socket.connect
if trace_on:  # what the sender thread does, timestamped (audit events and GC passes)
    def audit(event, args):
        if event.startswith(("socket.", "import", "open")) or event in ("exec", "compile"):
            trace.append((clock(), threading.get_ident(), event, repr(args)[:70]))
    sys.addaudithook(audit)
    gc.callbacks.append(lambda phase, info: trace.append(
        (clock(), threading.get_ident(), "gc." + phase, str(info.get("generation")))))
import producers
producer = producers.init("bench-hung", pulse_interval=0.5)
heartbeat = producers.heartbeat
rusage, THREAD = resource.getrusage, resource.RUSAGE_THREAD
SLOW = int(sys.argv[3])
def noop():
    return None
beats, noops = array("q"), array("q")  # no per-call objects for the GC to walk
slow = []  # (kind, start, ns, voluntary switches, involuntary switches)
queue_max = 0
main = threading.get_ident()
end = time.monotonic() + seconds
t0 = clock()
while time.monotonic() < end:
    for _ in range(1000):
        a = rusage(THREAD)
        start = clock(); heartbeat(); d = clock() - start
        b = rusage(THREAD)
        beats.append(d)
        if d > SLOW:
            slow.append(("hb", start - t0, d, b.ru_nvcsw - a.ru_nvcsw, b.ru_nivcsw - a.ru_nivcsw))
        start = clock(); noop(); d = clock() - start
        c = rusage(THREAD)
        noops.append(d)
        if d > SLOW:
            slow.append(("noop", start - t0, d, c.ru_nvcsw - b.ru_nvcsw, c.ru_nivcsw - b.ru_nivcsw))
        until = clock() + 2000  # ~2 us of the agent's own work per iteration
        while clock() < until:
            pass
    queue_max = max(queue_max, len(producer._queue))
def stats(values):
    ordered = sorted(values)
    n = len(ordered)
    rank = lambda q: ordered[max(0, min(n - 1, round(q / 100 * n + 0.5) - 1))]
    return {"calls": n, "median": rank(50), "p99": rank(99), "p99.9": rank(99.9),
            "p99.99": rank(99.99), "max": ordered[-1]}
out = {"hb": stats(beats), "noop": stats(noops), "slow": slow, "queue_max": queue_max,
       "queue_size": producer.settings.queue_size, "connections": len(connects),
       "trace": [(t - t0, "main" if who == main else "sender", e, a) for t, who, e, a in trace]}
print(json.dumps(out))
print(json.dumps({"end": time.monotonic()}), flush=True)
"""


def one_run(kind: str, seconds: float, trace: bool) -> dict[str, Any]:
    server: HungServer | StoppedRedis = HungServer() if kind == "accept" else StoppedRedis()
    env = dict(os.environ, AGENTWATCH_REDIS_URL=server.url, AGENTWATCH_PREFIX="bench-hung")
    try:
        done = subprocess.run(
            [sys.executable, "-c", AGENT, str(seconds), "trace" if trace else "-", str(SLOW_NS)],
            env=env, capture_output=True, text=True, timeout=seconds + 60, check=True,
        )  # fmt: skip
        exited = time.monotonic()
    finally:
        server.close()
    lines = done.stdout.splitlines()
    data = json.loads(lines[0])
    data["exit_s"] = exited - json.loads(lines[1])["end"]
    data["kind"] = kind
    return data


def classify(data: dict[str, Any], call: str) -> dict[str, Any]:
    """Worst call overall, worst that waited (voluntary switch), worst only preempted."""
    waited = [(ns, at) for kind, at, ns, vol, _ in data["slow"] if kind == call and vol > 0]
    preempted = [ns for kind, _, ns, vol, invol in data["slow"] if kind == call and vol == 0 and invol > 0]
    over = [ns for kind, _, ns, _, _ in data["slow"] if kind == call and ns > 1_000_000]
    return {
        "worst_waited_ns": max(waited, default=(0, 0))[0],
        "worst_waited_at_s": max(waited, default=(0, 0))[1] / 1e9,
        "worst_preempted_ns": max(preempted, default=0),
        "waited_over_100us": sum(ns > 100_000 for ns, _ in waited),
        "over_1ms": len(over),
    }


def print_trace(data: dict[str, Any], run: int) -> None:
    """For each waited heartbeat() over 200 us: the sender's events 3 ms before to 0.5 ms after."""
    for kind, start, ns, vol, invol in data["slow"]:
        if kind != "hb" or vol == 0 or ns < 200_000:
            continue
        print(f"  run {run} ({data['kind']}): heartbeat() at {start / 1e6:.1f} ms took {ns / 1e3:.0f} us "
              f"(voluntary switches {vol}, involuntary {invol}); the sender around it:")  # fmt: skip
        near = [e for e in data["trace"] if start - 3_000_000 <= e[0] <= start + ns + 500_000]
        for t, who, event, args in near:
            print(f"    {(t - start) / 1e3:+9.1f} us {who:6s} {event} {args}")
        if not near:
            print("    (no socket or GC event: the sender woke from a wait or timeout)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--kind", choices=("accept", "stopped", "both"), default="both")
    parser.add_argument("--quick", action="store_true", help="4 runs of 4 s")
    parser.add_argument("--trace", action="store_true", help="print what the sender did around stalls")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.seconds = min(args.runs, 4), min(args.seconds, 4.0)
    kinds = ("accept", "stopped") if args.kind == "both" else (args.kind,)
    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    for number in range(1, args.runs + 1):
        kind = kinds[(number - 1) % len(kinds)]
        data = one_run(kind, args.seconds, args.trace)
        hb, noop = classify(data, "hb"), classify(data, "noop")
        row = {
            "run": number,
            "Redis": kind,
            "calls": data["hb"]["calls"],
            "hb median us": data["hb"]["median"] / 1e3,
            "hb p99.99 us": data["hb"]["p99.99"] / 1e3,
            "hb worst us": data["hb"]["max"] / 1e3,
            "hb worst waited us": hb["worst_waited_ns"] / 1e3,
            "... at s": round(hb["worst_waited_at_s"], 2),
            "hb waited > 100us": hb["waited_over_100us"],
            "hb > 1ms": hb["over_1ms"],
            "no-op p99.99 us": data["noop"]["p99.99"] / 1e3,
            "no-op worst us": data["noop"]["max"] / 1e3,
            "no-op waited > 100us": noop["waited_over_100us"],
            "no-op > 1ms": noop["over_1ms"],
            "queue max": data["queue_max"],
            "connections": data["connections"],
            "exit s": round(data["exit_s"], 2),
        }
        rows.append(row)
        runs.append({**row, "load": os.getloadavg()[0]})
        print(f"run {number}/{args.runs} ({kind}): worst heartbeat() {row['hb worst us']:,.0f} us "
              f"(waited {row['hb worst waited us']:,.0f} us), worst no-op {row['no-op worst us']:,.0f} us, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
        if args.trace:
            print_trace(data, number)
    worst = [row["hb worst us"] / 1e3 for row in rows]
    waited = [row["hb worst waited us"] / 1e3 for row in rows]
    noop_worst = [row["no-op worst us"] / 1e3 for row in rows]
    verdict = {
        "runs": args.runs,
        "seconds": args.seconds,
        "worst_ms_median_of_runs": median(worst),
        "worst_ms_worst_of_runs": max(worst),
        "waited_worst_ms_median_of_runs": median(waited),
        "waited_worst_ms_worst_of_runs": max(waited),
        "noop_worst_ms_median_of_runs": median(noop_worst),
        "hb_waited_over_100us_total": sum(row["hb waited > 100us"] for row in rows),
        "noop_waited_over_100us_total": sum(row["no-op waited > 100us"] for row in rows),
        "queue_within_cap": all(row["queue max"] <= 10_000 for row in rows),
        "exit_s_max": max(row["exit s"] for row in rows),
    }
    figures = [
        figure("worst heartbeat() with Redis hung (median of runs)", median(worst), "ms",
               goal=GOAL_WORST_MS, issue=17),
        figure("worst heartbeat() with Redis hung (worst of runs)", max(worst), "ms"),
        figure("worst heartbeat() that waited on the sender thread (median of runs)", median(waited), "ms",
               goal=GOAL_WORST_MS, issue=17),
        figure("worst no-op call in the same loop (median of runs)", median(noop_worst), "ms"),
    ]  # fmt: skip
    report("producer_hung", rows, {"verdict": verdict, "runs": runs}, figures=figures)
    print(f"\nworst heartbeat() with Redis hung: median of {args.runs} runs {median(worst):.3f} ms, "
          f"worst {max(worst):.3f} ms (goal <= {GOAL_WORST_MS} ms); of it, waiting on the sender "
          f"thread: median {median(waited):.3f} ms, worst {max(waited):.3f} ms; worst no-op: median "
          f"{median(noop_worst):.3f} ms; heartbeat() calls that waited > 100 us: "
          f"{verdict['hb_waited_over_100us_total']} (no-op: {verdict['noop_waited_over_100us_total']}); "
          f"exit with Redis hung <= {verdict['exit_s_max']:.2f} s")  # fmt: skip


if __name__ == "__main__":
    main()
