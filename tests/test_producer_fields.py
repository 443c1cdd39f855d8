"""Whatever the agent passes, ``heartbeat()`` never raises and every event still decodes."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from agents.testkit import of_kind, read_events, wait_for

from producers import Producer, _guard
from producers._fields import META_ITEMS, add_work_fields, clean_meta, count, fingerprint
from producers._usage import usage_fields


@pytest.fixture(autouse=True)
def strict(monkeypatch: pytest.MonkeyPatch) -> None:
    """SDK bugs fail the test; warnings start from a clean slate."""
    monkeypatch.setattr(_guard, "RAISE_INTERNAL", True)
    monkeypatch.setattr(_guard, "_warned", set())


@pytest.fixture
def producer(redis_url: str, prefix: str) -> Iterator[Producer]:
    made = Producer("fields-bot", redis_url=redis_url, prefix=prefix, flush_interval=0.01)
    yield made
    made.close()


def delivered(r: redis.Redis, prefix: str, beats: int) -> list[dict[str, Any]]:
    def enough() -> list[dict[str, Any]] | None:
        found = of_kind(read_events(r, f"{prefix}:events"), "beat")
        return found if len(found) >= beats else None

    return wait_for(enough, what=f"{beats} beats")


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [rec.getMessage() for rec in caplog.records if rec.name == "agentwatch.producer"]


# -- usage objects -------------------------------------------------------------------------


@dataclass
class OpenAIUsage:  # the shape of openai.types.CompletionUsage
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: Any = None


@dataclass
class AnthropicUsage:  # the shape of anthropic.types.Usage
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


def test_openai_chat_usage_object() -> None:
    usage = OpenAIUsage(120, 30, 150, SimpleNamespace(cached_tokens=100))
    assert usage_fields(usage) == {
        "tokens_in": 120, "tokens_out": 30, "tokens": 150, "tokens_cache_read": 100,
    }  # fmt: skip


def test_openai_responses_usage_dict() -> None:
    usage = {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15,
             "input_tokens_details": {"cached_tokens": 0}}  # fmt: skip
    assert usage_fields(usage) == {"tokens_in": 10, "tokens_out": 5, "tokens": 15}


def test_anthropic_usage_counts_cache_tokens_as_input() -> None:
    usage = AnthropicUsage(input_tokens=20, output_tokens=7, cache_creation_input_tokens=300,
                           cache_read_input_tokens=1000)  # fmt: skip
    assert usage_fields(usage) == {
        "tokens_in": 1320, "tokens_out": 7, "tokens": 1327,
        "tokens_cache_read": 1000, "tokens_cache_write": 300,
    }  # fmt: skip


def test_a_whole_response_object_is_accepted() -> None:
    response = SimpleNamespace(id="msg_1", usage=AnthropicUsage(3, 4))
    assert usage_fields(response) == {"tokens_in": 3, "tokens_out": 4, "tokens": 7}


def test_unrecognised_usage_is_ignored_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    assert usage_fields(object()) == {}
    assert usage_fields(object()) == {}
    assert usage_fields({"prompt_tokens": "many", "completion_tokens": None}) == {}
    assert len(warnings(caplog)) == 2  # one per kind of object


def test_usage_and_explicit_arguments_end_to_end(producer: Producer, r: redis.Redis, prefix: str) -> None:
    producer.heartbeat(usage=OpenAIUsage(100, 20, 120), model="gpt-x")
    producer.heartbeat(usage={"input_tokens": 5, "output_tokens": 6}, tokens_out=60)  # explicit wins
    producer.heartbeat(tokens_in=3, tokens_out=4)  # total derived

    first, second, third = delivered(r, prefix, 3)
    assert (first["tokens_in"], first["tokens_out"], first["tokens"]) == (100, 20, 120)
    assert first["model"] == "gpt-x"
    assert (second["tokens_in"], second["tokens_out"], second["tokens"]) == (5, 60, 65)  # total follows
    assert third["tokens"] == 7


def test_an_explicit_total_is_kept_and_usage_total_stands_without_a_split() -> None:
    def fields(**kwargs: Any) -> dict[str, Any]:
        event: dict[str, Any] = {}
        arguments = dict.fromkeys(("tokens", "tokens_in", "tokens_out", "cost", "model", "fp", "usage"))
        add_work_fields(event, **{**arguments, **kwargs})
        return event

    usage = OpenAIUsage(100, 20, 125)  # a total with more than in+out (reasoning, say)
    assert fields(usage=usage)["tokens"] == 125
    assert fields(usage=usage, tokens_in=10)["tokens"] == 30  # the split was overridden
    assert fields(usage=usage, tokens_in=10, tokens=99)["tokens"] == 99  # explicit total wins
    assert fields(usage=usage, tokens_in=-1)["tokens"] == 125  # a dropped override changes nothing


# -- bad arguments -------------------------------------------------------------------------


class BrokenRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


BAD_CALLS: list[tuple[str, dict[str, Any], Callable[[dict[str, Any]], bool]]] = [
    ("negative tokens", {"tokens": -5}, lambda e: "tokens" not in e),
    ("text tokens", {"tokens": "abc"}, lambda e: "tokens" not in e),
    ("bool tokens", {"tokens_in": True}, lambda e: "tokens_in" not in e),
    ("nan cost", {"cost": math.nan}, lambda e: "cost" not in e),
    ("negative cost", {"cost": -0.01}, lambda e: "cost" not in e),
    ("infinite cost", {"cost": math.inf}, lambda e: "cost" not in e),
    ("model not text", {"model": 42}, lambda e: "model" not in e),
    ("1 MB meta value", {"note": "x" * 2**20}, lambda e: len(e["note"]) == 1024),
    ("unserialisable meta", {"when": object()}, lambda e: "when" not in e),
    ("nan meta", {"score": math.nan}, lambda e: "score" not in e),
    ("reserved meta key", {"rss": "fake"}, lambda e: "rss" not in e),
    ("deep meta", {"tree": [[[[[1]]]]]}, lambda e: e["tree"] == [[[[]]]]),
    ("tokens over 2**53-1", {"tokens": 2**53}, lambda e: "tokens" not in e),
    ("usage over 2**53-1", {"usage": {"input_tokens": 2**60, "output_tokens": 1}},
     lambda e: "tokens_in" not in e and e["tokens_out"] == 1 and e["tokens"] == 1),
    ("fp whose repr raises", {"fp": BrokenRepr()}, lambda e: "fp" not in e),
    ("huge nested meta", {"response": [[n] * 256 for n in range(256)], "step": "s"},
     lambda e: "response" not in e and e["step"] == "s"),
]  # fmt: skip


@pytest.mark.parametrize(("kwargs", "check"), [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_never_raise_and_the_beat_still_goes_out(
    producer: Producer,
    r: redis.Redis,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
    kwargs: dict[str, Any],
    check: Callable[[dict[str, Any]], bool],
) -> None:
    caplog.set_level(logging.WARNING, "agentwatch.producer")
    producer.heartbeat(**kwargs)
    producer.heartbeat(**kwargs)  # the same mistake again: no second warning

    beats = delivered(r, prefix, 2)  # read_events decodes each one exactly as a worker would
    assert all(check(beat) for beat in beats)
    assert len(warnings(caplog)) == 1, warnings(caplog)


def test_long_fingerprints_are_hashed_so_distinct_items_stay_distinct() -> None:
    first, second = fingerprint("y" * 5000), fingerprint("y" * 4999 + "z")
    assert first.startswith("sha256:") and len(first) == 71
    assert first != second
    assert fingerprint("y" * 5000) == first


def test_numbers_from_other_libraries_are_accepted() -> None:
    assert count("tokens", 12.0) == 12
    assert count("tokens", Decimal("3")) is None  # not an integer type: dropped, not guessed
    event: dict[str, Any] = {}
    add_work_fields(event, tokens=None, tokens_in=None, tokens_out=None, cost=Decimal("0.25"),
                    model=None, fp=("url", 3), usage=None)  # fmt: skip
    assert event == {"cost": 0.25, "fp": "('url', 3)"}


def test_meta_is_reduced_to_plain_data() -> None:
    meta: dict[str, Any] = {}
    clean_meta({"ok": False, "n": 3, "tags": ("a", "b"), "d": {"k": 1.5, 2: "int key"}}, meta)
    assert meta == {"ok": False, "n": 3, "tags": ["a", "b"], "d": {"k": 1.5}}
    assert fingerprint("short") == "short"


def test_meta_beyond_the_budget_is_dropped_value_by_value(
    producer: Producer, r: redis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    many = {f"field{i:02}": "z" * 1000 for i in range(20)}  # each value fits, together 20 KB
    producer.heartbeat(tokens=5, **many, small="kept")

    (beat,) = delivered(r, prefix, 1)
    kept = sorted(key for key in beat if key.startswith("field"))
    assert beat["tokens"] == 5 and beat["small"] == "kept"  # a later value that fits still goes
    assert kept == [f"field{i:02}" for i in range(len(kept))] and 4 <= len(kept) <= 7  # ~7 KiB
    assert sum("too large for one beat" in message for message in warnings(caplog)) == 1


def test_an_event_still_over_the_size_cap_keeps_the_beat_and_loses_the_meta(
    producer: Producer, r: redis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Within the meta budget, but with a long model name and fingerprint the event is over 8 KiB.
    meta = {f"field{i}": "z" * 1000 for i in range(6)}
    producer.heartbeat(tokens=5, model="m" * 1024, fp="f" * 1024, **meta)

    (beat,) = delivered(r, prefix, 1)
    assert beat["tokens"] == 5 and len(beat["model"]) == 1024
    assert not [key for key in beat if key.startswith("field")]
    assert any("lost its meta" in message for message in warnings(caplog))


def api_response(items: int) -> list[dict[str, Any]]:
    """What a parsed JSON API response looks like: ~90 bytes of JSON per item."""
    return [
        {"id": n, "name": f"item-{n}", "tags": ["a", "b"], "score": n / 7, "ok": True, "next": None}
        for n in range(items)
    ]


@pytest.mark.parametrize(
    "value",
    [api_response(5000), [[n] * 256 for n in range(256)], {f"k{n}": list(range(300)) for n in range(3000)}],
    ids=["445 KB JSON list", "256x256 nested list", "3000 keys of 300 items"],
)
def test_a_huge_meta_value_is_dropped_whole_and_warned_once(
    value: Any, caplog: pytest.LogCaptureFixture
) -> None:
    for _ in range(3):
        event: dict[str, Any] = {}
        size = clean_meta({"response": value, "step": "search"}, event)
        assert event == {"step": "search"}  # the huge value is dropped whole, the rest kept
        assert size < 100
    assert sum("too large for one beat" in m for m in warnings(caplog)) == 1


class _Watched(list[Any]):
    """A list that counts the items anyone reads from it (all instances together)."""

    read = 0

    def __iter__(self) -> Iterator[Any]:
        for item in super().__iter__():
            _Watched.read += 1
            yield item


def test_the_walk_of_a_huge_meta_value_stops_at_the_budget() -> None:
    """What keeps such a beat to microseconds (benchmarks/producer_heartbeat.py times it): the
    walk reads about one budget of values (META_ITEMS), never the whole value (256 x 256 here),
    which is what cost up to 436 ms before the budget."""
    value = _Watched(_Watched(range(n, n + 256)) for n in range(256))
    _Watched.read = 0
    event: dict[str, Any] = {}
    clean_meta({"response": value, "step": "search"}, event)
    assert event == {"step": "search"}
    assert 0 < _Watched.read <= 2 * META_ITEMS


def test_heavy_beats_are_bounded_by_queue_bytes_and_every_one_is_counted(
    redis_url: str, prefix: str, r: redis.Redis
) -> None:
    producer = Producer("heavy-bot", redis_url=redis_url, prefix=prefix, queue_bytes=64 * 1024,
                        flush_interval=600, pulse_interval=600)  # fmt: skip
    meta = {f"field{i}": "z" * 1000 for i in range(5)}  # ~5 KB per beat
    try:
        for n in range(100):
            producer.heartbeat(tokens=n, **meta)
        sender = producer._sender
        assert sender is not None
        queued = sender.bytes_in - sender.bytes_out
        one = clean_meta(meta, {})  # the approximate size each of them is counted at
        assert 64 * 1024 - one < queued <= 64 * 1024  # a dozen heavy beats, not a hundred
        assert len(producer._queue) * one == queued
        producer.heartbeat(tokens=1000)  # a light beat still fits: queue_size is not reached
        assert len(producer._queue) == queued // one + 1
    finally:
        producer.close()

    events = read_events(r, f"{prefix}:events")
    dropped = sum(e.get("dropped", {}).get("queue_full", 0) for e in events)
    assert len(of_kind(events, "beat")) + dropped == 101
    assert sender.bytes_in == sender.bytes_out  # every heavy beat taken off the queue was uncounted


def test_internal_errors_are_swallowed_unless_asked_to_raise(
    producer: Producer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any) -> int:
        raise ZeroDivisionError("an SDK bug")

    monkeypatch.setattr("producers._producer.clean_meta", broken)
    with pytest.raises(ZeroDivisionError):  # the test suite's mode
        producer.heartbeat(x=1)

    monkeypatch.setattr(_guard, "RAISE_INTERNAL", False)  # an agent's mode
    producer.heartbeat(x=1)
    producer.heartbeat(x=1)
    errors = [rec for rec in caplog.records if rec.levelno == logging.ERROR]
    assert len(errors) == 1 and "internal error in heartbeat" in errors[0].getMessage()
