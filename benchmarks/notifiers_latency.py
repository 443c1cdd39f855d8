"""Alert on the stream -> webhook receiver has it: p50/p99 over N alerts, notifier worker vs a raw loop.

Alerts are published exactly as detectors publish them (``Incidents.fire``: Lua + XADD) at a
steady rate, after 20 unmeasured warm-up alerts; the clock starts just before the publish call
and stops when the receiver (a threaded ``http.server`` on 127.0.0.1, in this process) has read
the request. The notifier
worker runs as its own process (``agentwatch worker notifiers``), with default settings except
the notifier URLs. Scenarios:

* baseline - a raw loop in this process: XREAD BLOCK on the alerts stream + one httpx POST per
  alert (no consumer group, no queue, no retries): the floor for this machine;
* healthy - one webhook notifier;
* healthy, other hung - the same, plus a second webhook notifier whose receiver accepts every
  request and never answers: the healthy notifier's figure must not move.

Target (issue 5): p99 <= 100 ms in both notifier scenarios.

    python benchmarks/notifiers_latency.py [--alerts 1000] [--rate 200] [--redis-url URL]
"""

from __future__ import annotations

import argparse
import os
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
from _common import percentile, report

from agentwatch.alerts import Incidents, decode_alert
from agentwatch.embedded import EmbeddedRedis
from agentwatch.keys import Keys

WARM_UP = 20


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


def worker_process(
    url: str, prefix: str, hooks: list[tuple[str, str]], workdir: Path
) -> subprocess.Popen[bytes]:
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
        "notifiers",
        "--config",
        str(config),
        "--log-level",
        "error",
    ]
    return subprocess.Popen(argv, env=env)


def wait_ready(client: redis.Redis, keys: Keys, timeout_s: float = 20.0) -> None:
    """The worker is up once it published its first health record (after its notifiers started)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.zcard(keys.workers):
            return
        time.sleep(0.05)
    raise SystemExit("the notifier worker did not start")


def warm_up(client: redis.Redis, keys: Keys, hook: Receiver) -> None:
    """A few alerts first, not measured: connections, script loads, lazy imports in the worker."""
    latencies_ms(publish(client, keys, WARM_UP, 50.0, tag="warm"), hook.arrived)


def scenario(
    url: str, client: redis.Redis, workdir: Path, args: argparse.Namespace, hung: bool
) -> list[float]:
    prefix = f"benchn{uuid.uuid4().hex[:6]}"
    keys = Keys(prefix)
    healthy = Receiver()
    stuck = Receiver(hang=True) if hung else None
    hooks = [("healthy", healthy.url)] + ([("stuck", stuck.url)] if stuck else [])
    worker = worker_process(url, prefix, hooks, workdir)
    try:
        wait_ready(client, keys)
        warm_up(client, keys, healthy)
        sent = publish(client, keys, args.alerts, args.rate)
        values = latencies_ms(sent, healthy.arrived)
        if stuck is not None:
            print(f"  (the hung receiver got {len(stuck.arrived)} requests and answered none)")
        return values
    finally:
        worker.terminate()
        worker.wait(10)
        healthy.close()
        if stuck is not None:
            stuck.close()
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
        warm_up(client, keys, hook)
        return latencies_ms(publish(client, keys, args.alerts, args.rate), hook.arrived)
    finally:
        stop.set()
        thread.join(5)
        hook.close()
        for key in client.scan_iter(f"{keys.prefix}:*"):
            client.delete(key)


def row(name: str, values: list[float], target: str) -> dict[str, Any]:
    return {"scenario": name, "alerts": len(values), "p50 ms": percentile(values, 50),
            "p99 ms": percentile(values, 99), "max ms": max(values), "target": target}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--alerts", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200.0, help="alerts per second")
    parser.add_argument("--redis-url", default=None, help="default: a private server (embedded launcher)")
    args = parser.parse_args()
    server = None
    url = args.redis_url
    workdir = Path(tempfile.mkdtemp(prefix="aw-bench-"))
    if url is None:
        server = EmbeddedRedis(workdir / "redis").start()
        url = server.url
    client = redis.Redis.from_url(url)
    try:
        print("baseline: raw XREAD + POST loop ...")
        raw = baseline(url, client, args)
        print("healthy notifier ...")
        healthy = scenario(url, client, workdir, args, hung=False)
        print("healthy notifier while another notifier's receiver hangs ...")
        beside_hung = scenario(url, client, workdir, args, hung=True)
    finally:
        client.close()
        if server:
            server.cleanup()
    rows = [
        row("baseline: raw XREAD + POST", raw, "-"),
        row("webhook notifier, healthy receiver", healthy, "p99 <= 100 ms"),
        row("same, other notifier's receiver hung", beside_hung, "p99 <= 100 ms"),
    ]
    report("notifiers_latency", rows, {"rate_per_s": args.rate, "alerts": args.alerts})
    ok = all(r["p99 ms"] <= 100 for r in rows[1:])
    print(f"p99 target (<= 100 ms) {'met' if ok else 'MISSED'}")


if __name__ == "__main__":
    main()
