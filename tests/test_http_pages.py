"""The dashboard's pages, access rules, badges and /metrics over real HTTP against a running
``agentwatch serve`` and detector worker; hostile agent text stays text."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from agents_detect.kit import Agent
from prometheus_client.parser import text_string_to_metric_families

from agentwatch.halts import Halts
from agentwatch.maintenance import AdhocWindows
from notifiers.routing import Mutes

from conftest import free_port
from helpers import wait_for
from http_kit import PING_KEY, TOKEN, Deployment, deployment, shared_prefix
from notify_kit import Reply, receiver

# Real server processes: starting them takes seconds on a loaded machine (bounded, not hoped).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
SCRIPT = "<script>document.title='pwned'</script>"


@pytest.fixture(scope="module")
def dep(redis_url: str) -> Iterator[Deployment]:
    """One server and detector worker for the module's tests (each uses its own agent names)."""
    extra = '[detectors.stall.agents."stuck-*"]\nafter = "1s"\n'
    root = Path(tempfile.mkdtemp(prefix="aw-"))
    with (
        shared_prefix(redis_url) as prefix,
        deployment(root, prefix=prefix, redis_url=redis_url, extra=extra) as running,
    ):
        yield running
    shutil.rmtree(root, ignore_errors=True)


def beat(dep: Deployment, agent: str, **body: Any) -> None:
    assert httpx.post(dep.ping_url(agent), json=body or None, timeout=10).status_code == 200


def seen(dep: Deployment, agent: str, **expected: Any) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        status = dep.status(agent)
        return status if status and all(status.get(k) == v for k, v in expected.items()) else None

    return wait_for(check, timeout=10, what=f"{agent} with {expected}")


def test_pages_show_the_fleet_an_agent_and_its_alerts(dep: Deployment) -> None:
    beat(dep, "writer", tokens=1200, model="gpt-4o")
    state = seen(dep, "writer", tokens_total=1200)["state"]
    with dep.client() as http:
        fleet = http.get("/")
        assert fleet.status_code == 200 and 'data-agent="writer"' in fleet.text
        assert "text/html" in fleet.headers["content-type"]
        assert "script-src 'self'" in fleet.headers["content-security-policy"]
        partial = http.get("/?partial=1")
        assert partial.text.lstrip().startswith("<section") and "<html" not in partial.text
        agent = http.get("/agents/writer")
        assert agent.status_code == 200 and agent.text.count('class="chart"') == 4
        assert "1,200 tokens" in agent.text
        assert http.get("/alerts").status_code == 200
        missing = http.get("/agents/nobody")
        assert missing.status_code == 404 and "no such agent" in missing.text
        filtered = http.get("/", params={"q": "wri*", "state": state})
        assert 'data-agent="writer"' in filtered.text
        other = "down" if state != "down" else "ok"
        assert 'data-agent="writer"' not in http.get("/", params={"state": other}).text
        assert 'data-agent="writer"' not in http.get("/", params={"q": "other"}).text


