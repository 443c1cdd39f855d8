"""What an export becomes, given what the receiver remembers: protocol events (fast, no Redis).

Each test folds decoded requests through the receiver's state exactly as consecutive exports
would (the state is packed and unpacked between them, as it is in Redis).
"""

from __future__ import annotations

from collections import Counter

import pytest

from agentwatch import codec
from agentwatch.config import OtlpSection
from agentwatch.otlp.decode import decode_metrics
from agentwatch.otlp.fold import Draft, fold_metrics, fold_spans, start_facts
from agentwatch.otlp.metrics import read_metrics
from agentwatch.otlp.state import ProcessState

from otlp_build import DELTA, llm_call, read_request, recorded, span, token_histogram, tool_call, traces

SERVICE = {"service.name": "svc", "service.instance.id": "i-1"}
T0_MS = 1_800_000_000_000


class Process:
    """One exporting process as the receiver sees it across exports (state round-tripped)."""

    def __init__(self, settings: OtlpSection | None = None) -> None:
        self.settings = settings or OtlpSection()
        self.state: bytes | None = None
        self.tally: Counter[str] = Counter()
        self.own: list[str | None] = []

    def spans(self, *spans, resource=SERVICE) -> list[Draft]:
        (batch,) = read_request(traces((resource, list(spans))), self.settings).batches
        own = self._own(batch.origin.agent)
        state = ProcessState.unpack(self.state, own=own)
        out = fold_spans(batch, state.trace, state.metric, self.settings, self.tally)
        self.state = state.pack(2**32 - 1, own=own)
        return _valid(out)

    def metrics(self, request, at_ms: int) -> list[Draft] | None:
        (batch,) = read_metrics(request, self.settings).batches
        own = self._own(batch.origin.agent)
        state = ProcessState.unpack(self.state, own=own)
        out = fold_metrics(batch, state.trace, state.metric, self.settings, now_ms=at_ms, tally=self.tally)
        self.state = state.pack(2**32 - 1, own=own)
        return None if out is None else _valid(out)

    def _own(self, agent: str | None) -> str | None:
        """The agent the state is packed around: the first resource's, as the receiver's is its
        resource's (the process's key hashes it; some tests send one process two resources)."""
        if not self.own:
            self.own.append(agent)
        return self.own[0]


def _valid(drafts: list[Draft]) -> list[Draft]:
    """Every draft is a valid protocol event once the writer numbers it."""
    for seq, draft in enumerate(drafts):
        codec.validate(
            {
                "v": 1,
                "agent": draft.agent,
                "kind": draft.kind,
                "ts": 1.0,
                "run": "r",
                "seq": seq,
                **draft.fields,
            }
        )
    return drafts


def kinds(drafts: list[Draft]) -> list[tuple[str, str]]:
    return [(d.agent, d.kind) for d in drafts]


def test_each_llm_call_is_a_beat_of_its_agent_and_run_with_its_usage():
    process = Process()
    first = process.spans(llm_call(100, 20), llm_call(5, 5))
    assert kinds(first) == [("svc", "beat"), ("svc", "beat")]
    assert {draft.run for draft in first} == {"i-1"}
    assert first[0].fields == {"tokens_in": 100, "tokens_out": 20, "tokens": 120, "model": "gpt-4o"}


def test_a_run_says_where_it_runs():
    resource = {**SERVICE, "host.name": "h1", "service.version": "2.1"}
    (batch,) = read_request(traces((resource, [])), OtlpSection()).batches
    assert start_facts(batch.origin) == {"source": "otlp", "host": "h1", "version": "2.1"}


def test_a_new_service_instance_is_another_process_and_a_new_run():
    settings = OtlpSection()
    (first,) = read_request(traces((SERVICE, [llm_call()])), settings).batches
    restarted = {**SERVICE, "service.instance.id": "i-2"}
    (second,) = read_request(traces((restarted, [llm_call()])), settings).batches
    assert first.origin.key != second.origin.key  # its own state: it starts afresh
    assert (first.origin.run, second.origin.run) == ("i-1", "i-2")


def test_each_llm_call_reads_the_tool_calls_before_it_as_its_fingerprint():
    process = Process()
    drafts = process.spans(llm_call(), tool_call("search", '{"q": 1}'), llm_call(), llm_call())
    beats = [d for d in drafts if d.kind == "beat"]
    assert "fp" not in beats[0].fields
    assert beats[1].fields["fp"].startswith("search(")
    assert "fp" not in beats[2].fields  # a second call without a tool between reads nothing new


def test_a_looping_agent_gives_the_same_fingerprint_on_every_beat_across_exports():
    process = Process()
    fps = []
    for _ in range(5):  # each export: one LLM call, then the tool it asked for
        drafts = process.spans(llm_call(), tool_call("get_weather", '{"city": "Paris"}'))
        fps += [d.fields.get("fp") for d in drafts if d.kind == "beat"]
    assert fps[0] is None  # the very first call read no tool
    assert len(set(fps[1:])) == 1 and fps[1].startswith("get_weather(")


