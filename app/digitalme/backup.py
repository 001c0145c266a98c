"""Backup freshness as the app sees it: Litestream's replication and the last restore drill.

Litestream 0.5 answers HTTP on its control socket (``/run/litestream/litestream.sock`` on
hosts deployed by the roles; it runs as the app's user, so the app may connect). ``GET
/list`` gives, per database, ``last_sync_at``: the end of the last successful sync to the
replica. While the replica accepts writes it advances about every sync interval (1 s),
idle or not; when the replica stops accepting them (target down, disk full, credentials
gone) it stops, so ``now - last_sync_at`` is how long the replica has been behind at most:
the data a crash would lose. Checked against Litestream 0.5.17 (docs/operations/
backup-and-recovery.md).

The restore drill (``digitalme-backup-drill.service``, roles/litestream) writes its result
as JSON (``/var/lib/digitalme/backup-drill/result.json`` by default,
``DIGITALME_BACKUP_DRILL_RESULT``); the app only reads it.

Both feed the ``backup`` readiness check (reported, not required: a backup problem must
be seen, but must not take the only instance out of rotation) and the
``digitalme_backup_*`` metrics.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Required, TypedDict

from .config import Settings
from .health import Check, CheckResult
from .metrics import Metrics

SOCKET_TIMEOUT_SECONDS = 1.0
_MAX_RESPONSE_BYTES = 1 << 20
# Go's zero time: what a database that never synced would report.
_NEVER = datetime(1, 1, 1, tzinfo=UTC)

Clock = Callable[[], datetime]


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Replication:
    """What Litestream said about our database (``answered`` False: it did not say)."""

    answered: bool
    detail: str
    status: str | None = None
    last_sync_at: datetime | None = None
    lag_seconds: float | None = None


class LitestreamError(Exception):
    pass


async def _get(socket_path: Path, target: str) -> Any:
    """GET ``target`` over Litestream's control socket; the decoded JSON body. The caller
    bounds the time (``asyncio.timeout``)."""
    try:
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
    except FileNotFoundError:
        raise LitestreamError(
            f"Litestream is not running (no control socket at {socket_path})"
        ) from None
    except ConnectionRefusedError:
        raise LitestreamError(
            f"Litestream is not running ({socket_path} refuses connections)"
        ) from None
    except PermissionError:
        raise LitestreamError(f"no permission to connect to {socket_path}") from None
    try:
        writer.write(f"GET {target} HTTP/1.0\r\nHost: litestream\r\n\r\n".encode())
        raw = b""
        while chunk := await reader.read(65536):
            raw += chunk
            if len(raw) > _MAX_RESPONSE_BYTES:
                raise LitestreamError("Litestream's answer is too large")
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split()
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise LitestreamError(f"unexpected answer from Litestream: {status_line[:80]!r}")
    if parts[1] != "200":
        raise LitestreamError(
            f"Litestream answered {status_line[:80]!r}: "
            f"{body[:200].decode(errors='replace').strip()}"
        )
    try:
        return json.loads(body)
    except ValueError:
        raise LitestreamError("Litestream's answer is not JSON") from None


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return None if parsed <= _NEVER else parsed


def _entry_for(listing: Any, db_path: Path) -> dict[str, Any] | str:
    """Our database's entry in Litestream's /list answer, or why there is none."""
    databases = listing.get("databases") if isinstance(listing, dict) else None
    if not isinstance(databases, list):
        return "unexpected answer from Litestream's /list"
    wanted = os.path.abspath(db_path)
    entries = [e for e in databases if isinstance(e, dict)]
    for entry in entries:
        if os.path.abspath(str(entry.get("path", ""))) == wanted:
            return entry
    known = ", ".join(str(e.get("path")) for e in entries)
    return f"Litestream does not replicate {wanted} (it replicates: {known or 'nothing'})"


async def read_replication(
    socket_path: Path, db_path: Path, *, clock: Clock = _utcnow
) -> Replication:
    try:
        async with asyncio.timeout(SOCKET_TIMEOUT_SECONDS):
            listing = await _get(socket_path, "/list")
    except TimeoutError:
        return Replication(False, f"Litestream did not answer within {SOCKET_TIMEOUT_SECONDS:g}s")
    except LitestreamError as exc:
        return Replication(False, str(exc))
    entry = _entry_for(listing, db_path)
    if isinstance(entry, str):
        return Replication(False, entry)
    status = str(entry.get("status") or "unknown")
    last_sync = _parse_time(entry.get("last_sync_at"))
    if last_sync is None:
        return Replication(
            True, f"Litestream is {status} but has not synced to the replica yet", status
        )
    lag = max(0.0, (clock() - last_sync).total_seconds())
    return Replication(True, f"replica synced {lag:.1f}s ago", status, last_sync, lag)


@dataclass(frozen=True)
class Drill:
    """The last restore drill's result file, as far as it could be read."""

    found: bool
    ok: bool = False
    detail: str = ""
    finished_at: datetime | None = None
    data: dict[str, Any] | None = None


