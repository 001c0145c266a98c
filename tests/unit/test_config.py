"""Settings: parsing, precedence, credentials, errors that name the setting, docs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from digitalme.config import (
    ConfigError,
    declared_settings,
    effective_settings,
    load_settings,
    settings_reference_markdown,
    unknown_variables,
)

REPO = Path(__file__).resolve().parents[2]


def test_defaults() -> None:
    settings = load_settings({})
    assert settings.listen == ("127.0.0.1", 8080)
    assert settings.rate_limit_per_minute == 100
    assert settings.environment == "development"
    assert settings.anthropic_api_key is None
    assert not settings.claude_configured


def test_environment_values_are_parsed() -> None:
    settings = load_settings(
        {
            "DIGITALME_LISTEN": "[::1]:9000",
            "DIGITALME_RATE_LIMIT_PER_MINUTE": "7",
            "DIGITALME_TRUSTED_PROXIES": "10.0.0.0/8, 127.0.0.1",
            "ANTHROPIC_BASE_URL": "http://127.0.0.1:1234/",
            "DIGITALME_LOG_LEVEL": "DEBUG",
        }
    )
    assert settings.listen == ("::1", 9000)
    assert settings.rate_limit_per_minute == 7
    assert [str(n) for n in settings.trusted_proxies] == ["10.0.0.0/8", "127.0.0.1/32"]
    assert settings.anthropic_base_url == "http://127.0.0.1:1234"
    assert settings.log_level == "debug"


def test_every_bad_value_is_named_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(
            {
                "DIGITALME_LISTEN": "8080",
                "DIGITALME_RATE_LIMIT_PER_MINUTE": "lots",
                "DIGITALME_MAX_TOKENS": "0",
                "ANTHROPIC_BASE_URL": "ftp://x",
            }
        )
    problems = caught.value.problems
    assert set(problems) == {
        "DIGITALME_LISTEN",
        "DIGITALME_RATE_LIMIT_PER_MINUTE",
        "DIGITALME_MAX_TOKENS",
        "ANTHROPIC_BASE_URL",
    }
    assert "whole number" in problems["DIGITALME_RATE_LIMIT_PER_MINUTE"]
    assert "DIGITALME_LISTEN" in str(caught.value)


def test_secrets_from_systemd_credentials(tmp_path: Path) -> None:
    (tmp_path / "ANTHROPIC_API_KEY").write_text("sk-from-credential\n")
    settings = load_settings({"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert settings.anthropic_api_key == "sk-from-credential"
    # The environment, when set, wins over the credential file.
    settings = load_settings(
        {"CREDENTIALS_DIRECTORY": str(tmp_path), "ANTHROPIC_API_KEY": "sk-env"}
    )
    assert settings.anthropic_api_key == "sk-env"


def test_secrets_are_masked_in_the_effective_settings() -> None:
    settings = load_settings({"ANTHROPIC_API_KEY": "sk-very-secret"})
    rows = effective_settings(settings)
    assert "sk-very-secret" not in str(rows)
    assert ("ANTHROPIC_API_KEY", "(set, hidden)") in [(name, shown) for name, shown, _ in rows]


def test_unknown_variables_are_reported() -> None:
    assert unknown_variables({"DIGITALME_RATE_LIMT": "5", "DIGITALME_ENV": "x", "HOME": "/"}) == [
        "DIGITALME_RATE_LIMT"
    ]


def test_every_setting_has_help_and_the_docs_carry_the_current_reference() -> None:
    for info in declared_settings():
        assert len(info.help) > 15, info.env
    docs = (REPO / "docs" / "configuration.md").read_text()
    # Regenerate with: .venv/bin/digitalme check-config --reference
    assert settings_reference_markdown() in docs, (
        "docs/configuration.md is out of date: paste `digitalme check-config --reference`"
    )
    documented = set(re.findall(r"`(DIGITALME_[A-Z0-9_]+)`", docs))
    assert documented <= {info.env for info in declared_settings()}, (
        "docs/configuration.md names settings that do not exist"
    )


def test_the_metrics_token_is_a_long_header_safe_secret(tmp_path: Path) -> None:
    assert load_settings({}).metrics_token is None
    token = "0123456789abcdef" * 4
    (tmp_path / "DIGITALME_METRICS_TOKEN").write_text(token + "\n")
    assert load_settings({"CREDENTIALS_DIRECTORY": str(tmp_path)}).metrics_token == token
    for bad in ("short-token", "x" * 31, "has a space " + "x" * 30, "x" * 40 + "\u00e9"):
        with pytest.raises(ConfigError) as caught:
            load_settings({"DIGITALME_METRICS_TOKEN": bad})
        assert "openssl rand -hex 32" in caught.value.problems["DIGITALME_METRICS_TOKEN"]
        assert bad not in str(caught.value)  # a secret is never echoed


def test_retention_keeps_deliveries_past_every_redelivery_window() -> None:
    settings = load_settings({})
    assert (
        settings.inbox_retention_days,
        settings.inbox_failed_retention_days,
        settings.activity_retention_days,
        settings.prune_interval_minutes,
    ) == (14, 30, 30, 60)
    assert load_settings({"DIGITALME_INBOX_RETENTION_DAYS": "0"}).inbox_retention_days == 0
    for name, value, why in (
        ("DIGITALME_INBOX_RETENTION_DAYS", "7", "at least 8 days"),
        ("DIGITALME_INBOX_FAILED_RETENTION_DAYS", "-1", "between 0 and 3650"),
        ("DIGITALME_PRUNE_INTERVAL_MINUTES", "0", "between 1 and 1440"),
        (
            "DIGITALME_ACTIVITY_RETENTION_DAYS",
            "5",
            "at least DIGITALME_ACTIVITY_DIGEST_DAYS (7) or 0",
        ),
    ):
        with pytest.raises(ConfigError) as caught:
            load_settings({name: value})
        assert why in caught.value.problems[name], caught.value.problems
    # The digest and the activity it reads agree.
    assert (
        load_settings(
            {"DIGITALME_ACTIVITY_RETENTION_DAYS": "5", "DIGITALME_ACTIVITY_DIGEST_DAYS": "5"}
        ).activity_retention_days
        == 5
    )


# --- the PostgreSQL backend's settings ------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("mysql://app:s3cret@db/app", "must be a postgresql:// URL"),
        ("postgresql://app:s3cret@db:99999/app", "is not a valid URL"),
        ("postgresql://app:s3cret@db", "names no database"),
        ("postgresql://app:s3cret@db/app?sslmod=require", 'invalid URI query parameter: "sslmod"'),
        ("postgresql://app:s3cret@[db/app", "is not a valid URL"),
    ],
)
def test_a_bad_database_url_is_named_without_its_password(raw: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"DIGITALME_DATABASE_URL": raw})
    assert list(caught.value.problems) == ["DIGITALME_DATABASE_URL"]
    assert message in caught.value.problems["DIGITALME_DATABASE_URL"]
    assert "s3cret" not in str(caught.value)


def test_the_database_url_selects_postgresql_and_hides_its_password(tmp_path: Path) -> None:
    assert load_settings({}).database == Path("digitalme.db")  # SQLite stays the default
    settings = load_settings({"DIGITALME_DATABASE_URL": "postgresql://app:s3cret@db:5432/app"})
    shown = dict((name, value) for name, value, _ in effective_settings(settings))
    assert shown["DIGITALME_DATABASE_URL"] == "postgresql://app:***@db:5432/app"
    assert shown["DIGITALME_DATABASE_PASSWORD"] == "(not set)"
    assert "s3cret" not in repr(settings)
    # The password from a credential file (LoadCredential=), given to the driver apart.
    (tmp_path / "DIGITALME_DATABASE_PASSWORD").write_text("from-credential\n")
    settings = load_settings(
        {"DIGITALME_DATABASE_URL": "postgresql://app@db/app"}, credentials_directory=str(tmp_path)
    )
    assert settings.database == settings.database_url.with_password(  # type: ignore[union-attr]
        "from-credential"
    )
    assert settings.database.password == "from-credential"  # type: ignore[union-attr]
    assert "from-credential" not in repr(settings) + str(settings.database)
    shown = dict((name, value) for name, value, _ in effective_settings(settings))
    assert shown["DIGITALME_DATABASE_PASSWORD"] == "(set, hidden)"


def test_a_database_password_without_a_url_is_refused() -> None:
    with pytest.raises(
        ConfigError, match="DIGITALME_DATABASE_PASSWORD: is set but DIGITALME_DATABASE_URL is not"
    ):
        load_settings({"DIGITALME_DATABASE_PASSWORD": "x"})


def test_check_config_names_a_bad_url_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from digitalme.cli import EXIT_CONFIG, main

    monkeypatch.setenv("DIGITALME_DATABASE_URL", "postgres://u:s3cret@db/app?sslmode")
    assert main(["check-config"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "DIGITALME_DATABASE_URL: is not a valid URL" in err
    assert "Traceback" not in err and "s3cret" not in err


def test_check_config_accepts_a_postgresql_url_and_warns_about_litestream(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from digitalme.cli import EXIT_OK, main

    monkeypatch.setenv("DIGITALME_DATABASE_URL", "postgresql://app@db.internal/app")
    monkeypatch.setenv("DIGITALME_DB_PATH", "/nowhere/at/all/digitalme.db")  # not used
    monkeypatch.setenv("DIGITALME_LITESTREAM_SOCKET", "/run/litestream/litestream.sock")
    assert main(["check-config"]) == EXIT_OK
    captured = capsys.readouterr()
    assert "postgresql://app@db.internal/app" in captured.out
    assert "Litestream replicates SQLite only" in captured.err
    assert "does not exist" not in captured.err
