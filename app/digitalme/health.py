"""Readiness: named checks, each saying ok or not and why, run together for /health/ready.

The core registers database, migrations, persona and Claude checks; other parts (channels,
backups) add their own with :meth:`Readiness.add`. A check marked ``required=False`` is
reported but does not make the service unready.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .conversations import now_iso
from .db import Database
from .engine import DatabaseError
from .llm import Claude
from .persona import PersonaStore

log = logging.getLogger(__name__)

CHECK_TIMEOUT_SECONDS = 2.0


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


Check = Callable[[], Awaitable[CheckResult]]


@dataclass(frozen=True)
class _Registered:
    name: str
    check: Check
    required: bool


class Readiness:
    def __init__(self) -> None:
        self._checks: list[_Registered] = []

    def add(self, name: str, check: Check, *, required: bool = True) -> None:
        self._checks.append(_Registered(name, check, required))

    async def _run_one(self, registered: _Registered) -> dict[str, Any]:
        started = time.monotonic()
        try:
            result = await asyncio.wait_for(registered.check(), CHECK_TIMEOUT_SECONDS)
        except TimeoutError:
            result = CheckResult(False, f"no answer within {CHECK_TIMEOUT_SECONDS:g}s")
        except Exception as exc:
            log.exception("readiness check %s failed", registered.name)
            result = CheckResult(False, f"check failed: {type(exc).__name__}: {exc}")
        return {
            "ok": result.ok,
            "required": registered.required,
            "detail": result.detail,
            **result.data,
            "duration_ms": round((time.monotonic() - started) * 1000, 1),
        }

    async def run(self) -> tuple[bool, dict[str, dict[str, Any]]]:
        results = await asyncio.gather(*(self._run_one(r) for r in self._checks))
        checks = {r.name: result for r, result in zip(self._checks, results, strict=True)}
        ready = all(c["ok"] for c in checks.values() if c["required"])
        return ready, checks


def database_check(db: Database) -> Check:
    async def check() -> CheckResult:
        try:
            await db.execute(
                "INSERT INTO health_probe (id, checked_at) VALUES (1, ?)"
                " ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
                (now_iso(),),
            )
        except Exception as exc:
            return CheckResult(False, f"cannot write to {db.name}: {exc}")
        return CheckResult(True, "writable", {"size_bytes": await db.size_bytes()})

    return check


def migrations_check(db: Database) -> Check:
    async def check() -> CheckResult:
        try:
            state = await db.migration_state()
        except DatabaseError as exc:
            return CheckResult(False, str(exc))
        if state.pending:
            return CheckResult(
                False, f"pending migrations: {state.describe_pending()}; run `digitalme migrate`"
            )
        data: dict[str, Any] = {"version": len(db.migrations)}
        if state.newer:
            # A rollback of the code alone: the schema is a newer release's, which only adds.
            data["newer"] = state.newer
            return CheckResult(
                True,
                f"up to date; the database also has migrations {state.newer} of a newer release",
                data,
            )
        return CheckResult(True, "up to date", data)

    return check


def persona_check(personas: PersonaStore) -> Check:
    async def check() -> CheckResult:
        stored = await personas.load()
        if stored is None:
            return CheckResult(False, "no persona imported: run `digitalme persona import FILE`")
        return CheckResult(True, f"{stored.persona.name}, imported {stored.imported_at}")

    return check


def claude_check(claude: Claude) -> Check:
    async def check() -> CheckResult:
        if not claude.configured:
            return CheckResult(False, "ANTHROPIC_API_KEY is not set")
        state = claude.breaker.state.name.lower()
        data = {"model": claude.settings.model, "breaker": state}
        if state == "open":
            # An outage is reported, but does not take the service out of rotation:
            # it still answers quickly with a friendly message.
            return CheckResult(True, "configured; circuit breaker open (Claude is failing)", data)
        return CheckResult(True, "configured", data)

    return check
