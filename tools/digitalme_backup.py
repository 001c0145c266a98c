#!/usr/bin/python3
"""Restores, restore drills and database inspection for DigitalMe's Litestream replica.

Installed by the litestream role as /usr/local/libexec/digitalme-backup, a link to
/usr/local/lib/digitalme-tools/digitalme_backup.py beside tools/drill_report.py, which it
imports (Python 3 standard library only); it reads its settings from
/etc/digitalme-backup.json (written by the role: database, Litestream's configuration and
binary, the replica, the drill's settings; no secret), and command-line options override
them. Run it as the app's user with Litestream's secrets: the units do;
/usr/local/sbin/digitalme-backup does it for an operator. Commands:

``restore --output PATH [--timestamp T]``
    Restore the replica's latest state (or its state at T) into PATH, with Litestream's
    full integrity check. Litestream 0.5.17 reads an SFTP replica with one round trip per
    few kilobytes (about 0.9 MB/s on the sandbox hosts, far less over a real WAN); so for
    an SFTP replica this asks Litestream for the restore plan (``restore -dry-run``),
    fetches exactly the plan's files with OpenSSH's sftp (pipelined, the same key and the
    pinned host key) and lets Litestream restore from that local copy: the same files,
    the same restore, at the speed of the link. litestream-restore.service runs it with
    ``--if-db-not-exists --if-replica-exists`` at boot and on a fresh host.

``drill``
    What digitalme-backup-drill.service runs: restore the latest replica into a scratch
    folder as above, check the copy (``PRAGMA integrity_check``, row counts, its newest
    row), and judge its freshness against the live database (read-only): every row the
    live database holds that was written more than ``max_behind_seconds`` before the
    restore started must be in the copy. The oldest live row missing from the copy gives
    ``behind_seconds``, the replica's lag as the drill saw it. Comparing with the live
    database rather than with the clock means an idle clone (nothing written for days)
    does not raise a false alarm, and a row written a moment before the drill (not yet
    synced) does not either, while a replica that stopped receiving changes fails. The
    result goes to ``<workdir>/result.json`` (read by the app's ``backup`` readiness
    check) and to ``digitalme_backup.prom`` in node-exporter's textfile folder, as
    tools/drill_report.py writes them for both drills. The scratch copy is removed. Exit
    status 1 on any failure, with the reason on stderr (the journal), so that the unit
    fails and shows in ``systemctl --failed``.

``inspect PATH``
    Print a JSON report of one database file: ``integrity`` ("ok" or the problems), row
    counts per table, its newest row, size. ``--live`` opens a database in use read-only
    through SQLite's WAL (never writing it); without it the file is opened as immutable
    (a restored copy nobody else has open: no -wal/-shm files are created).

See docs/operations/backup-and-recovery.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

from drill_report import Failure, iso, run, run_drill, tail, to_epoch

SETTINGS_FILE = "/etc/digitalme-backup.json"
# What `litestream restore` says when the replica holds nothing (0.5.17).
EMPTY_REPLICA = "no matching backup files available"


# --------------------------------------------------------------------------- databases


def connect(path: Path, *, live: bool) -> sqlite3.Connection:
    """Open read-only. A live database goes through its WAL (mode=ro: reads the latest
    committed state, writes nothing); a restored copy is opened immutable."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    quoted = urllib.parse.quote(str(path))
    if live and Path(f"{path}-wal").exists():
        uri = f"file:{quoted}?mode=ro"
    else:
        # No WAL beside it: the main file is the whole database (a live database whose
        # last connection closed, or a restored copy); immutable creates no -shm file.
        uri = f"file:{quoted}?mode=ro&immutable=1"
    db = sqlite3.connect(uri, uri=True, timeout=10)
    db.execute("PRAGMA busy_timeout = 10000")
    return db


def _quote_name(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _has_table(db: sqlite3.Connection, table: str) -> bool:
    return (
        db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
        ).fetchone()
        is not None
    )


def newest_value(db: sqlite3.Connection, table: str, column: str) -> Any:
    """The newest value of column in table, as stored; None if empty or missing."""
    if not _has_table(db, table):
        return None
    return db.execute(f"SELECT max({_quote_name(column)}) FROM {_quote_name(table)}").fetchone()[0]


def newest_row(db: sqlite3.Connection, table: str, column: str) -> float | None:
    """Epoch seconds of the newest row of table (by column); None if empty or missing."""
    return to_epoch(newest_value(db, table, column))


