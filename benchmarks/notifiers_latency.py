"""Alert on the stream -> webhook receiver has it: p50/p99/p99.9, notifier worker vs a raw loop.

Alerts are published exactly as detectors publish them (``Incidents.fire``: Lua + XADD) at a
steady rate, after 20 unmeasured warm-up alerts; the clock starts just before the publish call
and stops when the receiver (a threaded ``http.server`` on 127.0.0.1, in this process) has read
the request. The notifier worker runs as its own process (``agentwatch worker notifiers``), with
default settings except the notifier URLs. Scenarios, each run ``--rounds`` times, interleaved:

* baseline - a raw loop in this process: XREAD BLOCK on the alerts stream + one httpx POST per
  alert (no consumer group, no queue, no retries): the floor for this machine;
* healthy - one webhook notifier;
* healthy, other hung - the same, plus a second webhook notifier whose receiver accepts every
  request and never answers: the healthy notifier's figure must not move;
* baseline, busy worker - the raw loop again, while a detector worker is kept busy (below);
* 4 notifiers, one hung, busy worker (issue 17) - four webhook notifiers, three healthy
  receivers and one that accepts and never answers, while a real ``agentwatch worker
  detectors`` process on the same machine and Redis (its own prefix, so its alerts stay apart)
  digests a flood of beats and pulses from ``--flood-agents`` agents at ``--flood-rate``
  events/s, written by a feeder process as raw pipelined XADDs. The latencies of the three
  healthy receivers are pooled (3 x ``--alerts`` samples). The table reports the CPU the
  detector worker and the feeder used while the alerts were published.

Targets: p99 <= 100 ms in the two one-notifier scenarios (issue 5); p99 <= 50 ms with 4
notifiers, one hung, busy worker (issue 17), p99.9 reported. A figure is the median of the
rounds; the rows show min / median / max.

``--profile`` also samples the notifier worker with py-spy (``py-spy`` on PATH, or ``$PY_SPY``)
during the 4-notifier scenario of the first round and writes a per-thread summary (top frames,
where the main thread spends its wall time) to ``benchmarks/results/notifiers_profile.txt``.

    python benchmarks/notifiers_latency.py [--alerts 1000] [--rate 200] [--rounds 3] [--workers 1]
        [--flood-rate 30000] [--only-busy] [--profile] [--quick]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, figure, median, percentile, report

from agentwatch import codec
from agentwatch.alerts import Incidents, decode_alert
from agentwatch.embedded import EmbeddedRedis
from agentwatch.keys import Keys

WARM_UP = 20
GOAL_ISSUE_5_MS = 100.0
GOAL_ISSUE_17_MS = 50.0
BUSY = "4 notifiers, one hung, busy worker"


class Receiver:
    """Records when each alert id arrived; ``hang`` never answers (until closed)."""

    def __init__(self, hang: bool = False) -> None:
        self.arrived: dict[str, float] = {}
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # as any production server (nginx: tcp_nodelay on)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                now = time.monotonic()
                key = self.headers.get("webhook-id") or decode_alert(body).id
                receiver.arrived.setdefault(key, now)
                if hang:
                    receiver.release.wait()
                    self.close_connection = True
                    return
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def publish(client: redis.Redis, keys: Keys, count: int, rate: float, tag: str = "bench") -> dict[str, float]:
    """Fire ``count`` alerts at ``rate`` per second; alert id -> monotonic time before publishing."""
    incidents = Incidents(client, keys)
    sent: dict[str, float] = {}
    start = time.monotonic()
    for i in range(count):
        due = start + i / rate
        while (pause := due - time.monotonic()) > 0:
            time.sleep(pause)
        seconds, micros = client.time()
        before = time.monotonic()
        alert = incidents.fire(f"{tag}-{i}", "silence", severity="critical", summary=f"bench-{i} silent",
                               at_ms=int(seconds) * 1000 + int(micros) // 1000)  # fmt: skip
        assert alert is not None
        sent[alert.id] = before
    return sent


def latencies_ms(sent: dict[str, float], arrived: dict[str, float], timeout_s: float = 60.0) -> list[float]:
    deadline = time.monotonic() + timeout_s
    while len([k for k in sent if k in arrived]) < len(sent) and time.monotonic() < deadline:
        time.sleep(0.05)
    missing = [k for k in sent if k not in arrived]
    if missing:
        raise SystemExit(f"{len(missing)} alerts never reached the receiver")
    return [(arrived[k] - sent[k]) * 1000 for k in sent]


def raw_loop(url: str, keys: Keys, hook: str, stop: threading.Event, last: bytes) -> None:
    """The floor: XREAD BLOCK + one POST per alert, nothing else."""
    client = redis.Redis.from_url(url)
    with httpx.Client() as http:
        while not stop.is_set():
            reply = client.xread({keys.alerts: last}, block=200, count=100)
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    alert = decode_alert(fields[b"d"])
                    http.post(hook, content=fields[b"d"], headers={"webhook-id": alert.id})
    client.close()


def spawn_worker(
    kind: str, url: str, prefix: str, hooks: list[tuple[str, str]], workdir: Path
) -> subprocess.Popen[bytes]:
    """``agentwatch worker <kind>`` in its own process, default settings but for the URLs."""
    config = workdir / f"{prefix}.toml"
    text = f'[redis]\nurl = "{url}"\nprefix = "{prefix}"\n'
    for name, hook in hooks:
        text += f'\n[[notifiers]]\ntype = "webhook"\nname = "{name}"\nurl = "{hook}"\n'
    config.write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTWATCH_")}
    argv = [
        sys.executable,
        "-m",
        "agentwatch",
        "worker",
        kind,
        "--config",
        str(config),
        "--log-level",
        "error",
    ]
    return subprocess.Popen(argv, env=env)


def wait_ready(client: redis.Redis, keys: Keys, timeout_s: float = 20.0, count: int = 1) -> None:
    """A worker is up once it published its first health record (after its handlers started)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.zcard(keys.workers) >= count:
            return
        time.sleep(0.05)
    raise SystemExit("the worker did not start")


