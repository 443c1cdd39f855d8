"""pipeline.toml loading: defaults, durations, environment overrides, ${VAR}, per-agent globs,
and the error for every kind of bad file (naming the file and the key)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agentwatch import config
from agentwatch.cli import app
from agentwatch.errors import ConfigError
from detectors import BUILTINS as BUILTIN_DETECTORS

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.toml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, text))
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
    pipeline = config.load(None, plugins=False)
    assert pipeline.source == config.BUILTIN_SOURCE
    assert pipeline.settings.redis.url is None
    assert pipeline.settings.redis.prefix == "aw"
    assert pipeline.keys.events() == "aw:events"


def test_the_repository_pipeline_toml_is_valid_and_all_defaults() -> None:
    pipeline = config.load(ROOT / "pipeline.toml")
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
    settings = config.load(path, plugins=False).settings
    assert (settings.redis.prefix, settings.redis.shards) == ("prod", 4)
    assert settings.worker.claim_idle_s == 120.0 and settings.worker.tick_s == 0.1


def test_environment_overrides_beat_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(
        tmp_path,
        '[redis]\nprefix = "file"\n[detectors.limits]\nclass = "sample_plugins:Threshold"\nlimit = 5\n',
    )
    monkeypatch.setenv("AGENTWATCH_REDIS__PREFIX", "env")
    monkeypatch.setenv("AGENTWATCH_DETECTORS__LIMITS__LIMIT", "7")
    pipeline = config.load(path)
    assert pipeline.settings.redis.prefix == "env"
    limits = next(p for p in pipeline.detectors if p.name == "limits")
    assert limits.config.limit == 7


def test_producer_variables_fill_in_when_nothing_else_sets_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTWATCH_REDIS_URL", "redis://10.0.0.5:6379/0")
    monkeypatch.setenv("AGENTWATCH_PREFIX", "fleet")
    settings = config.load(write(tmp_path, ""), plugins=False).settings
    assert (settings.redis.url, settings.redis.prefix) == ("redis://10.0.0.5:6379/0", "fleet")
    settings = config.load(write(tmp_path, '[redis]\nprefix = "mine"\n'), plugins=False).settings
    assert settings.redis.prefix == "mine"


def test_variables_expand_inside_strings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_HOST", "cache.internal")
    text = '[redis]\nurl = "redis://${REDIS_HOST}:${REDIS_PORT:-6380}/0"\nprefix = "a$$b"\n'
    with pytest.raises(ConfigError):  # "a$b" is not a valid prefix: proves $$ became one $
        config.load(write(tmp_path, text), plugins=False)
    settings = config.load(write(tmp_path, text.replace("a$$b", "ab")), plugins=False).settings
    assert settings.redis.url == "redis://cache.internal:6380/0"


def test_an_unset_variable_names_the_key_and_the_variable(tmp_path: Path) -> None:
    found = problems(
        tmp_path, '[[notifiers]]\ntype = "sample_plugins:Print"\nprefix = "${NOT_SET_ANYWHERE}"\n'
    )
    assert found == [
        "[[notifiers]] #1 prefix: environment variable NOT_SET_ANYWHERE is not set "
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
        config.load(tmp_path / "nope.toml")


def test_unknown_plugins_are_named_with_the_choices(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        '[detectors.wat]\nafter = "1s"\n[[notifiers]]\ntype = "carrier-pigeon"\n'
        '[[notifiers]]\ntype = "sample_plugins:NotAPlugin"\n[[notifiers]]\nurl = "x"\n',
    )
    assert found[0].startswith("[detectors.wat]: unknown detector 'wat'; available:")
    assert found[1].startswith("[[notifiers]] #1 type: unknown notifier 'carrier-pigeon'; available:")
    assert found[2] == (
        "[[notifiers]] #2 type: 'sample_plugins:NotAPlugin' is not a notifier: "
        "it needs a Config subclass of NotifierConfig"
    )
    assert found[3].startswith("[[notifiers]] #3: missing key 'type'")


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
    (limits,) = [p for p in config.load(path).detectors if p.name == "limits"]
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
    assert "limits" not in [p.name for p in config.load(path).detectors]


def test_two_notifiers_of_one_type_get_distinct_names(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[[notifiers]]\ntype = "sample_plugins:Print"\n[[notifiers]]\ntype = "sample_plugins:Print"\n',
    )
    assert [p.name for p in config.load(path).notifiers] == ["sample_plugins:Print", "sample_plugins:Print-2"]


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
        "webhook    type=webhook url=https://***@hooks.example.com/x headers=*** secret=***" in result.output
    )
    for secret in ("pw123", "s3cr3t", "tok3n"):
        assert secret not in result.output


def test_a_bad_secret_value_is_not_echoed_in_the_error(tmp_path: Path) -> None:
    found = problems(tmp_path, '[[notifiers]]\ntype = "webhook"\nurl = "http://x"\nsecret = 12345678\n')
    assert len(found) == 1 and found[0].startswith("[[notifiers]] #1 secret:")
    assert "12345678" not in found[0]
