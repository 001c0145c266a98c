"""`digitalme migrate-data`: every row of a live SQLite database into an empty PostgreSQL
one, verified by counts and checksums; the app works on the copy (new ids included);
the way back gives the same rows; a non-empty target or a password on the command line is
refused."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from digitalme.cli import main
from digitalme.config import DatabaseUrl, load_settings
from digitalme.conversations import ConversationStore
from digitalme.db import Database, DatabaseError
from digitalme.inbox import InboxStore
from digitalme.persona import PersonaStore, load_persona_file
from digitalme.tokens import TokenStore
from digitalme.transfer import copy_data
from digitalme.usage import Usage
from tests.conftest import SAMPLE_PERSONA
from tests.support import peek

TABLES = (
    "activity",
    "api_tokens",
    "conversations",
    "health_probe",
    "inbox",
    "messages",
    "persona_profile",
    "persona_traits",
    "tool_actions",
    "workers",
)


async def _fill(path: Path) -> str:
    """A small database with a row in every table, the way the service writes them; the
    service stays 'running' (open) while the copy reads it. Returns a token's secret."""
    db = Database(path)
    await db.open()
    await db.migrate()
    persona, digest = load_persona_file(SAMPLE_PERSONA)
    await PersonaStore(db).save(persona, digest)
    secret, token = await TokenStore(db).create("owner", "admin")
    conversations = ConversationStore(db)
    chat = await conversations.create("api", token_id=token.id, title="ünïcode ✓")
    await conversations.add_message(chat.id, "user", "hello 'quoted' \"text\"\nline two")
    await conversations.add_message(
        chat.id,
        "assistant",
        "hi",
        model="m",
        cost_usd=0.000123,
        usage=Usage(10, 5, 2, 1),
        stop_reason="end_turn",
    )
    inbox = InboxStore(db)
    item = await inbox.ingest("github", "d-1", "issues", {"n": 1})
    await inbox.ingest("telegram", "t-1", "message", {"n": 2})
    await inbox.claim(1, owner="host:1:x")
    await inbox.heartbeat("host:1:x")
    await db.execute(
        "INSERT INTO activity (source, inbox_id, kind, summary, occurred_at)"
        " VALUES ('github', ?, 'issues.opened', 'opened #1', '2026-01-01')",
        (item.item_id,),
    )
    await db.execute(
        "INSERT INTO tool_actions (tool, conversation_id, request_sha256, result,"
        " created_at) VALUES ('clickup', ?, 'abc', '{}', '2026-01-01')",
        (chat.id,),
    )
    await db.execute("INSERT INTO health_probe (id, checked_at) VALUES (1, 'now')")
    await db.close()
    return secret


def test_sqlite_to_postgresql_and_back(tmp_path: Path, postgres_database: DatabaseUrl) -> None:
    source = tmp_path / "live.db"
    secret = asyncio.run(_fill(source))
    forward = copy_data(source, postgres_database)
    assert tuple(sorted(c.table for c in forward)) == TABLES
    assert all(c.rows > 0 for c in forward), forward
    for table in TABLES:
        assert peek.rows(postgres_database, f"SELECT count(*) FROM {table}") == peek.rows(
            source, f"SELECT count(*) FROM {table}"
        )

    async def use_the_copy() -> None:
        db = Database(postgres_database)
        await db.open()
        try:
            await db.require_migrated()
            token = await TokenStore(db).authenticate(secret)
            assert token is not None and token.name == "owner"
            conversations = ConversationStore(db)
            [chat] = await db.fetchall("SELECT id FROM conversations")
            stored = await conversations.messages(chat["id"], limit=10)
            assert [m.text for m in stored] == ["hello 'quoted' \"text\"\nline two", "hi"]
            assert stored[1].cost_usd == 0.000123
            # New rows get new ids: the identity sequences were moved past the copied ones.
            added = await conversations.add_message(chat["id"], "user", "after the move")
            assert added.id == stored[-1].id + 1
        finally:
            await db.close()

    asyncio.run(use_the_copy())

    # The way back, to a new SQLite file: the same rows (and the message added since, which
    # changed its conversation's updated_at).
    back = tmp_path / "back.db"
    returned = {c.table: c for c in copy_data(postgres_database, back)}
    for copied in forward:
        if copied.table not in ("messages", "conversations"):
            assert returned[copied.table] == copied
    assert returned["messages"].rows == 3
    assert peek.rows(back, "SELECT text FROM messages ORDER BY id DESC LIMIT 1") == [
        ("after the move",)
    ]


def test_a_target_with_rows_is_refused_and_left_as_it_was(
    tmp_path: Path, migrated_postgres_database: DatabaseUrl
) -> None:
    source = tmp_path / "live.db"
    asyncio.run(_fill(source))
    peek.rows(
        migrated_postgres_database, "INSERT INTO health_probe (id, checked_at) VALUES (1, 'theirs')"
    )
    with pytest.raises(DatabaseError, match=r"is not empty \(table health_probe has rows\)"):
        copy_data(source, migrated_postgres_database)
    assert peek.rows(migrated_postgres_database, "SELECT count(*) FROM messages") == [(0,)]


def test_the_command(
    tmp_path: Path,
    postgres_database: DatabaseUrl,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source = tmp_path / "live.db"
    asyncio.run(_fill(source))
    monkeypatch.setenv("DIGITALME_DB_PATH", str(source))
    with_password = postgres_database.conninfo.replace("postgres@", "postgres:hunter2@")
    assert main(["migrate-data", "--from", f"sqlite://{source}", "--to", with_password]) == 1
    err = capsys.readouterr().err
    assert "--to: leave the password out of the URL" in err and "hunter2" not in err
    assert (
        main(["migrate-data", "--from", f"sqlite://{source}", "--to", postgres_database.conninfo])
        == 0
    )
    out = capsys.readouterr().out
    assert any(line.split()[:3] == ["messages", "2", "rows"] for line in out.splitlines())
    assert out.rstrip().endswith("counts and checksums match")
    # Again: the target has rows now, nothing is copied twice.
    assert (
        main(["migrate-data", "--from", f"sqlite://{source}", "--to", postgres_database.conninfo])
        == 1
    )
    assert "is not empty" in capsys.readouterr().err
    assert (
        load_settings({"DIGITALME_DATABASE_URL": postgres_database.conninfo}).database
        == postgres_database
    )