def warm_up(client: redis.Redis, keys: Keys, hooks: list[Receiver]) -> None:
    """A few alerts first, not measured: connections, script loads, lazy imports in the worker."""
    sent = publish(client, keys, WARM_UP, 50.0, tag="warm")
    for hook in hooks:
        latencies_ms(sent, hook.arrived)


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Busy:
    """A detector worker kept busy: ``agentwatch worker detectors`` on its own prefix, fed by a
    feeder process (this script, ``--feed``) writing beats and pulses as raw pipelined XADDs."""

    def __init__(self, url: str, client: redis.Redis, workdir: Path, args: argparse.Namespace) -> None:
        self.prefix = f"benchf{uuid.uuid4().hex[:6]}"
        self.client = client
        self.worker = spawn_worker("detectors", url, self.prefix, [], workdir)
        wait_ready(client, Keys(self.prefix))
        argv = [
            sys.executable,
            __file__,
            "--feed",
            url,
            self.prefix,
            str(args.flood_rate),
            str(args.flood_agents),
        ]
        self.feeder = subprocess.Popen(argv)
        self.stream = Keys(self.prefix).event_streams()[0]
        self._mark: tuple[float, float, float, int] | None = None

    def _added(self) -> int:
        return (
            int(self.client.xinfo_stream(self.stream)["entries-added"])
            if self.client.exists(self.stream)
            else 0
        )

    def mark(self) -> None:
        self._mark = (time.monotonic(), cpu_s(self.worker.pid), cpu_s(self.feeder.pid), self._added())

    def usage(self) -> dict[str, float]:
        """Since :meth:`mark`: the CPU share (1.0 = one core) of the worker and of the feeder,
        and the events/s the feeder got into the stream."""
        assert self._mark is not None
        start, worker, feeder, added = self._mark
        wall = time.monotonic() - start
        return {"worker_cpu": (cpu_s(self.worker.pid) - worker) / wall,
                "feeder_cpu": (cpu_s(self.feeder.pid) - feeder) / wall,
                "flood_per_s": (self._added() - added) / wall}  # fmt: skip

    def stop(self) -> None:
        for proc in (self.feeder, self.worker):
            proc.terminate()
        for proc in (self.feeder, self.worker):
            proc.wait(10)
        for key in self.client.scan_iter(f"{self.prefix}:*"):
            self.client.delete(key)


