"""``[http]`` settings and the bind rule: bad values are named at load, a public address without a
token is refused before anything starts, ping URLs parse as documented."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from agentwatch.cli import app
from agentwatch.config import HttpSection, split_bind
from agentwatch.errors import ConfigError
from agentwatch.http.access import check_bind, is_loopback
from agentwatch.http.ping import BadPing, event_of, parse_command, parse_fields, parse_interval

SECRET = "s" * 16


@pytest.mark.parametrize(
    ("bind", "expected"),
    [
        ("127.0.0.1:8787", ("127.0.0.1", 8787)),
        ("[::1]:9000", ("::1", 9000)),
        ("localhost:80", ("localhost", 80)),
    ],
)
def test_bind_addresses(bind: str, expected: tuple[str, int]) -> None:
    assert split_bind(bind) == expected


@pytest.mark.parametrize(("bind", "why"), [("8787", "host:port"), ("::1:8787", "in brackets"),
                                            ("h:99999", "host:port"), ("h:", "host:port")])  # fmt: skip
def test_bad_bind_addresses_are_named(bind: str, why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        HttpSection(bind=bind)


def test_short_secrets_are_refused() -> None:
    with pytest.raises(ValidationError, match="at least 16 characters"):
        HttpSection(token="hunter2")
    with pytest.raises(ValidationError, match="at least 16 characters"):
        HttpSection(ping_key="abc")


def test_chart_series_are_bounded() -> None:
    with pytest.raises(ValidationError, match="at most 4096 points"):
        HttpSection.model_validate({"series_bucket": "10s", "series_span": "1d"})


@pytest.mark.parametrize("bind", ["0.0.0.0:8787", "[::]:8787", "10.0.0.5:80", "dashboard.example.com:80"])
def test_a_public_address_needs_a_token(bind: str) -> None:
    with pytest.raises(ConfigError, match="not a loopback address, and \\[http\\] token is not set"):
        check_bind(HttpSection(), bind)
    check_bind(HttpSection(token=SECRET), bind)  # with a token: fine


def test_check_config_refuses_what_up_would_refuse_naming_the_key(tmp_path: Path) -> None:
    """The bind rule at check-config too: exit 2 naming ``[http] bind``, so a file that passes
    starts ``up``; with a token, or with the server off in ``up``, the same address is fine."""
    runner = CliRunner()
    path = tmp_path / "pipeline.toml"
    path.write_text('[http]\nbind = "0.0.0.0:8787"\n')
    refused = runner.invoke(app, ["check-config", str(path)])
    assert refused.exit_code == 2, refused.output
    assert (
        "[http] bind: '0.0.0.0:8787' is not a loopback address, and [http] token is not set" in refused.output
    )
    for extra in (f'token = "{SECRET}"', "enabled = false"):
        path.write_text(f'[http]\nbind = "0.0.0.0:8787"\n{extra}\n')
        accepted = runner.invoke(app, ["check-config", str(path)])
        assert accepted.exit_code == 0, accepted.output


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "localhost"])
def test_loopback_needs_no_token(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize(
    ("rest", "expected"),
    [("job", ("job", "beat")), ("team/job/start", ("team/job", "start")), ("a/fail", ("a", "fail")),
     ("a/0", ("a", "0")), ("a/137", ("a", "137")), ("a/b", ("a/b", "beat")), ("start", ("start", "beat"))],
)  # fmt: skip
def test_ping_paths(rest: str, expected: tuple[str, str]) -> None:
    assert parse_command(rest) == expected


@pytest.mark.parametrize(
    ("rest", "kind", "expected"),
    [("backup/start", "beat", ("backup/start", "beat")), ("shards/3", "start", ("shards/3", "start")),
     ("a/fail", "fail", ("a/fail", "fail")), ("a", "137", ("a", "137"))],
)  # fmt: skip
def test_the_kind_query_makes_the_whole_path_the_agent(
    rest: str, kind: str, expected: tuple[str, str]
) -> None:
    assert parse_command(rest, kind) == expected


@pytest.mark.parametrize("kind", ["exit", "", "²", "-1", "START"])
def test_an_unknown_kind_is_refused_by_name(kind: str) -> None:
    with pytest.raises(BadPing, match="kind must be one of beat, start, fail or an exit code"):
        parse_command("job", kind)


def test_a_last_segment_of_non_ascii_digits_is_part_of_the_name() -> None:
    assert parse_command("a/²") == ("a/²", "beat")  # int("²") fails: never read as an exit code


def test_ping_bodies_and_commands() -> None:
    assert parse_fields(b"", ("tokens",)) == {}
    assert parse_fields(b'{"tokens": 5, "model": null}', ("tokens", "model")) == {"tokens": 5}
    with pytest.raises(BadPing, match="unknown key\\(s\\) 'token'; allowed: tokens"):
        parse_fields(b'{"token": 5}', ("tokens",))
    with pytest.raises(BadPing, match="must be a JSON object, got list"):
        parse_fields(b"[1]", ("tokens",))
    assert event_of("0", {"tokens": 3}) == ("beat", {"tokens": 3})
    assert event_of("3", {"error": "x"}) == ("exit", {"reason": "exit", "code": 3, "error": "x"})
    assert event_of("fail", {}) == ("exit", {"reason": "exit", "error": "reported as failed (/fail)"})
    with pytest.raises(BadPing, match="takes only 'error'"):
        event_of("fail", {"tokens": 5})
    assert parse_interval("300") == 300.0 and parse_interval("5m") == 300.0 and parse_interval(None) is None
    with pytest.raises(BadPing, match="above 0"):
        parse_interval("-1")
