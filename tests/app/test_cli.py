"""The ``digitalme`` command, run for real as a subprocess with an explicit environment.

What an owner types: help, migrate, check-config (with systemd credentials), persona
import/show/prompt, token create/list/revoke, and serve refusing to start on a bad setting
or an unusable database, each failure a short message with no traceback.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sqlite3
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
import yaml

from digitalme.config import declared_settings
from digitalme.db import bundled_migrations
from digitalme.persona import build_prompt, load_persona_file
from standins.anthropic_api import run_anthropic_standin
from tests.support.process import (
    SAMPLE_PERSONA,
    digitalme_command,
    free_port,
    run_cli,
    running_service_async,
    service_env,
)

SECRET_KEY = "sk-ant-cli-test-" + "s3cr3t" * 6
TOKEN = re.compile(r"^dm_[A-Za-z0-9_-]{40,}$")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    # A port of its own: should a `serve` that must refuse start anyway, it binds nothing
    # anyone else uses.
    return service_env(tmp_path, DIGITALME_LISTEN=f"127.0.0.1:{free_port()}")


def cli(
    env: dict[str, str],
    *args: str,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    return run_cli(args, env, timeout=timeout)


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr


def assert_refused(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    """Failed with ``code``, said why (naming each needle) on stderr, and no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    # Log lines may come first (e.g. a migration applied), then the verdict.
    assert any(line.startswith("digitalme: ") for line in result.stderr.splitlines()), result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def migrated(env: dict[str, str]) -> Path:
    assert_ok(cli(env, "migrate"))
    return Path(env["DIGITALME_DB_PATH"])


# --- help ---------------------------------------------------------------------------------

SUBCOMMANDS = [
    ((), ("serve", "migrate", "check-config", "persona", "token")),
    (("serve",), ()),
    (("migrate",), ()),
    (("check-config",), ()),
    (("persona",), ("import", "show", "prompt")),
    (("persona", "import"), ("file",)),
    (("persona", "show"), ("--format",)),
    (("persona", "prompt"), ()),
    (("token",), ("create", "list", "revoke")),
    (("token", "create"), ("--name", "--scope", "--quiet")),
    (("token", "list"), ()),
    (("token", "revoke"), ("id",)),
    (("inbox",), ("list", "retry", "prune")),
    (("inbox", "prune"), ()),
]


@pytest.mark.parametrize(
    ("words", "mentions"), SUBCOMMANDS, ids=[" ".join(w) or "top" for w, _ in SUBCOMMANDS]
)
def test_help(env: dict[str, str], words: tuple[str, ...], mentions: tuple[str, ...]) -> None:
    # Help never needs a valid configuration, nor touches the database.
    env["DIGITALME_LISTEN"] = "nope"
    result = cli(env, *words, "--help")
    assert_ok(result)
    assert result.stderr == ""
    assert result.stdout.startswith(f"usage: {' '.join(('digitalme', *words))}")
    for word in mentions:
        assert word in result.stdout
    assert not Path(env["DIGITALME_DB_PATH"]).exists()


def test_version(env: dict[str, str]) -> None:
    result = cli(env, "--version")
    assert_ok(result)
    assert re.fullmatch(r"digitalme \d+\.\d+\.\d+\S*\n", result.stdout)


def test_unknown_command_is_a_usage_error(env: dict[str, str]) -> None:
    result = cli(env, "frobnicate")
    assert result.returncode == 2
    assert "invalid choice: 'frobnicate'" in result.stderr
    assert "Traceback" not in result.stderr


# --- migrate ------------------------------------------------------------------------------


def test_migrate_reports_what_it_applied_then_up_to_date(env: dict[str, str]) -> None:
    db_path = Path(env["DIGITALME_DB_PATH"])
    expected = [f"{m.version:04d}_{m.name}" for m in bundled_migrations()]
    first = cli(env, "migrate")
    assert_ok(first)
    assert first.stdout == (
        f"applied {len(expected)} migration(s) to {db_path}: {', '.join(expected)}\n"
    )
    with sqlite3.connect(db_path) as conn:
        rows = conn.execute("SELECT version, checksum FROM schema_migrations ORDER BY version")
        assert [tuple(r) for r in rows] == [(m.version, m.checksum) for m in bundled_migrations()]
    second = cli(env, "migrate")
    assert_ok(second)
    assert second.stdout == f"{db_path} is up to date\n"