def _resp(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


def feed(url: str, prefix: str, rate: float, agents: int) -> None:
    """The flood: ``agents`` agents, a start each, then beats (tokens, cost, model, a fresh
    fingerprint) and every 5th a pulse (RSS), ``rate`` events/s in batches of 500, until killed.
    Packed by hand and written on one connection, so the feeder itself costs little CPU."""
    client = redis.Redis.from_url(url)
    stream = Keys(prefix).event_streams()[0].encode()
    conn = client.connection_pool.get_connection()
    runs = [f"run-{n}" for n in range(agents)]
    batch, n = 500, 0
    start = time.monotonic()
    sent = 0
    while True:
        blob = []
        for _ in range(batch):
            agent_no, round_no = n % agents, n // agents
            event: dict[str, Any] = {"v": 1, "agent": f"flood-{agent_no:05d}", "ts": time.time(),
                                     "run": runs[agent_no], "seq": round_no}  # fmt: skip
            if round_no == 0:
                event.update(kind="start", interval=30.0, pid=1000 + agent_no, host="bench")
            elif round_no % 5 == 0:
                event.update(kind="pulse", rss=(200 + agent_no % 50) * 2**20 + round_no * 4096, interval=30.0)
            else:
                tokens = 300 + (n * 7919) % 900
                event.update(kind="beat", tokens=tokens, cost=tokens * 3e-6, model="gpt-x", fp=f"job-{n}")
            blob.append(_resp(b"XADD", stream, b"MAXLEN", b"~", b"200000", b"*", b"d", codec.encode(event)))
            n += 1
        conn.send_packed_command([b"".join(blob)], check_health=False)
        for _ in range(batch):
            conn.read_response()
        sent += batch
        pause = start + sent / rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)


class Profiler:
    """py-spy sampling a process (wall time, idle included, one stack per thread)."""

    def __init__(self, pid: int, out: Path) -> None:
        binary = os.environ.get("PY_SPY") or shutil.which("py-spy")
        if binary is None:
            raise SystemExit("--profile needs py-spy on PATH (pip install py-spy) or $PY_SPY")
        self.out = out
        argv = [binary, "record", "--pid", str(pid), "--rate", "200", "--format", "raw", "--threads",
                "--idle", "--nonblocking", "--output", str(out)]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        self.proc.send_signal(2)  # SIGINT: py-spy writes what it sampled and exits
        self.proc.wait(30)


_FRAME_LINE = re.compile(r" \(([^:()]+):\d+\)$")


def _frame(raw: str) -> str:
    """``func (path/file.py:123)`` -> ``func (file.py)``: one row per function, not per line."""
    match = _FRAME_LINE.search(raw)
    if match is None:
        return raw
    return f"{raw[: match.start()]} ({Path(match.group(1)).name})"


def summarize_profile(raw: Path, label: str) -> str:
    """Per thread group: samples, top-10 functions by inclusive and by self (leaf) wall time."""
    groups: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    leaves: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    totals: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = stack.split(";")
        thread = frames[0].partition(": ")[2] or frames[0]
        group = re.sub(r"-\d+$", "-*", thread)  # notify-hook1-0, notify-hook1-1 -> notify-hook1-*
        count = int(count_text)
        totals[group] += count
        for name in dict.fromkeys(_frame(f) for f in frames[1:]):
            groups[group][name] += count
        if len(frames) > 1:
            leaves[group][_frame(frames[-1])] += count
    lines = [f"py-spy wall-time profile of the notifier worker ({label}); 200 samples/s, idle included", ""]
    for group in sorted(totals, key=lambda g: (g != "MainThread", g)):
        total = totals[group]
        lines.append(f"## {group}: {total} samples")
        lines.append("inclusive (frames under >= 98 % of the samples, the thread's roots, left out):")
        inner = [(name, c) for name, c in groups[group].most_common() if c < 0.98 * total]
        lines += [f"  {100 * c / total:5.1f} %  {name}" for name, c in inner[:10]]
        lines.append("self (leaf frame):")
        lines += [f"  {100 * c / total:5.1f} %  {name}" for name, c in leaves[group].most_common(10)]
        lines.append("")
    return "\n".join(lines)