def test_parallel_tool_calls_make_one_order_free_fingerprint():
    process = Process()
    one = process.spans(tool_call("a", "1"), tool_call("b", "2"), llm_call())
    two = process.spans(tool_call("b", "2"), tool_call("a", "1"), llm_call())
    assert one[-1].fields["fp"] == two[-1].fields["fp"]
    assert one[-1].fields["fp"].count("(") == 2


def test_tool_calls_of_another_trace_are_not_read_by_this_one():
    process = Process()
    drafts = process.spans(tool_call(trace=b"a" * 16), llm_call(trace=b"b" * 16))
    assert "fp" not in drafts[-1].fields


def test_tool_calls_alone_are_a_pulse_not_a_beat():
    process = Process()
    drafts = process.spans(tool_call())
    assert kinds(drafts) == [("svc", "pulse")]
    assert drafts[0].fields == {"interval": 60.0}


def test_other_spans_keep_known_agents_alive_and_create_none():
    unknown = Process()
    assert unknown.spans(span("GET /health")) == []
    known = Process()
    known.spans(llm_call(gen_ai__agent__name="bot"))
    assert kinds(known.spans(span("GET /health"))) == [("bot", "pulse")]


def test_a_resource_naming_its_agent_is_an_agent_before_any_genai_span():
    process = Process()
    resource = {**SERVICE, "gen_ai.agent.name": "crawler"}
    assert kinds(process.spans(span("GET /page"), resource=resource)) == [("crawler", "pulse")]


def test_the_interval_comes_from_a_glob_before_the_default():
    process = Process(OtlpSection(agents={"sv*": {"interval": "10m"}}))
    assert process.spans(tool_call())[0].fields["interval"] == 600.0


def test_usage_from_metrics_keeps_span_beats_for_loops_but_without_usage():
    process = Process(OtlpSection(usage_from="metrics"))
    drafts = process.spans(llm_call(gen_ai__usage__cost=0.5))
    assert drafts[-1].fields == {"model": "gpt-4o"}


# -- metrics -------------------------------------------------------------------------------------


def test_cumulative_totals_become_usage_since_the_previous_export():
    process = Process()
    start = T0_MS * 1_000_000
    assert process.metrics(token_histogram(SERVICE, [("input", 100, start)]), T0_MS) == []  # waits
    second = process.metrics(
        token_histogram(SERVICE, [("input", 150, start), ("output", 40, start)]), T0_MS + 60_000
    )
    assert kinds(second) == [("svc", "pulse"), ("svc", "beat")]
    # the receiver saw the series from its start: all of it counts
    assert second[-1].fields == {"tokens_in": 150, "tokens_out": 40, "tokens": 190, "model": "gpt-4o"}
    third = process.metrics(
        token_histogram(SERVICE, [("input", 175, start), ("output", 40, start)]), T0_MS + 120_000
    )
    assert third[-1].fields == {"tokens_in": 25, "tokens": 25, "model": "gpt-4o"}


def test_a_restarted_series_counts_from_zero_again():
    process = Process()
    start = T0_MS * 1_000_000
    process.metrics(token_histogram(SERVICE, [("input", 100, start)]), T0_MS)
    process.metrics(token_histogram(SERVICE, [("input", 500, start)]), T0_MS + 60_000)
    later = start + 90_000 * 1_000_000
    drafts = process.metrics(token_histogram(SERVICE, [("input", 30, later)]), T0_MS + 120_000)
    assert drafts[-1].fields["tokens_in"] == 30


def test_a_series_that_began_long_before_the_receiver_saw_it_only_sets_a_baseline():
    process = Process()
    old = (T0_MS - 3_600_000) * 1_000_000
    process.metrics(token_histogram(SERVICE, [("input", 10_000, old)]), T0_MS)
    second = process.metrics(token_histogram(SERVICE, [("input", 10_000, old)]), T0_MS + 60_000)
    assert [d.kind for d in second] == ["pulse"]
    third = process.metrics(token_histogram(SERVICE, [("input", 10_300, old)]), T0_MS + 120_000)
    assert third[-1].fields["tokens_in"] == 300


def test_delta_points_count_as_they_come():
    process = Process()
    process.spans(span("x"), resource={**SERVICE, "gen_ai.agent.name": "bot"})
    request = token_histogram(SERVICE, [("input", 70, 0)], temporality=DELTA)
    drafts = process.metrics(request, T0_MS)
    assert drafts[-1].agent == "bot" and drafts[-1].fields["tokens_in"] == 70


def test_metrics_of_a_process_whose_spans_carry_usage_only_prove_it_alive():
    process = Process()
    process.spans(llm_call(100, 20, gen_ai__agent__name="bot"))
    drafts = process.metrics(token_histogram(SERVICE, [("input", 100, T0_MS * 1_000_000)]), T0_MS)
    assert kinds(drafts) == [("bot", "pulse")]  # the same calls: not counted twice


