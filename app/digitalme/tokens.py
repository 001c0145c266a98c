"""API bearer tokens: created once, stored as SHA-256 digests, scoped, revocable.

Tokens are 256-bit random strings, so a plain SHA-256 is a sound digest: there is nothing
to brute-force. A token is looked up by its digest, which also means no secret comparison
happens in Python at all.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from .db import Database
from .models import SCOPES as SCOPES

TOKEN_PREFIX = "dm_"  # noqa: S105 - the public prefix of every token


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class TokenInfo:
    id: int
    name: str
    scope: str
    prefix: str
    created_at: str
    last_used_at: str | None
    revoked_at: str | None

    def allows(self, scope: str) -> bool:
        """admin tokens may do everything a chat token may."""
        return self.scope == "admin" or self.scope == scope


class TokenError(ValueError):
    pass


_COLUMNS = "id, name, scope, prefix, created_at, last_used_at, revoked_at"


class TokenStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._minute_number = -1  # the minute (since the epoch) self._minute is the text of
        self._minute = ""

    async def create(self, name: str, scope: str) -> tuple[str, TokenInfo]:
        """Make a token; returns the secret (shown once) and its record."""
        name = name.strip()
        if not name or len(name) > 100:
            raise TokenError("name must be 1 to 100 characters")
        if scope not in SCOPES:
            raise TokenError(f"scope must be one of {', '.join(SCOPES)}")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        prefix = secret[: len(TOKEN_PREFIX) + 6]
        row = await self.db.write_returning(
            "INSERT INTO api_tokens (name, scope, token_sha256, prefix, created_at)"
            f" VALUES (?, ?, ?, ?, ?) RETURNING {_COLUMNS}",
            (name, scope, _digest(secret), prefix, _now()),
        )
        assert row is not None  # an INSERT without conflict clause returns its row
        return secret, TokenInfo(**dict(row))

    async def get(self, token_id: int) -> TokenInfo | None:
        row = await self.db.fetchone(f"SELECT {_COLUMNS} FROM api_tokens WHERE id = ?", (token_id,))
        return TokenInfo(**dict(row)) if row else None

    async def all(self) -> list[TokenInfo]:
        rows = await self.db.fetchall(f"SELECT {_COLUMNS} FROM api_tokens ORDER BY id")
        return [TokenInfo(**dict(row)) for row in rows]

    async def revoke(self, token_id: int) -> TokenInfo | None:
        """Revoke a token; None when there is no such token. Revoking twice is harmless."""
        await self.db.execute(
            "UPDATE api_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
            (_now(), token_id),
        )
        return await self.get(token_id)

    async def delete(self, token_id: int) -> None:
        """Remove a token for good (a throw-away one; people's tokens are revoked, so that
        what they did stays attributed)."""
        await self.db.execute("DELETE FROM api_tokens WHERE id = ?", (token_id,))

    async def authenticate(self, secret: str) -> TokenInfo | None:
        """The live token with this secret, or None."""
        if not secret.startswith(TOKEN_PREFIX) or len(secret) > 200:
            return None
        row = await self.db.lookup_one(  # the UNIQUE index on token_sha256
            f"SELECT {_COLUMNS} FROM api_tokens WHERE token_sha256 = ? AND revoked_at IS NULL",
            (_digest(secret),),
        )
        return TokenInfo(**dict(row)) if row else None

    async def touch(self, token: TokenInfo) -> None:
        """Record use, at most once a minute per token to spare the disk: a token looked up
        with this minute's ``last_used_at`` costs no write at all (and no clock reading
        made into text: the minute's text is kept while the clock is in that minute)."""
        minute_number = int(time.time()) // 60
        if minute_number != self._minute_number:
            self._minute = _now()[:16]
            self._minute_number = minute_number
        minute = self._minute
        if token.last_used_at is not None and token.last_used_at >= minute:
            return
        now = _now()
        minute = now[:16]
        await self.db.execute(
            "UPDATE api_tokens SET last_used_at = ? WHERE id = ? AND"
            " (last_used_at IS NULL OR last_used_at < ?)",
            (now, token.id, minute),
        )
