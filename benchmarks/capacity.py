"""Capacity on a local Redis Cluster: a million agents beating every 30 s, 1, 2 and 4 detector workers.

A 3-master cluster on this machine (agentwatch/localcluster.py, the test suite's builder) holds
``--shards`` event streams. ``--agents`` simulated agents (default 1,000,000) speak the wire
protocol themselves: raw pipelined ``XADD ... MAXLEN ~ 1000000`` (PROTOCOL.md), sent by
``--loaders`` processes that route each stream to the master owning its slot, as a cluster client
would. Each agent sends a ``start`` (declaring its interval; the starts spread over ``--ramp``
seconds), then a beat every ``--interval`` seconds, phases spread evenly, so the cluster sees
agents / interval events per second. ``--bulk-interval`` gives every agent but the probes a
longer interval: the whole fleet registered at a rate a small machine carries.

For each worker count in ``--workers`` (default ``1,2,4``), on an emptied cluster:

1. ``W`` detector workers start (``agentwatch worker detectors``, every built-in detector at its
   defaults, ``[redis] cluster = true``) and the loaders start the fleet.
2. Over ``--window`` seconds of steady state: the event rate sent (and how far behind schedule
   the worst loader fell) and applied, detector CPU seconds per million events (psutil user +
   system of the worker processes, over the events their group read in the window), Redis CPU
   per million events (``INFO cpu`` of every master), loader CPU, and the backlog (the group's
   lag + pending) at the end of the window; then how long the workers took to catch up.
3. ``--silent`` probes (default 1,000, every N/1000-th agent, so phases and shards spread) stop.
   Each one's deadline is its last event's entry time + max(``after`` = 60 s, 3 x interval):
   the delay is the firing silence alert's entry time on ``<prefix>:alerts`` minus that deadline,
   both Redis time, p50 / p99 / max, split into *decided* (the alert's ``at``: when the timer
   check saw it) and *published*. Goal (issue 17): p99 <= 500 ms at 1,000,000 agents.
4. Memory at the end of the run: ``used_memory`` over the masters minus the empty cluster's, per
   agent; ``MEMORY USAGE`` of every key, streams apart (a backlog bounded by ``MAXLEN`` per
   stream, not per agent), and per key kind, bytes per element.

``--profile DIR`` runs the workers under cProfile timed by CPU time. The machine, date, load
averages and arguments go to ``benchmarks/results/capacity.json``; BENCHMARKS.md ("capacity")
and docs/operations.md ("Capacity planning") say what was run and what it means.

    nice -n 5 python benchmarks/capacity.py [--agents 1000000] [--workers 1,2,4] [--shards 6]
    python benchmarks/capacity.py --agents 1000000 --bulk-interval 600 --ramp 150
    python benchmarks/capacity.py --quick          # 20,000 agents every 10 s, 1 and 2 workers
"""

from __future__ import annotations

import argparse
import heapq
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import psutil
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import figure, median, percentile, report

from agentwatch.alerts import decode_alert
from agentwatch.codec import entry_ms
from agentwatch.keys import Keys
from agentwatch.localcluster import LocalCluster

PREFIX = "cap"
MAXLEN = 1_000_000  # the Python producer's default (PROTOCOL.md, "Trimming")
WAKE_S = 0.02  # a loader sends what fell due every 20 ms
# --profile: the worker under cProfile timed by CPU time (process_time), so a worker descheduled
# on a busy machine does not charge the wait to whatever line it was on.
PROFILED = """
import cProfile, runpy, sys, time
out = sys.argv[1]
sys.argv = ["agentwatch", *sys.argv[2:]]
profile = cProfile.Profile(time.process_time)
profile.enable()
try:
    runpy.run_module("agentwatch", run_name="__main__")
finally:
    profile.disable()
    profile.dump_stats(out)
"""
CONFIG = """
[redis]
url = "{url}"
prefix = "{prefix}"
cluster = true
shards = {shards}
"""


def slot_owners(port: int) -> dict[int, int]:
    """Slot -> port of the master that owns it (CLUSTER SLOTS of any node)."""
    client = redis.Redis(host="127.0.0.1", port=port)
    owners: dict[int, int] = {}
    for first, last, master, *_ in client.execute_command("CLUSTER SLOTS"):
        for slot in range(int(first), int(last) + 1):
            owners[slot] = int(master[1])
    client.close()
    return owners


