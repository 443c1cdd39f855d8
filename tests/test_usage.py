"""Usage objects of real SDKs become the protocol's token classes, counted exactly once.

Built from the real ``openai`` and ``anthropic`` model classes (test dependencies), and from
LiteLLM-, LangChain- and Gemini-shaped dicts as those libraries return them.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from agents.testkit import of_kind, read_events, wait_for
from anthropic.types import Message, Usage
from anthropic.types.output_tokens_details import OutputTokensDetails as AnthropicOutputDetails
from openai.types import CompletionUsage
from openai.types.completion_usage import CompletionTokensDetails, PromptTokensDetails
from openai.types.responses import ResponseUsage
from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails

from agentwatch import codec
from producers import Producer, _guard
from producers._usage import usage_fields


@pytest.fixture(autouse=True)
def strict(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_guard, "RAISE_INTERNAL", True)
    monkeypatch.setattr(_guard, "_warned", set())


def chat_usage() -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=12_000,
        completion_tokens=900,
        total_tokens=12_900,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=8_000, cache_write_tokens=3_000),
        completion_tokens_details=CompletionTokensDetails(reasoning_tokens=600),
    )


def responses_usage() -> ResponseUsage:
    return ResponseUsage(
        input_tokens=5_000,
        input_tokens_details=InputTokensDetails(cached_tokens=4_096, cache_write_tokens=500),
        output_tokens=2_000,
        output_tokens_details=OutputTokensDetails(reasoning_tokens=1_500),
        total_tokens=7_000,
    )


def anthropic_message() -> Message:
    return Message(
        id="msg_01",
        type="message",
        role="assistant",
        model="claude-sonnet-4-5",
        content=[],
        stop_reason="end_turn",
        stop_sequence=None,
        usage=Usage(
            input_tokens=50,
            output_tokens=700,
            cache_read_input_tokens=10_000,
            cache_creation_input_tokens=2_000,
            output_tokens_details=AnthropicOutputDetails(thinking_tokens=400),
        ),
    )


def test_openai_chat_usage_keeps_cache_write_and_reasoning_apart() -> None:
    assert usage_fields(chat_usage()) == {
        "tokens_in": 12_000, "tokens_out": 900, "tokens": 12_900,
        "tokens_cache_read": 8_000, "tokens_cache_write": 3_000, "tokens_reasoning": 600,
    }  # fmt: skip


def test_openai_responses_usage() -> None:
    assert usage_fields(responses_usage()) == {
        "tokens_in": 5_000, "tokens_out": 2_000, "tokens": 7_000,
        "tokens_cache_read": 4_096, "tokens_cache_write": 500, "tokens_reasoning": 1_500,
    }  # fmt: skip


def test_anthropic_message_adds_cache_tokens_to_input_once() -> None:
    assert usage_fields(anthropic_message()) == {
        "tokens_in": 12_050, "tokens_out": 700, "tokens": 12_750,
        "tokens_cache_read": 10_000, "tokens_cache_write": 2_000, "tokens_reasoning": 400,
    }  # fmt: skip


def test_litellm_with_an_anthropic_model_counts_the_cache_once() -> None:
    # LiteLLM's ModelResponse.usage for Claude: OpenAI's names (prompt_tokens includes the
    # cache) plus Anthropic's cache fields. Adding those gave tokens_in 20,050 > tokens.
    litellm = {
        "prompt_tokens": 10_050, "completion_tokens": 300, "total_tokens": 10_350,
        "cache_read_input_tokens": 10_000, "cache_creation_input_tokens": 0,
        "prompt_tokens_details": {"cached_tokens": 10_000},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }  # fmt: skip
    fields = usage_fields(litellm)
    assert fields == {"tokens_in": 10_050, "tokens_out": 300, "tokens": 10_350, "tokens_cache_read": 10_000}
    assert fields["tokens_in"] <= fields["tokens"]


def test_an_input_tokens_shape_with_anthropic_cache_fields_and_an_inclusive_total() -> None:
    # input_tokens that already hold the cache (the total says so): not added twice.
    usage = {"input_tokens": 1_200, "output_tokens": 100, "total_tokens": 1_300,
             "cache_read_input_tokens": 1_000}  # fmt: skip
    assert usage_fields(usage)["tokens_in"] == 1_200


def test_langchain_usage_metadata_dict_and_message() -> None:
    metadata = {
        "input_tokens": 3_000, "output_tokens": 800, "total_tokens": 3_800,
        "input_token_details": {"cache_read": 2_000, "cache_creation": 500, "audio": 0},
        "output_token_details": {"reasoning": 300, "audio": 0},
    }  # fmt: skip
    expected = {
        "tokens_in": 3_000, "tokens_out": 800, "tokens": 3_800,
        "tokens_cache_read": 2_000, "tokens_cache_write": 500, "tokens_reasoning": 300,
    }  # fmt: skip
    assert usage_fields(metadata) == expected
    message = SimpleNamespace(content="hi", usage_metadata=metadata)  # an AIMessage carries it so
    assert usage_fields(message) == expected


def test_gemini_usage_metadata_adds_thoughts_to_output() -> None:
    metadata = {"prompt_token_count": 4_000, "candidates_token_count": 250, "thoughts_token_count": 750,
                "cached_content_token_count": 3_000, "total_token_count": 5_000}  # fmt: skip
    assert usage_fields(SimpleNamespace(usage_metadata=metadata)) == {
        "tokens_in": 4_000, "tokens_out": 1_000, "tokens": 5_000,
        "tokens_cache_read": 3_000, "tokens_reasoning": 750,
    }  # fmt: skip


def test_classes_larger_than_what_they_share_are_dropped(caplog: pytest.LogCaptureFixture) -> None:
    usage = {"prompt_tokens": 100, "completion_tokens": 10, "prompt_tokens_details": {"cached_tokens": 500},
             "completion_tokens_details": {"reasoning_tokens": 11}}  # fmt: skip
    assert usage_fields(usage) == {"tokens_in": 100, "tokens_out": 10, "tokens": 110}
    text = " ".join(rec.getMessage() for rec in caplog.records)
    assert "more cache tokens (500) than input tokens (100)" in text
    assert "more reasoning tokens (11) than output tokens (10)" in text


@pytest.fixture
def producer(redis_url: str, prefix: str) -> Iterator[Producer]:
    made = Producer("usage-bot", redis_url=redis_url, prefix=prefix, flush_interval=0.01)
    yield made
    made.close()


def beats(r: redis.Redis, prefix: str, count: int) -> list[dict[str, Any]]:
    def enough() -> list[dict[str, Any]] | None:
        found = of_kind(read_events(r, f"{prefix}:events"), "beat")
        return found if len(found) >= count else None

    return wait_for(enough, what=f"{count} beats")


def test_token_classes_travel_as_protocol_keys_end_to_end(
    producer: Producer, r: redis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    producer.heartbeat(usage=anthropic_message(), model="claude-sonnet-4-5")
    # By hand, as keywords (they used to be meta): counts, validated like tokens_in.
    producer.heartbeat(tokens_in=100, tokens_out=20, tokens_cache_read=60, tokens_reasoning=5)
    producer.heartbeat(tokens_in=100, tokens_cache_write=-3, tokens_reasoning="many")
    first, second, third = beats(r, prefix, 3)
    for event in (first, second, third):  # every one a valid protocol event
        codec.validate(event)
    classes = ("tokens_in", "tokens_cache_read", "tokens_cache_write", "tokens_reasoning")
    assert [first[key] for key in classes] == [12_050, 10_000, 2_000, 400]
    assert (second["tokens_cache_read"], second["tokens_reasoning"]) == (60, 5)
    assert "tokens_cache_write" not in third and "tokens_reasoning" not in third
    text = " ".join(rec.getMessage() for rec in caplog.records)
    assert "heartbeat(tokens_cache_write=-3) is negative" in text
    assert "heartbeat(tokens_reasoning='many') is not an integer" in text


@pytest.mark.parametrize("key", ["tokens_cache_read", "tokens_cache_write", "tokens_reasoning"])
@pytest.mark.parametrize("value", [-1, 1.5, "7", 2**53, True])
def test_the_codec_checks_token_classes_as_counts(key: str, value: object) -> None:
    event = {"v": 1, "agent": "a", "kind": "beat", "ts": 1.0, "run": "r", "seq": 0, key: value}
    with pytest.raises(codec.InvalidEntry, match=key):
        codec.validate(event)


def test_the_codec_caps_cost() -> None:
    event = {"v": 1, "agent": "a", "kind": "beat", "ts": 1.0, "run": "r", "seq": 0}
    codec.validate({**event, "cost": codec.MAX_COST})
    with pytest.raises(codec.InvalidEntry, match=r"'cost' must be at most 1,000,000"):
        codec.validate({**event, "cost": 1e300})


def test_the_producer_drops_a_huge_cost_with_a_warning(
    producer: Producer, r: redis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    producer.heartbeat(cost=5e9, tokens=10)
    (beat,) = beats(r, prefix, 1)
    assert "cost" not in beat and beat["tokens"] == 10
    assert any("cost=5000000000.0 is over 1,000,000" in rec.getMessage() for rec in caplog.records)