def test_agent_text_is_escaped_everywhere(dep: Deployment) -> None:
    # Names with markup cannot exist (the protocol's charset): refused at the door...
    answer = httpx.get(dep.ping_url("%3Cscript%3Ealert(1)%3C%2Fscript%3E"), timeout=10)
    assert answer.status_code == 400 and "outside A-Za-z0-9._:@/-" in answer.text
    # ...and so are "." and ".." path segments (PROTOCOL.md), but dots and slashes are valid
    # names, and free text (errors, stacks) carries anything.
    answer = httpx.get(dep.ping_url("..%2F..%2Fetc%2Fpasswd"), timeout=10)
    assert answer.status_code == 400 and "has a '.' or '..' path segment" in answer.text
    bot = Agent(dep.r, dep.keys, "stuck-../..x/etc/passwd")
    bot.start()
    bot.beat()
    stack = f"File 'x.py', line 1\n</pre>{SCRIPT}"
    dot = Agent(dep.r, dep.keys, "...")
    dot.start()
    dot.exit("exception", 1, error=f"ValueError: {SCRIPT}", traceback=f"Traceback\n{SCRIPT}")

    def stalled() -> bool:
        bot.pulse(stack=stack)  # the process lives (pulses) but its loop does not beat: a stall
        return any(a.detector == "stall" for a in dep.alerts())

    wait_for(stalled, timeout=60, interval=0.2, what="a stall with a stack")
    links = ('href="/agents/stuck-..%2F..x%2Fetc%2Fpasswd"', 'href="/agents?agent=..."')
    with dep.client() as http:

        def fleet_with_both() -> str | None:
            text = http.get("/").text
            return text if all(link in text for link in links) else None

        fleet = wait_for(fleet_with_both, timeout=10, what="both agents on the fleet page (cached a moment)")
        pages = [fleet, http.get("/alerts").text]
        pages.append(http.get("/agents/stuck-..%2F..x%2Fetc%2Fpasswd").text)
        pages.append(http.get("/agents", params={"agent": "..."}).text)
    for page in pages:
        assert SCRIPT not in page and "<script>document" not in page
    assert "&lt;script&gt;document.title=&#39;pwned&#39;&lt;/script&gt;" in pages[3]  # the exit's error
    assert "&lt;/pre&gt;&lt;script&gt;" in pages[2]  # the stuck stack


def test_protected_routes_need_the_token_and_secrets_never_show(dep: Deployment) -> None:
    beat(dep, "quiet")
    seen(dep, "quiet")
    with dep.client(auth=False) as anonymous:
        for path in ("/", "/alerts", "/agents/quiet", "/metrics", "/api/status"):
            refused = anonymous.get(path)
            assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
        page = anonymous.get("/", headers={"Accept": "text/html"})
        assert page.status_code == 303 and page.headers["location"] == "/login?next=%2F"
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.get("/badge/quiet.svg").status_code == 200
        wrong = anonymous.post("/login", data={"token": "guess", "next": "/"}, headers={"Origin": dep.base})
        assert wrong.status_code == 401
        right = anonymous.post(
            "/login", data={"token": TOKEN, "next": "/alerts"}, headers={"Origin": dep.base}
        )
        assert right.status_code == 303 and right.headers["location"] == "/alerts"
        cookie = right.headers["set-cookie"]
        assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower() and TOKEN not in cookie
        assert anonymous.get("/alerts").status_code == 200  # the session cookie
    with dep.client() as http:
        bodies = [http.get(p).text for p in ("/", "/alerts", "/agents/quiet", "/metrics", "/api/status")]
    for body in bodies:
        assert PING_KEY not in body and TOKEN not in body


def test_mute_and_unmute_from_the_page(dep: Deployment) -> None:
    beat(dep, "noisy")
    seen(dep, "noisy")
    mutes = Mutes(dep.r, dep.keys)
    with dep.client() as http:
        form = {"agent": "noisy", "for": "1h", "reason": "deploying", "next": "/agents/noisy"}
        refused = http.post("/actions/mute", data=form, headers={"Origin": "http://evil.example"})
        assert refused.status_code == 403 and not mutes.active()
        done = http.post("/actions/mute", data=form, headers={"Origin": dep.base})
        assert done.status_code == 303 and done.headers["location"] == "/agents/noisy"
        (mute,) = mutes.active()
        assert (mute.agent, mute.detector, mute.reason) == ("noisy", None, "deploying")
        assert mute.by.startswith("dashboard")
        assert "Muted (all detectors)" in http.get("/agents/noisy").text
        seen(dep, "noisy", state="muted")
        gone = http.post("/actions/unmute", data={"agent": "noisy", "next": "//evil.example"})
        assert gone.status_code == 303 and gone.headers["location"] == "/"  # never off-site
        assert not mutes.active()


