"""Small tools shared by tests: awaiting a condition, settings for a test prefix, worker threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from agentwatch import config
from agentwatch.codec import entry_key
from agentwatch.config import PipelineSettings
from agentwatch.keys import Keys
from agentwatch.worker import Worker

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.01, what: str = "") -> T:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def settings_for(prefix: str, url: str | None = None, **sections: dict[str, Any]) -> PipelineSettings:
    """Default settings with the test's prefix (and URL), plus per-section overrides by key."""
    base = config.PipelineSettings()
    updates: dict[str, Any] = {}
    redis_update: dict[str, Any] = {"prefix": prefix, **sections.pop("redis", {})}
    if url is not None:
        redis_update["url"] = url
    updates["redis"] = config.RedisSection.model_validate(
        {**base.redis.model_dump(by_alias=True), **redis_update}
    )
    section_models = {
        "worker": config.WorkerSection,
        "streams": config.StreamsSection,
        "embedded": config.EmbeddedSection,
    }
    for name, values in sections.items():
        model = section_models[name]
        current = getattr(base, name).model_dump(by_alias=True)
        updates[name] = model.model_validate({**current, **values})
    return base.model_copy(update=updates)


@contextmanager
def running(worker: Worker[Any]) -> Iterator[threading.Thread]:
    """Run a worker in a thread for the duration of the block; stop and join it afterwards."""
    thread = threading.Thread(target=worker.run, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        worker.stop()
        thread.join(10)
        assert not thread.is_alive(), "worker did not stop within 10s"


def caught_up(r: Any, keys: Keys) -> bool:
    """The detector group exists and has read and acknowledged every event (an absent group
    would make "all groups caught up" vacuously true before the worker has even started), and
    where a detector engine owns the shard, it has checkpointed since (its views show it all:
    the engine saves at least every half second)."""
    groups = r.xinfo_groups(keys.events()) if r.exists(keys.events()) else []
    if not groups or not all(g["lag"] == 0 and g["pending"] == 0 for g in groups):
        return False
    if not r.exists(keys.lease(0)) and not r.exists(keys.checkpoint(0)):
        return True  # no detector engine here (a runtime test's bare worker)
    applied = r.hget(keys.checkpoint(0), "last_id")
    last = max(entry_key(g["last-delivered-id"]) for g in groups)
    return applied is not None and entry_key(applied) >= last


def drained(r: Any, keys: Keys, shard: int) -> Callable[[], bool]:
    """A predicate: shard ``shard``'s checkpoint covers every entry its stream holds now (beats
    added later need not be saved yet: the owner saves every half second while they go on)."""
    newest: Any = r.xrevrange(keys.events(shard), count=1)
    target = entry_key(newest[0][0]) if newest else (0, 0)

    def covered() -> bool:
        through = r.hget(keys.checkpoint(shard), "last_id")
        return through is not None and entry_key(through) >= target

    return covered


def events_worker(client: Any, prefix: str, handlers: list[Any], **worker: Any) -> Worker[Any]:
    """A bare runtime worker on the prefix's event stream (real codec, the given handlers only,
    a fast tick): for tests of the runtime itself, without any detector."""
    from agentwatch import codec  # noqa: PLC0415

    settings = settings_for(prefix, worker={"tick": "50ms", **worker})
    return Worker(
        client, settings, kind="detectors", streams=[Keys(prefix).events()], group="detectors",
        decode=codec.decode, handlers=handlers, retention_s=3600,
    )  # fmt: skip
