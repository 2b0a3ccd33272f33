from __future__ import annotations

from pathlib import Path

import pytest

from gateway.settings import ConfigError, Settings


def test_defaults() -> None:
    s = Settings.load(env={})
    assert (s.host, s.port, s.db, s.upstream_url) == ("127.0.0.1", 8080, "gateway.db", None)
    assert s.max_body_bytes == 10 * 1024 * 1024


def test_precedence_file_then_env_then_overrides(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text('db = "file.db"\nport = 7000\nupstream_url = "http://file/v1"\nread_timeout = 12.5\n')
    s = Settings.load(config_file=str(cfg), env={})
    assert (s.db, s.port, s.upstream_url, s.read_timeout) == ("file.db", 7000, "http://file/v1", 12.5)
    s = Settings.load(config_file=str(cfg), env={"GATEWAY_DB": "env.db", "GATEWAY_PORT": "7001"})
    assert (s.db, s.port, s.upstream_url) == ("env.db", 7001, "http://file/v1")
    s = Settings.load(
        config_file=str(cfg), env={"GATEWAY_DB": "env.db"}, overrides={"db": "cli.db", "port": None}
    )
    assert (s.db, s.port) == ("cli.db", 7000)


def test_config_file_from_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text('upstream_url = "http://x/v1"\n')
    assert Settings.load(env={"GATEWAY_CONFIG": str(cfg)}).upstream_url == "http://x/v1"


def test_secrets_never_in_repr() -> None:
    s = Settings.load(env={"GATEWAY_UPSTREAM_API_KEY": "sk-operator", "GATEWAY_ADMIN_TOKEN": "adm"})
    assert s.upstream_api_key == "sk-operator"
    assert "sk-operator" not in repr(s) and "adm" not in repr(s)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bogus = 1\n", r"unknown setting\(s\) in .*: bogus"),
        ("port = [\n", "not valid TOML"),
        ('port = "eighty"\n', "not a valid int"),
        ("db = 5\n", "expected a string"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=message):
        Settings.load(config_file=str(cfg), env={})


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        Settings.load(config_file="/nonexistent/gw.toml", env={})


def test_a_boolean_setting_reads_the_usual_words_and_refuses_others() -> None:
    for word, expected in (("true", True), ("Yes", True), ("1", True), ("off", False), (" false ", False)):
        assert Settings.load(env={"GATEWAY_GC_FREEZE": word}).gc_freeze is expected
    with pytest.raises(ConfigError, match="gc_freeze"):
        Settings.load(env={"GATEWAY_GC_FREEZE": "maybe"})