def test_a_maintenance_window_shows_on_the_agent_page_and_in_metrics(dep: Deployment) -> None:
    for name in ("deploying-bot", "bystander"):
        beat(dep, name)
        seen(dep, name)
    window = AdhocWindows(dep.r, dep.keys).start(600, agents=["deploying-*"], reason="deploy")
    try:
        with dep.client() as http:
            page = http.get("/agents/deploying-bot").text
            assert 'id="maintenance"' in page and window.id in page

            def in_maintenance() -> bool:
                text = http.get("/metrics").text
                return 'agentwatch_agent_in_maintenance{agent="deploying-bot"} 1.0' in text

            wait_for(in_maintenance, timeout=10, what="the agent in maintenance in /metrics")
            bystander = http.get("/agents/bystander")
            assert bystander.status_code == 200 and 'id="maintenance"' not in bystander.text
    finally:
        AdhocWindows(dep.r, dep.keys).stop(window.id)


def test_halt_and_resume_from_the_page(dep: Deployment) -> None:
    beat(dep, "braked")
    seen(dep, "braked")
    halts = Halts(dep.r, dep.keys)
    with dep.client() as http:
        bad = http.post("/actions/halt", data={"agent": "braked", "reason": "line\nbreak"})
        assert bad.status_code == 400 and "printable text only" in bad.text and not halts.halting("braked")
        form = {"agent": "braked", "reason": "budget spent", "next": "/agents/braked"}
        assert http.post("/actions/halt", data=form).status_code == 303
        (halt,) = halts.halting("braked")
        assert (halt.reason, halt.by.startswith("dashboard")) == ("budget spent", True)
        assert "Halted by glob" in http.get("/agents/braked").text
        assert http.post("/actions/resume", data={"agent": "braked"}).status_code == 303
        assert not halts.halting("braked")
    assert [a.status for a in dep.alerts() if a.detector == "halt" and a.agent == "braked"] == [
        "firing",
        "resolved",
    ]


def test_without_a_token_pages_are_open_on_loopback_but_actions_are_off(
    short_dir: Path, prefix: str, redis_url: str
) -> None:
    with deployment(short_dir, prefix=prefix, redis_url=redis_url, workers=(), token=None) as dep:
        http = dep.client()
        assert http.get("/").status_code == 200
        assert 'action="/actions/mute"' not in http.get("/agents/x").text
        refused = http.post("/actions/mute", data={"agent": "x", "for": "1h"})
        assert refused.status_code == 403 and "[http] token" in refused.text
        http.close()


