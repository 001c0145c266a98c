"""What a restore drill reports, and how: shared by the SQLite drill
(tools/digitalme_backup.py, ``drill``) and the PostgreSQL one
(tools/digitalme_postgresql_drill.py), so that the same alerts, dashboard and readiness
check read both.

``run_drill`` is the frame around a drill's own checks: a scratch folder made fresh and
removed afterwards, SIGTERM (systemd's TimeoutStartSec, ``systemctl stop``) turned into a
failure, the time of the last success carried over from the previous result, and the
result written to ``<workdir>/result.json`` (read by the app, ``digitalme.backup``) and, as
``digitalme_backup_drill_*`` gauges, to ``digitalme_backup.prom`` in node-exporter's
textfile folder, both written to a temporary file and renamed. Exit status 1 on any
failure, with the reason on stderr (the journal).

Installed by the litestream and postgresql roles beside the programs that import it
(/usr/local/lib/digitalme-tools/; the programs' /usr/local/libexec names are links there).
Python 3 standard library only.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

RESULT_FILE = "result.json"
METRICS_FILE = "digitalme_backup.prom"


class Failure(Exception):
    """A restore or a check failed; the message says which and why."""


class Metric(NamedTuple):
    name: str
    help: str
    key: str  # of the result


METRICS = (
    Metric(
        "digitalme_backup_drill_success",
        "1 if the last restore drill passed, 0 if it failed.",
        "success",
    ),
    Metric(
        "digitalme_backup_drill_duration_seconds",
        "How long the last restore drill took (restore and checks).",
        "duration_seconds",
    ),
    Metric(
        "digitalme_backup_drill_last_run_timestamp_seconds",
        "When the last restore drill finished (Unix time).",
        "finished_epoch",
    ),
    Metric(
        "digitalme_backup_drill_last_success_timestamp_seconds",
        "When a restore drill last passed (Unix time; NaN: never).",
        "last_success_epoch",
    ),
    Metric(
        "digitalme_backup_replica_age_seconds",
        "Age of the newest change on the replica when the drill ran (the SQLite drill "
        "only; grows while nothing is written: alert on "
        "digitalme_backup_drill_behind_seconds instead).",
        "replica_age_seconds",
    ),
    Metric(
        "digitalme_backup_drill_behind_seconds",
        "How long before the drill the oldest row missing from the restored copy was "
        "written (0: the copy held every row of the live database).",
        "behind_seconds",
    ),
    Metric(
        "digitalme_backup_drill_restored_bytes",
        "Size of the database the last drill restored.",
        "restored_bytes",
    ),
)
ROWS_METRIC = Metric(
    "digitalme_backup_drill_restored_rows",
    "Rows per table in the database the last drill restored.",
    "rows",
)


# --------------------------------------------------------------------------- values


def iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


def to_epoch(value: Any) -> float | None:
    """A timestamp as seconds since the epoch: ISO 8601 text (the app's created_at; naive
    means UTC) or a number of seconds; None for anything else."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        try:
            return float(value)
        except ValueError:
            return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


# --------------------------------------------------------------------------- commands