def oldest_row_after(db: sqlite3.Connection, table: str, column: str, after: Any) -> float | None:
    """Epoch seconds of the oldest row of table newer than after (a value as stored, from
    the same column of a copy; None: every row counts); None if there is none. Values are
    compared as SQLite stores them, so the column's own format decides, not a parser."""
    if not _has_table(db, table):
        return None
    column_sql, table_sql = _quote_name(column), _quote_name(table)
    if after is None:
        (value,) = db.execute(f"SELECT min({column_sql}) FROM {table_sql}").fetchone()
    else:
        (value,) = db.execute(
            f"SELECT min({column_sql}) FROM {table_sql} WHERE {column_sql} > ?", (after,)
        ).fetchone()
    return to_epoch(value)


def inspect(
    path: Path, *, live: bool, table: str, column: str, full_check: bool = True
) -> dict[str, Any]:
    db = connect(path, live=live)
    try:
        pragma = "integrity_check" if full_check else "quick_check"
        problems = [row[0] for row in db.execute(f"PRAGMA {pragma}(20)")]
        # Litestream's own bookkeeping tables (_litestream_seq, _litestream_lock) left out.
        names = [
            name
            for (name,) in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
                "AND name NOT LIKE '\\_litestream\\_%' ESCAPE '\\' ORDER BY name"
            )
        ]
        rows = {
            name: db.execute(f"SELECT count(*) FROM {_quote_name(name)}").fetchone()[0]
            for name in names
        }
        newest_stored = newest_value(db, table, column)
    finally:
        db.close()
    newest = to_epoch(newest_stored)
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "integrity": "ok" if problems == ["ok"] else problems,
        "rows": rows,
        "newest_row_at": iso(newest),
        "newest_row_epoch": newest,
        # As stored (ISO text or a number), for comparing with the same column elsewhere.
        "newest_row_value": newest_stored,
    }


# --------------------------------------------------------------------------- litestream


def json_in_output(text: str) -> Any:
    """The JSON document in a litestream command's output: Litestream 0.5.17 prints its log
    lines on stdout too, before the document."""
    lines = text.splitlines(keepends=True)
    for index, line in enumerate(lines):
        if line.startswith(("{", "[")):
            value, _ = json.JSONDecoder().raw_decode("".join(lines[index:]))
            return value
    raise ValueError("no JSON document in the output")


def restore_plan(
    args: argparse.Namespace, output: Path, timestamp: str | None
) -> dict[str, Any] | None:
    """Litestream's plan for restoring into output (the files it would fetch), or None when
    the replica holds no backup."""
    argv = [
        args.litestream,
        "restore",
        "-config",
        args.config,
        "-dry-run",
        "-json",
        *(["-timestamp", timestamp] if timestamp else []),
        "-o",
        str(output),
        args.db,
    ]
    proc = run(argv, min(args.timeout, 600))
    if proc.returncode != 0:
        said = f"{proc.stderr}\n{proc.stdout}"
        if EMPTY_REPLICA in said and not timestamp:
            return None
        raise Failure(
            f"litestream could not plan the restore (exit {proc.returncode}): "
            f"{tail(proc.stderr) or tail(proc.stdout)}"
        )
    try:
        plan = json_in_output(proc.stdout)
    except ValueError:
        raise Failure("litestream restore -dry-run did not print its plan as JSON") from None
    if not isinstance(plan, dict) or not isinstance(plan.get("files"), list) or not plan["files"]:
        raise Failure("litestream restore -dry-run printed an unexpected plan")
    return plan


def _sftp_destination(replica: dict[str, Any]) -> tuple[str, str]:
    """(destination for sftp, known_hosts line) of an SFTP replica."""
    host, port = str(replica["host"]), int(replica.get("port", 22))
    bracketed = f"[{host}]" if ":" in host else host
    pattern = bracketed if port == 22 else f"[{host}]:{port}"
    key_type, key = str(replica["host_key"]).split()[:2]
    return f"{replica['user']}@{bracketed}", f"{pattern} {key_type} {key}\n"


