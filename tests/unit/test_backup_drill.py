"""The backup tool (tools/digitalme_backup.py, with tools/drill_report.py): restores,
drills, inspection.

It runs as a process, as the units run it, with a settings file like the role's, against
stand-ins of the commands it drives: ``litestream`` (``restore -dry-run -json`` prints a plan
of one LTX file; ``restore -o OUT`` writes the "replica state" database, from the replica or
from a local ``file://`` copy; it fails like Litestream on a corrupted replica) and OpenSSH's
``sftp`` (runs the batch of ``get`` commands against a folder standing for the target's
chroot, after checking the pinned host key and the key file). The live database is a real
SQLite file in WAL mode with a writer connection open, like the app's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from digitalme.backup import DrillResult, read_drill
from tests.support.shapes import shape_problems

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools/digitalme_backup.py"
LTX = "0000000000000001-00000000000000a1.ltx"
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE0cq4z49d9k3986lOi569WRw8gsBMzgYxbsOa4ynoRf"

FAKE_LITESTREAM = textwrap.dedent("""\
    #!{python}
    # Stand-in of litestream 0.5.17's restore command (plan, restore, restore from file://).
    import json, os, shutil, sys
    args = sys.argv[1:]
    state = os.environ["FAKE_REPLICA_STATE"]
    log = 'time=2026-11-26T04:27:32.340Z level=INFO msg="post-restore integrity check passed"'
    def fail(message):
        print("Error: " + message, file=sys.stderr)
        sys.exit(1)
    with open(os.environ["FAKE_CALLS"], "a") as calls:
        calls.write(" ".join(args) + "\\n")
    if os.environ.get("FAKE_SLEEP"):
        import time
        time.sleep(float(os.environ["FAKE_SLEEP"]))
    if args[0] != "restore":
        sys.exit(2)
    out, source = args[args.index("-o") + 1], args[-1]
    if "-dry-run" in args:
        if not os.path.exists(state):
            fail("no matching backup files available")
        print(log)  # Litestream 0.5.17 logs on stdout, before the JSON
        print(json.dumps({{"source": source, "target_path": out, "replica": "sftp",
                           "min_txid": "0000000000000001", "max_txid": "00000000000000a1",
                           "files": [{{"level": 9, "name": "{ltx}",
                                       "min_txid": "0000000000000001",
                                       "max_txid": "00000000000000a1",
                                       "size": os.path.getsize(state),
                                       "timestamp": os.environ["FAKE_REPLICA_TIME"]}}]}}, indent=2))
        sys.exit(0)
    if os.environ.get("FAKE_RESTORE_ERROR"):
        print(log)
        fail(os.environ["FAKE_RESTORE_ERROR"])
    if os.path.exists(out):
        fail("output file already exists")
    if source.startswith("file://"):
        if args[args.index("-txid") + 1] != "00000000000000a1":
            fail("unexpected -txid")
        src = os.path.join(source[len("file://"):], "ltx", "9", "{ltx}")
    else:
        src = state
    if not os.path.exists(src):
        fail("no matching backup files available")
    shutil.copyfile(src, out)
    print(log)
    print(json.dumps({{"db_path": out, "replica": "file", "txid": "00000000000000a1",
                       "duration_ms": 5, "integrity_check": "full"}}, indent=2))
""")

FAKE_SFTP = textwrap.dedent("""\
    #!{python}
    # Stand-in of OpenSSH's sftp: runs a batch of gets against FAKE_SFTP_ROOT (the chroot).
    import os, shlex, shutil, sys
    args = sys.argv[1:]
    options = [args[i + 1] for i, a in enumerate(args) if a == "-o"]
    def option(name):
        return next((o.split("=", 1)[1] for o in options if o.startswith(name + "=")), None)
    if os.environ.get("FAKE_SFTP_ERROR"):
        print(os.environ["FAKE_SFTP_ERROR"], file=sys.stderr)
        sys.exit(255)
    assert option("StrictHostKeyChecking") == "yes" and option("BatchMode") == "yes"
    assert open(option("UserKnownHostsFile")).read() == os.environ["FAKE_KNOWN_HOST"]
    assert os.path.exists(option("IdentityFile")), "no key"
    assert args[-1] == os.environ["FAKE_DESTINATION"], args[-1]
    batch = args[args.index("-b") + 1]
    for line in open(batch):
        verb, remote, local = shlex.split(line)
        assert verb == "get"
        shutil.copyfile(os.environ["FAKE_SFTP_ROOT"] + remote, local)
        if os.environ.get("FAKE_SFTP_TRUNCATE"):
            with open(local, "r+b") as f:
                f.truncate(100)
