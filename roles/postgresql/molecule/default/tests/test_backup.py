"""Backups on `db` (posix repository, the role's default): WAL archiving and a full backup
from the first run, the backup units, and the restore drill passing on a fresh archive
and failing, with its metrics saying so, when the archive lacks old rows."""

from __future__ import annotations

import json
import re
import time

import pytest

testinfra_hosts = ["db"]

STANZA = "digitalme"
DRILL_TOOL = "/usr/local/libexec/digitalme-postgresql-drill"
METRICS = "/var/lib/prometheus/node-exporter/digitalme_backup.prom"
RESULT = "/var/lib/postgresql/digitalme-drill/result.json"


def as_postgres(host, command: str):
    return host.run(f"runuser -u postgres -- {command}")


def info(host) -> dict:
    result = as_postgres(host, f"pgbackrest --stanza={STANZA} --output=json info")
    assert result.rc == 0, result.stderr
    return json.loads(result.stdout)[0]


def app_sql(host, query: str) -> str:
    result = as_postgres(host, f'psql -XAtq -v ON_ERROR_STOP=1 -d digitalme -c "{query}"')
    assert result.rc == 0, result.stderr
    return result.stdout.strip()


def metrics(host) -> dict[str, str]:
    values = {}
    for line in host.file(METRICS).content_string.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = value
    return values


def test_wal_is_archived_and_a_full_backup_exists_from_the_first_run(host):
    stanza = info(host)
    assert stanza["status"]["code"] == 0, stanza["status"]
    assert any(backup["type"] == "full" for backup in stanza["backup"])
    # pgbackrest check switches to a new WAL segment and waits until it is archived.
    check = as_postgres(host, f"pgbackrest --stanza={STANZA} check")
    assert check.rc == 0, check.stderr
    settings = as_postgres(host, "psql -XAtq -d postgres -c 'SHOW archive_mode'")
    assert settings.stdout.strip() == "on"


def test_the_settings_file_is_readable_by_postgres_only(host):
    conf = host.file("/etc/pgbackrest.conf")
    assert (conf.user, conf.group, conf.mode) == ("root", "postgres", 0o640)
    assert "repo1-type=posix" in conf.content_string
    repository = host.file("/var/lib/pgbackrest")
    assert (repository.user, repository.mode) == ("postgres", 0o750)


def test_the_backup_unit_takes_a_differential_backup_and_the_timers_are_on(host):
    before = len(info(host)["backup"])
    result = host.run("systemctl start digitalme-database-backup@diff.service")
    assert result.rc == 0, host.run("journalctl -u digitalme-database-backup@diff -n 30").stdout
    backups = info(host)["backup"]
    assert len(backups) == before + 1 and backups[-1]["type"] == "diff"
    for timer in (
        "digitalme-database-backup-full.timer",
        "digitalme-database-backup-diff.timer",
        "digitalme-backup-drill.timer",
    ):
        assert host.service(timer).is_enabled and host.service(timer).is_running, timer


@pytest.fixture
def messages(host):
    """The app's table as its migrations make it (what the drill checks), dropped after."""
    app_sql(
        host,
        "CREATE TABLE messages (id bigint PRIMARY KEY, text text NOT NULL, "
        "created_at text NOT NULL)",
    )
    yield
    app_sql(host, "DROP TABLE messages")


def insert(host, row_id: int, age_seconds: float) -> None:
    at = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() - age_seconds))
    app_sql(host, f"INSERT INTO messages VALUES ({row_id}, 'row {row_id}', '{at}')")


def test_the_drill_restores_the_archive_and_fails_when_it_lacks_old_rows(host, messages):
    insert(host, 1, age_seconds=5)
    assert as_postgres(host, f"pgbackrest --stanza={STANZA} check").rc == 0  # archived

    result = host.run("systemctl start digitalme-backup-drill.service")
    assert result.rc == 0, host.run("journalctl -u digitalme-backup-drill -n 30").stdout
    passed = metrics(host)
    # Readable by node-exporter, through the textfile group.
    prom = host.file(METRICS)
    assert (prom.user, prom.group, prom.mode) == ("postgres", "node-exporter-textfile", 0o640)
    assert passed["digitalme_backup_drill_success"] == "1"
    assert passed['digitalme_backup_drill_restored_rows{table="messages"}'] == "1"
    assert float(passed["digitalme_backup_drill_behind_seconds"]) == 0
    assert float(passed["digitalme_backup_drill_restored_bytes"]) > 1_000_000
    # Nothing of the scratch copy is left, and no server runs on it.
    assert host.run("ls /var/lib/postgresql/digitalme-drill").stdout.split() == ["result.json"]
    assert host.run("pgrep -f digitalme-drill/scratch").rc == 1

    # A row written an hour "ago" that never reached the archive (its WAL segment is still
    # open): the copy lacks it, so the archive is stale; the drill fails and says so.
    insert(host, 2, age_seconds=3600)
    failed = as_postgres(host, DRILL_TOOL)
    assert failed.rc == 1
    assert re.search(
        r"the backup is stale: the restored copy lacks messages rows written "
        r"36\d\ds before the drill",
        failed.stderr,
    ), failed.stderr
    report = metrics(host)
    assert report["digitalme_backup_drill_success"] == "0"
    assert float(report["digitalme_backup_drill_behind_seconds"]) >= 3600
    # The last success is still the earlier run's.
    assert (
        report["digitalme_backup_drill_last_success_timestamp_seconds"]
        == passed["digitalme_backup_drill_last_success_timestamp_seconds"]
    )
    assert json.loads(host.file(RESULT).content_string)["ok"] is False
