"""Wire protocol v1 decoding: what is accepted, and the reason given for what is not.

Pure logic, no Redis: the same inputs go through real streams in test_worker.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import msgpack
import pytest

from agentwatch import codec, signing
from agentwatch.errors import InvalidEntry


def event(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {"v": 1, "agent": "my-bot", "kind": "beat", "ts": 1.5, "run": "r1", "seq": 0}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def reason(raw: bytes) -> str:
    with pytest.raises(InvalidEntry) as caught:
        codec.decode(raw)
    return str(caught.value)


def test_a_full_beat_round_trips() -> None:
    beat = event(tokens=120, tokens_in=100, tokens_out=20, cost=0.0012, model="gpt-4o", fp="job-7")
    assert codec.decode(codec.encode(beat)) == beat


@pytest.mark.parametrize("kind", ["start", "beat", "pulse"])
def test_every_kind_is_accepted(kind: str) -> None:
    assert codec.decode(codec.encode(event(kind=kind)))["kind"] == kind


def test_exit_needs_a_known_reason() -> None:
    assert codec.decode(codec.encode(event(kind="exit", reason="signal", code=143)))["reason"] == "signal"
    assert "exit 'reason'" in reason(codec.encode(event(kind="exit", reason="bored")))


def test_unknown_keys_are_kept_for_forward_compatibility() -> None:
    decoded = codec.decode(codec.encode(event(ok=False, shiny={"new": [1, 2]})))
    assert decoded["ok"] is False and decoded["shiny"] == {"new": [1, 2]}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"\xc1\x00garbage", "not msgpack"),
        (msgpack.packb([1, 2, 3]), "not a msgpack map but list"),
        (msgpack.packb("hello"), "not a msgpack map but str"),
        (b"\x92\x01", "not msgpack"),  # truncated array
        (codec.encode(event(v=2)), "unsupported protocol version 2"),
        (codec.encode(event(v=True)), "unsupported protocol version"),
        (codec.encode(event(kind="dance")), "unknown kind 'dance'"),
        (codec.encode(event(tokens=math.nan)), "'tokens' must be an integer >= 0"),
        (codec.encode(event(tokens=-5)), "'tokens' must be an integer >= 0"),
        (codec.encode(event(tokens="abc")), "'tokens' must be an integer >= 0"),
        (codec.encode(event(cost=math.nan)), "'cost' must be a finite number >= 0"),
        (codec.encode(event(cost=math.inf)), "'cost' must be a finite number >= 0"),
        (codec.encode(event(cost=-0.5)), "'cost' must be a finite number >= 0"),
        (codec.encode(event(ts=math.nan)), "'ts' must be a finite number >= 0"),
        (codec.encode(event(ts=-5.0)), "'ts' must be a finite number >= 0, got -5.0"),
        (codec.encode(event(ts=math.inf)), "'ts' must be a finite number >= 0"),
        (codec.encode(event(seq=-1)), "'seq' must be an integer >= 0"),
        (codec.encode(event(run="")), "'run' must be a string"),
        (codec.encode(event(agent=None)), "missing key 'agent'"),
        (codec.encode(event(agent=["a"])), "'agent' must be a string"),
        (codec.encode(event(kind={"k": 1})), "unknown kind {'k': 1}"),
        (codec.encode(event(kind="exit", reason=["x"])), "exit 'reason' must be one of"),
        (codec.encode(event(run=None)), "missing key 'run'"),
        (codec.encode(event(agent="my bot")), "characters outside"),
        (codec.encode(event(agent="bot\nx")), "characters outside"),
        (codec.encode(event(agent="bot;rm -rf /")), "characters outside"),
        (codec.encode(event(agent="$(reboot)")), "characters outside"),
        (codec.encode(event(agent="-oProxyCommand")), "starts with '-' (it could be read as an option)"),
        (codec.encode(event(agent="../evil")), "has a '.' or '..' path segment"),
        (codec.encode(event(agent="team/../../evil")), "has a '.' or '..' path segment"),
        (codec.encode(event(agent="team/..")), "has a '.' or '..' path segment"),
        (codec.encode(event(agent=".")), "has a '.' or '..' path segment"),
        (codec.encode(event(agent="a" * 256)), "must be 1-128 chars, got 256"),
        (codec.encode(event(agent="")), "must be 1-128 chars, got 0"),
        (codec.encode(event(stack="x" * 5000)), "'stack' must be a string of at most 4096"),
        (codec.encode(event(dropped={"queue_full": -1})), "'dropped' must map"),
        (codec.encode(event(dropped={"queue_full": 2**53})), "'dropped' must map"),
        (codec.encode(event(tokens=2**63)), "'tokens' must be at most 2**53-1 (9007199254740991), got"),
        (codec.encode(event(tokens=2**53)), "'tokens' must be at most 2**53-1"),
        (codec.encode(event(seq=2**64 - 1)), "'seq' must be at most 2**53-1"),
        (codec.encode(event(kind="pulse", rss=2**60)), "'rss' must be at most 2**53-1"),
        (codec.encode(event(kind="start", pid=2**53)), "'pid' must be at most 2**53-1"),
        (codec.encode(event(tokens_in=2**53)), "'tokens_in' must be at most 2**53-1"),
        (codec.encode(event(tokens_out=2**53)), "'tokens_out' must be at most 2**53-1"),
        (
            codec.encode(event(kind="start", interval=31_536_001)),
            "'interval' must be at most 31536000 seconds",
        ),
        (codec.encode(event(extend=1e12)), "'extend' must be at most 31536000 seconds (365 days)"),
        (codec.encode(event(extend=-1.0)), "'extend' must be a finite number >= 0"),
        (codec.encode(event(kind="exit", reason="exit", code=2**63)), "'code' must be an integer within"),
    ],
)
def test_bad_entries_are_refused_with_a_precise_reason(raw: bytes, expected: str) -> None:
    assert expected in reason(raw)


@pytest.mark.parametrize(
    "changes",
    [
        {"ts": 0}, {"ts": 0.0}, {"seq": 2**53 - 1}, {"tokens": 2**53 - 1}, {"tokens": 0},
        {"kind": "pulse", "rss": 2**53 - 1, "interval": 31_536_000}, {"extend": 31_536_000.0},
        {"kind": "start", "pid": 2**53 - 1, "interval": 0.5}, {"kind": "exit", "reason": "exit", "code": -9},
        {"dropped": {"queue_full": 2**53 - 1}},
    ],
)  # fmt: skip
def test_values_at_the_caps_are_accepted(changes: dict[str, object]) -> None:
    decoded = codec.decode(codec.encode(event(**changes)))
    assert {key: decoded[key] for key in changes} == changes


def test_an_oversized_entry_is_refused_before_unpacking() -> None:
    raw = codec.encode(event(blob="x" * (1 << 20)))
    assert reason(raw) == f"entry is {len(raw)} bytes, over the 8192-byte cap"


def test_deeply_nested_meta_is_refused() -> None:
    nested: object = 1
    for _ in range(6):
        nested = {"k": nested}
    assert "'meta' is nested deeper than 4 levels" in reason(codec.encode(event(meta=nested)))
    shallow = {"a": {"b": {"c": [1]}}}
    assert codec.decode(codec.encode(event(meta=shallow)))["meta"] == shallow


def test_pathological_nesting_within_the_size_cap_is_refused_not_crashing() -> None:
    deep = b"\x91" * 4000 + b"\x01"  # [[[[...1]]]] 4000 levels in 4 KB
    assert reason(b"\x81\xa1m" + deep) == "not msgpack (StackError)"
    fine = codec.encode(event(meta=0))
    hollow = fine[:-1]  # drop the encoded 0 to splice a 500-deep list in as the value of meta
    assert "'meta' is nested deeper than 4 levels" in reason(hollow + b"\x91" * 500 + b"\x01")


def test_map_keys_must_be_strings() -> None:
    assert "not msgpack" in reason(msgpack.packb({1: "x"}))


WEIRD_VALUES = [
    None,
    True,
    -1,
    2**64 - 1,
    -(2**63),
    1.5,
    math.nan,
    -math.inf,
    "",
    "x" * 2000,
    b"\x00",
    [],
    [[]],
    {},
    {"a": []},
]


@pytest.mark.parametrize("key", ["v", "agent", "kind", "ts", "run", "seq", "tokens", "tokens_in", "cost",
                                 "model", "fp", "rss", "stack", "interval", "extend", "dropped", "code",
                                 "reason", "error", "pid", "host", "meta"])  # fmt: skip
def test_any_value_of_any_key_is_accepted_or_refused_never_crashes(key: str) -> None:
    for kind in ("beat", "exit"):
        for value in WEIRD_VALUES:
            raw = codec.encode({**event(kind=kind, reason="exit"), key: value})
            with contextlib.suppress(InvalidEntry):
                codec.decode(raw)


@pytest.mark.parametrize("name", ["a..b", "team/bot.v2", "..hidden-not", "x-", "bot@host:1", "a/b/c", "_-x"])
def test_names_that_only_look_like_paths_or_options_are_valid(name: str) -> None:
    assert codec.decode(codec.encode(event(agent=name)))["agent"] == name


def test_agent_names_are_cached_only_after_validation() -> None:
    name = "cache-probe-agent"
    codec.decode(codec.encode(event(agent=name)))
    assert name in codec._valid_agents
    reason(codec.encode(event(agent="not valid!")))
    assert "not valid!" not in codec._valid_agents


def test_entry_ms_reads_redis_time_from_an_entry_id() -> None:
    assert codec.entry_ms(b"1700000000123-7") == 1700000000123
    assert codec.entry_ms("1700000000123-0") == 1700000000123


@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_the_redis_cli_example_in_protocol_md_prints_a_valid_beat_in_any_shell(shell: str) -> None:
    if shutil.which(shell) is None:
        pytest.skip(f"no {shell}")
    text = (Path(__file__).resolve().parents[1] / "PROTOCOL.md").read_text()
    example = re.search(r"```sh\n# (\{.*\})\n(printf '[^']*')", text)
    assert example is not None, "the redis-cli example in PROTOCOL.md"
    printed = subprocess.run([shell, "-c", example.group(2)], capture_output=True, check=True).stdout
    assert printed == codec.encode(json.loads(example.group(1)))
    assert codec.decode(printed)["kind"] == "beat"


def test_the_signature_test_vector_in_protocol_md_holds() -> None:
    text = (Path(__file__).resolve().parents[1] / "PROTOCOL.md").read_text()
    found = re.search(
        r"secret `([^`]+)`, agent `([^`]+)` gives the key\s+`([0-9a-f]{64})`.*?`d` = `([0-9a-f]+)`.*?"
        r"signed at `(\d+)` for `([^`]+)`, carries\s+`s` = `([^`]+)`",
        text,
        re.S,
    )
    assert found, "the test vector in PROTOCOL.md"
    secret, agent, key, data, at, stream, signature = found.groups()
    assert signing.agent_key(secret, agent) == key
    signer = signing.Signer(key, stream)
    signer.stamp(int(at))
    assert signer.sign(bytes.fromhex(data)).decode() == signature
    assert signing.check(key, stream, bytes.fromhex(data), signature.encode()) == int(at)
    assert codec.decode(bytes.fromhex(data))["agent"] == agent
