"""pipeline.toml loading: defaults, durations, environment overrides, ${VAR}, per-agent globs,
and the error for every kind of bad file (naming the file and the key)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agentwatch import config, config_errors, loading, plugins, signing
from agentwatch.cli import app
from agentwatch.errors import ConfigError
from detectors import BUILTINS as BUILTIN_DETECTORS

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
SILENCE_KEYS = ", ".join(config_errors.valid_keys(plugins.resolve("detectors", "silence").Config))
"""enabled, class, agents, after, ...: the keys of [detectors.silence] (detectors/ owns the list)."""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.toml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        loading.load(write(tmp_path, text))
    assert caught.value.source == str(tmp_path / "pipeline.toml")
    return caught.value.problems


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AGENTWATCH_REDIS_URL", "AGENTWATCH_PREFIX", "AGENTWATCH_CONFIG"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("30s", 30), ("5m", 300), ("1h", 3600), ("1h30m", 5400), ("2d", 172800), ("1.5s", 1.5)],
)
def test_durations_parse_with_units(text: str, seconds: float) -> None:
    assert config.parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "30", "5 parsecs", "m5", "1h 3", "-5s"])
def test_bad_durations_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="bad duration"):
        config.parse_duration(bad)


def test_a_bare_number_is_not_a_duration() -> None:
    with pytest.raises(ValueError, match='like "60s"'):
        config.parse_duration(60)


def test_no_file_means_built_in_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    pipeline = loading.load(None, plugins=False)
    assert pipeline.source == config.BUILTIN_SOURCE
    assert pipeline.settings.redis.url is None
    assert pipeline.settings.redis.prefix == "aw"
    assert pipeline.keys.events() == "aw:events"


def test_the_repository_pipeline_toml_is_valid_and_all_defaults() -> None:
    pipeline = loading.load(ROOT / "pipeline.toml")
    defaults = config.PipelineSettings()
    assert pipeline.settings.model_dump(exclude={"detectors"}) == defaults.model_dump(exclude={"detectors"})
    assert pipeline.notifiers == []
    # every built-in detector has its section, and every value in it is the default
    assert set(pipeline.settings.detectors) == set(BUILTIN_DETECTORS)
    assert [p.name for p in pipeline.detectors] == list(BUILTIN_DETECTORS)
    for plugin in pipeline.detectors:
        assert plugin.config.model_dump() == type(plugin.config)().model_dump(), plugin.name


def test_file_values_and_durations(tmp_path: Path) -> None:
    path = write(
        tmp_path, '[redis]\nprefix = "prod"\nshards = 4\n[worker]\nclaim_idle = "2m"\ntick = "100ms"\n'
    )
    settings = loading.load(path, plugins=False).settings
    assert (settings.redis.prefix, settings.redis.shards) == ("prod", 4)
    assert settings.worker.claim_idle_s == 120.0 and settings.worker.tick_s == 0.1


def test_environment_overrides_beat_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(
        tmp_path,
        '[redis]\nprefix = "file"\n[detectors.limits]\nclass = "sample_plugins:Threshold"\nlimit = 5\n',
    )
    monkeypatch.setenv("AGENTWATCH_REDIS__PREFIX", "env")
    monkeypatch.setenv("AGENTWATCH_DETECTORS__LIMITS__LIMIT", "7")
    pipeline = loading.load(path)
    assert pipeline.settings.redis.prefix == "env"
    limits = next(p for p in pipeline.detectors if p.name == "limits")
    assert limits.config.limit == 7


def test_producer_variables_fill_in_when_nothing_else_sets_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTWATCH_REDIS_URL", "redis://10.0.0.5:6379/0")
    monkeypatch.setenv("AGENTWATCH_PREFIX", "fleet")
    settings = loading.load(write(tmp_path, ""), plugins=False).settings
    assert (settings.redis.url, settings.redis.prefix) == ("redis://10.0.0.5:6379/0", "fleet")
    settings = loading.load(write(tmp_path, '[redis]\nprefix = "mine"\n'), plugins=False).settings
    assert settings.redis.prefix == "mine"


def test_variables_expand_inside_strings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_HOST", "cache.internal")
    text = '[redis]\nurl = "redis://${REDIS_HOST}:${REDIS_PORT:-6380}/0"\nprefix = "a$$b"\n'
    with pytest.raises(ConfigError):  # "a$b" is not a valid prefix: proves $$ became one $
        loading.load(write(tmp_path, text), plugins=False)
    settings = loading.load(write(tmp_path, text.replace("a$$b", "ab")), plugins=False).settings
    assert settings.redis.url == "redis://cache.internal:6380/0"


def test_an_unset_variable_names_the_key_and_the_variable(tmp_path: Path) -> None:
    found = problems(
        tmp_path, '[[notifiers]]\ntype = "sample_plugins:Print"\nprefix = "${NOT_SET_ANYWHERE}"\n'
    )
    assert found == [
        "[[notifiers]][0] prefix: environment variable NOT_SET_ANYWHERE is not set "
        "(export it, or write ${NOT_SET_ANYWHERE:-default})"
    ]


def test_unknown_key_names_the_key_and_the_valid_choices(tmp_path: Path) -> None:
    found = problems(tmp_path, '[redis]\nprefx = "x"\n')
    assert found == [
        "[redis] prefx: unknown key (did you mean 'prefix'?); "
        "valid keys: url, prefix, shards, cluster, timeout"
    ]


def test_unknown_section_is_named(tmp_path: Path) -> None:
    (found,) = problems(tmp_path, "[redsi]\nurl = 1\n")
    assert found.startswith("unknown section [redsi] (did you mean 'redis'?); valid sections: redis,")


def test_wrong_type_and_bad_duration_are_each_named(tmp_path: Path) -> None:
    found = problems(tmp_path, '[worker]\nbatch = "lots"\nclaim_idle = "soon"\nblock = 5\n')
    assert len(found) == 3
    assert found[0].startswith("[worker] batch: Input should be a valid integer")
    assert found[1].startswith("[worker] block: durations are strings with a unit")
    assert found[2].startswith("[worker] claim_idle: bad duration 'soon'")


def test_not_toml_at_all(tmp_path: Path) -> None:
    (found,) = problems(tmp_path, "[redis\nurl = ")
    assert found.startswith("not valid TOML")


def test_a_missing_file_given_explicitly_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        loading.load(tmp_path / "nope.toml")


def test_unknown_plugins_are_named_with_the_choices(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        '[detectors.wat]\nafter = "1s"\n[[notifiers]]\ntype = "carrier-pigeon"\n'
        '[[notifiers]]\ntype = "sample_plugins:NotAPlugin"\n[[notifiers]]\nurl = "x"\n',
    )
    assert found[0].startswith("[detectors.wat]: unknown detector 'wat'; available:")
    assert found[1].startswith("[[notifiers]][0] type: unknown notifier 'carrier-pigeon'; available:")
    assert found[2] == (
        "[[notifiers]][1] type: 'sample_plugins:NotAPlugin' is not a notifier: "
        "it needs a Config subclass of NotifierConfig"
    )
    assert found[3].startswith("[[notifiers]][2]: missing key 'type'")


def test_a_notifier_filtering_on_a_detector_the_pipeline_lacks_is_named(tmp_path: Path) -> None:
    text = (
        '[detectors.limits]\nclass = "sample_plugins:Threshold"\n'
        '[[notifiers]]\ntype = "restart"\ncommand = ["true"]\non = ["silense", "stall", "loop"]\n'
        '[[notifiers]]\ntype = "webhook"\nurl = "http://127.0.0.1:9/hook"\n'
        'match = { detectors = ["limits", "restart_loop", "stal"] }\n'
    )
    found = problems(tmp_path, text)
    assert len(found) == 2
    assert found[0].startswith(
        "[[notifiers]][0] (restart): unknown detector 'silense' (did you mean 'silence'?); known: "
    )
    assert found[1].startswith("[[notifiers]][1] (webhook): unknown detector 'stal' (did you mean 'stall'?)")
    # The plugin's section name and the restart notifier's own alert are known names.
    assert "limits" in found[1] and "restart_loop" in found[1]


def test_a_plugin_validates_its_own_section(tmp_path: Path) -> None:
    found = problems(
        tmp_path, '[detectors.limits]\nclass = "sample_plugins:Threshold"\nlimt = 3\nafter = 3\n'
    )
    assert len(found) == 2
    assert (
        "[detectors.limits] limt: unknown key (did you mean 'limit'?); "
        "valid keys: enabled, class, agents, limit, after"
    ) in found
    assert any(p.startswith("[detectors.limits] after: durations are strings with a unit") for p in found)


def test_per_agent_overrides_first_matching_glob_wins(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[detectors.limits]\nclass = "sample_plugins:Threshold"\nlimit = 10\nafter = "1m"\n'
        '[detectors.limits.agents."scraper-eu-*"]\nlimit = 99\n'
        '[detectors.limits.agents."scraper-*"]\nlimit = 50\nafter = "10m"\n',
    )
    (limits,) = [p for p in loading.load(path).detectors if p.name == "limits"]
    cfg = limits.config
    assert (cfg.for_agent("trader").limit, cfg.for_agent("trader").after_s) == (10, 60)
    assert (cfg.for_agent("scraper-us-1").limit, cfg.for_agent("scraper-us-1").after_s) == (50, 600)
    assert (cfg.for_agent("scraper-eu-2").limit, cfg.for_agent("scraper-eu-2").after_s) == (99, 60)


def test_per_agent_overrides_are_validated_too(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        '[detectors.limits]\nclass = "sample_plugins:Threshold"\n'
        '[detectors.limits.agents."bot-*"]\nlimit = -1\n[detectors.limits.agents."x"]\nenabled = false\n',
    )
    assert found[0].startswith('[detectors.limits.agents."bot-*"] limit: Input should be greater than')
    assert found[1] == "[detectors.limits.agents.x] enabled: cannot be set per agent"


def test_a_disabled_detector_is_not_loaded(tmp_path: Path) -> None:
    path = write(tmp_path, '[detectors.limits]\nclass = "sample_plugins:Threshold"\nenabled = false\n')
    assert "limits" not in [p.name for p in loading.load(path).detectors]


def test_two_notifiers_of_one_type_get_distinct_names(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[[notifiers]]\ntype = "sample_plugins:Print"\n[[notifiers]]\ntype = "sample_plugins:Print"\n',
    )
    assert [p.name for p in loading.load(path).notifiers] == [
        "sample_plugins:Print",
        "sample_plugins:Print-2",
    ]


def test_check_config_exits_2_and_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[worker]\nbatchsize = 10\n")
    result = subprocess.run(
        [sys.executable, "-m", "agentwatch", "check-config", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert f"invalid configuration in {path}" in result.stderr
    assert "[worker] batchsize: unknown key (did you mean 'batch'?)" in result.stderr


def test_check_config_summarises_a_valid_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[redis]\nurl = "redis://:hunter2@db:6379/0"\n'
        '[detectors.limits]\nclass = "sample_plugins:Threshold"\n'
        '[detectors.limits.agents."x-*"]\nlimit = 1\n',
    )
    result = runner.invoke(app, ["check-config", str(path)])
    assert result.exit_code == 0, result.output
    assert f"{path}: OK" in result.output
    assert "redis://***@db:6379/0" in result.output and "hunter2" not in result.output
    assert "limits     limit=100 after=1m  (+1 per-agent override(s))" in result.output


def test_check_config_defaults_to_pipeline_toml_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, "[redis]\nshards = 0\n")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["check-config"])
    assert result.exit_code == 2
    assert "[redis] shards: Input should be greater than or equal to 1" in result.output


def test_check_config_never_prints_secrets(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[[notifiers]]\ntype = "webhook"\nurl = "https://user:pw123@hooks.example.com/x"\n'
        'secret = "s3cr3t"\nheaders = { Authorization = "Bearer tok3n" }\n',
    )
    result = runner.invoke(app, ["check-config", str(path)])
    assert result.exit_code == 0, result.output
    assert (
        "webhook    type=webhook url=https://***@hooks.example.com/*** headers={Authorization=***} secret=***"
        in result.output
    )
    for secret in ("pw123", "s3cr3t", "tok3n"):
        assert secret not in result.output


def test_a_bad_secret_value_is_not_echoed_in_the_error(tmp_path: Path) -> None:
    found = problems(tmp_path, '[[notifiers]]\ntype = "webhook"\nurl = "http://x"\nsecret = 12345678\n')
    assert len(found) == 1 and found[0].startswith("[[notifiers]][0] secret:")
    assert "12345678" not in found[0]


@pytest.mark.parametrize(
    ("header", "why"),
    [('{ Authorization = "${TOKEN}" }', "the value of 'Authorization' holds a line feed (LF)"),
     ('{ X-Team = "ml\\r\\nX-Evil: 1" }', "the value of 'X-Team' holds a carriage return (CR)"),
     ('{ X-Team = "caf\u00e9" }', "the value of 'X-Team' holds the character 'é'"),
     ('{ "X Team" = "ml" }', "'X Team' is not an HTTP header name"),
     ('{ Host = "evil.example" }', "'Host' is set by the HTTP client itself")],
)  # fmt: skip
def test_a_header_that_would_break_every_delivery_is_refused_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, header: str, why: str
) -> None:
    monkeypatch.setenv("TOKEN", "Bearer s3cr3t-tok3n\n")  # read from a file, newline and all
    path = write(tmp_path, f'[[notifiers]]\ntype = "webhook"\nurl = "http://x"\nheaders = {header}\n')
    result = subprocess.run([sys.executable, "-m", "agentwatch", "check-config", str(path)],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode == 2
    assert f"[[notifiers]][0] headers: {why}" in result.stderr, result.stderr
    assert "s3cr3t" not in result.stderr


@pytest.mark.parametrize(
    ("section", "why"),
    [('agent_keys = true', "[security]: agent_keys = true needs secret"),
     ('secret = "${SHORT}"', "[security] secret: must be at least 32 characters"),
     ('max_skew = "0s"', "[security] max_skew: must be more than 0ms, got 0ms")],
)  # fmt: skip
def test_security_settings_that_cannot_work_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, section: str, why: str
) -> None:
    monkeypatch.setenv("SHORT", "hunter2-s3cr3t")
    (found,) = problems(tmp_path, f"[security]\n{section}\n")
    assert found.startswith(why), found
    assert "s3cr3t" not in found


def test_agent_keys_work_with_the_ping_api_and_otlp_ingest(tmp_path: Path) -> None:
    """Both front doors sign what they write (tests/test_security_front_doors.py): no refusal."""
    text = (f'[security]\nsecret = "{"s" * 40}"\nagent_keys = true\n'
            f'[http]\nping_key = "{"p" * 20}"\ningest_token = "{"i" * 20}"\n')  # fmt: skip
    settings = loading.load(write(tmp_path, text)).settings
    assert settings.security.agent_keys and settings.http.ping_key and settings.http.ingest_token


def test_the_agent_key_command_prints_the_derived_key_alone(tmp_path: Path) -> None:
    secret = "s" * 40
    path = write(tmp_path, f'[security]\nsecret = "{secret}"\nagent_keys = true\n')
    command = [sys.executable, "-m", "agentwatch", "agent-key", "team/bot-1", "--config", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert (result.returncode, result.stdout) == (0, signing.agent_key(secret, "team/bot-1") + "\n")
    bad = runner.invoke(app, ["agent-key", "../evil", "--config", str(path)])
    assert bad.exit_code == 2 and "not an agent name: '../evil' has a '.' or '..' path segment" in bad.output
    other = write(tmp_path, "[worker]\nbatch = 5\n")
    unset = runner.invoke(app, ["agent-key", "bot", "--config", str(other)])
    assert (
        unset.exit_code == 2 and "agent keys derive from [security] secret, which is not set" in unset.output
    )


# -- [redis] url ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:6379/0", "rediss://:pw@cache.example.com:6380/1", "unix:///run/redis.sock?db=2",
     "embedded"],
)  # fmt: skip
def test_redis_urls_that_are_accepted(tmp_path: Path, url: str) -> None:
    assert loading.load(write(tmp_path, f'[redis]\nurl = "{url}"\n'), plugins=False).settings.redis.url == url


@pytest.mark.parametrize(
    ("url", "why"),
    [("htp://localhost:6379", "not a Redis URL"), ("localhost:6379", "not a Redis URL"),
     ("REDIS://host", "not a Redis URL"), ("unix://", "not a valid Redis URL: no socket path"),
     ("redis://host:port/0", "not a valid Redis URL"),
     # what redis-py would quietly read as something else; the producer refuses them alike
     ("redis://host/abc", "not a valid Redis URL: database 'abc' is not a number"),
     ("redis://:6379/0", "not a valid Redis URL: no host name"),
     ("redis://host:0/0", "not a valid Redis URL: port 0")],
)  # fmt: skip
def test_a_bad_redis_url_is_refused_naming_the_key(tmp_path: Path, url: str, why: str) -> None:
    (found,) = problems(tmp_path, f'[redis]\nurl = "{url}"\n')
    assert found.startswith(f"[redis] url: {why}")


def test_a_bad_redis_url_from_the_environment_exits_2_naming_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for command in (["check-config"], ["worker", "detectors"], ["status"]):
        result = runner.invoke(app, command, env={"AGENTWATCH_REDIS__URL": "foo://x"})
        assert result.exit_code == 2, result.output
        assert "[redis] url: not a Redis URL" in result.output
        assert "(from environment AGENTWATCH_REDIS__URL)" in result.output
        assert isinstance(result.exception, SystemExit)  # typer's exit 2, not a traceback


def test_a_bad_producer_url_variable_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTWATCH_REDIS_URL", "http://:hunter2@cache:6379")
    (found,) = problems(tmp_path, "")
    assert found.startswith("[redis] url: not a Redis URL")
    assert found.endswith("(got 'http://***@cache:6379') (from environment AGENTWATCH_REDIS_URL)")


# -- environment overrides --------------------------------------------------------------------


def test_a_misspelled_section_in_an_override_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTWATCH_WROKER__BATCH", "5")
    (found,) = problems(tmp_path, "")
    assert found == (
        "environment variable AGENTWATCH_WROKER__BATCH: unknown section 'wroker' (did you mean 'worker'?); "
        "valid sections: redis, embedded, streams, worker, report, security, http, prices, budgets, otlp, "
        "grouping, maintenance, detectors, notifiers "
        "(overrides are AGENTWATCH_<SECTION>__<KEY>)"
    )


def test_producer_and_user_variables_are_never_taken_for_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = ["AGENTWATCH_AGENT", "AGENTWATCH_INTERVAL", "AGENTWATCH_PULSE_INTERVAL",
             "AGENTWATCH_TEST_REDIS_URL", "AGENTWATCH_WEBHOOK_SECRET", "AGENTWATCH_CONFIG_DIR"]  # fmt: skip
    for name in names:
        monkeypatch.setenv(name, "x")
    monkeypatch.setenv("AGENTWATCH_PREFIX", "fleet")
    assert loading.load(write(tmp_path, ""), plugins=False).settings.redis.prefix == "fleet"


def test_an_override_of_a_detector_key_is_named_as_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTWATCH_DETECTORS__SILENCE__AFTER", "2minutes")
    monkeypatch.setenv("AGENTWATCH_DETECTORS__SILENCE__AFTR", "2m")
    first, *found = problems(tmp_path, "[worker]\nbatch = 0\n")  # the plugin check runs even so
    assert first.startswith("[worker] batch: Input should be greater than or equal to 1")
    assert (
        f"[detectors.silence] aftr: unknown key (did you mean 'after'?); valid keys: {SILENCE_KEYS} "
        "(from environment AGENTWATCH_DETECTORS__SILENCE__AFTR)"
    ) in found
    assert (
        '[detectors.silence] after: bad duration \'2minutes\': use e.g. "500ms", "30s", "5m", "1h", '
        '"1d" (from environment AGENTWATCH_DETECTORS__SILENCE__AFTER)'
    ) in found
    assert len(found) == 2


def test_a_notifier_is_overridden_by_its_position(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = '[[notifiers]]\ntype = "webhook"\nurl = "http://a"\n[[notifiers]]\ntype = "webhook"\nurl = "http://b"\n'
    monkeypatch.setenv("AGENTWATCH_NOTIFIERS__1__URL", "https://hooks.example.com/prod")
    monkeypatch.setenv("AGENTWATCH_NOTIFIERS__1__HEADERS__X_TEAM", "ops")
    first, second = loading.load(write(tmp_path, text)).notifiers
    assert first.config.url == "http://a"
    assert (second.config.url, second.config.headers) == ("https://hooks.example.com/prod", {"x_team": "ops"})
    monkeypatch.setenv("AGENTWATCH_NOTIFIERS__0__TIMEOUT", "soon")
    monkeypatch.setenv("AGENTWATCH_NOTIFIERS__5__URL", "http://c")
    found = problems(tmp_path, text)
    assert found[0] == (
        "environment variable AGENTWATCH_NOTIFIERS__5__URL: the file declares 2 [[notifiers]] "
        "(numbered from 0), so there is no [[notifiers]][5] to override"
    )
    assert found[1].startswith("[[notifiers]][0] timeout: bad duration 'soon'")
    assert found[1].endswith("(from environment AGENTWATCH_NOTIFIERS__0__TIMEOUT)")
    monkeypatch.delenv("AGENTWATCH_NOTIFIERS__0__TIMEOUT")
    monkeypatch.delenv("AGENTWATCH_NOTIFIERS__5__URL")
    assert problems(tmp_path, "") == [  # none declared: nothing to override, said so
        "environment variable AGENTWATCH_NOTIFIERS__1__HEADERS__X_TEAM: the file declares 0 [[notifiers]] "
        "(numbered from 0), so there is no [[notifiers]][1] to override",
        "environment variable AGENTWATCH_NOTIFIERS__1__URL: the file declares 0 [[notifiers]] "
        "(numbered from 0), so there is no [[notifiers]][1] to override",
    ]


# -- hints --------------------------------------------------------------------------------------


def test_a_nested_unknown_key_lists_the_nested_keys(tmp_path: Path) -> None:
    (found,) = problems(
        tmp_path, '[[notifiers]]\ntype = "webhook"\nurl = "http://x"\nmatch = { agent = ["a"] }\n'
    )
    assert found == (
        "[[notifiers]][0] match.agent: unknown key (did you mean 'agents'?); "
        "valid keys: agents, detectors, severity, statuses, labels"
    )


def test_an_unknown_plugin_gets_a_did_you_mean(tmp_path: Path) -> None:
    found = problems(tmp_path, '[detectors.silense]\nafter = "1m"\n[[notifiers]]\ntype = "webhok"\n')
    assert found[0].startswith("[detectors.silense]: unknown detector 'silense' (did you mean 'silence'?);")
    assert found[1].startswith("[[notifiers]][0] type: unknown notifier 'webhok' (did you mean 'webhook'?);")


def test_a_per_agent_unknown_key_lists_only_what_can_be_set_per_agent(tmp_path: Path) -> None:
    (found,) = problems(tmp_path, '[detectors.silence.agents."x-*"]\naftr = "1m"\n')
    per_agent = SILENCE_KEYS.removeprefix("enabled, class, agents, ")
    assert found == (
        f"[detectors.silence.agents.\"x-*\"] aftr: unknown key (did you mean 'after'?); "
        f"valid keys: {per_agent}"
    )


def test_notifiers_written_as_one_table_get_the_double_bracket_hint(tmp_path: Path) -> None:
    (found,) = problems(tmp_path, '[notifiers]\ntype = "webhook"\n')
    assert found == (
        "[notifiers]: each notifier is its own [[notifiers]] table (double brackets: a list of tables), "
        "not one [notifiers] table"
    )


def test_an_unset_variable_is_reported_once(tmp_path: Path) -> None:
    found = problems(tmp_path, '[[notifiers]]\ntype = "webhook"\nurl = "http://x"\nsecret = "${NOT_SET_X}"\n')
    assert found == [
        "[[notifiers]][0] secret: environment variable NOT_SET_X is not set "
        "(export it, or write ${NOT_SET_X:-default})"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [('[worker]\nblock = "5s"\n', "[worker] block: must be at most 1.5s, got 5s"),
     ('[worker]\nhealth_ttl = "500ms"\n', "[worker] health_ttl: must be at least 2s, got 500ms")],
)  # fmt: skip
def test_duration_bounds_are_said_in_durations(tmp_path: Path, text: str, expected: str) -> None:
    assert problems(tmp_path, text) == [expected]


OUTAGE_REASON = (
    "must be at least 250ms: a shorter allowance cannot be kept apart from a short Redis outage, and "
    'healthy agents would be paged after one (docs/detectors.md, "Redis outages")'
)


@pytest.mark.parametrize(
    ("section", "value"),
    [("detectors.silence", "0s"), ("detectors.silence", "200ms"), ("detectors.stall", "0.1s"),
     ('detectors.silence.agents."batch-*"', "100ms")],
)  # fmt: skip
def test_allowances_too_short_to_survive_an_outage_are_refused_with_the_reason(
    tmp_path: Path, section: str, value: str
) -> None:
    text = f'[{section}]\nafter = "{value}"\n'
    assert problems(tmp_path, text) == [f"[{section}] after: {OUTAGE_REASON} (got '{value}')"]


def test_the_shortest_allowance_an_outage_cannot_defeat_is_accepted(tmp_path: Path) -> None:
    text = '[detectors.silence]\nafter = "250ms"\n[detectors.stall]\nafter = "250ms"\n'
    pipeline = loading.load(write(tmp_path, text))
    assert {d.name: d.config.after_s for d in pipeline.detectors if d.name in ("silence", "stall")} == {
        "silence": 0.25,
        "stall": 0.25,
    }


@pytest.mark.parametrize(
    "seconds", [0.0, 0.001, 0.25, 0.1, 1.5, 5.0, 60.0, 90.0, 5400.0, 86400.0 * 8, 0.123456789, 1e-7, 3600.5,
                123456.789, 1 / 3]
)  # fmt: skip
def test_duration_text_is_an_exact_inverse(seconds: float) -> None:
    assert config.parse_duration(config.duration_text(seconds)) == seconds


def test_duration_text_reads_as_written() -> None:
    assert [config.duration_text(x) for x in (0.25, 1.5, 300.0, 5400.0, 604800.0)] == [
        "250ms", "1.5s", "5m", "1h30m", "7d"
    ]  # fmt: skip


# -- secrets and sizes in the summary -----------------------------------------------------------


def test_only_secret_keys_are_masked(tmp_path: Path) -> None:
    keys = ["min_tokens", "tokens", "token", "bot_token", "routing_key", "dedup_key", "api_key", "secret",
            "password", "headers", "env", "max_tokens_per_run"]  # fmt: skip
    assert [key for key in keys if config_errors.is_secret(key)] == [
        "token", "bot_token", "routing_key", "api_key", "secret", "password", "headers", "env"
    ]  # fmt: skip
    (found,) = problems(tmp_path, '[detectors.tokens]\nmin_tokens = "many"\n')
    assert (
        found.startswith("[detectors.tokens] min_tokens: Input should be a valid integer")
        and "'many'" in found
    )


def test_check_config_masks_secret_bearing_urls_and_shows_sizes(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[[notifiers]]\ntype = "webhook"\nurl = "https://hooks.slack.com/services/T0/B0/XXSECRET"\n'
        '[[notifiers]]\ntype = "pagerduty"\nrouting_key = "PDSECRET0123456789abcdef01234567"\n',
    )
    result = runner.invoke(app, ["check-config", str(path)])
    assert result.exit_code == 0, result.output
    assert "url=https://hooks.slack.com/***" in result.output
    assert "routing_key=***" in result.output
    for secret in ("XXSECRET", "PDSECRET"):
        assert secret not in result.output
    assert "rss_growth_min=50MB" in result.output and "min_tokens=500" in result.output
    assert "limit=4GB" in result.output


@pytest.mark.apprise
def test_check_config_masks_the_secrets_in_apprise_urls(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[[notifiers]]\ntype = "apprise"\nurls = ["tgram://BOTSECRET/12345", "mailto://u:MAILPW@example.com"]\n',
    )
    result = runner.invoke(app, ["check-config", str(path)])
    assert result.exit_code == 0, result.output
    assert "urls=[tgram://***, mailto://***]" in result.output
    for secret in ("BOTSECRET", "MAILPW", "12345"):
        assert secret not in result.output


# -- a bad file through the real commands -------------------------------------------------------


@pytest.mark.parametrize("command", [["worker", "detectors"], ["up"]])
def test_a_bad_file_stops_the_real_commands_with_exit_2_naming_file_and_keys(
    command: list[str], tmp_path: Path
) -> None:
    path = write(
        tmp_path,
        '[redis]\nprefix = "has spaces"\n[worker]\nbatchsize = 10\nmax_attempts = "many"\n'
        'claim_idle = "soon"\n[detectors.silense]\nafter = "1m"\n',
    )
    result = subprocess.run(
        [sys.executable, "-m", "agentwatch", *command, "--config", str(path)],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"invalid configuration in {path}:" in result.stderr
    for line in (
        "[redis] prefix: String should match pattern",  # a bad value
        "[worker] batchsize: unknown key (did you mean 'batch'?)",  # unknown key
        "[worker] max_attempts: Input should be a valid integer",  # wrong type
        "[worker] claim_idle: bad duration 'soon'",  # bad duration
        "[detectors.silense]: unknown detector 'silense' (did you mean 'silence'?)",  # unknown plugin
    ):
        assert line in result.stderr