# --- check-config -------------------------------------------------------------------------


def settings_table(stdout: str) -> dict[str, str]:
    rows = {}
    for line in stdout.splitlines():
        name, _, value = line.partition(" ")
        rows[name] = value.strip()
    return rows


def test_check_config_prints_every_setting_and_masks_the_key(env: dict[str, str]) -> None:
    env["ANTHROPIC_API_KEY"] = SECRET_KEY
    env["DIGITALME_MAX_TOKENS"] = "2048"
    del env["DIGITALME_LISTEN"]
    result = cli(env, "check-config")
    assert_ok(result)
    table = settings_table(result.stdout)
    assert list(table) == [info.env for info in declared_settings()]
    assert table["ANTHROPIC_API_KEY"] == "(set, hidden)"
    assert table["DIGITALME_MAX_TOKENS"] == "2048"
    assert table["DIGITALME_DB_PATH"] == env["DIGITALME_DB_PATH"]
    assert table["DIGITALME_LISTEN"] == "127.0.0.1:8080"  # the default
    assert SECRET_KEY not in result.stdout + result.stderr
    assert SECRET_KEY[:12] not in result.stdout + result.stderr
    assert result.stderr.strip().endswith("configuration is valid")


def test_check_config_warns_about_unknown_variables(env: dict[str, str]) -> None:
    env["DIGITALME_FOO"] = "1"
    result = cli(env, "check-config")
    assert_ok(result)
    assert "warning: DIGITALME_FOO is set but is not a DigitalMe setting (typo?)" in result.stderr
    assert "DIGITALME_FOO" not in result.stdout


def test_check_config_says_when_claude_is_not_configured(env: dict[str, str]) -> None:
    del env["ANTHROPIC_API_KEY"]
    result = cli(env, "check-config")
    assert_ok(result)
    assert settings_table(result.stdout)["ANTHROPIC_API_KEY"] == "(not set)"
    assert "warning: ANTHROPIC_API_KEY is not set" in result.stderr


def test_check_config_fails_when_the_database_directory_is_missing(
    env: dict[str, str], tmp_path: Path
) -> None:
    env["DIGITALME_DB_PATH"] = str(tmp_path / "missing" / "digitalme.db")
    result = cli(env, "check-config")
    assert result.returncode == 2
    assert f"DIGITALME_DB_PATH: directory {tmp_path / 'missing'} does not exist" in result.stderr
    assert "configuration has problems" in result.stderr


INVALID = [
    ("DIGITALME_RATE_LIMIT_PER_MINUTE", "abc", "must be a whole number, got 'abc'"),
    ("DIGITALME_LISTEN", "nope", "must be HOST:PORT, got 'nope'"),
    ("DIGITALME_MAX_TOKENS", "0", "must be between 1 and 64000, got 0"),
    ("DIGITALME_LOG_LEVEL", "loud", "must be one of debug, info, warning, error"),
    ("ANTHROPIC_BASE_URL", "ftp://127.0.0.1", "must be an http:// or https:// URL"),
    ("DIGITALME_TRUSTED_PROXIES", "10.0.0.0/8,bogus", "'bogus' is not an IP address"),
]


@pytest.mark.parametrize(("name", "value", "why"), INVALID, ids=[f"{n}={v}" for n, v, _ in INVALID])
def test_check_config_refuses_invalid_values(
    env: dict[str, str], name: str, value: str, why: str
) -> None:
    env[name] = value
    result = cli(env, "check-config")
    assert_refused(result, 2, f"{name}: {why}")
    assert result.stdout == ""


def test_check_config_names_every_invalid_setting_at_once(env: dict[str, str]) -> None:
    env.update(DIGITALME_RATE_LIMIT_PER_MINUTE="abc", DIGITALME_LISTEN="nope")
    result = cli(env, "check-config")
    assert_refused(result, 2, "DIGITALME_RATE_LIMIT_PER_MINUTE:", "DIGITALME_LISTEN:")


# --- check-config --env-file: the role's validate: of digitalme.env --------------------------

# As the digitalme role's template writes it (values through Ansible's `quote`).
ROLE_ENV_FILE = """# Ansible managed
# Settings of the digitalme service (docs/configuration.md).
DIGITALME_ENV='it'"'"'s staging'
DIGITALME_LISTEN=127.0.0.1:8080
DIGITALME_DB_PATH=/var/lib/digitalme/digitalme.db
DIGITALME_MODEL=claude-sonnet-4-5
ANTHROPIC_BASE_URL=http://10.0.0.1:8765
DIGITALME_RATE_LIMIT_PER_MINUTE=0
DIGITALME_LOG_LEVEL="warning"
"""