def fetch_plan(args: argparse.Namespace, plan: dict[str, Any], into: Path) -> dict[str, Any]:
    """Download the plan's LTX files from the SFTP replica into a file-replica layout
    (into/ltx/<level>/<name>) with OpenSSH's sftp, checking each file's size."""
    replica = args.replica
    key = Path(os.environ.get("CREDENTIALS_DIRECTORY", "/nonexistent")) / args.sftp_key_name
    if not key.exists():
        raise Failure(
            f"the SFTP key is not available at {key} (run this through the "
            "units or /usr/local/sbin/digitalme-backup, which hand it over)"
        )
    destination, known_host = _sftp_destination(replica)
    known_hosts = into / "known_hosts"
    known_hosts.write_text(known_host, encoding="utf-8")
    remote_root = str(replica["path"]).rstrip("/")
    commands = []
    for entry in plan["files"]:
        level, name = int(entry["level"]), str(entry["name"])
        if "/" in name or '"' in name:
            raise Failure(f"unexpected LTX file name in the plan: {name!r}")
        (into / "ltx" / str(level)).mkdir(parents=True, exist_ok=True)
        commands.append(f'get "{remote_root}/ltx/{level}/{name}" "{into}/ltx/{level}/{name}"')
    batch = into / "batch"
    batch.write_text("\n".join(commands) + "\n", encoding="utf-8")
    started = time.monotonic()
    proc = run(
        [
            args.sftp,
            "-q",
            "-b",
            str(batch),
            "-F",
            "/dev/null",
            "-o",
            f"IdentityFile={key}",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={known_hosts}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=30",
            "-o",
            "ServerAliveInterval=15",
            "-P",
            str(int(replica.get("port", 22))),
            destination,
        ],
        args.timeout,
    )
    if proc.returncode != 0:
        raise Failure(
            f"sftp could not fetch the replica's files from {destination} (exit "
            f"{proc.returncode}): {tail(proc.stderr) or tail(proc.stdout)}"
        )
    fetched = 0
    for entry in plan["files"]:
        path = into / "ltx" / str(int(entry["level"])) / str(entry["name"])
        size = path.stat().st_size if path.exists() else -1
        if size != int(entry["size"]):
            raise Failure(
                f"{path.name} (level {entry['level']}) came back with {size} bytes, "
                f"the replica lists {entry['size']}"
            )
        fetched += size
    return {
        "fetched_files": len(plan["files"]),
        "fetched_bytes": fetched,
        "fetch_seconds": round(time.monotonic() - started, 3),
    }


def restore(
    args: argparse.Namespace,
    output: Path,
    *,
    timestamp: str | None = None,
) -> dict[str, Any] | None:
    """Restore into output (which must not exist); a summary, or None if the replica is
    empty. Litestream checks the whole database after the restore (-integrity-check full)."""
    started = time.monotonic()
    plan = restore_plan(args, output, timestamp)
    if plan is None:
        return None
    summary: dict[str, Any] = {
        "txid": plan.get("max_txid"),
        "plan_files": len(plan["files"]),
        "plan_bytes": sum(int(f.get("size", 0)) for f in plan["files"]),
        "newest_change_epoch": max(
            (s for s in (to_epoch(f.get("timestamp")) for f in plan["files"]) if s is not None),
            default=None,
        ),
    }
    use_sftp = (
        args.replica.get("type") == "sftp"
        and not args.litestream_sftp
        and shutil.which(args.sftp) is not None
    )
    if use_sftp:
        fetch_dir = output.parent / f".{output.name}.fetch"
        shutil.rmtree(fetch_dir, ignore_errors=True)
        fetch_dir.mkdir(mode=0o700)
        try:
            summary.update(fetch_plan(args, plan, fetch_dir))
            applied = time.monotonic()
            argv = [
                args.litestream,
                "restore",
                "-integrity-check",
                "full",
                "-json",
                "-txid",
                str(plan["max_txid"]),
                "-o",
                str(output),
                f"file://{fetch_dir}",
            ]
            proc = run(argv, args.timeout)
            summary["apply_seconds"] = round(time.monotonic() - applied, 3)
        finally:
            shutil.rmtree(fetch_dir, ignore_errors=True)
        summary["method"] = "sftp fetch, then litestream restore from the local copy"
    else:
        argv = [
            args.litestream,
            "restore",
            "-config",
            args.config,
            "-integrity-check",
            "full",
            "-json",
            *(["-timestamp", timestamp] if timestamp else []),
            "-o",
            str(output),
            args.db,
        ]
        proc = run(argv, args.timeout)
        summary["method"] = "litestream restore"
    if proc.returncode != 0:
        raise Failure(
            f"litestream restore failed (exit {proc.returncode}): "
            f"{tail(proc.stderr) or tail(proc.stdout)}"
        )
    if not output.exists():
        raise Failure("litestream restore succeeded but wrote no database")
    try:
        said = json_in_output(proc.stdout)
        if isinstance(said, dict) and said.get("txid"):
            summary["txid"] = said["txid"]
    except ValueError:
        pass
    summary["bytes"] = output.stat().st_size
    summary["seconds"] = round(time.monotonic() - started, 3)
    return summary


