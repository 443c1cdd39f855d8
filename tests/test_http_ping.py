"""The ping API as cron jobs use it: ``curl`` against a running ``agentwatch serve``, real
detector workers deciding silence and exit alerts from what the pings became."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from helpers import wait_for
from http_kit import PING_KEY, Deployment, deployment, shared_prefix

# Real server processes: starting them takes seconds on a loaded machine (bounded, not hoped).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="no curl on PATH")


@pytest.fixture(scope="module")
def dep(redis_url: str) -> Iterator[Deployment]:
    """One server and detector worker for the module's tests (each uses its own agent names).
    Silence after 3 s: the cron script's pings come every 0.2 s plus a ``curl`` start, which a
    loaded box stretched past 1 s once (a silence alert before the script had ended)."""
    extra = '[detectors.silence]\nafter = "3s"\n[detectors.exit]\nclean_exit = false\n'
    root = Path(tempfile.mkdtemp(prefix="aw-"))
    with (
        shared_prefix(redis_url) as prefix,
        deployment(root, prefix=prefix, redis_url=redis_url, extra=extra) as running,
    ):
        yield running
    shutil.rmtree(root, ignore_errors=True)


def curl(*args: str) -> tuple[int, str]:
    """``curl -s`` as a script would run it: (HTTP status, body)."""
    done = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", *args], capture_output=True, text=True,
                          timeout=20, check=True)  # fmt: skip
    body, _, code = done.stdout.rpartition("\n")
    return int(code), body.rstrip("\n")


CRON_SCRIPT = """
set -eu
curl -fsS "$BASE/start?interval=0.3" >/dev/null
for i in 1 2 3; do
  do_work=$i
  curl -fsS -X POST -d "{\\"tokens\\": $((do_work * 100))}" "$BASE" >/dev/null
  sleep 0.2
