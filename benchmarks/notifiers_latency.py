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

After the rounds, the 4-notifier scenario runs once more (``--profile-alerts``, not counted in any
figure) with the notifier worker under cProfile, every thread timed by its own CPU time
(``time.thread_time``: waiting for a socket or the GIL costs nothing), and the summary goes to
the JSON (``profile``), to the output and to ``benchmarks/results/notifiers_profile.txt``: CPU
per thread group and per delivery, the functions with the most CPU of their own, and the
project's functions by inclusive CPU. ``--no-profile`` skips that pass. cProfile slows what it
times (2-3x here), so read shares, not absolute times.

    python benchmarks/notifiers_latency.py [--alerts 1000] [--rate 200] [--rounds 3] [--workers 1]
        [--flood-rate 30000] [--only-busy] [--no-profile] [--profile-alerts 300] [--quick]
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import signal
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
    kind: str, url: str, prefix: str, hooks: list[tuple[str, str]], workdir: Path, profile: Path | None = None
) -> subprocess.Popen[bytes]:
    """``agentwatch worker <kind>`` in its own process, default settings but for the URLs;
    with ``profile``, under cProfile (:func:`profiled_worker`), its stats written beside it."""
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
    if profile is not None:
        argv[1:3] = [__file__, "--profiled-worker", str(profile)]
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


def profiled_worker(out: str, argv: list[str]) -> None:
    """``agentwatch <argv>`` in this process, each thread under its own cProfile timed by its own
    CPU time: the delivery threads from their start, the main thread from SIGUSR1 (sent after
    the warm-up: its start-up, imports and plugin loading, is not what we look at). At exit each
    thread's stats go to ``<out>.<thread name>``."""
    import atexit  # noqa: PLC0415 - only in the profiled worker
    import cProfile  # noqa: PLC0415

    profiles: dict[str, cProfile.Profile] = {}

    def start(*_: Any) -> None:  # the first event of a thread (or SIGUSR1): profile it from here
        name = threading.current_thread().name
        if name not in profiles:
            # This thread's CPU clock, whichever thread reads it: at exit, the main thread closes
            # the calls still open in the others (a delivery thread waiting on a socket).
            clock = functools.partial(time.clock_gettime, time.pthread_getcpuclockid(threading.get_ident()))
            profiles[name] = profile = cProfile.Profile(clock)
            profile.enable()

    def dump() -> None:
        for name, profile in profiles.items():
            profile.disable()
            profile.dump_stats(f"{out}.{name}")

    atexit.register(dump)
    threading.setprofile(start)
    signal.signal(signal.SIGUSR1, start)
    sys.argv = ["agentwatch", *argv]
    from agentwatch.cli import main as cli  # noqa: PLC0415

    cli()


def _where(func: tuple[str, int, str]) -> str:
    path, line, name = func
    return name if path == "~" else f"{name} ({Path(path).name}:{line})"


def _group(thread: str) -> str:
    if thread == "MainThread":
        return "main thread (read, route, queue)"
    if thread.startswith("notify-healthy"):
        return "delivery threads, healthy notifiers"
    if thread.startswith("notify-stuck"):
        return "delivery threads, hung notifier"
    return "other threads"


def summarize_profile(prefix: Path, alerts: int, deliveries: int) -> tuple[str, dict[str, Any]]:
    """Per thread group: CPU seconds, CPU per alert (main thread: ``alerts`` after the warm-up)
    or per delivery (delivery threads: ``deliveries``, warm-up included), top-10 functions by
    their own CPU and the project's top-10 by inclusive CPU. Text for people, a dict for the JSON."""
    import pstats  # noqa: PLC0415

    files: dict[str, list[str]] = collections.defaultdict(list)
    for path in sorted(prefix.parent.glob(prefix.name + ".*")):
        files[_group(path.name[len(prefix.name) + 1 :])].append(str(path))
    summary: dict[str, Any] = {"alerts": alerts, "deliveries": deliveries, "groups": {}}
    lines = [f"cProfile of the notifier worker, CPU time per thread ({alerts} alerts, {deliveries} "
             "deliveries to healthy receivers; cProfile's own overhead included: compare shares, not "
             "absolute times)", ""]  # fmt: skip
    for group in sorted(files):
        stats = pstats.Stats(*files[group])
        raw: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = stats.stats  # type: ignore[attr-defined]
        total = max(float(stats.total_tt), 1e-9)  # type: ignore[attr-defined]
        own = sorted(raw.items(), key=lambda kv: -kv[1][2])[:10]
        ours = [kv for kv in raw.items() if "/agentwatch/" in kv[0][0] or "/notifiers/" in kv[0][0]]
        inclusive = [kv for kv in sorted(ours, key=lambda kv: -kv[1][3]) if kv[1][3] < 0.98 * total][:10]
        unit, count = ("alert", alerts) if group.startswith("main") else ("delivery", deliveries)
        if "healthy" not in group and not group.startswith("main"):
            unit, count = "", 0
        per = 1e6 * total / count if count else 0.0
        entry = {
            "cpu_s": round(total, 3), "threads": len(files[group]),
            **({f"cpu_us_per_{unit}": round(per, 1)} if unit else {}),
            "self": [[_where(f), round(100 * v[2] / total, 1)] for f, v in own],
            "inclusive": [[_where(f), round(100 * v[3] / total, 1)] for f, v in inclusive],
        }  # fmt: skip
        summary["groups"][group] = entry
        lines.append(f"## {group}: {total:.2f} s CPU over {len(files[group])} thread(s)"
                     + (f", {per:.0f} us per {unit}" if unit else ""))  # fmt: skip
        lines.append("own CPU (top 10):")
        lines += [f"  {share:5.1f} %  {name}" for name, share in entry["self"]]
        lines.append("inclusive CPU, agentwatch's functions (top 10, the thread's roots left out):")
        lines += [f"  {share:5.1f} %  {name}" for name, share in entry["inclusive"]]
        lines.append("")
    return "\n".join(lines), summary