def env_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "digitalme.env"
    path.write_text(text)
    return path


def test_check_config_reads_an_env_file_as_systemd_does(
    env: dict[str, str], tmp_path: Path
) -> None:
    # The process's own DIGITALME_* variables are not looked at: only the file's.
    env["DIGITALME_MAX_TOKENS"] = "0"  # invalid, but not in the file
    env["DIGITALME_TYPO_IN_MY_SHELL"] = "1"
    path = env_file(tmp_path, ROLE_ENV_FILE)
    result = cli(env, "check-config", "--strict", "--env-file", str(path))
    assert_ok(result)
    table = settings_table(result.stdout)
    assert table["DIGITALME_DB_PATH"] == "/var/lib/digitalme/digitalme.db"  # folder absent here
    assert table["DIGITALME_LOG_LEVEL"] == "warning"
    assert table["DIGITALME_ENV"] == "it's staging"
    assert table["DIGITALME_RATE_LIMIT_PER_MINUTE"] == "0"
    assert table["DIGITALME_MAX_TOKENS"] != "0"
    assert "TYPO" not in result.stderr
    assert result.stderr.strip().endswith("configuration is valid")


def test_check_config_strict_refuses_a_misspelt_setting_in_the_file(
    env: dict[str, str], tmp_path: Path
) -> None:
    path = env_file(tmp_path, ROLE_ENV_FILE + "DIGITALME_RATE_LIMT_PER_MINUTE=5\n")
    lenient = cli(env, "check-config", "--env-file", str(path))
    assert_ok(lenient)
    assert (
        "warning: DIGITALME_RATE_LIMT_PER_MINUTE is set but is not a DigitalMe setting"
        in lenient.stderr
    )
    strict = cli(env, "check-config", "--strict", "--env-file", str(path))
    assert strict.returncode == 2, (strict.stdout, strict.stderr)
    assert (
        "error: DIGITALME_RATE_LIMT_PER_MINUTE is set but is not a DigitalMe setting"
        in strict.stderr
    )
    assert strict.stderr.strip().endswith("configuration has problems")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("DIGITALME_MAX_TOKENS=0\n", "DIGITALME_MAX_TOKENS: must be between 1 and 64000, got 0"),
        ("DIGITALME_LISTEN\n", "line 1: expected NAME=value, got 'DIGITALME_LISTEN'"),
        ("DIGITALME_ENV='unterminated\n", "line 1: DIGITALME_ENV: No closing quotation"),
    ],
    ids=["invalid-value", "no-equals", "bad-quoting"],
)
def test_check_config_refuses_a_bad_env_file_naming_the_line_or_setting(
    env: dict[str, str], tmp_path: Path, text: str, why: str
) -> None:
    path = env_file(tmp_path, text)
    result = cli(env, "check-config", "--env-file", str(path))
    assert_refused(result, 2, str(path), why)


def test_check_config_names_an_env_file_it_cannot_read(env: dict[str, str], tmp_path: Path) -> None:
    result = cli(env, "check-config", "--env-file", str(tmp_path / "absent.env"))
    assert_refused(result, 2, f"{tmp_path / 'absent.env'}: No such file or directory")


def test_secrets_come_from_the_credentials_directory(env: dict[str, str], tmp_path: Path) -> None:
    del env["ANTHROPIC_API_KEY"]
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "ANTHROPIC_API_KEY").write_text(SECRET_KEY + "\n")
    env["CREDENTIALS_DIRECTORY"] = str(credentials)
    result = cli(env, "check-config")
    assert_ok(result)
    assert settings_table(result.stdout)["ANTHROPIC_API_KEY"] == "(set, hidden)"
    assert "ANTHROPIC_API_KEY is not set" not in result.stderr
    assert SECRET_KEY not in result.stdout + result.stderr