def run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """A command the drill drives (litestream, sftp, pgbackrest, psql, pg_ctl), its output
    captured; a command that cannot start or does not finish in time is a Failure."""
    try:
        # argv: a configured binary and our own arguments.
        return subprocess.run(  # noqa: S603
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise Failure(f"`{' '.join(argv[:2])}` did not finish within {timeout:g}s") from None
    except OSError as exc:
        raise Failure(f"cannot run {argv[0]}: {exc.strerror}") from None


def tail(text: str, lines: int = 6) -> str:
    """The last non-blank lines of a command's output, on one line (for a Failure)."""
    kept = [line for line in text.strip().splitlines() if line.strip()]
    return " / ".join(kept[-lines:])


# --------------------------------------------------------------------------- outputs


def write_atomic(path: Path, text: str) -> None:
    """Write a temporary file in the same folder, then rename it over path: a reader
    (node-exporter's textfile collector, the app) never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def number(value: float | int | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "NaN"
    return repr(float(value)) if isinstance(value, float) else str(value)


def render_metrics(result: dict[str, Any], metrics: tuple[Metric, ...] = METRICS) -> str:
    """The result as node-exporter textfile gauges: ``metrics`` (NaN for a value the result
    lacks) and the restored rows per table."""
    values = dict(result, success=1 if result["ok"] else 0)
    lines = []
    for name, help_text, key in metrics:
        lines += [
            f"# HELP {name} {help_text}",
            f"# TYPE {name} gauge",
            f"{name} {number(values.get(key))}",
        ]
    rows = result.get(ROWS_METRIC.key) or {}
    if rows:
        name = ROWS_METRIC.name
        lines += [f"# HELP {name} {ROWS_METRIC.help}", f"# TYPE {name} gauge"]
        for table, count in sorted(rows.items()):
            label = str(table).replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'{name}{{table="{label}"}} {count}')
    return "\n".join(lines) + "\n"


def previous_success(workdir: Path) -> float | None:
    """When the previous result says a drill last passed (None: never, or no result)."""
    try:
        previous = json.loads((workdir / RESULT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = previous.get("last_success_epoch") if isinstance(previous, dict) else None
    return float(value) if isinstance(value, int | float) else None


# --------------------------------------------------------------------------- the drill


def _stopped(signum: int, _frame: object) -> None:
    # systemd stops the drill with SIGTERM (TimeoutStartSec, or `systemctl stop`): fail the
    # drill, so that its result and metrics say so instead of showing the previous run.
    # subprocess.run kills the running command on the way out.
    raise Failure(
        f"stopped by {signal.Signals(signum).name} before it finished (the unit's "
        "TimeoutStartSec, or `systemctl stop`)"
    )


def run_drill(
    workdir: Path,
    fields: dict[str, Any],
    checks: Callable[[Path, dict[str, Any]], None],
    *,
    textfile_dir: str | None,
    summary: Callable[[dict[str, Any]], str],
    release: Callable[[Path], None] | None = None,
    metrics: tuple[Metric, ...] = METRICS,
) -> int:
    """Run ``checks(scratch, result)`` in ``<workdir>/scratch`` and report (module
    docstring); ``fields`` start the result, ``summary(result)`` says what a passed drill
    found, ``release(scratch)`` lets go of what the checks started there (a server) before
    the folder is removed, also when an interrupted drill left it. Exit status 0 or 1."""
    signal.signal(signal.SIGTERM, _stopped)
    scratch = workdir / "scratch"
    started = time.time()
    result: dict[str, Any] = {"ok": False, "error": None, **fields, "started_at": iso(started)}
    last_success = previous_success(workdir)
    try:
        if release and scratch.exists():  # left by an interrupted drill
            release(scratch)
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(mode=0o700, parents=True)
        checks(scratch, result)
        result["ok"] = True
    except Failure as exc:
        result["error"] = str(exc)
    except Exception as exc:  # an unexpected failure must still be reported as a failure
        traceback.print_exc()
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        # From here on a SIGTERM just ends the process: the results are written atomically.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if release and scratch.exists():
            release(scratch)
        shutil.rmtree(scratch, ignore_errors=True)
    finished = time.time()
    if result["ok"]:
        last_success = finished
    result.update(
        finished_at=iso(finished),
        finished_epoch=finished,
        duration_seconds=round(finished - started, 3),
        last_success_at=iso(last_success),
        last_success_epoch=last_success,
    )
    write_atomic(workdir / RESULT_FILE, json.dumps(result, indent=2) + "\n")
    if textfile_dir:
        write_atomic(Path(textfile_dir) / METRICS_FILE, render_metrics(result, metrics))
    if result["ok"]:
        print(f"restore drill passed in {result['duration_seconds']:.1f}s: {summary(result)}")
        return 0
    print(
        f"restore drill FAILED after {result['duration_seconds']:.1f}s: {result['error']}",
        file=sys.stderr,
    )
    return 1