def scenario(
    url: str, client: redis.Redis, workdir: Path, args: argparse.Namespace, *, healthy: int, hung: int,
    busy: Busy | None = None, profile: str | None = None,
) -> tuple[list[float], dict[str, float]]:  # fmt: skip
    """Latencies (ms) of every healthy receiver pooled, and facts about the run."""
    prefix = f"benchn{uuid.uuid4().hex[:6]}"
    keys = Keys(prefix)
    good = [Receiver() for _ in range(healthy)]
    stuck = [Receiver(hang=True) for _ in range(hung)]
    hooks = [(f"healthy{i}", r.url) for i, r in enumerate(good)] + [
        (f"stuck{i}", r.url) for i, r in enumerate(stuck)
    ]
    workers = [spawn_worker("notifiers", url, prefix, hooks, workdir) for _ in range(args.workers)]
    worker = workers[0]
    profiler = None
    facts: dict[str, float] = {}
    try:
        wait_ready(client, keys, count=args.workers)
        warm_up(client, keys, good)
        if profile:
            profiler = Profiler(worker.pid, workdir / "profile.raw")
        if busy is not None:
            busy.mark()
        cpu_before = sum(cpu_s(w.pid) for w in workers)
        sent = publish(client, keys, args.alerts, args.rate)
        values = [v for r in good for v in latencies_ms(sent, r.arrived)]
        facts["notifier_cpu_ms_per_alert"] = (
            (sum(cpu_s(w.pid) for w in workers) - cpu_before) * 1000 / args.alerts
        )
        if busy is not None:
            facts.update(busy.usage())
        if profiler is not None:
            profiler.stop()
            text = summarize_profile(profiler.out, profile)
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / "notifiers_profile.txt").write_text(text + "\n")
            print(text)
            profiler = None
        if stuck:
            facts["hung_requests"] = sum(len(r.arrived) for r in stuck)
        return values, facts
    finally:
        if profiler is not None:
            profiler.stop()
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait(10)
        for r in good + stuck:
            r.close()
        for key in client.scan_iter(f"{prefix}:*"):
            client.delete(key)


def baseline(url: str, client: redis.Redis, args: argparse.Namespace) -> list[float]:
    keys = Keys(f"benchr{uuid.uuid4().hex[:6]}")
    hook = Receiver()
    stop = threading.Event()
    seed = client.xadd(keys.alerts, {"d": b"{}"})  # the loop reads what comes after this entry
    thread = threading.Thread(target=raw_loop, args=(url, keys, hook.url, stop, seed), daemon=True)
    thread.start()
    try:
        warm_up(client, keys, [hook])
        return latencies_ms(publish(client, keys, args.alerts, args.rate), hook.arrived)
    finally:
        stop.set()
        thread.join(5)
        hook.close()
        for key in client.scan_iter(f"{keys.prefix}:*"):
            client.delete(key)


def spread(values: list[float]) -> str:
    """``min / median / max`` of per-round values."""
    return f"{min(values):.2f} / {median(values):.2f} / {max(values):.2f}"


