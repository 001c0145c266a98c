#!/usr/bin/python3
"""The restore drill of DigitalMe's PostgreSQL backups (pgBackRest).

Installed by the postgresql role as /usr/local/libexec/digitalme-postgresql-drill, a link
to /usr/local/lib/digitalme-tools/digitalme_postgresql_drill.py beside
tools/drill_report.py, which it imports (Python 3 standard library only; psql and pg_ctl
from the server's own packages); it reads its
settings from /etc/digitalme-postgresql-drill.json (written by the role, no secret) and
runs as ``postgres`` (digitalme-backup-drill.service). What it does:

1. ``pgbackrest restore`` of the latest backup and every archived WAL segment into a
   scratch folder (``--archive-mode=off``: the copy never archives into the repository).
2. A throw-away server on that folder, on a Unix socket inside it only (no TCP), with
   ``hot_standby=off``: it answers only once recovery has replayed the whole archive and
   the copy is promoted, or it fails (a missing or corrupt segment, a backup that does not
   restore).
3. Checks of the copy: every table of the app's database readable (row counts), its newest
   row; and its freshness against the live database (read-only): every row the live
   database holds that was written more than ``max_behind_seconds`` before the drill
   started must be in the copy. The live rows after the copy's last id are the ones it
   lacks; the oldest of them gives ``behind_seconds``, the archive's lag as the drill saw
   it. An idle database raises no alarm; an archive that stopped receiving WAL does.
4. The server stopped, the scratch folder removed; the result written to
   ``<workdir>/result.json`` and, in the same metric names as the SQLite drill's
   (digitalme_backup_drill_*), to ``digitalme_backup.prom`` in node-exporter's textfile
   folder, by tools/drill_report.py for both drills, so that the same alerts watch both.
   Exit status 1 on any failure, with the reason on stderr (the journal).

See docs/scale-out.md (Backups and point-in-time recovery).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from drill_report import METRICS, Failure, iso, run, run_drill, tail, to_epoch

SETTINGS_FILE = "/etc/digitalme-postgresql-drill.json"
# The SQLite drill's gauges, but for the replica's age (pgBackRest's archive has no
# per-change timestamps to read it from): behind_seconds is what the alerts watch.
DRILL_METRICS = tuple(m for m in METRICS if m.key != "replica_age_seconds")


class Server:
    """psql against one server, over its Unix socket."""

    def __init__(self, socket_dir: str, port: int, database: str) -> None:
        self.socket_dir, self.port, self.database = socket_dir, port, database

    def query(self, sql: str, *, timeout: float = 120) -> list[list[str]]:
        done = run(
            [
                "psql",
                "-h",
                self.socket_dir,
                "-p",
                str(self.port),
                "-d",
                self.database,
                "-X",
                "-q",
                "-A",
                "-t",
                "-F",
                "\t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ],
            timeout,
        )
        if done.returncode != 0:
            raise Failure(
                f"psql on {self.socket_dir}:{self.port}/{self.database}: {tail(done.stderr)}"
            )
        # One line per row (unaligned, tuples only); a NULL prints as an empty field.
        lines = done.stdout.removesuffix("\n").split("\n") if done.stdout else []
        return [line.split("\t") for line in lines]


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def restore(settings: dict[str, Any], data: Path) -> float:
    started = time.monotonic()
    done = run(
        [
            "pgbackrest",
            f"--stanza={settings['stanza']}",
            f"--pg1-path={data}",
            "--archive-mode=off",
            "--log-level-console=warn",
            "restore",
        ],
        settings["timeout_seconds"],
    )
    if done.returncode != 0:
        raise Failure(
            f"pgbackrest restore failed (exit {done.returncode}): {tail(done.stderr + done.stdout)}"
        )
    return time.monotonic() - started


def start_copy(settings: dict[str, Any], scratch: Path, data: Path) -> Server:
    """Start a server on the restored folder: socket only, no archiving; it accepts
    connections once the archive is replayed and the copy promoted (hot_standby=off)."""
    socket_dir = scratch / "socket"
    socket_dir.mkdir(mode=0o700)
    conf = scratch / "drill.conf"
    hba = scratch / "pg_hba.conf"
    ident = scratch / "pg_ident.conf"
    hba.write_text("local all all peer\n", encoding="utf-8")
    ident.write_text("", encoding="utf-8")
    conf.write_text(
        "\n".join(
            [
                "listen_addresses = ''",
                f"port = {settings['drill_port']}",
                f"unix_socket_directories = '{socket_dir}'",
                f"hba_file = '{hba}'",
                f"ident_file = '{ident}'",
                "archive_mode = off",
                "hot_standby = off",
                "ssl = off",
                "",
            ]
        ),
        encoding="utf-8",
    )
    pg_ctl = str(Path(settings["bin_dir"]) / "pg_ctl")
    log = scratch / "server.log"
    done = run(
        [pg_ctl, "-D", str(data), "-o", f"-c config_file={conf}", "-l", str(log), "-s", "start"],
        120,
    )
    server = Server(str(socket_dir), settings["drill_port"], settings["database"])
    deadline = time.monotonic() + settings["timeout_seconds"]
    while True:
        try:
            if server.query("SELECT pg_is_in_recovery()", timeout=30) == [["f"]]:
                return server
        except Failure:
            pass
        if (
            done.returncode != 0
            or not (data / "postmaster.pid").exists()
            or time.monotonic() > deadline
        ):
            log_tail = (
                tail(log.read_text(encoding="utf-8", errors="replace"), 8)
                if log.exists()
                else "(no log)"
            )
            raise Failure(
                f"the restored copy did not come up (recovery failed or took too long): {log_tail}"
            )
        time.sleep(1)


def stop_copy(settings: dict[str, Any], data: Path) -> None:
    if (data / "postmaster.pid").exists():
        run(
            [
                str(Path(settings["bin_dir"]) / "pg_ctl"),
                "-D",
                str(data),
                "-m",
                "immediate",
                "-s",
                "-w",
                "stop",
            ],
            120,
        )


def checks(settings: dict[str, Any], scratch: Path, result: dict[str, Any]) -> None:
    table, column, id_column = settings["table"], settings["time_column"], settings["id_column"]
    live = Server(settings["socket_dir"], settings["port"], settings["database"])
    newest_sql = f"SELECT max({quote_ident(column)}) FROM {quote_ident(table)}"
    # Read the live database first: a drill that cannot read it fails before restoring. A
    # server set up a moment ago has no app tables yet (the app hosts' migrations make
    # them): then the copy is only read, not compared.
    has_table = live.query(
        "SELECT to_regclass('public.' || " + quote_literal(quote_ident(table)) + ") IS NOT NULL"
    ) == [["t"]]
    result["live_newest_row_at"] = (
        iso(to_epoch(live.query(newest_sql)[0][0])) if has_table else None
    )

    reference = time.time()
    data = scratch / "data"
    data.mkdir(mode=0o700)
    result["restore_seconds"] = round(restore(settings, data), 3)
    copy = start_copy(settings, scratch, data)
    try:
        tables = [
            row[0]
            for row in copy.query(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
            )
        ]
        if has_table and table not in tables:
            raise Failure(
                f"the restored copy of {settings['database']} has no table {table} "
                f"(tables: {', '.join(tables) or 'none'})"
            )
        # Reading every row of every table: a page the restore got wrong fails here.
        counts = (
            copy.query(
                " UNION ALL ".join(
                    f"SELECT {quote_literal(name)}, count(*) FROM {quote_ident(name)}"
                    for name in tables
                )
            )
            if tables
            else []
        )
        result["rows"] = {name: int(count) for name, count in counts}
        result["restored_bytes"] = int(
            copy.query("SELECT pg_database_size(current_database())")[0][0]
        )
        if not has_table:
            result["behind_seconds"] = 0.0
            result["note"] = f"the live database has no table {table} yet: nothing to compare"
            return
        copy_newest = copy.query(newest_sql)[0][0] or None
        copy_last_id = (
            copy.query(f"SELECT max({quote_ident(id_column)}) FROM {quote_ident(table)}")[0][0]
            or None
        )
    finally:
        stop_copy(settings, data)
    result["restored_newest_row_at"] = iso(to_epoch(copy_newest))

    # The rows the copy lacks: the live ones after its last id (ids come from a sequence,
    # in the order rows were written; their timestamps need not be).
    after = f" WHERE {quote_ident(id_column)} > {int(copy_last_id)}" if copy_last_id else ""
    missing_rows = live.query(
        f"SELECT min({quote_ident(column)}) FROM {quote_ident(table)}" + after
    )
    missing = to_epoch(missing_rows[0][0] or None)
    # How long before the restore the oldest row missing from the copy was written: the
    # archive's lag as the drill saw it (0 when the copy holds every row).
    behind = 0.0 if missing is None else max(0.0, reference - missing)
    result["oldest_missing_row_at"] = iso(missing)
    result["behind_seconds"] = round(behind, 3)
    if behind > settings["max_behind_seconds"]:
        raise Failure(
            f"the backup is stale: the restored copy lacks {table} rows written "
            f"{behind:.0f}s before the drill started (from {iso(missing)} on; its newest "
            f"is {result['restored_newest_row_at']}), more than "
            f"{settings['max_behind_seconds']}s; is WAL archiving working? "
            f"(pgbackrest --stanza={settings['stanza']} check; journalctl -u postgresql@*)"
        )


# --------------------------------------------------------------------------- the drill


def drill(settings: dict[str, Any]) -> int:
    def release(scratch: Path) -> None:
        if (scratch / "data").exists():
            stop_copy(settings, scratch / "data")

    def passed(result: dict[str, Any]) -> str:
        return (
            f"{result['restored_bytes']} bytes, "
            f"{result['rows'].get(settings['table'], 0)} {settings['table']} rows, "
            f"{result['behind_seconds']:.1f}s behind the live database"
            + (f" ({result['note']})" if result.get("note") else "")
        )

    return run_drill(
        Path(settings["workdir"]),
        {"stanza": settings["stanza"], "max_behind_seconds": settings["max_behind_seconds"]},
        lambda scratch, result: checks(settings, scratch, result),
        textfile_dir=settings.get("textfile_dir"),
        summary=passed,
        release=release,
        metrics=DRILL_METRICS,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="digitalme-postgresql-drill",
        description="Restore the latest PostgreSQL backup (pgBackRest) into a scratch "
        "folder, start it, check it against the live database and report "
        "(result.json, node-exporter's textfile). Run as postgres.",
    )
    parser.add_argument(
        "--settings",
        default=SETTINGS_FILE,
        help=f"the role's settings file (default: {SETTINGS_FILE})",
    )
    parser.add_argument(
        "--max-behind-seconds", type=float, help="override the settings' max_behind_seconds"
    )
    args = parser.parse_args(argv)
    try:
        settings = json.loads(Path(args.settings).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"digitalme-postgresql-drill: cannot read {args.settings}: {exc}", file=sys.stderr)
        return 2
    if args.max_behind_seconds is not None:
        settings["max_behind_seconds"] = args.max_behind_seconds
    return drill(settings)


if __name__ == "__main__":
    sys.exit(main())