def due_at(i: int, k: int, args: argparse.Namespace, t0: float) -> float:
    """When agent ``i`` sends its ``k``-th event (0: the start), wall-clock seconds.

    Starts are spread over ``ramp`` seconds in agent order. The probes (the agents that will go
    silent) beat every ``interval`` from their start; the bulk beats every ``bulk_interval`` from
    the end of the ramp, phases spread over the interval, so the rate is flat from then on. With
    the defaults (all three 30 s) both are ``t0 + (i / agents + k) * 30``.
    """
    phase = i / args.agents
    start = t0 + phase * args.ramp
    if k == 0:
        return start
    if i % probe_step(args) == 0:
        return start + k * args.interval
    return t0 + args.ramp + (phase + k - 1) * args.bulk_interval


def probe_step(args: argparse.Namespace) -> int:
    """Agents ``0, step, 2 step, ...`` are the probes: their phases and shards spread evenly."""
    return max(1, args.agents // args.silent)


def loader(
    index: int,
    loaders: int,
    args: argparse.Namespace,
    owners: dict[int, int],
    t0: float,
    stop_silent_at: Any,
    quit_flag: Any,
    sent: Any,
    behind_ms: Any,
    out: Any,
) -> None:
    """Send the events of agents ``index``, ``index + loaders``, ... as they fall due (:func:`due_at`).

    Raw pipelined XADDs, one pipeline per master, each stream sent to the master owning its slot.
    The probes send nothing due after ``stop_silent_at``; the entry id of each probe's last event
    goes to ``out`` when told to quit.
    """
    keys = Keys(PREFIX, args.shards)
    ports = sorted(set(owners.values()))
    conns = [redis.Redis(host="127.0.0.1", port=p) for p in ports]
    route: dict[int, tuple[bytes, int]] = {}
    schedule: list[tuple[float, int, int]] = []
    for i in range(index, args.agents, loaders):
        stream = keys.events_for(f"cap-{i:07d}").encode()
        route[i] = (stream, ports.index(owners[key_slot(stream)]))
        schedule.append((due_at(i, 0, args, t0), i, 0))
    heapq.heapify(schedule)
    step = probe_step(args)
    last_ids: dict[int, bytes] = {}
    pack = msgpack.Packer().pack
    while not quit_flag.value:
        now = time.time()
        stop_at = stop_silent_at.value
        pipes = [c.pipeline(transaction=False) for c in conns]
        probe_replies: list[list[tuple[int, int]]] = [[] for _ in conns]
        queued = [0] * len(conns)
        worst = 0.0
        while schedule[0][0] <= now:
            due, i, k = schedule[0]
            heapq.heapreplace(schedule, (due_at(i, k + 1, args, t0), i, k + 1))
            worst = max(worst, now - due)
            probe = i % step == 0
            if probe and stop_at and due > stop_at:
                continue
            event: dict[str, Any] = {"v": 1, "agent": f"cap-{i:07d}", "ts": due, "run": f"{i:016x}", "seq": k}
            if k == 0:
                every = args.interval if probe else args.bulk_interval
                host = f"host-{i % 500:03d}"
                event.update(kind="start", interval=float(every), pid=1000 + i, host=host, version="0.1.0")
            else:
                event.update(kind="beat", tokens=300)
            stream, node = route[i]
            pipes[node].execute_command("XADD", stream, "MAXLEN", "~", MAXLEN, "*", "d", pack(event))
            if probe:
                probe_replies[node].append((queued[node], i))
            queued[node] += 1
        for node, pipe in enumerate(pipes):
            if queued[node]:
                replies = pipe.execute()
                for n, i in probe_replies[node]:
                    last_ids[i] = replies[n]
        with sent.get_lock():
            sent.value += sum(queued)
        if worst * 1000 > behind_ms.value:
            behind_ms.value = worst * 1000
        time.sleep(max(0.0, WAKE_S - (time.time() - now)))
    out.put({i: entry_ms(e) for i, e in last_ids.items()})


def info_sum(ports: list[int], section: str, fields: tuple[str, ...]) -> float:
    total = 0.0
    for port in ports:
        client = redis.Redis(host="127.0.0.1", port=port)
        info = client.info(section)
        total += sum(float(info[f]) for f in fields)
        client.close()
    return total


def group_state(client: RedisCluster, keys: Keys) -> tuple[int, int]:
    """(entries the detector group read, events not yet read or acknowledged) over all shards."""
    read = waiting = 0
    for stream in keys.event_streams():
        try:
            groups = client.xinfo_groups(stream)
        except redis.ResponseError:
            continue
        for group in groups:
            read += int(group.get("entries-read") or 0)
            waiting += int(group.get("lag") or 0) + int(group["pending"])
    return read, waiting


def snapshot(
    ps_workers: list[psutil.Process],
    ps_loaders: list[psutil.Process],
    sent: Any,
    client: RedisCluster,
    keys: Keys,
    ports: list[int],
) -> tuple[float, float, float, int, int, int, float]:
    """(time, worker CPU s, loader CPU s, events sent, events the group read, waiting, Redis CPU s)."""
    read, waiting = group_state(client, keys)
    redis_cpu = info_sum(ports, "cpu", ("used_cpu_user", "used_cpu_sys"))
    return (time.time(), cpu_s(ps_workers), cpu_s(ps_loaders), int(sent.value), read, waiting, redis_cpu)


def stream_names(keys: Keys) -> set[str]:
    return {*keys.event_streams(), keys.alerts, keys.deadletter}


def key_sizes(client: RedisCluster) -> dict[str, int]:
    """MEMORY USAGE (every element counted) of every key on every master: a few dozen keys, since
    the detectors keep one hash or sorted set per shard, not one key per agent."""
    sizes: dict[str, int] = {}
    for key in client.scan_iter(match=f"{PREFIX}:*", count=1000, target_nodes=RedisCluster.PRIMARIES):
        name = key.decode()
        sizes[name] = int(client.memory_usage(name, samples=0) or 0)
    return sizes


def by_kind(client: RedisCluster, sizes: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Per-shard keys grouped by kind (``cap:{3}:states`` -> ``states``): (bytes, elements)."""
    out: dict[str, tuple[int, int]] = {}
    for key, size in sizes.items():
        if not key.startswith(f"{PREFIX}:{{"):
            continue
        kind = key.split("}:", 1)[1]
        kind_type = client.type(key).decode()
        count = {"hash": client.hlen, "zset": client.zcard}.get(kind_type)
        entries = int(count(key)) if count is not None else 0  # type: ignore[operator]
        total, n = out.get(kind, (0, 0))
        out[kind] = (total + size, n + entries)
    return out


def cpu_s(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        times = proc.cpu_times()
        total += times.user + times.system
    return total


def one_run(cluster: LocalCluster, workers: int, args: argparse.Namespace, state: Path) -> dict[str, Any]:
    """One worker count on the emptied cluster; returns the row of measurements."""
    ports = cluster.ports
    for port in ports:
        redis.Redis(host="127.0.0.1", port=port).flushall()
    client = RedisCluster.from_url(cluster.url)
    keys = Keys(PREFIX, args.shards)
    empty_bytes = info_sum(ports, "memory", ("used_memory",))
    config = state / "pipeline.toml"
    config.write_text(CONFIG.format(url=cluster.url, prefix=PREFIX, shards=args.shards))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTWATCH_")}
    argv = [sys.executable, "-m", "agentwatch", "worker", "detectors", "--config", str(config)]
    argv += ["--log-level", "warning"]
    procs = []
    for n in range(workers):
        out_file = str(Path(args.profile) / f"worker-{workers}-{n}.prof") if args.profile else ""
        run = [argv[0], "-c", PROFILED, out_file, *argv[3:]] if args.profile else argv
        procs.append(subprocess.Popen(run, env=env))
    ps_workers = [psutil.Process(p.pid) for p in procs]
    owners = slot_owners(ports[0])
    ctx = mp.get_context("fork")
    stop_silent_at, quit_flag = ctx.Value("d", 0.0), ctx.Value("b", 0)
    sent, behind_ms = ctx.Value("q", 0), ctx.Value("d", 0.0)
    out: Any = ctx.Queue()
    t0 = time.time() + 1.0
    loaders = [
        ctx.Process(
            target=loader,
            args=(j, args.loaders, args, owners, t0, stop_silent_at, quit_flag, sent, behind_ms, out),
        )
        for j in range(args.loaders)
    ]
    for proc in loaders:
        proc.start()
    ps_loaders = [psutil.Process(p.pid) for p in loaders if p.pid is not None]
    row: dict[str, Any] = {"workers": workers}
    try:
        # Steady state: every start sent, every agent beating; then one window.
        time.sleep(max(0.0, t0 + max(args.ramp, args.interval) + 5 - time.time()))
        w0 = snapshot(ps_workers, ps_loaders, sent, client, keys, ports)
        row["load average (1 min) at start"] = round(os.getloadavg()[0], 1)
        behind_ms.value = 0.0
        time.sleep(args.window)
        w1 = snapshot(ps_workers, ps_loaders, sent, client, keys, ports)
        span = w1[0] - w0[0]
        events = max(1, w1[4] - w0[4])
        probes = len(range(0, args.agents, probe_step(args)))
        row["events/s due"] = round(probes / args.interval + (args.agents - probes) / args.bulk_interval)
        row["events/s sent"] = round((w1[3] - w0[3]) / span)
        row["loader worst behind, ms"] = round(behind_ms.value)
        row["events/s applied"] = round(events / span)
        row["waiting at end of window"] = w1[5]
        row["detector CPU s per 1M events"] = round((w1[1] - w0[1]) / events * 1e6, 1)
        row["detector CPU, cores"] = round((w1[1] - w0[1]) / span, 2)
        row["Redis CPU s per 1M events"] = round((w1[6] - w0[6]) / events * 1e6, 1)
        row["Redis CPU, cores"] = round((w1[6] - w0[6]) / span, 2)
        row["loader CPU s per 1M events"] = round((w1[2] - w0[2]) / max(1, w1[3] - w0[3]) * 1e6, 1)
        # Caught up? Wait (bounded) until what waits is under a second of events.
        waited = time.time()
        while group_state(client, keys)[1] > max(1000, row["events/s due"]) and time.time() < waited + 300:
            time.sleep(1)
        behind = group_state(client, keys)[1]
        row["caught up after window, s"] = (
            round(time.time() - waited) if behind <= max(1000, row["events/s due"]) else "no"
        )
        # Silence: the silent agents stop now; their alerts come 90 s after their last beat.
        stop_silent_at.value = time.time()
        stopped = time.time()
        delays = collect_delays(client, keys, args, stopped, quit_flag, out, row)
        row["silent agents alerted"] = f"{len(delays)} / {args.silent}"
        values = list(delays.values())
        if values:
            row["silence p50, ms"] = round(median(values))
            row["silence p99, ms"] = round(percentile(values, 99))
            row["silence max, ms"] = round(max(values))
        row["false alerts (healthy agents)"] = sum(
            1 for _, f in client.xrange(keys.alerts)
            if (a := json.loads(f[b"d"]))["detector"] == "silence" and a["status"] == "firing"
            and int(a["agent"][4:]) % probe_step(args) != 0
        )  # fmt: skip
        # Memory, at the end: every agent registered for minutes (the dashboard series and the
        # report rollups are swept from the totals at their bucket boundaries), streams at
        # their backlog.
        used = info_sum(ports, "memory", ("used_memory",)) - empty_bytes
        sizes = key_sizes(client)
        streams = sum(size for key, size in sizes.items() if key in stream_names(keys))
        row["Redis used_memory delta per agent, B"] = round(used / args.agents)
        row["event streams (backlog), MB"] = round(streams / 1e6)
        row["state per agent (keys, MEMORY USAGE), B"] = round((sum(sizes.values()) - streams) / args.agents)
        row["used_memory per agent without streams, B"] = round((used - streams) / args.agents)
        for kind, (size, entries) in sorted(by_kind(client, sizes).items()):
            row[f"  {kind}: B per entry (entries)"] = f"{size / max(1, entries):.0f} ({entries:,})"
        row["waiting at end"] = group_state(client, keys)[1]
        row["load average (1 min) at end"] = round(os.getloadavg()[0], 1)
    finally:
        quit_flag.value = 1
        for proc in loaders:
            proc.join(30)
            if proc.is_alive():
                proc.terminate()
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
        client.close()
    return row


def collect_delays(
    client: RedisCluster,
    keys: Keys,
    args: argparse.Namespace,
    stopped: float,
    quit_flag: Any,
    out: Any,
    row: dict[str, Any],
) -> dict[str, float]:
    """Wait for the silent agents' firing alerts; delay = alert entry ms - (last beat ms + 90 s)."""
    allowance_ms = max(60_000, 3 * args.interval * 1000)
    silent = {f"cap-{i:07d}" for i in range(0, args.agents, probe_step(args))}
    fired: dict[str, int] = {}
    decided: dict[str, int] = {}
    cursor = "-"
    most_waiting = 0
    deadline = stopped + args.interval + allowance_ms / 1000 + 60
    # Wait for the last silent beats to be sent (one cycle) before asking the loaders for them.
    while time.time() < deadline and len(fired) < len(silent):
        for entry_id, fields in client.xrange(keys.alerts, min=cursor):
            cursor = f"({entry_id.decode()}"
            alert = decode_alert(fields[b"d"])
            if alert.detector == "silence" and alert.status == "firing" and alert.agent in silent:
                if alert.agent in fired:
                    raise SystemExit(f"two firing alerts for {alert.agent}")
                fired[alert.agent] = entry_ms(entry_id)
                decided[alert.agent] = alert.at_ms
        most_waiting = max(most_waiting, group_state(client, keys)[1])
        time.sleep(0.5)
    row["most waiting while the probes went silent"] = most_waiting
    quit_flag.value = 1
    last: dict[int, int] = {}
    for _ in range(args.loaders):
        last.update(out.get(timeout=60))
    known = [agent for agent in fired if int(agent[4:]) in last]
    # Where the delay goes: the timer check deciding (the alert's "at", Redis time of the check),
    # then publishing it on the alerts stream.
    late = [decided[a] - (last[int(a[4:])] + allowance_ms) for a in known]
    publish = [fired[a] - decided[a] for a in known]
    if known:
        row["decided after deadline p50 / p99, ms"] = f"{median(late):.0f} / {percentile(late, 99):.0f}"
        row["published after decided p50 / p99, ms"] = (
            f"{median(publish):.0f} / {percentile(publish, 99):.0f}"
        )
    return {a: fired[a] - (last[int(a[4:])] + allowance_ms) for a in known}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=1_000_000)
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between an agent's beats")
    parser.add_argument(
        "--bulk-interval", type=float, help="... of the agents that never go silent (default: --interval)"
    )
    parser.add_argument(
        "--ramp", type=float, help="seconds over which the agents start (default: --bulk-interval)"
    )
    parser.add_argument("--window", type=float, default=30.0, help="seconds of steady state measured")
    parser.add_argument("--workers", default="1,2,4", help="detector worker counts to run, comma-separated")
    parser.add_argument("--shards", type=int, default=6)
    parser.add_argument("--loaders", type=int, default=2, help="processes sending the fleet's XADDs")
    parser.add_argument("--silent", type=int, default=1000)
    parser.add_argument(
        "--quick", action="store_true", help="20,000 agents every 10 s, 1 and 2 workers (run_all.py --quick)"
    )
    parser.add_argument("--profile", help="run the workers under cProfile, writing <dir>/worker-W-n.prof")
    args = parser.parse_args()
    if args.quick:  # the allowance is at least 60 s (silence `after`): each worker count takes ~2 min
        args.agents, args.interval, args.workers, args.window = 20_000, 10.0, "1,2", 10.0
    args.bulk_interval = args.bulk_interval or args.interval
    args.ramp = args.ramp or args.bulk_interval
    if args.ramp > 3 * args.bulk_interval:
        parser.error("--ramp must be at most 3 x --bulk-interval (or the first started go silent)")
    counts = [int(w) for w in args.workers.split(",")]
    state = Path(tempfile.mkdtemp(prefix="aw-cap-"))
    rows = []
    try:
        with LocalCluster(state / "cluster") as cluster:
            owners = slot_owners(cluster.ports[0])
            homes = [owners[key_slot(s.encode())] for s in Keys(PREFIX, args.shards).event_streams()]
            spread = sorted(homes.count(port) for port in cluster.ports)
            print(f"cluster {cluster.ports}: event streams per master {spread}", flush=True)
            for w in counts:
                row = one_run(cluster, w, args, state)
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    scale = f"{args.agents / 1e6:g}M" if args.agents >= 1_000_000 else f"{args.agents:,}"
    if not args.bulk_interval == args.interval == 30:  # not every agent every 30 s: say at what rate
        scale += f" agents (at {rows[0].get('events/s due', 0):,} events/s)"
    else:
        scale += " agents"
    figures = [
        figure(
            f"silence p99 after deadline, {scale}, {r['workers']} workers",
            float(r.get("silence p99, ms", float("inf"))),
            "ms",
            goal=500,
            issue=17,
        )
        for r in rows
    ]
    extra = {"agents": args.agents, "interval_s": args.interval, "bulk_interval_s": args.bulk_interval,
             "ramp_s": args.ramp, "window_s": args.window, "shards": args.shards,
             "loaders": args.loaders, "silent": args.silent, "masters": 3, "runs": rows}  # fmt: skip
    # One line per measurement, one column per worker count: the table stays readable.
    names = list(dict.fromkeys(key for row in rows for key in row if key != "workers"))
    table = [{"measure": n, **{f"{r['workers']} worker(s)": r.get(n, "") for r in rows}} for n in names]
    report("capacity", table, extra, figures=figures)


if __name__ == "__main__":
    main()
