"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright): a
killed agent turns ``down`` without a reload, its alert shows, charts are drawn, hostile text
stays text, the page fits a phone, and the console stays clean.

``AGENTWATCH_SCREENSHOT=docs/images/fleet.png pytest tests/test_http_browser.py`` also saves the
fleet page's screenshot that README.md shows.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers import wait_for
from http_kit import Deployment, deployment, shared_prefix

# Real server processes: starting them takes seconds on a loaded machine (bounded, not hoped).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
CHROMIUM = os.environ.get("AGENTWATCH_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip

AGENT = """
import os, signal, time
import producers
producers.init(agent=os.environ["AW_NAME"], interval=0.2, pulse_interval=0.2)
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
n = 0
while True:
    n += 1
    producers.heartbeat(tokens=100 + (n % 7) * 40, cost=0.0004, model="gpt-4o-mini")
    time.sleep(0.2)
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright  # noqa: PLC0415 - only these tests need it
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)")
    with sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def dep(redis_url: str) -> Iterator[Deployment]:
    """One server and detector worker for the module's tests (each uses its own agent names)."""
    extra = '[detectors.silence]\nafter = "1s"\n'
    root = Path(tempfile.mkdtemp(prefix="aw-"))
    with (
        shared_prefix(redis_url) as prefix,
        deployment(root, prefix=prefix, redis_url=redis_url, token=None, extra=extra) as running,
    ):
        yield running
    shutil.rmtree(root, ignore_errors=True)


def start_agent(dep: Deployment, name: str, redis_url: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "AGENTWATCH_REDIS_URL": redis_url, "AGENTWATCH_PREFIX": dep.keys.prefix,
           "AW_NAME": name, "PYTHONUNBUFFERED": "1"}  # fmt: skip
    return subprocess.Popen([sys.executable, "-c", AGENT], env=env)


class Console:
    """Every console error and uncaught page error, to assert there were none."""

    def __init__(self, page: Any) -> None:
        self.errors: list[str] = []
        page.on("console", lambda msg: self.errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))


def test_a_killed_agent_turns_down_without_a_reload(dep: Deployment, browser: Any, redis_url: str) -> None:
    agents = [start_agent(dep, name, redis_url) for name in ("writer-1", "writer-2", "scraper")]
    try:
        wait_for(lambda: all(dep.status(n) for n in ("writer-1", "writer-2", "scraper")), timeout=60,
                 what="three agents in status")  # fmt: skip
        page = browser.new_page(viewport={"width": 1100, "height": 640})
        console = Console(page)
        page.goto(dep.base + "/")
        page.wait_for_selector('tr[data-agent="scraper"][data-state="ok"]', timeout=60_000)
        page.evaluate("window.__sameDocument = true")  # gone if the page reloads
        agents[2].send_signal(signal.SIGKILL)
        agents[2].wait(10)
        page.wait_for_selector('tr[data-agent="scraper"][data-state="down"]', timeout=60_000)
        assert page.evaluate("window.__sameDocument") is True
        assert page.inner_text('tr[data-agent="scraper"] .incident') == "silence"
        if os.environ.get("AGENTWATCH_SCREENSHOT"):
            page.screenshot(path=os.environ["AGENTWATCH_SCREENSHOT"])
        page.goto(dep.base + "/alerts")
        row = page.locator("table.alerts tbody tr", has_text="scraper")
        assert "silence" in row.first.inner_text() and "no heartbeat" in row.first.inner_text()
        assert console.errors == []
        page.close()
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.terminate()
                agent.wait(10)


def test_the_agent_page_draws_its_charts_and_fits_a_phone(
    dep: Deployment, browser: Any, redis_url: str
) -> None:
    agent = start_agent(dep, "charted", redis_url)
    try:
        wait_for(lambda: (s := dep.status("charted")) and s["tokens_total"] > 0, timeout=60, what="tokens")
        page = browser.new_page(viewport={"width": 390, "height": 800})  # a phone
        console = Console(page)
        page.goto(dep.base + "/agents/charted")
        page.wait_for_selector("svg.chart", timeout=10_000)
        assert page.locator("svg.chart").count() == 4
        wait_for(lambda: page.locator('svg.chart[data-metric="tokens"] rect.bar').count() > 0, timeout=10,
                 what="a tokens bar")  # fmt: skip
        chart = page.locator('svg.chart[data-metric="tokens"]')
        # the page redraws its charts on every poll: a box read during a redraw is None, so wait
        # for one drawn (a loaded machine made that instant likely enough to fail the run)
        wait_for(lambda: (b := chart.bounding_box()) is not None and b["width"] > 200 and b["height"] > 20,
                 timeout=10, what="the tokens chart drawn at least 200 px wide")  # fmt: skip
        assert page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
        assert console.errors == []
        page.close()
    finally:
        agent.terminate()
        agent.wait(10)


def test_hostile_text_is_shown_not_run(dep: Deployment, browser: Any) -> None:
    hostile = "<img src=x onerror=\"document.title='pwned'\"><script>document.title='pwned'</script>"
    answer = httpx.post(dep.ping_url("victim/fail"), json={"error": hostile}, timeout=10)
    assert answer.status_code == 200
    wait_for(lambda: dep.fired("victim", "exit"), timeout=15, what="the exit alert")
    page = browser.new_page()
    page.goto(dep.base + "/agents/victim")
    page.wait_for_selector("section.exit")
    assert page.title() == "agentwatch: victim"
    assert hostile in page.inner_text("section.exit")  # shown as the characters it is
    assert page.locator("section.exit img, section.exit script").count() == 0
    page.close()
