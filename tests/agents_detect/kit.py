"""What the detector tests share: a pipeline with chosen detector settings, a worker on it, a
fake fleet that XADDs protocol events directly, and readers for the alerts that came out."""

from __future__ import annotations

import itertools
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import redis

from agentwatch import codec, plugins
from agentwatch.alerts import Alert, decode_alert
from agentwatch.config import Pipeline
from agentwatch.keys import Keys
from agentwatch.redisconn import connect
from agentwatch.worker import Worker
from agentwatch.workers import detector_worker

from helpers import settings_for

FAST_WORKER = {"tick": "50ms", "block": "50ms", "claim_idle": "1s"}


def pipeline_for(
    prefix: str, url: str, *, worker: dict[str, Any] | None = None, **detectors: dict[str, Any]
) -> Pipeline:
    """Default pipeline for the test's prefix; detector sections as keyword arguments.

    Built-ins left out run with their defaults; ``name={"enabled": False}`` switches one off."""
    settings = settings_for(prefix, url, worker={**FAST_WORKER, **(worker or {})})
    sections = {
        name.replace("_", "-") if name.startswith("x_") else name: values
        for name, values in detectors.items()
    }
    loaded, problems = plugins.load_detectors(sections)
    assert not problems, problems
    settings = settings.model_copy(update={"detectors": sections})
    return Pipeline(settings=settings, source="test", detectors=loaded)


def worker_for(pipeline: Pipeline, url: str, consumer: str | None = None) -> Worker[Any]:
    client = connect(pipeline.settings, url)
    return detector_worker(pipeline, client, consumer=consumer)


@dataclass
class Agent:
    """One simulated agent: builds events the way a producer would and XADDs them."""

    r: redis.Redis
    keys: Keys
    name: str
    run: str = "run-1"
    seq: itertools.count[int] = field(default_factory=itertools.count)

    def send(self, kind: str, **fields: Any) -> bytes:
        event = {"v": 1, "agent": self.name, "kind": kind, "ts": time.time(), "run": self.run,
                 "seq": next(self.seq), **fields}  # fmt: skip
        entry_id: bytes = self.r.xadd(self.keys.events_for(self.name), {"d": codec.encode(event)})
        return entry_id

    def start(self, run: str | None = None, **fields: Any) -> bytes:
        if run is not None:
            self.run = run
            self.seq = itertools.count()
        return self.send("start", **fields)

    def beat(self, **fields: Any) -> bytes:
        return self.send("beat", **fields)

    def pulse(self, **fields: Any) -> bytes:
        return self.send("pulse", **fields)

    def exit(self, reason: str, code: int = 0, **fields: Any) -> bytes:
        return self.send("exit", reason=reason, code=code, **fields)


def alerts(r: redis.Redis, keys: Keys) -> list[Alert]:
    return [decode_alert(fields[b"d"]) for _, fields in r.xrange(keys.alerts)]


def transitions(r: redis.Redis, keys: Keys) -> list[tuple[str, str, str]]:
    """(agent, detector, status) of every alert, in stream order."""
    return [(a.agent, a.detector, a.status) for a in alerts(r, keys)]


def duplicates(r: redis.Redis, keys: Keys) -> list[tuple[str, str, str]]:
    """Transitions that appear more than once, ignoring alert ids (same incident twice)."""
    counts = Counter(transitions(r, keys))
    return [t for t, n in counts.items() if n > 1]


def fired(r: redis.Redis, keys: Keys, detector: str, agent: str | None = None) -> list[Alert]:
    return [a for a in alerts(r, keys) if a.detector == detector and a.status == "firing"
            and (agent is None or a.agent == agent)]  # fmt: skip


def resolved(r: redis.Redis, keys: Keys, detector: str, agent: str | None = None) -> list[Alert]:
    return [a for a in alerts(r, keys) if a.detector == detector and a.status == "resolved"
            and (agent is None or a.agent == agent)]  # fmt: skip


class Feed:
    """Hand-made batches for driving a worker's engine directly (no stream, no timing):
    ``feed.batch(("bot", "beat", {"tokens": 5}), ...)`` with explicit Redis times."""

    def __init__(self, worker: Worker[Any], t0_ms: int = 1_795_000_000_000) -> None:
        from detectors.engine import Engine  # noqa: PLC0415

        self.engine = next(h for h in worker.handlers if isinstance(h, Engine))
        self.now = t0_ms
        self.seqs: dict[tuple[str, str], itertools.count[int]] = {}
        self.runs: dict[str, str] = {}
        self._last = (0, -1)
        self._renewed = 0.0

    def event(
        self,
        agent: str,
        kind: str,
        *,
        run: str | None = None,
        at: int | None = None,
        seq: int | None = None,
        **fields: Any,
    ) -> tuple[bytes, dict[str, Any]]:
        run = run or self.runs.setdefault(agent, "run-1")
        self.runs[agent] = run
        counter = self.seqs.setdefault((agent, run), itertools.count())
        self.now = at if at is not None else self.now + 10
        event = {"v": 1, "agent": agent, "kind": kind, "ts": 0.0, "run": run,
                 "seq": next(counter) if seq is None else seq, **fields}  # fmt: skip
        codec.validate(event)
        # Entry ids as Redis makes them: unique and increasing (<ms>-<n>, n counting within a ms)
        n = self._last[1] + 1 if self.now == self._last[0] else 0
        self._last = (self.now, n)
        return (f"{self.now}-{n}".encode(), event)

    def apply(self, messages: list[tuple[bytes, dict[str, Any]]]) -> None:
        if not self.engine.shards:  # the first batch: take the shards first, as a worker's first tick does
            self.engine.on_tick(self.now)
        elif time.monotonic() - self._renewed > 0.5:  # keep them, as a worker's ticks do (3 s leases)
            self.engine.leases.refresh(self.now)
        self._renewed = time.monotonic()
        self.engine.on_batch(list(messages))
        self.engine.flush()  # what a worker saves within half a second: read it at once here

    def tick(self, now_ms: int | None = None) -> None:
        self.engine.on_tick(now_ms if now_ms is not None else self.now)
        self.engine.flush()