def read_drill(path: Path) -> Drill:
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Drill(False, detail=f"no restore drill has run yet ({path} does not exist)")
    except OSError as exc:
        return Drill(True, detail=f"cannot read the drill result {path}: {exc.strerror}")
    try:
        result = json.loads(raw)
    except ValueError:
        return Drill(True, detail=f"the drill result {path} is not JSON")
    if not isinstance(result, dict):
        return Drill(True, detail=f"the drill result {path} is not a JSON object")
    finished = _parse_time(result.get("finished_at"))
    if finished is None:
        return Drill(True, detail=f"the drill result {path} has no finished_at")
    ok = result.get("ok") is True
    return Drill(True, ok, "" if ok else str(result.get("error") or "failed"), finished, result)


class DrillResult(TypedDict, total=False):
    """The drill's ``result.json`` as this module reads it: the fields of the backup tool's
    output (roles/litestream, ``digitalme-backup drill``) that the app relies on. Declared
    once here; tests/unit/test_backup_drill.py checks the real tool's output against it (a
    passing and a failing drill) and feeds that output to :func:`read_drill`, and the app's
    tests build their results through it."""

    ok: Required[bool]
    started_at: str
    finished_at: Required[str]
    duration_seconds: float
    error: Required[str | None]
    restored_txid: str | None
    behind_seconds: float | None
    replica_age_seconds: float | None
    restored_bytes: int
    rows: dict[str, int]
    last_success_at: str | None


# The fields of the drill's result shown in the readiness detail: all but the verdict.
_DRILL_FIELDS = tuple(name for name in DrillResult.__annotations__ if name != "ok")


def backup_check(settings: Settings, *, clock: Clock = _utcnow) -> Check:
    """Readiness check ``backup``: replication lag and the last drill, with their detail."""
    max_lag = settings.backup_max_lag_seconds
    max_drill_age = settings.backup_drill_max_age_hours * 3600

    async def check() -> CheckResult:
        problems: list[str] = []
        notes: list[str] = []
        data: dict[str, Any] = {}
        if settings.litestream_socket is not None:
            replication = await read_replication(
                settings.litestream_socket, settings.db_path, clock=clock
            )
            data["replication_lag_seconds"] = (
                round(replication.lag_seconds, 1) if replication.lag_seconds is not None else None
            )
            data["last_sync_at"] = (
                replication.last_sync_at.isoformat() if replication.last_sync_at else None
            )
            data["litestream"] = replication.status or "not answering"
            if replication.lag_seconds is None:
                problems.append(replication.detail)
            elif replication.lag_seconds > max_lag:
                problems.append(
                    f"the replica last synced {replication.lag_seconds:.0f}s ago "
                    f"(more than {max_lag:g}s): is the backup target reachable? "
                    "`journalctl -u litestream`"
                )
            else:
                notes.append(replication.detail)
        if settings.backup_drill_result is not None:
            drill = read_drill(settings.backup_drill_result)
            if not drill.found:
                data["drill"] = None
                notes.append(drill.detail)
            elif drill.finished_at is None or drill.data is None:
                data["drill"] = {"ok": False}
                problems.append(drill.detail)
            else:
                age = max(0.0, (clock() - drill.finished_at).total_seconds())
                data["drill"] = {
                    "ok": drill.ok,
                    "age_hours": round(age / 3600, 2),
                    **{k: drill.data[k] for k in _DRILL_FIELDS if k in drill.data},
                }
                when = drill.finished_at.isoformat(timespec="seconds")
                if not drill.ok:
                    problems.append(
                        f"the last restore drill failed ({when}): {drill.detail}; "
                        "`journalctl -u digitalme-backup-drill`"
                    )
                elif age > max_drill_age:
                    problems.append(
                        f"the last restore drill is {age / 3600:.0f}h old (more "
                        f"than {max_drill_age / 3600:g}h): is "
                        "digitalme-backup-drill.timer enabled?"
                    )
                else:
                    notes.append(f"last restore drill ok ({when})")
        return CheckResult(not problems, "; ".join(problems or notes), data)

    return check


def replication_metrics_refresher(
    socket_path: Path, db_path: Path, metrics: Metrics, *, clock: Clock = _utcnow
) -> Callable[[], Awaitable[None]]:
    """A scrape-time refresher of ``digitalme_backup_litestream_up`` and
    ``digitalme_backup_replication_lag_seconds`` (NaN while Litestream does not say)."""

    async def refresh() -> None:
        replication = await read_replication(socket_path, db_path, clock=clock)
        metrics.backup_litestream_up.set(1 if replication.answered else 0)
        metrics.backup_replication_lag.set(
            replication.lag_seconds if replication.lag_seconds is not None else math.nan
        )

    return refresh