def _spread_or_dash(values: list[float] | None) -> str:
    return spread(values) if values else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--alerts", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200.0, help="alerts per second")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--workers", type=int, default=1, help="notifier worker processes (they share the queues)"
    )
    parser.add_argument("--flood-rate", type=float, default=30000.0, help="events/s to the busy worker")
    parser.add_argument("--flood-agents", type=int, default=1000)
    parser.add_argument(
        "--only-busy", action="store_true", help="only the issue 17 scenario and its baseline"
    )
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the notifier worker (round 1, 4 notifiers)"
    )
    parser.add_argument("--redis-url", default=None, help="default: a private server (embedded launcher)")
    parser.add_argument(
        "--feed", nargs=4, metavar=("URL", "PREFIX", "RATE", "AGENTS"), help=argparse.SUPPRESS
    )
    parser.add_argument("--quick", action="store_true", help="one round of 500 alerts (run_all.py --quick)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.alerts = 1, 500
    if args.feed:
        url, prefix, rate, agents = args.feed
        feed(url, prefix, float(rate), int(agents))
        return
    server = None
    url = args.redis_url
    workdir = Path(tempfile.mkdtemp(prefix="aw-bench-"))
    if url is None:
        server = EmbeddedRedis(workdir / "redis").start()
        url = server.url
    client = redis.Redis.from_url(url)
    results: dict[str, list[list[float]]] = collections.defaultdict(list)
    facts: dict[str, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))

    def run(key: str, got: tuple[list[float], dict[str, float]]) -> None:
        results[key].append(got[0])
        for name, value in got[1].items():
            facts[key][name].append(value)

    loads = []
    try:
        for n in range(args.rounds):
            print(f"round {n + 1}/{args.rounds}")
            if not args.only_busy:
                results["baseline"].append(baseline(url, client, args))
                run("healthy", scenario(url, client, workdir, args, healthy=1, hung=0))
                run("beside hung", scenario(url, client, workdir, args, healthy=1, hung=1))
            busy = Busy(url, client, workdir, args)
            try:
                busy.mark()
                results["baseline, busy"].append(baseline(url, client, args))
                label = f"round {n + 1}, {BUSY}" if args.profile and n == 0 else None
                run(BUSY, scenario(url, client, workdir, args, healthy=3, hung=1, busy=busy, profile=label))
            finally:
                busy.stop()
            loads.append(os.getloadavg()[0])
    finally:
        client.close()
        if server:
            server.cleanup()
    names = {
        "baseline": ("baseline: raw XREAD + POST", "-"),
        "healthy": ("webhook notifier, healthy receiver", f"p99 <= {GOAL_ISSUE_5_MS:.0f} ms"),
        "beside hung": ("same, other notifier's receiver hung", f"p99 <= {GOAL_ISSUE_5_MS:.0f} ms"),
        "baseline, busy": ("baseline: raw XREAD + POST, busy worker", "-"),
        BUSY: (f"{BUSY} (3 receivers pooled)", f"p99 <= {GOAL_ISSUE_17_MS:.0f} ms"),
    }
    rows = []
    per_round: dict[str, dict[str, list[float]]] = {}
    for key, rounds in results.items():
        stat = {"p50": [percentile(v, 50) for v in rounds], "p99": [percentile(v, 99) for v in rounds],
                "p99.9": [percentile(v, 99.9) for v in rounds], "max": [max(v) for v in rounds]}  # fmt: skip
        per_round[key] = stat
        name, target = names[key]
        rows.append({"scenario": name, "samples": sum(len(v) for v in rounds) // len(rounds),
                     "p50 ms": spread(stat["p50"]), "p99 ms": spread(stat["p99"]),
                     "p99.9 ms": spread(stat["p99.9"]), "max ms": spread(stat["max"]),
                     "notifier CPU ms/alert": _spread_or_dash(facts[key].get("notifier_cpu_ms_per_alert")),
                     "target": target})  # fmt: skip
    figures = []
    if "healthy" in per_round:
        figures += [
            figure("alert->webhook p99, healthy", median(per_round["healthy"]["p99"]), "ms",
                   goal=GOAL_ISSUE_5_MS, issue=5),
            figure("alert->webhook p99, beside a hung notifier", median(per_round["beside hung"]["p99"]),
                   "ms", goal=GOAL_ISSUE_5_MS, issue=5),
        ]  # fmt: skip
    busy_p99, busy_p999 = median(per_round[BUSY]["p99"]), median(per_round[BUSY]["p99.9"])
    figures += [
        figure(f"alert->webhook p99, {BUSY}", busy_p99, "ms", goal=GOAL_ISSUE_17_MS, issue=17),
        figure(f"alert->webhook p99.9, {BUSY}", busy_p999, "ms", issue=17),
        figure("raw XREAD + POST p99, busy worker (baseline)", median(per_round["baseline, busy"]["p99"]),
               "ms", issue=17),
        # per round, against the baseline of the same round: the load at that moment hits both
        figure(f"p99 / raw baseline p99, {BUSY}",
               median([a / b for a, b in zip(per_round[BUSY]["p99"], per_round["baseline, busy"]["p99"],
                                              strict=True)]), "ratio", issue=17),
    ]  # fmt: skip
    extra = {
        "rate_per_s": args.rate, "alerts": args.alerts, "rounds": args.rounds,
        "flood_rate_per_s": args.flood_rate, "flood_agents": args.flood_agents,
        "per_round": per_round, "facts": {key: dict(value) for key, value in facts.items()},
        "loadavg_per_round": loads,
    }  # fmt: skip
    report("notifiers_latency", rows, extra, figures=figures)
    busy_facts = facts[BUSY]
    print(f"busy detector worker: {spread([100 * c for c in busy_facts['worker_cpu']])} % of a core "
          f"(min / median / max); feeder {spread([100 * c for c in busy_facts['feeder_cpu']])} %, "
          f"{spread(busy_facts['flood_per_s'])} events/s; "
          f"load average (1 min) after each round: {', '.join(f'{x:.1f}' for x in loads)}")  # fmt: skip
    for fig in figures:
        if fig["goal"] is not None:
            print(f"{fig['figure']}: {fig['value']:.1f} ms, goal <= {fig['goal']:.0f} ms "
                  f"{'met' if fig['met'] else 'MISSED'}")  # fmt: skip


if __name__ == "__main__":
    main()
