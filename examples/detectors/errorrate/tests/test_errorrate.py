"""The error-rate detector against a real Redis, through a real detector worker: the engine
keeps its state, applies the beats once and in order, and publishes its decisions as alerts.
(test_errorrate_logic.py tests the same logic without Redis.)

Needs a Redis: ``AGENTWATCH_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``); skipped
when none answers.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, distribution
from typing import Any

import pytest
import redis
from agentwatch_errorrate import ErrorRate, ErrorRateConfig

from agentwatch import codec, plugins
from agentwatch.alerts import Alert, decode_alert
from agentwatch.config import Pipeline, PipelineSettings, RedisSection, WorkerSection
from agentwatch.redisconn import connect
from agentwatch.workers import detector_worker

URL = os.environ.get("AGENTWATCH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def r() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(URL)
    try:
        client.ping()
    except redis.RedisError:
        pytest.skip(f"no Redis at {URL}")
    yield client
    client.close()


@pytest.fixture
def prefix(r: redis.Redis) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    name = f"er{uuid.uuid4().hex[:8]}"
    yield name
    for key in r.scan_iter(f"{name}:*"):
        r.delete(key)


def test_found_through_its_entry_point_when_installed() -> None:
    """``pip install`` registers the alias: ``[detectors.errorrate]`` needs no ``class``."""
    try:
        distribution("agentwatch-errorrate")
    except PackageNotFoundError:
        pytest.skip("agentwatch-errorrate is not installed (pip install -e examples/detectors/errorrate)")
    assert "errorrate" in plugins.available("detectors")
    assert plugins.resolve("detectors", "errorrate") is ErrorRate
    loaded, problems = plugins.load_detectors({"errorrate": {"window": 10}})
    assert not problems
    (plugin,) = [p for p in loaded if p.name == "errorrate"]
    assert (
        plugin.cls is ErrorRate and isinstance(plugin.config, ErrorRateConfig) and plugin.config.window == 10
    )


def make_pipeline(prefix: str) -> Pipeline:
    sections: dict[str, dict[str, Any]] = {"errorrate": {"class": "agentwatch_errorrate:ErrorRate"},
                **{name: {"enabled": False} for name in plugins.builtins("detectors")}}  # fmt: skip
    detectors, problems = plugins.load_detectors(sections)
    assert not problems
    settings = PipelineSettings(
        redis=RedisSection(prefix=prefix),
        worker=WorkerSection.model_validate({"tick": "50ms", "block": "50ms"}),
        detectors=sections,
    )
    return Pipeline(settings=settings, source="test", detectors=detectors)


def test_half_of_the_last_20_beats_failing_fires_and_recovery_resolves(r: redis.Redis, prefix: str) -> None:
    pipeline = make_pipeline(prefix)
    assert [p.cls for p in pipeline.detectors] == [ErrorRate]
    worker = detector_worker(pipeline, connect(pipeline.settings, URL))
    seq = iter(range(10_000))

    def send(kind: str, run: str = "r1", **meta: object) -> None:
        event = {"v": 1, "agent": "bot", "kind": kind, "ts": 0.0, "run": run, "seq": next(seq), **meta}
        r.xadd(f"{prefix}:events", {"d": codec.encode(event)})

    def beat(ok: bool) -> None:
        send("beat", ok=ok)

    def received() -> list[Alert]:
        entries: list[tuple[bytes, dict[bytes, bytes]]] = r.xrange(f"{prefix}:alerts")  # type: ignore[assignment]
        return [decode_alert(fields[b"d"]) for _, fields in entries]

    def alerts() -> list[tuple[str, str]]:
        return [(a.status, a.summary) for a in received()]

    def wait(predicate: object, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():  # type: ignore[operator]
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.02)

    thread = threading.Thread(target=worker.run, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    try:
        for i in range(20):
            beat(ok=i % 3 != 0)  # 7 of 20 failed: 35%, no alert
        beat(ok=True)
        wait(lambda: worker.stats.processed >= 21)
        assert alerts() == []
        for _ in range(5):
            beat(ok=False)  # 10 of the last 20: the five old failures still in the window, five new
        wait(lambda: len(alerts()) == 1)
        assert alerts() == [("firing", "bot: 10 of its last 20 beats failed (ok=False)")]
        for _ in range(13):
            beat(ok=True)  # the old failures leave the window; the five new ones remain: 25%
        wait(lambda: len(alerts()) == 2)
        assert alerts()[1] == ("resolved", "bot: failures down to 5 of its last 20 beats")
        for _ in range(10):
            beat(ok=False)  # 10 of the last 20 again (the five failures before them have left)
        wait(lambda: len(alerts()) == 3)
        seq = iter(range(10_000))
        send("start", run="r2")  # a restart: the failures were the old run's
        wait(lambda: len(alerts()) == 4)
        assert alerts()[2:] == [
            ("firing", "bot: 10 of its last 20 beats failed (ok=False)"),
            ("resolved", "bot: restarted; its failed beats were the previous run's"),
        ]
        assert received()[0].details == {"failures": 10, "beats": 20, "share": 0.5}
    finally:
        worker.stop()
        thread.join(5)
        worker.client.close()