# --------------------------------------------------------------------------- drill


def drill_checks(args: argparse.Namespace, scratch: Path, result: dict[str, Any]) -> None:
    db_path = Path(args.db)
    # Read the live database first: a drill that cannot read it fails before restoring.
    try:
        live_db = connect(db_path, live=True)
        try:
            result["live_newest_row_at"] = iso(newest_row(live_db, args.table, args.time_column))
        finally:
            live_db.close()
    except (OSError, sqlite3.Error) as exc:
        raise Failure(f"cannot read the newest row of the live database {db_path}: {exc}") from None

    # Every row written more than max_behind_seconds before this moment must be in the copy.
    reference = time.time()
    restored = scratch / "restored.db"
    summary = restore(args, restored)
    if summary is None:
        raise Failure("the replica holds no backup")
    result["restored_txid"] = summary.get("txid")
    result["restore"] = {
        k: summary[k]
        for k in ("method", "plan_files", "plan_bytes", "fetch_seconds", "apply_seconds", "seconds")
        if k in summary
    }
    report = inspect(restored, live=False, table=args.table, column=args.time_column)
    result["restored_bytes"] = report["bytes"]
    result["rows"] = report["rows"]
    result["integrity"] = report["integrity"]
    result["restored_newest_row_at"] = report["newest_row_at"]
    if report["integrity"] != "ok":
        raise Failure(
            f"the restored copy fails PRAGMA integrity_check: {'; '.join(report['integrity'][:5])}"
        )
    if not report["rows"]:
        raise Failure("the restored copy has no tables")

    newest_change = summary.get("newest_change_epoch")
    result["replica_newest_change_at"] = iso(newest_change)
    if newest_change is not None:
        result["replica_age_seconds"] = round(max(0.0, time.time() - newest_change), 3)

    copy_newest = report["newest_row_value"]
    try:
        live_db = connect(db_path, live=True)
        try:
            missing = oldest_row_after(live_db, args.table, args.time_column, copy_newest)
        finally:
            live_db.close()
    except (OSError, sqlite3.Error) as exc:
        raise Failure(f"cannot compare the live database {db_path} with the copy: {exc}") from None
    # How long before the restore the oldest row missing from the copy was written: the
    # replica's lag as the drill saw it (0 when the copy holds every row).
    behind = 0.0 if missing is None else max(0.0, reference - missing)
    result["oldest_missing_row_at"] = iso(missing)
    result["behind_seconds"] = round(behind, 3)
    if behind > args.max_behind_seconds:
        held = (
            f"its newest is {iso(to_epoch(copy_newest))}"
            if copy_newest is not None
            else "the restored copy has none"
        )
        raise Failure(
            f"the replica is stale: the restored copy lacks {args.table} rows written "
            f"{behind:.0f}s before the drill started (from {iso(missing)} on; {held}), "
            f"more than {args.max_behind_seconds:g}s; is Litestream replicating? "
            "(journalctl -u litestream)"
        )


def cmd_drill(args: argparse.Namespace) -> int:
    def passed(result: dict[str, Any]) -> str:
        return (
            f"{result['restored_bytes']} bytes, {result['rows'].get(args.table, 0)} "
            f"{args.table} rows, {result['behind_seconds']:.1f}s behind the live "
            "database, integrity ok"
        )

    return run_drill(
        Path(args.workdir),
        {"db": args.db, "max_behind_seconds": args.max_behind_seconds},
        lambda scratch, result: drill_checks(args, scratch, result),
        textfile_dir=args.textfile_dir,
        summary=passed,
    )


