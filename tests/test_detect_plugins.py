"""Plugins: the example error-rate detector found through its entry point and run by a worker;
a detector that crashes on every hook is logged, counted and isolated while the built-ins carry
on, batch hooks and stateful hooks alike."""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from agents_detect.kit import Agent, fired, pipeline_for, transitions, worker_for

from agentwatch import loading, plugins
from agentwatch.keys import Keys
from detectors.base import Agent as AgentState
from detectors.base import ChildRun, Detector, DetectorConfig, Event, Message

from helpers import running, wait_for

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "detectors" / "errorrate"


class Crashing(Detector[DetectorConfig]):
    """Raises from every hook, like a plugin with a bug."""

    def on_batch(self, messages: Sequence[Message[Event]]) -> None:
        raise RuntimeError("plugin bug in on_batch")

    def on_tick(self, now_ms: int) -> None:
        raise ZeroDivisionError("plugin bug in on_tick")


@dataclass
class Nothing:
    count: int = 0


class CrashingStateful(Detector[DetectorConfig]):
    """A stateful plugin with a bug: raises from every event and every timer."""

    State = Nothing
    listens = frozenset({"start", "beat", "exit"})

    def on_event(self, agent: AgentState, event: Event, at_ms: int, child: ChildRun | None) -> None:
        raise RuntimeError("plugin bug in on_event")

    def due_ms(self, agent: AgentState) -> int:
        raise ZeroDivisionError("plugin bug in due_ms")


@pytest.fixture
def installed_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The example package as pip would install it: importable, with its entry points
    (copied from its pyproject.toml into a dist-info directory on sys.path)."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    dist = tmp_path / "agentwatch_errorrate-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: 0.1.0\n")
    lines = ["[agentwatch.detectors]"]
    lines += [
        f"{name} = {target}" for name, target in project["entry-points"]["agentwatch.detectors"].items()
    ]
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "errorrate"


def test_the_example_detector_is_found_by_its_entry_point_and_fires(
    installed_example: str, redis_url: str, prefix: str, r: redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    assert installed_example in plugins.available("detectors")
    path = tmp_path / "pipeline.toml"
    path.write_text(f'[redis]\nprefix = "{prefix}"\n[detectors.errorrate]\nwindow = 10\n')
    loaded = loading.load(path)
    (plugin,) = [p for p in loaded.detectors if p.name == "errorrate"]
    assert plugin.cls.__module__ == "agentwatch_errorrate" and plugin.config.window == 10
    pipeline = pipeline_for(prefix, redis_url, errorrate={"window": 10})
    with running(worker_for(pipeline, redis_url)):
        bot = Agent(r, keys, "bot")
        bot.start()
        for i in range(10):
            bot.beat(ok=i % 2 == 0)
        alert = wait_for(lambda: fired(r, keys, "errorrate"), timeout=5, what="error-rate alert")[0]
    assert alert.summary == "bot: 5 of its last 10 beats failed (ok=False)"


def test_a_crashing_detector_is_isolated(redis_url: str, prefix: str, r: redis.Redis, keys: Keys) -> None:
    pipeline = pipeline_for(
        prefix, redis_url, crashy={"class": "test_detect_plugins:Crashing"}, silence={"after": "300ms"}
    )
    worker = worker_for(pipeline, redis_url)
    with running(worker):
        bot, other = Agent(r, keys, "bot"), Agent(r, keys, "other")
        bot.start()
        other.start()
        bot.exit("exception", 1, error="KeyError: 'x'")
        wait_for(lambda: fired(r, keys, "exit"), timeout=5, what="the exit alert")
        wait_for(lambda: fired(r, keys, "silence"), timeout=5, what="the silence alert")
        wait_for(lambda: worker.stats.handler_errors.get("crashy", 0) >= 4, timeout=5, what="errors counted")
    assert sorted(transitions(r, keys)) == [("bot", "exit", "firing"), ("other", "silence", "firing")]
    assert set(worker.stats.handler_errors) == {"crashy"}


def test_a_crashing_stateful_detector_blinds_no_other_detector(
    installed_example: str, redis_url: str, prefix: str, r: redis.Redis, keys: Keys
) -> None:
    """Its errors count under its own name; the detectors after it still see every event."""
    pipeline = pipeline_for(
        prefix,
        redis_url,
        crashy={"class": "test_detect_plugins:CrashingStateful"},
        errorrate={"window": 10},
        silence={"after": "300ms"},
    )
    assert [p.name for p in pipeline.detectors].index("crashy") < [p.name for p in pipeline.detectors].index(
        "errorrate"
    )
    worker = worker_for(pipeline, redis_url)
    with running(worker):
        bot, other = Agent(r, keys, "bot"), Agent(r, keys, "other")
        bot.start()
        other.start()
        for i in range(10):
            bot.beat(ok=i % 2 == 0)
        bot.exit("exception", 1, error="KeyError: 'x'")
        wait_for(lambda: fired(r, keys, "errorrate"), timeout=5, what="the error-rate alert")
        wait_for(lambda: fired(r, keys, "exit"), timeout=5, what="the exit alert")
        wait_for(lambda: fired(r, keys, "silence"), timeout=5, what="the silence alert")
    assert sorted(transitions(r, keys)) == [
        ("bot", "errorrate", "firing"),
        ("bot", "exit", "firing"),
        ("other", "silence", "firing"),
    ]
    assert set(worker.stats.handler_errors) == {"crashy"}
