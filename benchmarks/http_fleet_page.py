"""The dashboard's fleet page with a large fleet: server time to render, and bytes sent.

10,000 agents (start + a beat with tokens each, applied by the real detector engine), then the
page is requested back to back through the real app (Starlette's in-process client: the
server's whole work, no network), as a dashboard left open polls it: the fleet's status comes
from the server's cache, re-read in the background while it is served (agentwatch/http/server.py,
FleetCache), so those reads compete for the same CPU. A page opened cold waits for one status
read first: the first row (``fleet_status`` alone, what ``agentwatch status --json`` reads)
is that extra time. Pages show ``[http] page_size`` agents (100) each; the others are a page
link away. Target (issue 14): polled full page p99 <= 300 ms.

    python benchmarks/http_fleet_page.py [--agents 10000] [--requests 30] [--quick] [--redis-url URL]

``--quick``: the same 10,000 agents, 10 requests per kind (run_all's quick mode; its p99 is then
the worst of 10).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import figure, median, percentile, redis_server, report

from agentwatch import codec, config, loading
from agentwatch.fleet import fleet_status
from agentwatch.http.app import create_app
from agentwatch.redisconn import connect
from agentwatch.workers import detector_worker

with warnings.catch_warnings():  # starlette's note about its next test client: not ours to act on
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient


def populate(pipeline: config.Pipeline, url: str, agents: int) -> None:
    """Every agent starts and beats once, through the detector worker, until it is caught up."""
    client = connect(pipeline.settings, url)
    stream = pipeline.keys.events()
    pipe = client.pipeline(transaction=False)
    for i in range(agents):
        for seq, kind in enumerate(("start", "beat")):
            event = {"v": 1, "agent": f"agent-{i:05d}", "kind": kind, "ts": time.time(), "run": f"r{i}",
                     "seq": seq, "interval": 30.0, "tokens": 100 + i % 900}  # fmt: skip
            if kind == "start":
                del event["tokens"]
            pipe.xadd(stream, {"d": codec.encode(event)})
        if i % 2000 == 1999:
            pipe.execute()
    pipe.execute()
    worker = detector_worker(pipeline, client)
    thread = threading.Thread(target=worker.run, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        groups = client.xinfo_groups(stream)
        if groups and all(g["lag"] == 0 and g["pending"] == 0 for g in groups):
            break
        time.sleep(0.2)
    worker.stop()
    thread.join(30)
    client.close()


def timed(call: object, count: int) -> tuple[list[float], int]:
    """(durations in ms, bytes of the last answer) of ``count`` calls."""
    durations, size = [], 0
    for _ in range(count):
        start = time.perf_counter()
        answer = call()  # type: ignore[operator]
        durations.append((time.perf_counter() - start) * 1000)
        size = len(answer.content) if hasattr(answer, "content") else 0
    return durations, size


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=None, help="default 30 (--quick: 10)")
    parser.add_argument("--quick", action="store_true", help="10 requests per kind")
    parser.add_argument("--redis-url")
    args = parser.parse_args()
    args.requests = args.requests or (10 if args.quick else 30)
    rows = []
    with redis_server(args.redis_url) as url:
        settings = config.PipelineSettings().model_copy(
            update={"redis": config.RedisSection(url=url, prefix=f"benchfleet{os.getpid()}")}
        )
        builtins = loading.load(None).detectors  # as `agentwatch up` runs them
        pipeline = config.Pipeline(settings=settings, source="benchmark", detectors=builtins)
        populate(pipeline, url, args.agents)
        client = connect(settings, url)
        status_ms, _ = timed(lambda: fleet_status(client, pipeline), args.requests)
        client.close()
        with TestClient(create_app(pipeline, url)) as http:
            first = http.get("/")
            assert first.status_code == 200 and first.text.count("data-agent=") == settings.http.page_size
            page_ms, page_bytes = timed(lambda: http.get("/"), args.requests)
            partial_ms, partial_bytes = timed(lambda: http.get("/?partial=1"), args.requests)
            last_ms, _ = timed(
                lambda: http.get(f"/?page={args.agents // settings.http.page_size}"), args.requests
            )
    for what, values, size in (
        ("status read (a cold page adds it)", status_ms, None),
        ("fleet page, polled", page_ms, page_bytes),
        ("fleet page, live refresh (?partial=1)", partial_ms, partial_bytes),
        ("fleet page, last page, polled", last_ms, None),
    ):
        rows.append({"what": what, "agents": args.agents, "p50 ms": median(values),
                     "p99 ms": percentile(values, 99), "max ms": max(values),
                     "bytes": size if size is not None else ""})  # fmt: skip
    figures = [
        figure(
            "fleet page render p99, 10k agents, polled", percentile(page_ms, 99), "ms", goal=300, issue=14
        ),
        figure("fleet page render p50, 10k agents, polled", median(page_ms), "ms", issue=14),
        figure("status read, 10k agents (cold page)", median(status_ms), "ms", issue=14),
        figure("fleet page bytes", page_bytes, "B", issue=14),
    ]
    report("http_fleet_page", rows, {"requests": args.requests}, figures)


if __name__ == "__main__":
    main()
