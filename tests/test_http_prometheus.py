"""``/metrics`` scraped by a real Prometheus server (Debian's ``prometheus``), which is asked
back for an agent's numbers through its HTTP API."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from conftest import free_port
from helpers import wait_for
from http_kit import TOKEN, deployment

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(240),
    pytest.mark.skipif(
        not Path(PROMETHEUS).exists(),
        reason="no prometheus binary (apt-get install prometheus; .ci/run does)",
    ),
]


def test_prometheus_scrapes_the_fleet(short_dir: Path, prefix: str, redis_url: str) -> None:
    with deployment(short_dir, prefix=prefix, redis_url=redis_url) as dep:
        answer = httpx.post(dep.ping_url("prom-bot"), json={"tokens": 1234, "cost": 0.5}, timeout=10)
        assert answer.status_code == 200
        target = dep.base.removeprefix("http://")
        (short_dir / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: agentwatch\n    scrape_interval: 1s\n    scrape_timeout: 900ms\n"
            f"    authorization:\n      credentials: {TOKEN}\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        port = free_port()
        with (short_dir / "prometheus.log").open("wb") as log:
            server = subprocess.Popen(
                [PROMETHEUS, f"--config.file={short_dir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={short_dir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:

            def value(query: str) -> str | None:
                try:
                    reply = httpx.get(
                        f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}, timeout=5
                    )
                except httpx.TransportError:
                    return None
                results = reply.json().get("data", {}).get("result", []) if reply.status_code == 200 else []
                return str(results[0]["value"][1]) if results else None

            query = 'agentwatch_agent_tokens_total{agent="prom-bot",job="agentwatch"}'
            tokens = wait_for(
                lambda: value(query), timeout=60, interval=0.5, what="Prometheus to scrape agentwatch"
            )
            assert tokens == "1234"
            assert value('agentwatch_agent_cost_usd_total{agent="prom-bot"}') == "0.5"
            assert value('agentwatch_agent_state{agent="prom-bot",agentwatch_agent_state="ok"}') == "1"
            assert value('up{job="agentwatch"}') == "1"  # scraped with the bearer token, not refused
        finally:
            server.terminate()
            server.wait(20)