done
"""


@needs_curl
def test_a_cron_script_that_stops_beating_gets_a_silence_alert(dep: Deployment) -> None:
    env = {"BASE": dep.ping_url("nightly-report"), "PATH": "/usr/bin:/bin"}
    subprocess.run(["sh", "-c", CRON_SCRIPT], env=env, check=True, timeout=30)
    status = wait_for(lambda: dep.status("nightly-report"), timeout=10, what="the agent in status")
    assert status["interval_s"] == 0.3
    wait_for(
        lambda: (s := dep.status("nightly-report")) and s["tokens_total"] == 600, timeout=10, what="tokens"
    )
    (alert,) = wait_for(lambda: dep.fired("nightly-report", "silence"), timeout=15, what="a silence alert")
    assert "no heartbeat" in alert.summary
    wait_for(lambda: (s := dep.status("nightly-report")) and s["state"] == "down", timeout=10, what="down")


@needs_curl
def test_fail_and_exit_codes_alert_and_the_next_run_resolves(dep: Deployment) -> None:
    assert curl(dep.ping_url("backup"))[0] == 200
    code, body = curl("-X", "POST", "-d", '{"error": "disk full"}', dep.ping_url("backup/fail"))
    assert (code, body) == (200, "OK")
    (alert,) = wait_for(lambda: dep.fired("backup", "exit"), timeout=10, what="an exit alert")
    assert alert.details["error"] == "disk full" and alert.details["code"] is None
    assert curl(dep.ping_url("backup/0"))[0] == 200  # exit status 0 is a success: a beat, a new run
    wait_for(lambda: (s := dep.status("backup")) and s["state"] != "exited", timeout=10, what="resolved")
    assert curl(dep.ping_url("backup/3"))[0] == 200
    codes = wait_for(lambda: [a.details.get("code") for a in dep.fired("backup", "exit")][1:], timeout=10,
                     what="the second exit")  # fmt: skip
    assert codes == [3]


@needs_curl
def test_names_that_end_like_a_command_are_pinged_with_the_kind_query(dep: Deployment) -> None:
    assert curl(dep.ping_url("etl/start?kind=start&interval=600"))[0] == 200  # the agent "etl/start"
    assert curl("-d", '{"tokens": 7}', dep.ping_url("etl/start?kind=beat"))[0] == 200
    assert curl(dep.ping_url("shards/3?kind=3"))[0] == 200  # the agent "shards/3" exited with 3
    agent = wait_for(lambda: dep.status("etl/start"), timeout=10, what="the agent etl/start")
    assert agent["interval_s"] == 600 and not dep.status("etl")
    wait_for(lambda: (s := dep.status("etl/start")) and s["tokens_total"] == 7, timeout=10, what="tokens")
    (alert,) = wait_for(lambda: dep.fired("shards/3", "exit"), timeout=10, what="an exit alert")
    assert alert.details["code"] == 3
    code, body = curl(dep.ping_url("etl?kind=finish"))
    assert code == 400 and "kind must be one of beat, start, fail or an exit code (0-255)" in body


@needs_curl
def test_bad_pings_get_precise_answers_and_are_counted(dep: Deployment) -> None:
    before = pings(dep)
    assert curl(f"{dep.base}/ping/not-the-key/job") == (404, "not found")
    code, body = curl(dep.ping_url("bad%20name"))
    assert code == 400 and "has characters outside A-Za-z0-9._:@/-" in body
    code, body = curl("-d", "tokens=5", dep.ping_url("job"))
    assert code == 400 and "must be a JSON object" in body
    code, body = curl("-d", '{"tokens": -5}', dep.ping_url("job"))
    assert code == 400 and "'tokens' must be an integer >= 0" in body
    code, body = curl("-d", "x" * 20_000, dep.ping_url("job"))
    assert code == 413 and "at most 16,384" in body
    code, body = curl(dep.ping_url("job/start?interval=soon"))
    assert code == 400 and "interval" in body
    code, body = curl(dep.ping_url("job/999"))
    assert code == 400 and "0-255" in body
    code, body = curl("-d", '{"model": "\\ud800"}', dep.ping_url("job"))
    assert code == 400 and "lone surrogate" in body  # not a 500: UTF-8 cannot hold it
    after = pings(dep)
    counted = {outcome: after[outcome] - before[outcome] for outcome in after}
    assert counted == {
        "ok": 0,
        "bad_key": 1,
        "not_accepted": 0,
        "bad_request": 6,
        "too_large": 1,
        "flooded": 0,
        "unavailable": 0,
    }
    assert not dep.status("job")  # nothing bad was written


def pings(dep: Deployment) -> dict[str, float]:
    with dep.client() as http:
        families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
    return {s.labels["outcome"]: s.value for s in families["agentwatch_http_pings"].samples}


def test_a_flooding_agent_gets_429_and_others_do_not(short_dir: Path, prefix: str, redis_url: str) -> None:
    http = 'ping_burst = 3\nping_rate = "1/min"\n'
    with deployment(short_dir, prefix=prefix, redis_url=redis_url, workers=(), http=http) as dep:
        answers = [httpx.get(dep.ping_url("noisy"), timeout=10) for _ in range(4)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        assert 1 <= int(answers[-1].headers["Retry-After"]) <= 60
        assert "too many pings for noisy" in answers[-1].text
        assert httpx.get(dep.ping_url("quiet"), timeout=10).status_code == 200


def test_pings_from_many_threads_are_all_counted(dep: Deployment) -> None:
    def pump() -> None:
        with httpx.Client() as http:
            for _ in range(20):
                assert http.post(dep.ping_url("busy"), json={"tokens": 1}).status_code == 200

    threads = [threading.Thread(target=pump) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    wait_for(lambda: (s := dep.status("busy")) and s["tokens_total"] == 60, timeout=10, what="60 tokens")


def test_redis_down_is_503_with_retry_after_and_the_server_recovers(
    short_dir: Path, prefix: str, spawn_redis: object
) -> None:
    server = spawn_redis()  # type: ignore[operator]
    with deployment(short_dir, prefix=prefix, redis_url=server.url, workers=()) as dep:
        with dep.client() as http:
            assert http.get("/healthz").status_code == 200
            server.stop()
            health = http.get("/healthz")
            assert health.status_code == 503 and health.json()["ok"] is False
            ping = httpx.get(dep.ping_url("job"), timeout=10)
            assert ping.status_code == 503 and ping.headers["Retry-After"] == "5"
            page = http.get("/", headers={"Accept": "text/html"})
            assert page.status_code == 503 and "Redis is unavailable" in page.text
            scrape = http.get("/metrics")
            assert scrape.status_code == 200 and "agentwatch_redis_up 0.0" in scrape.text
            server.start()
            wait_for(lambda: http.get("/healthz").status_code == 200, timeout=60, what="recovery")
            assert httpx.get(dep.ping_url("job"), timeout=10).status_code == 200
            assert dep.processes["serve"].poll() is None
        client = redis.Redis.from_url(server.url)
        assert client.xlen(dep.keys.events()) == 2  # start + beat, once Redis was back
        client.close()


def test_the_server_sweeps_the_records_of_agents_gone_quiet(
    redis_url: str, prefix: str, r: redis.Redis
) -> None:
    """In-process, so the sweep's interval follows a short run_ttl: the record of an agent that
    stopped pinging is deleted by the server itself (memory), the active one's is kept."""
    from starlette.testclient import TestClient  # noqa: PLC0415

    from agentwatch.config import HttpSection, Pipeline  # noqa: PLC0415
    from agentwatch.http.app import create_app  # noqa: PLC0415

    from helpers import settings_for  # noqa: PLC0415

    settings = settings_for(prefix, redis_url)
    http = HttpSection(ping_key=PING_KEY, run_ttl="1s", ping_rate="1000/s", ping_burst=10_000)
    pipeline = Pipeline(settings=settings.model_copy(update={"http": http}), source="test")
    keys = pipeline.keys
    with TestClient(create_app(pipeline, redis_url)) as client:
        assert client.get(f"/ping/{PING_KEY}/gone-quiet").status_code == 200
        assert r.hexists(keys.ingest_for("gone-quiet"), "gone-quiet")

        def swept() -> bool:
            assert client.get(f"/ping/{PING_KEY}/still-here").status_code == 200
            return not r.hexists(keys.ingest_for("gone-quiet"), "gone-quiet")

        wait_for(swept, timeout=20, what="the quiet agent's record swept by the server")
        assert r.hexists(keys.ingest_for("still-here"), "still-here")


def test_other_methods_still_reach_the_router(redis_url: str, prefix: str) -> None:
    """Pings are answered before Starlette's router (agentwatch/http/app.py), but only the
    route's own methods: another method still gets the router's 405, and writes nothing."""
    from starlette.testclient import TestClient  # noqa: PLC0415

    from agentwatch.config import HttpSection, Pipeline  # noqa: PLC0415
    from agentwatch.http.app import create_app  # noqa: PLC0415

    from helpers import settings_for  # noqa: PLC0415

    settings = settings_for(prefix, redis_url)
    pipeline = Pipeline(
        settings=settings.model_copy(update={"http": HttpSection(ping_key=PING_KEY)}), source="t"
    )
    with TestClient(create_app(pipeline, redis_url)) as client:
        assert client.put(f"/ping/{PING_KEY}/job").status_code == 405
        assert client.delete(f"/ping/{PING_KEY}/job").status_code == 405
        answer = client.post(f"/ping/{PING_KEY}/job", json={"tokens": 3})
        assert answer.status_code == 200 and answer.text == "OK\n"
        assert answer.headers["X-Agentwatch-Seq"] == "1"  # after the run's start: the PUT wrote nothing
        assert answer.headers["content-type"] == "text/plain; charset=utf-8"