def test_the_interval_is_learnt_from_the_metrics_cadence():
    process = Process()
    process.spans(llm_call(gen_ai__agent__name="bot"))
    start = T0_MS * 1_000_000
    for n in range(4):
        drafts = process.metrics(token_histogram(SERVICE, [("input", 100, start)]), T0_MS + n * 300_000)
    assert drafts[0].fields["interval"] == 300.0
    # an out-of-cycle export (a flush at shutdown) does not shrink it
    drafts = process.metrics(token_histogram(SERVICE, [("input", 100, start)]), T0_MS + 3 * 300_000 + 2_000)
    assert drafts[0].fields["interval"] == 300.0


def test_metrics_of_a_process_with_no_genai_are_ignored_entirely():
    process = Process()
    request = token_histogram(SERVICE, [("input", 1, 0)])
    request.resource_metrics[0].scope_metrics[0].metrics[0].name = "http.server.duration"
    assert process.metrics(request, T0_MS) is None


def test_a_bad_metric_value_is_dropped_and_counted():
    process = Process()
    request = token_histogram(SERVICE, [("input", -5, 0), ("output", 2.5, 0)], temporality=DELTA)
    found = read_metrics(request, OtlpSection())
    assert found.tally["counts_dropped"] == 2 and found.rejected == 2
    assert found.batches[0].points == []
    del process


@pytest.mark.parametrize(
    ("payload", "usage"),
    [
        ("openai-v2.metrics.pb", {"tokens_in": 120, "tokens_out": 30, "tokens": 150}),
        ("openlit.metrics.pb", {"tokens_in": 120, "tokens_out": 30, "tokens": 150, "cost": 0.0006}),
        ("pydantic-ai.metrics.pb", {"tokens_in": 240, "tokens_out": 60, "tokens": 300, "cost": 0.00095}),
        (
            "inference-counters.metrics.pb",
            {
                "tokens_in": 120,
                "tokens_out": 30,
                "tokens": 150,
                "tokens_cache_read": 100,
                "tokens_reasoning": 10,
            },
        ),
    ],
)
def test_recorded_usage_metrics_give_the_usage_of_their_calls(payload, usage):
    """A process known only by its metrics: the first export waits, the second (here the same
    recorded totals again) counts everything the series hold since they began."""
    request = decode_metrics(recorded(payload), "application/x-protobuf", None, 10**7)
    (batch,) = read_metrics(request, OtlpSection()).batches
    recorded_at_ms = max(p.start_ns for p in batch.points) // 1_000_000 + 1000
    process = Process()
    assert process.metrics(request, recorded_at_ms) == []
    drafts = process.metrics(request, recorded_at_ms + 60_000)
    beats = [d for d in drafts if d.kind == "beat"]
    assert len(beats) == 1
    fields = {key: value for key, value in beats[0].fields.items() if key not in ("model", "provider")}
    assert fields == pytest.approx(usage)


def test_metric_deltas_each_under_the_cap_but_summed_over_it_are_dropped() -> None:
    process = Process(OtlpSection(max_tokens=1000, usage_from="metrics"))
    start = T0_MS * 1_000_000 - 10
    resource = {**SERVICE, "gen_ai.agent.name": "bot"}  # names its agent: counted from the first export
    request = token_histogram(resource, [("input", 600, start)], extra={"gen_ai.operation.name": "chat"})
    other = token_histogram(resource, [("input", 600, start)], extra={"gen_ai.operation.name": "embeddings"})
    request.resource_metrics[0].scope_metrics[0].metrics.extend(
        other.resource_metrics[0].scope_metrics[0].metrics
    )
    drafts = process.metrics(request, T0_MS) or []  # two series, one model: 1,200 input tokens in all
    assert [d.fields for d in drafts if d.kind == "beat"] == []
    assert process.tally["counts_dropped"] == 1
    within = token_histogram(resource, [("input", 900, start)], extra={"gen_ai.operation.name": "chat"})
    (beat,) = [d for d in process.metrics(within, T0_MS + 60_000) or [] if d.kind == "beat"]
    assert beat.fields["tokens_in"] == 300  # the series' totals were kept: only that usage was dropped


def test_a_process_state_packs_its_own_agent_as_nil_and_keeps_the_others() -> None:
    state = ProcessState()
    state.trace.remember("svc")
    state.trace.span_usage = True
    packed = state.pack(2**32 - 1, own="svc")
    assert len(packed) == 8  # expiry, then [[nil], true]: the usual process of one agent
    assert ProcessState.unpack(packed, own="svc") == state
    state.trace.remember("planner")
    state.trace.pending, state.trace.pending_agent = ["search(1)"], "svc"
    state.metric.agents = ["svc", "other"]
    again = ProcessState.unpack(state.pack(2**32 - 1, own="svc"), own="svc")
    assert again == state
    assert ProcessState.unpack(state.pack(2**32 - 1)) == state  # no own agent: names in full
    # read without its own agent (cannot happen: the resource is the state's key), nil is no one
    assert ProcessState.unpack(state.pack(2**32 - 1, own="svc")).trace.agents == ["planner"]