def cmd_restore(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if output.exists():
        if args.if_db_not_exists:
            print(f"{output} exists: nothing to restore", file=sys.stderr)
            return 0
        print(f"{output} exists: restore into a path that does not", file=sys.stderr)
        return 1
    try:
        summary = restore(args, output, timestamp=args.timestamp or None)
    except Failure as exc:
        print(f"restore FAILED: {exc}", file=sys.stderr)
        return 1
    if summary is None:
        if args.if_replica_exists:
            print("the replica holds no backup: nothing restored", file=sys.stderr)
            return 0
        print(f"restore FAILED: the replica holds no backup ({EMPTY_REPLICA})", file=sys.stderr)
        return 1
    print(
        f"restored {summary['bytes']} bytes (txid {summary['txid']}) into {output} in "
        f"{summary['seconds']:.1f}s: {summary['method']}",
        file=sys.stderr,
    )
    print(json.dumps(summary, indent=2))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    try:
        report = inspect(
            Path(args.path),
            live=args.live,
            table=args.table,
            column=args.time_column,
            full_check=not args.quick,
        )
    except (OSError, sqlite3.Error) as exc:
        print(f"cannot inspect {args.path}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


# Settings: the file's keys, with the defaults the role would write for a file replica.
DEFAULTS: dict[str, Any] = {
    "db": "/var/lib/digitalme/digitalme.db",
    "config": "/etc/litestream.yml",
    "litestream": "/usr/local/libexec/litestream",
    "sftp": "sftp",
    "replica": {"type": "file"},
    "sftp_key_name": "sftp-key",
    "timeout_seconds": 3600,
    "table": "messages",
    "time_column": "created_at",
    "drill": {
        "workdir": "/var/lib/digitalme/backup-drill",
        "textfile_dir": "/var/lib/prometheus/node-exporter",
        "max_behind_seconds": 60,
    },
}


def load_settings(path: str) -> dict[str, Any]:
    settings: dict[str, Any] = json.loads(json.dumps(DEFAULTS))
    try:
        loaded = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return settings
    if not isinstance(loaded, dict):
        raise SystemExit(f"{path}: not a JSON object")
    for key, value in loaded.items():
        if isinstance(value, dict) and isinstance(settings.get(key), dict):
            settings[key].update(value)
        else:
            settings[key] = value
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="digitalme-backup", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--settings",
        default=SETTINGS_FILE,
        help=f"JSON settings written by the role (default {SETTINGS_FILE})",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {name: sub.add_parser(name) for name in ("restore", "drill", "inspect")}
    for command in commands.values():
        command.add_argument("--table", help="table whose newest row is compared (messages)")
        command.add_argument(
            "--time-column", help="its timestamp column: ISO 8601 text or Unix seconds"
        )
    for name in ("restore", "drill"):
        command = commands[name]
        command.add_argument("--db", help="the live database Litestream replicates")
        command.add_argument("--config", help="Litestream's configuration")
        command.add_argument("--litestream", help="the litestream binary")
        command.add_argument(
            "--timeout", type=float, help="longest a litestream or sftp command may take (seconds)"
        )
        command.add_argument(
            "--litestream-sftp",
            action="store_true",
            help="let Litestream read an SFTP replica itself (slow), "
            "instead of fetching the plan's files with sftp first",
        )
    restore_cmd = commands["restore"]
    restore_cmd.add_argument("--output", required=True, help="where to write the database")
    restore_cmd.add_argument("--timestamp", help="point in time (RFC 3339, UTC)")
    restore_cmd.add_argument(
        "--if-db-not-exists",
        action="store_true",
        help="succeed without doing anything when the output exists",
    )
    restore_cmd.add_argument(
        "--if-replica-exists",
        action="store_true",
        help="succeed without a database when the replica is empty",
    )
    restore_cmd.set_defaults(func=cmd_restore)
    drill = commands["drill"]
    drill.add_argument("--workdir", help="folder for the scratch copy and result.json")
    drill.add_argument("--textfile-dir", help="node-exporter's textfile folder ('': none)")
    drill.add_argument("--max-behind-seconds", type=float)
    drill.set_defaults(func=cmd_drill)
    inspect_cmd = commands["inspect"]
    inspect_cmd.add_argument("path")
    inspect_cmd.add_argument(
        "--live", action="store_true", help="a database in use: read it through its WAL, read-only"
    )
    inspect_cmd.add_argument(
        "--quick", action="store_true", help="PRAGMA quick_check instead of integrity_check"
    )
    inspect_cmd.set_defaults(func=cmd_inspect)
    args = parser.parse_args(argv)

    settings = load_settings(args.settings)
    drill_settings = settings["drill"]
    for name, value in (
        ("table", settings["table"]),
        ("time_column", settings["time_column"]),
        ("db", settings["db"]),
        ("config", settings["config"]),
        ("litestream", settings["litestream"]),
        ("timeout", float(settings["timeout_seconds"])),
        ("workdir", drill_settings["workdir"]),
        ("textfile_dir", drill_settings["textfile_dir"]),
        ("max_behind_seconds", float(drill_settings["max_behind_seconds"])),
    ):
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    args.replica = settings["replica"]
    args.sftp = settings["sftp"]
    args.sftp_key_name = settings["sftp_key_name"]
    if not hasattr(args, "litestream_sftp"):
        args.litestream_sftp = False
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