""")

SCHEMA = """
CREATE TABLE _litestream_seq (id INTEGER PRIMARY KEY, seq INTEGER);
CREATE TABLE conversations (id TEXT PRIMARY KEY, created_at TEXT NOT NULL);
CREATE TABLE messages (id INTEGER PRIMARY KEY, conversation_id TEXT NOT NULL,
                       text TEXT NOT NULL, created_at TEXT NOT NULL);
"""


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Host:
    """A stand-in host: the live database, a replica state, the tool's settings."""

    root: Path
    live: sqlite3.Connection
    replica_type: str = "file"

    @property
    def db(self) -> Path:
        return self.root / "live" / "digitalme.db"

    @property
    def replica_state(self) -> Path:
        return self.root / "replica-state.db"

    @property
    def sftp_root(self) -> Path:
        return self.root / "target"

    @property
    def workdir(self) -> Path:
        return self.root / "drill"

    @property
    def textfile(self) -> Path:
        return self.root / "textfile"

    @property
    def calls(self) -> list[str]:
        path = self.root / "calls"
        return path.read_text().splitlines() if path.exists() else []

    def write(self, count: int, newest: datetime) -> None:
        """Commit `count` messages, the last one created at `newest`."""
        for i in range(count):
            at = newest - timedelta(seconds=count - 1 - i)
            self.live.execute(
                "INSERT INTO messages (conversation_id, text, created_at) VALUES ('c1', ?, ?)",
                (f"message {i}", iso(at)),
            )

    def replicate(self) -> None:
        """The replica holds exactly what the live database holds now."""
        self.replica_state.unlink(missing_ok=True)
        backup = sqlite3.connect(self.replica_state)
        self.live.backup(backup)
        backup.close()
        on_target = self.sftp_root / "replicas/digitalme/ltx/9" / LTX
        on_target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.replica_state, on_target)

    def settings(self) -> Path:
        replica: dict[str, Any] = {"type": self.replica_type}
        if self.replica_type == "sftp":
            replica.update(
                host="10.213.7.12",
                port=2222,
                user="litestream",
                path="/replicas/digitalme/",
                host_key=HOST_KEY + " root@replica",
            )
        path = self.root / "digitalme-backup.json"
        path.write_text(
            json.dumps(
                {
                    "db": str(self.db),
                    "config": "/dev/null",
                    "litestream": str(self.root / "litestream"),
                    "sftp": str(self.root / "sftp"),
                    "replica": replica,
                    "table": "messages",
                    "time_column": "created_at",
                    "drill": {
                        "workdir": str(self.workdir),
                        "textfile_dir": str(self.textfile),
                        "max_behind_seconds": 60,
                    },
                }
            )
        )
        return path

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, str(SCRIPT), "--settings", str(self.settings()), *args]

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of the tool: the stand-ins' settings, then `extra`."""
        return {
            **os.environ,
            "FAKE_REPLICA_STATE": str(self.replica_state),
            "FAKE_REPLICA_TIME": "2026-11-26T04:10:51Z",
            "FAKE_CALLS": str(self.root / "calls"),
            "FAKE_SFTP_ROOT": str(self.sftp_root),
            "FAKE_KNOWN_HOST": f"[10.213.7.12]:2222 {HOST_KEY}\n",
            "FAKE_DESTINATION": "litestream@10.213.7.12",
            "CREDENTIALS_DIRECTORY": str(self.root / "credentials"),
            **extra,
        }

    def tool(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args), capture_output=True, text=True, timeout=60, env=self.env(**env)
        )

    def drill(self, *extra: str, **env: str) -> subprocess.CompletedProcess[str]:
        return self.tool("drill", *extra, **env)

    def result(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads((self.workdir / "result.json").read_text())
        return loaded

    def metrics(self) -> dict[str, float]:
        text = (self.textfile / "digitalme_backup.prom").read_text()
        return {m[1]: float(m[2]) for m in re.finditer(r"^([^#\s]\S*) (\S+)$", text, re.M)}


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    for folder in ("live", "drill", "textfile", "credentials"):
        (tmp_path / folder).mkdir()
    (tmp_path / "credentials" / "sftp-key").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    for name, source in (("litestream", FAKE_LITESTREAM), ("sftp", FAKE_SFTP)):
        fake = tmp_path / name
        fake.write_text(source.format(python=sys.executable, ltx=LTX))
        fake.chmod(0o755)
    live = sqlite3.connect(tmp_path / "live" / "digitalme.db", isolation_level=None)
    live.execute("PRAGMA journal_mode = WAL")
    live.executescript(SCHEMA)
    live.execute("INSERT INTO conversations VALUES ('c1', '2026-11-01T00:00:00.000Z')")
    yield Host(tmp_path, live)
    live.close()


def test_a_drill_on_a_current_replica_passes_and_publishes_its_metrics(host: Host) -> None:
    host.write(20, datetime.now(UTC))
    host.replicate()
    before = sorted(p.name for p in host.db.parent.iterdir())
    proc = host.drill()
    assert proc.returncode == 0, proc.stderr
    assert "restore drill passed" in proc.stdout
    result = host.result()
    assert result["ok"] is True and result["error"] is None
    assert result["integrity"] == "ok"
    assert result["rows"] == {"conversations": 1, "messages": 20}
    assert result["behind_seconds"] == 0.0
    assert result["restored_txid"] == "00000000000000a1"
    assert result["replica_newest_change_at"].startswith("2026-11-26T04:10:51")
    assert result["last_success_at"] == result["finished_at"]
    assert result["restore"]["method"] == "litestream restore"
    plan, restore = host.calls
    assert plan.startswith("restore -config /dev/null -dry-run -json -o ") and "/scratch/" in plan
    assert restore.startswith("restore -config /dev/null -integrity-check full -json -o ")
    metrics = host.metrics()
    assert metrics["digitalme_backup_drill_success"] == 1
    assert metrics["digitalme_backup_drill_duration_seconds"] > 0
    assert metrics["digitalme_backup_drill_last_run_timestamp_seconds"] == pytest.approx(
        result["finished_epoch"]
    )
    assert metrics["digitalme_backup_drill_behind_seconds"] == 0
    assert metrics['digitalme_backup_drill_restored_rows{table="messages"}'] == 20
    assert metrics["digitalme_backup_replica_age_seconds"] > 0
    # Written atomically, scratch copy gone, the live database's folder untouched.
    assert sorted(p.name for p in host.workdir.iterdir()) == ["result.json"]
    assert sorted(p.name for p in host.textfile.iterdir()) == ["digitalme_backup.prom"]
    assert sorted(p.name for p in host.db.parent.iterdir()) == before


def test_an_idle_clone_is_not_a_stale_replica(host: Host) -> None:
    # Nothing written for ten days: the replica holds the newest row, so it is current.
    host.write(5, datetime.now(UTC) - timedelta(days=10))
    host.replicate()
    proc = host.drill()
    assert proc.returncode == 0, proc.stderr
    assert host.result()["behind_seconds"] == 0.0


def test_a_replica_that_stopped_receiving_changes_fails(host: Host) -> None:
    host.write(5, datetime.now(UTC) - timedelta(minutes=40))
    host.replicate()
    # Written after replication stopped: the oldest 30 minutes ago, the newest just now.
    host.write(1, datetime.now(UTC) - timedelta(minutes=30))
    host.write(3, datetime.now(UTC))
    proc = host.drill()
    assert proc.returncode == 1
    assert "restore drill FAILED" in proc.stderr and "the replica is stale" in proc.stderr
    result = host.result()
    assert result["ok"] is False
    assert 1790 < result["behind_seconds"] < 1830
    assert "written 18" in result["error"] and "more than 60s" in result["error"]
    assert result["oldest_missing_row_at"] < result["live_newest_row_at"]
    assert host.metrics()["digitalme_backup_drill_success"] == 0


def test_rows_written_within_the_allowed_lag_pass(host: Host) -> None:
    host.write(5, datetime.now(UTC) - timedelta(seconds=40))
    host.replicate()
    host.write(1, datetime.now(UTC) - timedelta(seconds=20))  # 20 s ago: within 60 s
    proc = host.drill()
    assert proc.returncode == 0, proc.stderr
    assert 19 < host.result()["behind_seconds"] < 23


def test_a_row_written_just_before_the_drill_after_a_quiet_week_passes(host: Host) -> None:
    # The replica holds everything up to a week ago; the one new row is not synced yet.
    # Its absence is replication lag, not a stale replica.
    host.write(5, datetime.now(UTC) - timedelta(days=7))
    host.replicate()
    host.write(1, datetime.now(UTC))
    proc = host.drill()
    assert proc.returncode == 0, proc.stderr
    assert 0 <= host.result()["behind_seconds"] < 3


def test_a_corrupted_replica_fails_loudly_and_keeps_the_last_success(host: Host) -> None:
    host.write(5, datetime.now(UTC))
    host.replicate()
    assert host.drill().returncode == 0
    passed = host.result()["last_success_epoch"]
    proc = host.drill(
        FAKE_RESTORE_ERROR="decode database: decode page 59: read page header 0:"
        " decompress block: lz4: invalid source"
    )
    assert proc.returncode == 1
    result = host.result()
    assert result["ok"] is False
    assert result["error"].startswith("litestream restore failed (exit 1): ")
    assert "lz4: invalid source" in result["error"]
    assert result["last_success_epoch"] == passed
    metrics = host.metrics()
    assert metrics["digitalme_backup_drill_success"] == 0
    assert metrics["digitalme_backup_drill_last_success_timestamp_seconds"] == pytest.approx(passed)
    assert not (host.workdir / "scratch").exists()


def test_the_apps_reader_reads_what_the_tool_writes(host: Host) -> None:
    """The one declaration of result.json (digitalme.backup.DrillResult) fits the real
    tool's output, passing and failing, and the app's reader sees that output as it is."""
    path = host.workdir / "result.json"
    host.write(5, datetime.now(UTC))
    host.replicate()
    assert host.drill().returncode == 0
    passed = host.result()
    assert shape_problems(passed, DrillResult) == []
    assert set(DrillResult.__annotations__) <= set(passed)  # every field the app shows
    seen = read_drill(path)
    assert (seen.found, seen.ok, seen.detail) == (True, True, "")
    assert seen.finished_at == datetime.fromisoformat(passed["finished_at"])
    assert seen.data == passed

    assert host.drill(FAKE_RESTORE_ERROR="decode page 59: lz4: invalid source").returncode == 1
    failed = host.result()
    assert shape_problems(failed, DrillResult) == []
    seen = read_drill(path)
    assert (seen.found, seen.ok) == (True, False)
    assert seen.detail == failed["error"] and "lz4: invalid source" in seen.detail
    assert seen.finished_at == datetime.fromisoformat(failed["finished_at"])


def test_a_drill_stopped_by_systemd_reports_a_failure(host: Host) -> None:
    host.write(5, datetime.now(UTC))
    host.replicate()
    drill = subprocess.Popen(
        host.argv("drill"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=host.env(FAKE_SLEEP="30"),
    )
    deadline = time.monotonic() + 20
    while not host.calls:  # litestream (the stand-in) is running
        assert time.monotonic() < deadline and drill.poll() is None
        time.sleep(0.05)
    started = time.monotonic()
    drill.send_signal(signal.SIGTERM)  # what TimeoutStartSec or `systemctl stop` sends
    _, stderr = drill.communicate(timeout=20)
    assert time.monotonic() - started < 10  # the stand-in was killed, not waited for
    assert drill.returncode == 1
    assert "restore drill FAILED" in stderr and "stopped by SIGTERM" in stderr
    assert host.result()["ok"] is False and "SIGTERM" in host.result()["error"]
    assert host.metrics()["digitalme_backup_drill_success"] == 0
    assert not (host.workdir / "scratch").exists()


def test_a_restored_copy_that_fails_integrity_check_fails(host: Host) -> None:
    host.write(400, datetime.now(UTC))
    host.live.execute("CREATE INDEX messages_text ON messages (text)")
    host.replicate()
    data = bytearray(host.replica_state.read_bytes())
    page = 4096
    for offset in range(len(data) - 2 * page, len(data) - page):  # one late page
        data[offset] ^= 0x5A
    host.replica_state.write_bytes(bytes(data))
    proc = host.drill()
    assert proc.returncode == 1
    error = host.result()["error"]
    assert "integrity_check" in error or "malformed" in error, error
    assert host.metrics()["digitalme_backup_drill_success"] == 0


def test_an_empty_replica_fails(host: Host) -> None:
    host.write(2, datetime.now(UTC))
    proc = host.drill()  # no replica state: restore succeeds without a database
    assert proc.returncode == 1
    assert "holds no backup" in host.result()["error"]


def test_rows_in_the_live_database_missing_from_the_copy_fail(host: Host) -> None:
    host.replicate()  # replicated while empty
    host.write(2, datetime.now(UTC) - timedelta(minutes=5))
    proc = host.drill()
    assert proc.returncode == 1
    assert "the restored copy has none" in host.result()["error"]


def test_a_missing_live_database_fails(host: Host, tmp_path: Path) -> None:
    host.write(2, datetime.now(UTC))
    host.replicate()
    proc = host.drill("--db", str(tmp_path / "nowhere.db"))
    assert proc.returncode == 1
    assert "cannot read the newest row of the live database" in host.result()["error"]


def test_a_leftover_scratch_copy_is_replaced(host: Host) -> None:
    host.write(2, datetime.now(UTC))
    host.replicate()
    (host.workdir / "scratch").mkdir()
    (host.workdir / "scratch" / "restored.db").write_text("left by an interrupted drill")
    proc = host.drill()
    assert proc.returncode == 0, proc.stderr
    assert not (host.workdir / "scratch").exists()


def test_unix_seconds_timestamps_are_understood(host: Host) -> None:
    host.live.execute("CREATE TABLE rows (id INTEGER PRIMARY KEY, what TEXT, at REAL)")
    now = datetime.now(UTC).timestamp()
    host.live.execute("INSERT INTO rows (what, at) VALUES ('a', ?), ('b', ?)", (now - 5, now))
    host.replicate()
    proc = host.drill("--table", "rows", "--time-column", "at")
    assert proc.returncode == 0, proc.stderr
    assert host.result()["restored_newest_row_at"].startswith(
        datetime.fromtimestamp(now, UTC).isoformat()[:19]
    )


def test_inspect_reports_integrity_rows_and_newest_row(host: Host) -> None:
    newest = datetime(2026, 11, 26, 4, 10, 51, tzinfo=UTC)
    host.write(3, newest)
    shm_before = host.db.with_name("digitalme.db-shm").stat().st_mtime_ns
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "inspect", "--live", str(host.db)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["integrity"] == "ok"
    assert report["rows"] == {"conversations": 1, "messages": 3}
    assert report["newest_row_at"] == "2026-11-26T04:10:51.000+00:00"
    assert host.db.with_name("digitalme.db-shm").stat().st_mtime_ns >= shm_before
    host.replicate()
    copy = subprocess.run(
        [sys.executable, str(SCRIPT), "inspect", str(host.replica_state)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert json.loads(copy.stdout)["rows"] == report["rows"]
    # A restored copy is opened immutable: no -wal/-shm left beside it.
    assert sorted(p.name for p in host.root.glob("replica-state.db*")) == ["replica-state.db"]
    missing = subprocess.run(
        [sys.executable, str(SCRIPT), "inspect", "/nonexistent.db"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_restore_over_sftp_fetches_the_plan_then_restores_from_the_local_copy(host: Host) -> None:
    host.replica_type = "sftp"
    host.write(30, datetime.now(UTC))
    host.replicate()
    output = host.root / "restored" / "digitalme.db"
    output.parent.mkdir()
    proc = host.tool("restore", "--output", str(output))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["method"] == "sftp fetch, then litestream restore from the local copy"
    assert summary["fetched_files"] == 1
    assert summary["fetched_bytes"] == host.replica_state.stat().st_size == summary["plan_bytes"]
    assert summary["txid"] == "00000000000000a1"
    plan, restore = host.calls
    assert "-dry-run" in plan and plan.endswith(str(host.db))
    assert f"-txid 00000000000000a1 -o {output} file://" in restore
    assert restore.startswith("restore -integrity-check full -json")
    # The fetched files are gone; the copy is the replica's state.
    assert sorted(p.name for p in output.parent.iterdir()) == ["digitalme.db"]
    assert sqlite3.connect(output).execute("SELECT count(*) FROM messages").fetchone()[0] == 30


def test_a_drill_over_sftp_uses_the_fast_path(host: Host) -> None:
    host.replica_type = "sftp"
    host.write(3, datetime.now(UTC))
    host.replicate()
    proc = host.drill()
    assert proc.returncode == 0, proc.stderr
    assert host.result()["restore"]["method"].startswith("sftp fetch")
    assert host.result()["restore"]["fetch_seconds"] >= 0


def test_an_sftp_failure_fails_the_restore_and_leaves_nothing(host: Host) -> None:
    host.replica_type = "sftp"
    host.write(3, datetime.now(UTC))
    host.replicate()
    output = host.root / "restored.db"
    proc = host.tool(
        "restore", "--output", str(output), FAKE_SFTP_ERROR="Host key verification failed."
    )
    assert proc.returncode == 1
    assert "sftp could not fetch the replica's files from litestream@10.213.7.12" in proc.stderr
    assert "Host key verification failed." in proc.stderr
    assert not output.exists()
    assert not list(host.root.glob(".restored.db.fetch"))


def test_a_truncated_download_is_caught(host: Host) -> None:
    host.replica_type = "sftp"
    host.write(3, datetime.now(UTC))
    host.replicate()
    proc = host.tool("restore", "--output", str(host.root / "restored.db"), FAKE_SFTP_TRUNCATE="1")
    assert proc.returncode == 1
    assert "came back with 100 bytes" in proc.stderr


def test_the_sftp_key_must_be_handed_over(host: Host) -> None:
    host.replica_type = "sftp"
    host.write(3, datetime.now(UTC))
    host.replicate()
    (host.root / "credentials" / "sftp-key").unlink()
    proc = host.tool("restore", "--output", str(host.root / "restored.db"))
    assert proc.returncode == 1
    assert "the SFTP key is not available" in proc.stderr


def test_restore_never_overwrites_and_knows_an_empty_replica(host: Host) -> None:
    output = host.root / "restored.db"
    # Empty replica: a failure, unless told that is fine (a first deployment).
    empty = host.tool("restore", "--output", str(output))
    assert empty.returncode == 1 and "the replica holds no backup" in empty.stderr
    fine = host.tool("restore", "--if-replica-exists", "--output", str(output))
    assert fine.returncode == 0 and not output.exists()
    # An existing output is never replaced; with --if-db-not-exists that is a success.
    output.write_text("keep me")
    refused = host.tool("restore", "--output", str(output))
    assert refused.returncode == 1 and "exists" in refused.stderr
    kept = host.tool("restore", "--if-db-not-exists", "--output", str(output))
    assert kept.returncode == 0 and output.read_text() == "keep me"
    assert len(host.calls) == 2  # only the two plans of the empty replica


def test_a_point_in_time_goes_to_the_plan_and_the_restore(host: Host) -> None:
    host.write(3, datetime.now(UTC))
    host.replicate()
    proc = host.tool(
        "restore", "--timestamp", "2026-11-26T02:00:00Z", "--output", str(host.root / "then.db")
    )
    assert proc.returncode == 0, proc.stderr
    assert all("-timestamp 2026-11-26T02:00:00Z" in call for call in host.calls)