async def test_the_service_calls_claude_with_the_key_from_the_credentials_directory(
    env: dict[str, str], tmp_path: Path
) -> None:
    # The stand-in accepts only SECRET_KEY: a chat turn proves the exact value (newline
    # stripped) reached the SDK, not just that a file was found.
    del env["ANTHROPIC_API_KEY"]
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "ANTHROPIC_API_KEY").write_text(SECRET_KEY + "\n")
    env["CREDENTIALS_DIRECTORY"] = str(credentials)
    async with run_anthropic_standin("127.0.0.1", 0, api_keys=[SECRET_KEY]) as standin:
        env["ANTHROPIC_BASE_URL"] = standin.base_url
        migrated(env)
        assert_ok(cli(env, "persona", "import", str(SAMPLE_PERSONA)))
        token = cli(env, "token", "create", "--name", "cred", "--scope", "chat", "--quiet")
        auth = {"Authorization": f"Bearer {token.stdout.strip()}"}
        async with (
            running_service_async(env, tmp_path) as service,
            aiohttp.ClientSession(service.base_url, headers=auth) as http,
        ):
            async with http.post("/api/v1/conversations") as response:
                conversation = (await response.json())["id"]
            async with http.post(
                f"/api/v1/conversations/{conversation}/messages", json={"text": "ping"}
            ) as response:
                body = await response.json()
                assert response.status == 201, body
            assert body["reply"]["text"] == "Stand-in reply to: ping"
        assert standin.message_requests[-1].api_key_present
        assert SECRET_KEY not in service.log_text()


# --- persona ------------------------------------------------------------------------------


def expected_sample() -> dict[str, object]:
    persona, _ = load_persona_file(SAMPLE_PERSONA)
    return persona.to_document()


def test_persona_import_then_show_round_trips(env: dict[str, str], tmp_path: Path) -> None:
    migrated(env)
    result = cli(env, "persona", "import", str(SAMPLE_PERSONA))
    assert_ok(result)
    assert result.stdout.startswith(
        f"imported persona 'Mara Lindqvist' with 4 trait(s) from {SAMPLE_PERSONA}"
    )

    as_json = cli(env, "persona", "show", "--format", "json")
    assert_ok(as_json)
    shown = json.loads(as_json.stdout)
    assert shown == expected_sample()
    assert shown["traits"][0] == {
        "category": "communication",
        "name": "Direct",
        "description": "Gets to the point and says no when the answer is no.",
        "weight": 9.0,
        "examples": [
            "Short answer: no. Longer answer: not this quarter, and here is why.",
            "I don't know yet. I'll find out by Thursday.",
        ],
    }

    as_yaml = cli(env, "persona", "show")
    assert_ok(as_yaml)
    header, _, document = as_yaml.stdout.partition("\n")
    digest = hashlib.sha256(SAMPLE_PERSONA.read_bytes()).hexdigest()
    assert re.fullmatch(rf"# imported \S+, source sha256 {digest}", header)
    assert yaml.safe_load(document) == expected_sample()

    # What `show` prints is itself an importable persona that shows the same.
    exported = tmp_path / "exported.yaml"
    exported.write_text(as_yaml.stdout)
    assert_ok(cli(env, "persona", "import", str(exported)))
    again = cli(env, "persona", "show", "--format", "json")
    assert json.loads(again.stdout) == shown


