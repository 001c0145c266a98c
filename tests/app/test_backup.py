"""Backup freshness in /health/ready and /metrics: Litestream's control socket and the drill.

Litestream is a stand-in of its 0.5 control socket (standins/litestream_socket.py);
the drill's result is a file written as digitalme-backup-drill.service writes it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from digitalme.backup import DrillResult
from standins.litestream_socket import LitestreamSocketStandin, run_litestream_socket
from tests.conftest import Service, ServiceFactory
from tests.support.shapes import shape_problems


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A folder with a short path: Unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="dm-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def litestream(short_dir: Path, tmp_path: Path) -> AsyncIterator[LitestreamSocketStandin]:
    async with run_litestream_socket(
        short_dir / "litestream.sock", tmp_path / "digitalme.db"
    ) as standin:
        yield standin


async def _ready(service: Service) -> tuple[int, dict[str, Any]]:
    response = await service.client.get("/health/ready")
    body: dict[str, Any] = await response.json()
    return response.status, body


async def _metric(service: Service, name: str) -> float:
    text = await service.metrics_text()
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match[1])


def _drill_result(
    path: Path,
    *,
    ok: bool,
    hours_ago: float = 1.0,
    error: str | None = None,
) -> None:
    finished = datetime.now(UTC) - timedelta(hours=hours_ago)
    # In the shape the backup tool writes (DrillResult, checked against the real tool's
    # output in tests/unit/test_backup_drill.py).
    result: DrillResult = {
        "ok": ok,
        "error": error,
        "started_at": (finished - timedelta(seconds=12)).isoformat(),
        "finished_at": finished.isoformat(),
        "duration_seconds": 12.0,
        "restored_txid": "00000000000000a1",
        "behind_seconds": 0.0,
        "replica_age_seconds": 3.5,
        "restored_bytes": 4096,
        "rows": {"messages": 10, "conversations": 2},
        "last_success_at": finished.isoformat() if ok else None,
    }
    assert shape_problems(result, DrillResult) == []
    path.write_text(json.dumps(result))


async def test_no_backup_check_without_backup_settings(service: Service) -> None:
    status, body = await _ready(service)
    assert status == 200
    assert "backup" not in body["checks"]
    # Not configured (an app host on PostgreSQL, or backups turned off): no claim either way,
    # neither a reassuring lag nor a Litestream that is "down" (the LitestreamDown alert).
    text = await service.metrics_text()
    assert "digitalme_backup_" not in text, text


async def test_ready_reports_the_replication_lag(
    make_service: ServiceFactory, litestream: LitestreamSocketStandin
) -> None:
    service = await make_service(litestream_socket=litestream.socket_path)
    litestream.synced(0.4)
    status, body = await _ready(service)
    backup = body["checks"]["backup"]
    assert status == 200 and backup["ok"] is True, backup
    assert backup["required"] is False
    assert 0.3 <= backup["replication_lag_seconds"] < 5
    assert backup["litestream"] == "replicating"
    assert backup["detail"].startswith("replica synced")
    assert await _metric(service, "digitalme_backup_litestream_up") == 1
    assert 0.3 <= await _metric(service, "digitalme_backup_replication_lag_seconds") < 5
    assert litestream.requests[-1] == "/list"


async def test_a_stalled_replica_shows_but_keeps_the_service_in_rotation(
    make_service: ServiceFactory, litestream: LitestreamSocketStandin
) -> None:
    service = await make_service(
        litestream_socket=litestream.socket_path, backup_max_lag_seconds=30.0
    )
    litestream.synced(125)
    status, body = await _ready(service)
    backup = body["checks"]["backup"]
    assert status == 200 and body["status"] == "ready"
    assert backup["ok"] is False
    assert 124 <= backup["replication_lag_seconds"] < 130
    assert "more than 30s" in backup["detail"] and "journalctl -u litestream" in backup["detail"]
    assert 124 <= await _metric(service, "digitalme_backup_replication_lag_seconds") < 130
    # Back in sync: fine again.
    litestream.synced(1)
    _, body = await _ready(service)
    assert body["checks"]["backup"]["ok"] is True


async def test_litestream_not_running(make_service: ServiceFactory, short_dir: Path) -> None:
    service = await make_service(litestream_socket=short_dir / "litestream.sock")
    status, body = await _ready(service)
    backup = body["checks"]["backup"]
    assert status == 200 and backup["ok"] is False
    assert backup["detail"].startswith("Litestream is not running (no control socket")
    assert backup["replication_lag_seconds"] is None
    assert backup["litestream"] == "not answering"
    assert await _metric(service, "digitalme_backup_litestream_up") == 0
    assert math.isnan(await _metric(service, "digitalme_backup_replication_lag_seconds"))


async def test_a_socket_left_by_a_killed_litestream(
    make_service: ServiceFactory, short_dir: Path
) -> None:
    import socket

    path = short_dir / "litestream.sock"
    with socket.socket(socket.AF_UNIX) as leftover:  # bound, never listening: refused
        leftover.bind(str(path))
        service = await make_service(litestream_socket=path)
        _, body = await _ready(service)
    assert "refuses connections" in body["checks"]["backup"]["detail"]


async def test_a_litestream_that_does_not_answer(
    make_service: ServiceFactory, litestream: LitestreamSocketStandin
) -> None:
    service = await make_service(litestream_socket=litestream.socket_path)
    litestream.hang()
    started = time.monotonic()
    status, body = await _ready(service)
    assert time.monotonic() - started < 10  # the check gives up on its own (1 s)
    assert status == 200
    assert body["checks"]["backup"]["detail"] == "Litestream did not answer within 1s"


async def test_a_database_that_never_synced(
    make_service: ServiceFactory, litestream: LitestreamSocketStandin
) -> None:
    service = await make_service(litestream_socket=litestream.socket_path)
    litestream.never_synced()
    _, body = await _ready(service)
    backup = body["checks"]["backup"]
    assert backup["ok"] is False
    assert backup["detail"] == "Litestream is replicating but has not synced to the replica yet"
    assert backup["replication_lag_seconds"] is None


async def test_litestream_replicating_another_database(
    make_service: ServiceFactory,
    litestream: LitestreamSocketStandin,
) -> None:
    service = await make_service(litestream_socket=litestream.socket_path)
    litestream.databases[0]["path"] = "/srv/other.db"
    _, body = await _ready(service)
    detail = body["checks"]["backup"]["detail"]
    assert body["checks"]["backup"]["ok"] is False
    assert "does not replicate" in detail and "/srv/other.db" in detail


async def test_the_last_drill_is_shown(
    make_service: ServiceFactory,
    litestream: LitestreamSocketStandin,
    tmp_path: Path,
) -> None:
    result = tmp_path / "result.json"
    service = await make_service(
        litestream_socket=litestream.socket_path, backup_drill_result=result
    )
    _, body = await _ready(service)
    assert body["checks"]["backup"]["ok"] is True  # no drill yet: said, not a failure
    assert body["checks"]["backup"]["drill"] is None
    assert "no restore drill has run yet" in body["checks"]["backup"]["detail"]

    _drill_result(result, ok=True, hours_ago=2)
    _, body = await _ready(service)
    backup = body["checks"]["backup"]
    assert backup["ok"] is True, backup
    assert backup["drill"]["ok"] is True
    assert 1.9 < backup["drill"]["age_hours"] < 2.1
    assert backup["drill"]["duration_seconds"] == 12.0
    assert backup["drill"]["rows"] == {"messages": 10, "conversations": 2}
    assert "last restore drill ok" in backup["detail"]


async def test_a_failed_drill_fails_the_check(
    make_service: ServiceFactory,
    tmp_path: Path,
) -> None:
    result = tmp_path / "result.json"
    service = await make_service(backup_drill_result=result)
    _drill_result(result, ok=False, error="restore failed: decode page 59: lz4: invalid source")
    status, body = await _ready(service)
    backup = body["checks"]["backup"]
    assert status == 200 and backup["ok"] is False
    assert "the last restore drill failed" in backup["detail"]
    assert "lz4: invalid source" in backup["detail"]
    assert "journalctl -u digitalme-backup-drill" in backup["detail"]
    assert "replication_lag_seconds" not in backup  # no socket configured


async def test_an_old_drill_fails_the_check(
    make_service: ServiceFactory,
    tmp_path: Path,
) -> None:
    result = tmp_path / "result.json"
    service = await make_service(backup_drill_result=result, backup_drill_max_age_hours=48.0)
    _drill_result(result, ok=True, hours_ago=50)
    _, body = await _ready(service)
    backup = body["checks"]["backup"]
    assert backup["ok"] is False
    assert "50h old (more than 48h)" in backup["detail"]
    assert "digitalme-backup-drill.timer" in backup["detail"]


@pytest.mark.parametrize("content", ["{not json", "[]", '{"ok": true}'])
async def test_an_unreadable_drill_result_fails_the_check(
    make_service: ServiceFactory, tmp_path: Path, content: str
) -> None:
    result = tmp_path / "result.json"
    result.write_text(content)
    service = await make_service(backup_drill_result=result)
    _, body = await _ready(service)
    assert body["checks"]["backup"]["ok"] is False
    assert str(result) in body["checks"]["backup"]["detail"]