def scenario(
    url: str, client: redis.Redis, workdir: Path, args: argparse.Namespace, *, healthy: int, hung: int,
    busy: Busy | None = None, profile: Path | None = None,
) -> tuple[list[float], dict[str, float]]:  # fmt: skip
    """Latencies (ms) of every healthy receiver pooled, and facts about the run."""
    prefix = f"benchn{uuid.uuid4().hex[:6]}"
    keys = Keys(prefix)
    good = [Receiver() for _ in range(healthy)]
    stuck = [Receiver(hang=True) for _ in range(hung)]
    hooks = [(f"healthy{i}", r.url) for i, r in enumerate(good)] + [
        (f"stuck{i}", r.url) for i, r in enumerate(stuck)
    ]
    workers = [spawn_worker("notifiers", url, prefix, hooks, workdir, profile if n == 0 else None)
               for n in range(args.workers)]  # fmt: skip
    facts: dict[str, float] = {}
    try:
        wait_ready(client, keys, count=args.workers)
        warm_up(client, keys, good)
        if profile is not None:
            workers[0].send_signal(signal.SIGUSR1)  # the main thread's profile starts here
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
        if stuck:
            facts["hung_requests"] = sum(len(r.arrived) for r in stuck)
        return values, facts
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait(10)
        for r in good + stuck:
            r.close()
        for key in client.scan_iter(f"{prefix}:*"):
            client.delete(key)


def profiled_pass(
    url: str, client: redis.Redis, workdir: Path, args: argparse.Namespace
) -> tuple[str, dict[str, Any]]:
    """The 4-notifier scenario once more, busy worker included, with the notifier worker under
    cProfile (:func:`profiled_worker`); not counted in any figure."""
    print("profiled pass (not measured)")
    prefix = workdir / "profile"
    busy = Busy(url, client, workdir, args)
    try:
        alerts = argparse.Namespace(**{**vars(args), "alerts": args.profile_alerts, "workers": 1})
        scenario(url, client, workdir, alerts, healthy=3, hung=1, busy=busy, profile=prefix)
    finally:
        busy.stop()
    return summarize_profile(prefix, args.profile_alerts, 3 * (args.profile_alerts + WARM_UP))


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
        "--no-profile", action="store_true", help="skip the profiled pass (cProfile, after the rounds)"
    )
    parser.add_argument("--profile-alerts", type=int, default=300, help="alerts in the profiled pass")
    parser.add_argument("--redis-url", default=None, help="default: a private server (embedded launcher)")
    parser.add_argument(
        "--feed", nargs=4, metavar=("URL", "PREFIX", "RATE", "AGENTS"), help=argparse.SUPPRESS
    )
    parser.add_argument("--quick", action="store_true", help="one round of 500 alerts (run_all.py --quick)")
    if sys.argv[1:2] == ["--profiled-worker"]:
        profiled_worker(sys.argv[2], sys.argv[3:])
        return
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
    profile_text, profile = "", None
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
                run(BUSY, scenario(url, client, workdir, args, healthy=3, hung=1, busy=busy))
            finally:
                busy.stop()
            loads.append(os.getloadavg()[0])
        if not args.no_profile:
            profile_text, profile = profiled_pass(url, client, workdir, args)
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
        "loadavg_per_round": loads, "profile": profile,
    }  # fmt: skip
    report("notifiers_latency", rows, extra, figures=figures)
    if profile_text:
        (RESULTS / "notifiers_profile.txt").write_text(profile_text + "\n")
        print(f"\n{profile_text}")
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