def test_a_public_bind_without_a_token_is_refused_at_start(
    short_dir: Path, prefix: str, redis_url: str
) -> None:
    config = short_dir / "pipeline.toml"
    config.write_text(f'[redis]\nurl = "{redis_url}"\nprefix = "{prefix}"\n')
    argv = ["serve", "--config", str(config), "--bind", f"0.0.0.0:{free_port()}"]
    done = subprocess.run(
        [sys.executable, "-m", "agentwatch", *argv], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert "is not a loopback address, and [http] token is not set" in done.stderr


def test_badges_say_up_down_or_unknown(dep: Deployment) -> None:
    beat(dep, "api-bot")
    seen(dep, "api-bot", state="ok")  # late only after 60 s without a beat (half the stall allowance)
    with httpx.Client(base_url=dep.base) as http:
        svg = http.get("/badge/api-bot.svg")
        assert svg.status_code == 200 and svg.headers["content-type"] == "image/svg+xml"
        assert "<title>api-bot: up</title>" in svg.text and "max-age=30" in svg.headers["cache-control"]
        assert http.get("/badge/api-bot.json").json() == {
            "schemaVersion": 1, "label": "api-bot", "message": "up", "color": "brightgreen",
        }  # fmt: skip
        assert httpx.get(dep.ping_url("api-bot/fail"), timeout=10).status_code == 200
        seen(dep, "api-bot", state="exited")
        assert http.get("/badge/api-bot.json").json()["message"] == "down"
        unknown = http.get("/badge/nobody.svg")
        assert unknown.status_code == 404 and "nobody: unknown" in unknown.text


def _scrape(dep: Deployment) -> dict[str, Any]:
    with dep.client() as http:
        return {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}


def test_metrics_follow_prometheus_conventions_and_forgotten_agents_leave(dep: Deployment) -> None:
    beat(dep, "alpha", tokens=50, cost=0.25)
    beat(dep, "beta", tokens=7)
    seen(dep, "alpha", tokens_total=50)
    seen(dep, "beta", tokens_total=7)
    families = _scrape(dep)
    tokens = {s.labels["agent"]: s.value for s in families["agentwatch_agent_tokens"].samples}
    assert (tokens["alpha"], tokens["beta"]) == (50, 7)
    assert families["agentwatch_agent_tokens"].type == "counter"
    cost = {s.labels["agent"]: s.value for s in families["agentwatch_agent_cost_usd"].samples}
    assert cost["alpha"] == 0.25
    states = {(s.labels["agent"], s.labels["agentwatch_agent_state"]): s.value
              for s in families["agentwatch_agent_state"].samples}  # fmt: skip
    assert states[("alpha", "ok")] == 1 and states[("alpha", "down")] == 0
    assert families["agentwatch_workers"].samples[0].labels == {"kind": "detectors"}
    assert families["agentwatch_pipeline_detecting"].samples[0].value == 1
    assert families["agentwatch_redis_up"].samples[0].value == 1
    dep.r.hdel(dep.keys.states(0), "beta")  # what `forget` does to the detectors' record

    def beta_gone() -> bool:
        samples = _scrape(dep)["agentwatch_agent_tokens"].samples
        return "beta" not in {s.labels["agent"] for s in samples}

    wait_for(beta_gone, timeout=10, what="a forgotten agent's series to go")


def test_up_starts_the_dashboard_and_prints_its_url(short_dir: Path) -> None:
    port = free_port()
    config = short_dir / "pipeline.toml"
    config.write_text(
        f'[redis]\nurl = "embedded"\n[embedded]\nstate_dir = "{short_dir / "state"}"\nport = 0\n'
        f'[http]\nbind = "127.0.0.1:{port}"\n'
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "agentwatch", "up", "--config", str(config), "--log-level", "warning"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        lines: list[str] = []
        while not lines or (lines[-1] and "Ctrl-C to stop." not in lines[-1]):
            lines.append(process.stdout.readline())  # the banner ends with that line
        assert f"dashboard: http://127.0.0.1:{port}/\n" in lines, lines
        page = wait_for(lambda: _get(f"http://127.0.0.1:{port}/"), timeout=60, what="the dashboard")
        assert "agentwatch: fleet" in page
    finally:
        process.terminate()
        process.wait(15)
        if process.stdout:
            process.stdout.close()


def _get(url: str) -> str | None:
    try:
        answer = httpx.get(url, timeout=2)
    except httpx.TransportError:
        return None
    return answer.text if answer.status_code == 200 else None


def test_the_alerts_page_shows_what_each_notifier_did(short_dir: Path, prefix: str, redis_url: str) -> None:
    with receiver() as good, receiver() as bad:
        bad.default = Reply(status=500, body=b"receiver exploded")
        timing = 'backoff = "50ms"\nbackoff_max = "100ms"\ntimeout = "2s"\n'
        extra = "".join(
            f'[[notifiers]]\ntype = "webhook"\nname = "{name}"\nurl = "{where.url}"\n{timing}{more}'
            for name, where, more in (("good", good, ""), ("bad", bad, "max_attempts = 2\n"))
        )
        with deployment(short_dir, prefix=prefix, redis_url=redis_url, workers=("detectors", "notifiers"),
                        extra=extra) as dep:  # fmt: skip
            assert (
                httpx.post(dep.ping_url("deliv/fail"), json={"error": "boom"}, timeout=10).status_code == 200
            )
            wait_for(lambda: dep.r.xlen(dep.keys.notify_failed) == 1, timeout=60, what="the failed delivery")
            with dep.client() as http:
                page = wait_for(lambda: (t := http.get("/alerts").text) and "good: delivered" in t and t,
                                timeout=30, what="both outcomes on the page")  # fmt: skip
    assert "bad: failed after 2 attempts (HTTP 500)" in page
    assert "receiver exploded" in page  # the receiver's answer, in the failed deliveries
    assert "deliv: exited without shutdown()" in page