def test_persona_prompt_is_byte_identical_across_runs(env: dict[str, str], tmp_path: Path) -> None:
    migrated(env)
    assert_ok(cli(env, "persona", "import", str(SAMPLE_PERSONA)))

    def prompt() -> bytes:
        result = subprocess.run(
            [*digitalme_command(), "persona", "prompt"],
            env=env,
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    first = prompt()
    persona, _ = load_persona_file(SAMPLE_PERSONA)
    assert first == build_prompt(persona).encode()
    assert first.startswith(b"You are the digital clone of Mara Lindqvist.")
    assert b"## Traits" in first and b"- [communication] Direct (weight 9)" in first
    assert prompt() == first
    # Re-importing (a new import time) changes nothing in the prompt.
    assert_ok(cli(env, "persona", "import", str(SAMPLE_PERSONA)))
    assert prompt() == first


def test_persona_show_before_import_says_what_to_do(env: dict[str, str]) -> None:
    migrated(env)
    for action in ("show", "prompt"):
        result = cli(env, "persona", action)
        assert_refused(result, 1, "no persona imported yet", "digitalme persona import FILE")


BAD_PERSONAS = {
    "weight-11": (
        "name: X\nbio: Y\ntraits:\n  - category: c\n    name: n\n    weight: 11\n",
        "traits[0].weight must be between 0 and 10, got 11",
    ),
    "unquoted-colon": (
        "name: X\nbio: Y\nvalues:\n  - Honesty: over comfort\n",
        "values[0] was read as a mapping: an item containing ': ' must be put in quotes",
    ),
    "not-yaml": ("name: X\nbio: [unclosed\n", "not valid YAML at line"),
    "missing-name": ("bio: Y\n", "name is required"),
    "unknown-key": ("name: X\nbio: Y\nhobbies: [chess]\n", "unknown keys: hobbies"),
    "weight-not-a-number": (
        "name: X\nbio: Y\ntraits:\n  - {category: c, name: n, weight: high}\n",
        "traits[0].weight must be a number from 0 to 10",
    ),
}


@pytest.mark.parametrize("case", list(BAD_PERSONAS))
def test_invalid_persona_is_refused_naming_the_field(
    env: dict[str, str], tmp_path: Path, case: str
) -> None:
    text, message = BAD_PERSONAS[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    result = cli(env, "persona", "import", str(path))
    assert_refused(result, 1, message)
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    # Nothing was stored: the refusal happens before the database is opened.
    assert not Path(env["DIGITALME_DB_PATH"]).exists()


def test_a_refused_import_keeps_the_current_persona(env: dict[str, str], tmp_path: Path) -> None:
    migrated(env)
    assert_ok(cli(env, "persona", "import", str(SAMPLE_PERSONA)))
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_PERSONAS["weight-11"][0])
    assert_refused(cli(env, "persona", "import", str(bad)), 1, "weight")
    assert json.loads(cli(env, "persona", "show", "--format", "json").stdout) == expected_sample()


def test_markdown_persona_with_front_matter_imports(env: dict[str, str], tmp_path: Path) -> None:
    migrated(env)
    path = tmp_path / "persona.md"
    path.write_text(
        "---\n"
        "name: Ola Nordmann\n"
        "languages: [Norwegian, English]\n"
        'values:\n  - "Tea first: then code."\n'
        'traits:\n  - {category: style, name: Calm, weight: 6.5, examples: ["No rush."]}\n'
        "---\n"
        "Ola runs a two-person consultancy in Bergen.\n\n"
        "He writes *Markdown* biographies.\n"
    )
    assert_ok(cli(env, "persona", "import", str(path)))
    shown = json.loads(cli(env, "persona", "show", "--format", "json").stdout)
    assert shown["name"] == "Ola Nordmann"
    assert shown["bio"] == (
        "Ola runs a two-person consultancy in Bergen.\n\nHe writes *Markdown* biographies."
    )
    assert shown["values"] == ["Tea first: then code."]
    assert shown["traits"] == [
        {
            "category": "style",
            "name": "Calm",
            "description": "",
            "weight": 6.5,
            "examples": ["No rush."],
        }
    ]
    prompt = cli(env, "persona", "prompt").stdout
    assert "Ola runs a two-person consultancy in Bergen." in prompt
    assert "- [style] Calm (weight 6.5)" in prompt


def test_markdown_persona_without_front_matter_is_refused(
    env: dict[str, str], tmp_path: Path
) -> None:
    path = tmp_path / "persona.md"
    path.write_text("# Ola\n\nJust prose.\n")
    assert_refused(
        cli(env, "persona", "import", str(path)),
        1,
        "a Markdown persona must start with '---' front matter",
    )


def test_persona_import_of_a_missing_file(env: dict[str, str], tmp_path: Path) -> None:
    assert_refused(
        cli(env, "persona", "import", str(tmp_path / "nope.yaml")), 1, "cannot read", "nope.yaml"
    )


# --- tokens -------------------------------------------------------------------------------


def test_token_create_list_revoke(env: dict[str, str]) -> None:
    migrated(env)
    quiet = cli(env, "token", "create", "--name", "alice", "--scope", "chat", "--quiet")
    assert_ok(quiet)
    assert quiet.stderr == ""
    assert len(quiet.stdout.splitlines()) == 1
    alice = quiet.stdout.strip()
    assert TOKEN.fullmatch(alice), alice

    loud = cli(env, "token", "create", "--name", "ops bot", "--scope", "admin")
    assert_ok(loud)
    bob = loud.stdout.strip()
    assert TOKEN.fullmatch(bob) and bob != alice
    assert "created token 2 'ops bot' (scope admin). Copy it now" in loud.stderr

    listed = cli(env, "token", "list")
    assert_ok(listed)
    lines = listed.stdout.splitlines()
    assert lines[0].split() == [
        "ID",
        "NAME",
        "SCOPE",
        "PREFIX",
        "CREATED",
        "LAST",
        "USED",
        "STATUS",
    ]
    assert re.match(
        rf"\s+1\s+alice\s+chat\s+{re.escape(alice[:9])}\s+\S+\s+-\s+active$", lines[1]
    ), lines[1]
    assert re.match(r"\s+2\s+ops bot\s+admin\s+", lines[2]) and lines[2].endswith("active")
    for secret in (alice, bob):
        assert secret not in listed.stdout
        assert secret[:20] not in listed.stdout

    revoked = cli(env, "token", "revoke", "1")
    assert_ok(revoked)
    assert re.fullmatch(r"token 1 'alice' revoked at \S+\n", revoked.stdout)
    lines = cli(env, "token", "list").stdout.splitlines()
    assert re.search(r"\srevoked \S+$", lines[1]), lines[1]
    assert lines[2].endswith("active")

    assert_refused(cli(env, "token", "revoke", "99"), 1, "no token with id 99")
    bad_scope = cli(env, "token", "create", "--name", "x", "--scope", "root")
    assert bad_scope.returncode == 2 and "invalid choice: 'root'" in bad_scope.stderr


async def test_cli_tokens_work_against_the_running_service(
    env: dict[str, str], tmp_path: Path
) -> None:
    migrated(env)
    chat = cli(env, "token", "create", "--name", "web", "--scope", "chat", "--quiet")
    admin = cli(env, "token", "create", "--name", "ops", "--scope", "admin", "--quiet")
    chat_token, admin_token = chat.stdout.strip(), admin.stdout.strip()
    async with (
        running_service_async(env, tmp_path) as service,
        aiohttp.ClientSession(service.base_url) as http,
    ):

        async def status(token: str, path: str) -> int:
            async with http.get(path, headers={"Authorization": f"Bearer {token}"}) as r:
                return r.status

        assert await status(chat_token, "/api/v1/me") == 200
        assert await status(chat_token, "/api/v1/tokens") == 403
        assert await status(admin_token, "/api/v1/tokens") == 200
        # Revoked from the CLI while the service runs: refused at once.
        assert_ok(cli(env, "token", "revoke", "1"))
        assert await status(chat_token, "/api/v1/me") == 401
        assert await status(admin_token, "/api/v1/me") == 200
    last_used = cli(env, "token", "list").stdout.splitlines()[2]
    assert re.match(r"\s+2\s+ops\s+admin\s+\S+\s+\S+\s+20\d\d-", last_used), last_used


async def test_smoke_test_talks_through_the_service_and_leaves_nothing_behind(
    env: dict[str, str], tmp_path: Path
) -> None:
    db_path = migrated(env)
    async with run_anthropic_standin("127.0.0.1", 0) as standin:
        env["ANTHROPIC_BASE_URL"] = standin.base_url
        assert_ok(cli(env, "persona", "import", str(SAMPLE_PERSONA)))
        async with running_service_async(env, tmp_path) as service:
            result = await asyncio.to_thread(cli, env, "smoke-test", "--url", service.base_url)
        assert_ok(result)
        answer = json.loads(result.stdout)
        assert answer["ok"] is True and answer["reply_chars"] > 0
        assert answer["model"] == "claude-test"
        assert len(standin.requests) == 1  # one real turn reached Claude
    with sqlite3.connect(db_path) as conn:
        left = [
            conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("conversations", "messages", "api_tokens")
        ]
    assert left == [0, 0, 0]


def test_smoke_test_says_why_it_failed_and_leaves_no_token(env: dict[str, str]) -> None:
    migrated(env)
    url = f"http://127.0.0.1:{free_port()}"
    result = cli(env, "smoke-test", "--url", url, "--timeout", "5")
    assert_refused(result, 1, "smoke test failed", url, "ClientConnectorError")
    assert "no tokens" in cli(env, "token", "list").stdout


def test_inbox_prune_deletes_what_is_past_its_retention(env: dict[str, str]) -> None:
    db_path = migrated(env)
    now = time.time()

    def ago(days: float) -> str:
        return (
            datetime.fromtimestamp(now - days * 86400, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z")
        )

    with sqlite3.connect(db_path) as conn:
        for delivery, status, days in (
            ("a", "done", 20),
            ("b", "done", 2),
            ("c", "failed", 20),
            ("d", "pending", 400),
        ):
            conn.execute(
                "INSERT INTO inbox (channel, delivery_id, kind, payload, status,"
                " next_attempt_at, received_at, updated_at) VALUES ('telegram', ?,"
                " 'message', '{}', ?, 0, ?, ?)",
                (delivery, status, ago(days), ago(days)),
            )
    result = cli(env, "inbox", "prune")
    assert_ok(result)
    assert re.fullmatch(
        r"pruned 1 deliveries and 0 activity events \([0-9.]+s\); kept: done "
        r"and ignored deliveries 14 days, failed ones 30 days, activity 30 "
        r"days\n",
        result.stdout,
    ), result.stdout
    with sqlite3.connect(db_path) as conn:
        assert [r[0] for r in conn.execute("SELECT delivery_id FROM inbox ORDER BY id")] == [
            "b",
            "c",
            "d",
        ]
    env["DIGITALME_INBOX_FAILED_RETENTION_DAYS"] = "10"
    assert cli(env, "inbox", "prune").stdout.startswith("pruned 1 deliveries")
    env["DIGITALME_INBOX_RETENTION_DAYS"] = "3"
    assert_refused(
        cli(env, "inbox", "prune"),
        2,
        "DIGITALME_INBOX_RETENTION_DAYS: must be 0 (keep forever) or at least 8 days, got 3",
    )


# --- serve refusing to start ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "why"), INVALID[:2], ids=[f"{n}={v}" for n, v, _ in INVALID[:2]]
)
def test_serve_refuses_an_invalid_setting(
    env: dict[str, str], name: str, value: str, why: str
) -> None:
    env[name] = value
    result = cli(env, "serve")
    assert_refused(result, 2, f"{name}: {why}")
    assert not Path(env["DIGITALME_DB_PATH"]).exists()


def one_line_refusal(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert_refused(result, 1, *needles)
    assert result.stderr.count("\n") == 1, result.stderr  # one line, nothing else


def test_serve_refuses_a_database_whose_migration_checksum_changed(env: dict[str, str]) -> None:
    db_path = migrated(env)
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1")
    result = cli(env, "serve")
    one_line_refusal(
        result,
        "digitalme: database error: migration 0001_initial changed after "
        "it was applied to this database",
    )


def test_serve_and_admin_commands_refuse_an_unmigrated_database(env: dict[str, str]) -> None:
    # Only `digitalme migrate` changes the schema; the deployment runs it as its own step.
    for command in (("serve",), ("token", "list")):
        result = cli(env, *command)
        every = ", ".join(f"{m.version:04d}_{m.name}" for m in bundled_migrations())
        one_line_refusal(result, f"lacks migrations {every}: run `digitalme migrate` first")


def test_a_database_from_a_newer_release_is_used_and_reported(env: dict[str, str]) -> None:
    # What a rollback of the code alone does: the previous release runs on the schema the
    # newer one left (migrations only add), and says so.
    db_path = migrated(env)
    with sqlite3.connect(db_path) as conn:
        conn.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES (999, 'future', 'x')"
        )
    result = cli(env, "token", "list")
    assert_ok(result)
    assert "migrations [999] from a newer release" in result.stderr
    assert "is up to date" in cli(env, "migrate").stdout
    status = cli(env, "migrate", "--status")
    assert_ok(status)
    assert json.loads(status.stdout)["applied"][-1] == 999
    assert json.loads(status.stdout)["pending"] == []


def test_serve_refuses_a_missing_database_directory(env: dict[str, str], tmp_path: Path) -> None:
    env["DIGITALME_DB_PATH"] = str(tmp_path / "gone" / "digitalme.db")
    result = cli(env, "serve")
    one_line_refusal(result, f"directory {tmp_path / 'gone'} does not exist")


@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_serve_refuses_a_file_that_is_not_sqlite(env: dict[str, str], command: str) -> None:
    # A regression here used to hang: a connection leaked by a failed PRAGMA kept its
    # (non-daemon) worker thread, so the process printed the error and never exited.
    db_path = Path(env["DIGITALME_DB_PATH"])
    db_path.write_text("these are my notes, not a database\n" * 50)
    result = cli(env, command, timeout=60)
    one_line_refusal(
        result, f"digitalme: database error: cannot open {db_path}: file is not a database"
    )
