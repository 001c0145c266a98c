#!/usr/bin/python3
"""Releases of DigitalMe on one host: health-gated switches, rollbacks, the deploy record.

Installed by the digitalme role as /usr/local/sbin/digitalme-deploy (Python 3 standard
library only; run as root). The role installs each release into
/opt/digitalme/releases/<release>/ and calls this tool to make it the running one; an
operator calls it to look, to roll back, or to break a stale lock. Its settings come from
/etc/digitalme-deploy.json (written by the role); see docs/operations/upgrades.md.

``lock acquire|release|show|break``
    One deploy at a time per host. The lock is a file in /run (a reboot clears it) naming
    its holder; a second deploy fails at once, or waits ``--wait`` seconds, and says who
    holds it and how to break it when that run is gone.

``plan RELEASE``
    What ``prepare`` and ``switch`` would do (read-only; check mode uses it).

``prepare RELEASE``
    Before the release runs: when it brings migrations the database lacks, make Litestream
    ship everything and record the replica's position (txid), take a consistent snapshot
    (``VACUUM INTO``) beside the database, then run the migrations as their own one-shot
    unit (``digitalme-migrate@RELEASE.service``). The running release keeps serving
    throughout: migrations only add, so it runs on the migrated schema; a failed migration
    changes nothing (a release's migrations apply together or not at all).

``switch RELEASE``
    Point ``current`` at the release and restart the service. systemd's socket unit keeps
    the listening socket, so requests arriving meanwhile wait in its backlog instead of
    failing. Then the health gate: ``/health/ready`` and a smoke chat turn
    (``digitalme smoke-test``) within ``--gate-timeout``. When the gate fails, ``current``
    goes back to the previous release, which is restarted and checked; the command fails
    naming the reason, with the new release's journal. Nothing happens when the release
    already runs with the same settings, secrets and units (a fingerprint of their files).

``rollback [--to RELEASE] [--data keep|restore]``
    Back to the release that ran before the last deploy (or the one named). When the
    release being left applied migrations the target does not know, the rollback refuses
    unless told what to do with the data: ``keep`` (the older release runs on the newer
    schema) or ``restore`` (the snapshot taken before that upgrade goes back in place;
    the refusal says how many messages, conversations and deliveries written since would
    be lost). A restore stops the service and its socket, and Litestream, swaps the files
    (the replaced ones are kept aside), resets Litestream's local state so that it ships
    the restored database as a new snapshot in the same replica, and starts everything.

``status``
    The releases on the host, which one runs, the last deploys, the lock.

The container runtime (``digitalme_runtime: docker``, docs/docker.md) goes through the
same commands: a release is also an image tagged with its name, ``current`` names it (its
``image.env``), and the units of the same names run it in a container behind the same
socket; pruning a release removes its image.

Every switch and rollback is appended to ``deploys.jsonl`` in the state folder; the last
one is also ``last.json`` (shown in the service's ``/info``) and ``digitalme_deploy.prom``
in node-exporter's textfile folder (``digitalme_deploy_*``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pwd
import re
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SETTINGS_FILE = "/etc/digitalme-deploy.json"
RELEASE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# Tables whose new rows a data rollback would lose (rowids only grow: rows written after the
# snapshot are those above its largest rowid).
LOSS_TABLES = ("messages", "conversations", "inbox")
EXIT_REFUSED = 3


class Failure(Exception):
    """The operation failed or was refused; the message says why and what to do."""


# --------------------------------------------------------------------------- settings


@dataclass
class Settings:
    root: Path = Path("/opt/digitalme")
    db_path: Path = Path("/var/lib/digitalme/digitalme.db")
    user: str | None = "digitalme"
    state_dir: Path = Path("/var/lib/digitalme-deploy")
    snapshot_dir: Path = Path("/var/lib/digitalme/snapshots")
    lock_file: Path = Path("/run/digitalme-deploy/lock.json")
    service: str = "digitalme.service"
    socket: str = "digitalme.socket"
    migrate_unit: str = "digitalme-migrate@{release}.service"
    admin_command: str = "/usr/local/sbin/digitalme"
    app_url: str = "http://127.0.0.1:8080"
    fingerprint_paths: list[str] = field(default_factory=list)
    textfile_dir: str = ""
    group: str = "digitalme"
    litestream_unit: str = ""
    litestream_socket: str = ""
    litestream_binary: str = "/usr/local/bin/litestream"
    litestream_admin: str = ""
    keep_releases: int = 5
    gate_timeout_seconds: float = 60.0
    smoke_chat: bool = True
    require_replication: bool = True
    sync_timeout_seconds: float = 60.0
    # The container runtime (docs/docker.md): each release is also an image, tagged with
    # the release's name; pruning a release removes its image with this engine.
    container_engine: str = ""
    container_image: str = ""
    # "postgresql" when DIGITALME_DATABASE_URL puts the data on a PostgreSQL server
    # (docs/scale-out.md): the schema is read through the release's own command, and the
    # server's backups, not a snapshot on this host, are what an upgrade falls back on.
    database_engine: str = "sqlite"

    @classmethod
    def load(cls, path: str) -> Settings:
        settings = cls()
        try:
            loaded = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return settings
        if not isinstance(loaded, dict):
            raise Failure(f"{path}: not a JSON object")
        for name, value in loaded.items():
            if name.startswith("_"):
                continue
            if not hasattr(settings, name):
                raise Failure(f"{path}: unknown setting {name!r}")
            current = getattr(settings, name)
            setattr(settings, name, Path(value) if isinstance(current, Path) else value)
        return settings

    @property
    def releases_dir(self) -> Path:
        return self.root / "releases"

    @property
    def current_link(self) -> Path:
        return self.root / "current"

    @property
    def history_file(self) -> Path:
        return self.state_dir / "deploys.jsonl"

    @property
    def last_file(self) -> Path:
        return self.state_dir / "last.json"

    @property
    def pending_file(self) -> Path:
        return self.state_dir / "pending.json"


# --------------------------------------------------------------------------- small helpers


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def write_atomic(path: Path, text: str, mode: int = 0o640, group: str | None = None) -> None:
    """Write beside, then rename: a reader sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.chmod(temporary, mode)
    if group is not None and os.geteuid() == 0:
        with contextlib.suppress(KeyError):
            shutil.chown(temporary, group=group)
    os.replace(temporary, path)


def run(
    argv: list[str], *, timeout: float = 600, check: bool = False, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(  # noqa: S603
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise Failure(f"`{' '.join(argv)}` did not finish within {timeout:g}s") from exc
    except OSError as exc:
        raise Failure(f"cannot run {argv[0]}: {exc.strerror}") from exc
    if check and result.returncode != 0:
        raise Failure(
            f"`{' '.join(argv)}` failed (exit {result.returncode}): "
            f"{(result.stderr or result.stdout).strip()}"
        )
    return result


def systemctl(*args: str, check: bool = True, timeout: float = 300) -> str:
    return run(["systemctl", *args], check=check, timeout=timeout).stdout.strip()


def unit_state(unit: str) -> dict[str, str]:
    shown = systemctl("show", "--property=ActiveState,SubState,NRestarts,MainPID,Result", unit)
    return dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)


# Lines that say nothing about why a release failed, and that a loaded service writes by
# the thousand: the access log and the HTTP client's request log.
JOURNAL_NOISE = (" aiohttp.access: ", " httpx2: HTTP Request: ", " httpx: HTTP Request: ")


def journal(unit: str, since: float, lines: int = 60) -> str:
    """The unit's journal since a moment, without access-log lines: the last ``lines``."""
    result = run(
        [
            "journalctl",
            "--unit",
            unit,
            "--since",
            f"@{int(since)}",
            "--lines",
            "5000",
            "--no-pager",
            "--output",
            "short-iso",
        ],
        check=False,
    )
    kept = [
        line
        for line in result.stdout.splitlines()
        if not any(noise in line for noise in JOURNAL_NOISE)
    ]
    return "\n".join(kept[-lines:]) or "(the journal has nothing for it)"


def check_release_name(release: str) -> str:
    if not RELEASE_NAME.match(release):
        raise Failure(f"{release!r} is not a release name (letters, digits, . _ -)")
    return release


# --------------------------------------------------------------------------- releases


def current_release(settings: Settings) -> str | None:
    try:
        return Path(os.readlink(settings.current_link)).name
    except (FileNotFoundError, OSError):
        return None


def installed_releases(settings: Settings) -> list[str]:
    if not settings.releases_dir.is_dir():
        return []
    return sorted(p.name for p in settings.releases_dir.iterdir() if (p / ".complete").exists())


def release_dir(settings: Settings, release: str) -> Path:
    check_release_name(release)
    path = settings.releases_dir / release
    if not (path / ".complete").exists():
        installed = ", ".join(installed_releases(settings)) or "none"
        raise Failure(
            f"release {release} is not installed on this host (installed: "
            f"{installed}); the digitalme role installs releases"
        )
    return path


def release_migrations(settings: Settings, release: str) -> dict[int, str]:
    """The migrations a release ships: version -> name (from its installed package, or, for
    a release of the container runtime, which has no virtualenv, from the app's wheel the
    image was built from)."""
    found: dict[int, str] = {}
    folder = release_dir(settings, release)
    names: list[str] = []
    for migrations in (folder / "venv" / "lib").glob("python3*/site-packages/digitalme/migrations"):
        names += [entry.name for entry in migrations.iterdir()]
    if not (folder / "venv").is_dir():
        for wheel in (folder / "wheels").glob("digitalme-*.whl"):
            with zipfile.ZipFile(wheel) as archive:
                names += [
                    Path(name).name
                    for name in archive.namelist()
                    if name.startswith("digitalme/migrations/")
                ]
    for name in names:
        match = MIGRATION_FILE.match(name)
        if match:
            found[int(match[1])] = f"{match[1]}_{match[2]}"
    return found


def release_info(settings: Settings, release: str) -> dict[str, Any]:
    try:
        info = json.loads((settings.releases_dir / release / "release.json").read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


# --------------------------------------------------------------------------- the database
# Reads of the live database run as the service's user: SQLite may create the -wal and -shm
# files, and root-owned ones would lock the service out of its own database.


def as_service_user(settings: Settings, *args: str, timeout: float = 3600) -> Any:
    """Run this tool's internal command as the service's user; its JSON answer."""
    argv = [sys.executable, os.path.abspath(__file__), "internal", *args]
    if settings.user and os.geteuid() == 0:
        argv = ["runuser", "-u", settings.user, "--", *argv]
    result = run(argv, timeout=timeout)
    if result.returncode != 0:
        raise Failure(result.stderr.strip() or f"internal {args[0]} failed")
    return json.loads(result.stdout)


def _open(path: Path, *, immutable: bool) -> sqlite3.Connection:
    if not path.exists():
        raise Failure(f"{path} does not exist")
    flags = "mode=ro&immutable=1" if immutable else "mode=ro"
    db = sqlite3.connect(f"file:{urllib.parse.quote(str(path))}?{flags}", uri=True, timeout=30)
    db.execute("PRAGMA busy_timeout = 30000")
    return db


def applied_migrations(db: sqlite3.Connection) -> list[int]:
    if (
        db.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_migrations'"
        ).fetchone()
        is None
    ):
        return []
    return sorted(row[0] for row in db.execute("SELECT version FROM schema_migrations"))


def internal_schema(path: str) -> dict[str, Any]:
    db = _open(Path(path), immutable=False)
    try:
        return {"applied": applied_migrations(db)}
    finally:
        db.close()


def internal_snapshot(path: str, destination: str) -> dict[str, Any]:
    """A consistent copy of the live database (one read transaction), and what it holds."""
    target = Path(destination)
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    partial.unlink(missing_ok=True)
    started = time.monotonic()
    db = _open(Path(path), immutable=False)
    try:
        db.execute("VACUUM INTO ?", (str(partial),))
        applied = applied_migrations(db)
    finally:
        db.close()
    copy = _open(partial, immutable=True)
    try:
        integrity = copy.execute("PRAGMA quick_check").fetchone()[0]
        highest = {table: _max_rowid(copy, table) for table in LOSS_TABLES}
    finally:
        copy.close()
    if integrity != "ok":
        partial.unlink(missing_ok=True)
        raise Failure(f"the snapshot of {path} fails its check: {integrity}")
    os.chmod(partial, 0o600)  # the whole database: its owner alone
    os.replace(partial, target)
    return {
        "path": str(target),
        "bytes": target.stat().st_size,
        "applied": applied,
        "highest_rowids": highest,
        "seconds": round(time.monotonic() - started, 3),
    }


def _max_rowid(db: sqlite3.Connection, table: str) -> int:
    if (
        db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,)).fetchone()
        is None
    ):
        return 0
    return int(db.execute(f'SELECT coalesce(max(rowid), 0) FROM "{table}"').fetchone()[0])


def internal_newer_rows(path: str, highest_json: str) -> dict[str, int]:
    """Rows of the live database above the snapshot's largest rowids, per table."""
    highest = json.loads(highest_json)
    db = _open(Path(path), immutable=False)
    try:
        counts = {}
        for table in LOSS_TABLES:
            if _max_rowid(db, table) == 0:
                counts[table] = 0
                continue
            counts[table] = int(
                db.execute(
                    f'SELECT count(*) FROM "{table}" WHERE rowid > ?', (int(highest.get(table, 0)),)
                ).fetchone()[0]
            )
        return counts
    finally:
        db.close()


def database_schema(settings: Settings, release: str | None = None) -> list[int] | None:
    """Versions applied to the live database; None when there is no database yet (SQLite).

    On PostgreSQL the database exists before the first release (the server's role made
    it), and only the app's own driver reads it: the release's ``migrate --status``."""
    if settings.database_engine == "postgresql":
        if release is None:
            release = current_release(settings)
        if release is None:
            return None
        env = dict(os.environ, DIGITALME_RELEASE_DIR=str(settings.releases_dir / release))
        result = run([settings.admin_command, "migrate", "--status"], timeout=120, env=env)
        if result.returncode != 0:
            raise Failure(
                "cannot read the schema of the PostgreSQL database: "
                f"{(result.stderr or result.stdout).strip()}"
            )
        return list(json.loads(result.stdout)["applied"])
    if not settings.db_path.exists():
        return None
    return list(as_service_user(settings, "schema", str(settings.db_path))["applied"])


# --------------------------------------------------------------------------- the lock


def lock_holder(settings: Settings) -> dict[str, Any] | None:
    try:
        holder = json.loads(settings.lock_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"holder": f"unreadable lock file {settings.lock_file}", "since": "?"}
    return holder if isinstance(holder, dict) else None


def describe_holder(holder: dict[str, Any]) -> str:
    since = holder.get("since", "?")
    age = ""
    with contextlib.suppress(ValueError, TypeError):
        age = f", {time.time() - datetime.fromisoformat(since).timestamp():.0f}s ago"
    return f"{holder.get('holder', '?')} since {since}{age}"


def acquire_lock(settings: Settings, holder: str, wait: float) -> str:
    settings.lock_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    document = json.dumps(
        {"token": token, "holder": holder, "since": now_iso(), "pid": os.getpid()}
    )
    deadline = time.monotonic() + wait
    while True:
        try:
            fd = os.open(settings.lock_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            current = lock_holder(settings)
            if current is None:
                continue  # released between our two looks
            if time.monotonic() >= deadline:
                raise Failure(
                    f"another deploy holds the lock of this host: {describe_holder(current)}. "
                    "Wait for it to finish (or give the playbook -e digitalme_deploy_lock_wait"
                    "_seconds=300). If that run is gone (interrupted, its controller lost), "
                    "break the lock: `sudo digitalme-deploy lock break` on the host, or run "
                    "the playbook with -e digitalme_deploy_break_lock=true."
                ) from None
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(document)
        return token


def release_lock(settings: Settings, token: str) -> None:
    current = lock_holder(settings)
    if current is None:
        return
    if current.get("token") != token:
        raise Failure(f"the lock is held by someone else now: {describe_holder(current)}")
    settings.lock_file.unlink(missing_ok=True)


def check_lock(settings: Settings, token: str) -> None:
    current = lock_holder(settings)
    if current is None or current.get("token") != token:
        held = describe_holder(current) if current else "nobody"
        raise Failure(
            f"this run no longer holds the deploy lock (held by {held}); "
            "someone broke it: stopping rather than interleaving with another run"
        )


@contextlib.contextmanager
def locked(
    settings: Settings, token: str | None, by: str, what: str, wait: float = 0
) -> Iterator[None]:
    """Under the caller's lock (the playbook's), or one taken for this command alone."""
    if token:
        check_lock(settings, token)
        yield
        return
    own = acquire_lock(settings, f"{by}: digitalme-deploy {what}", wait)
    try:
        yield
    finally:
        release_lock(settings, own)


# --------------------------------------------------------------------------- records


def history(settings: Settings) -> list[dict[str, Any]]:
    try:
        lines = settings.history_file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    records: list[dict[str, Any]] = []
    for line in lines:
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                records.append(record)
    return records


def last_success(settings: Settings) -> dict[str, Any] | None:
    successes = [record for record in history(settings) if record.get("result") == "success"]
    return successes[-1] if successes else None


def fingerprint(settings: Settings) -> str:
    """What the running service was started with, besides its release: settings, secrets
    (by content: the digest never leaves this host's root-only state) and unit files."""
    digest = hashlib.sha256()
    for name in settings.fingerprint_paths:
        path = Path(name)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            digest.update(str(file).encode() + b"\0")
            try:
                digest.update(file.read_bytes() + b"\0")
            except FileNotFoundError:
                digest.update(b"(absent)\0")
    return digest.hexdigest()


def metrics_text(record: dict[str, Any], records: list[dict[str, Any]]) -> str:
    def label(value: Any) -> str:
        return str(value or "").replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")

    finished = datetime.fromisoformat(record["finished_at"]).timestamp()
    results: dict[str, int] = {}
    for past in records:
        results[past.get("result", "unknown")] = results.get(past.get("result", "unknown"), 0) + 1
    lines = [
        "# HELP digitalme_deploy_last_success 1 when the last deploy or rollback passed its "
        "health gate, 0 when it failed or was rolled back.",
        "# TYPE digitalme_deploy_last_success gauge",
        f"digitalme_deploy_last_success {1 if record['result'] == 'success' else 0}",
        "# HELP digitalme_deploy_last_timestamp_seconds When the last deploy or rollback ended.",
        "# TYPE digitalme_deploy_last_timestamp_seconds gauge",
        f"digitalme_deploy_last_timestamp_seconds {finished:.3f}",
        "# HELP digitalme_deploy_last_duration_seconds How long the last deploy took, from "
        "its preparation to the end of the health gate.",
        "# TYPE digitalme_deploy_last_duration_seconds gauge",
        f"digitalme_deploy_last_duration_seconds {record.get('duration_seconds') or 0}",
        "# HELP digitalme_deploy_last_gate_seconds From the restart to the passed health gate.",
        "# TYPE digitalme_deploy_last_gate_seconds gauge",
        f"digitalme_deploy_last_gate_seconds {record.get('gate_seconds') or 0}",
        "# HELP digitalme_deploy_info The last deploy: its kind, result and releases.",
        "# TYPE digitalme_deploy_info gauge",
        f'digitalme_deploy_info{{kind="{label(record.get("kind"))}",'
        f'result="{label(record.get("result"))}",release="{label(record.get("to_release"))}",'
        f'from_release="{label(record.get("from_release"))}",'
        f'commit="{label(record.get("commit"))}"}} 1',
        "# HELP digitalme_deploys_total Deploys and rollbacks recorded on this host, by result.",
        "# TYPE digitalme_deploys_total counter",
        *(
            f'digitalme_deploys_total{{result="{label(result)}"}} {count}'
            for result, count in sorted(results.items())
        ),
    ]
    return "\n".join(lines) + "\n"


def save_record(settings: Settings, record: dict[str, Any]) -> None:
    record["finished_at"] = now_iso()
    started = datetime.fromisoformat(record["started_at"]).timestamp()
    record["duration_seconds"] = round(time.time() - started, 3)
    settings.state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
    with settings.history_file.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
    # /info shows it: readable by the service's group.
    write_atomic(
        settings.last_file,
        json.dumps(record, indent=2, sort_keys=True) + "\n",
        mode=0o640,
        group=settings.group,
    )
    if settings.textfile_dir and Path(settings.textfile_dir).is_dir():
        write_atomic(
            Path(settings.textfile_dir) / "digitalme_deploy.prom",
            metrics_text(record, history(settings)),
            mode=0o644,
        )
    settings.pending_file.unlink(missing_ok=True)


def new_record(
    settings: Settings, kind: str, to_release: str, by: str, commit: str | None = None
) -> dict[str, Any]:
    started = datetime.now(UTC)
    return {
        "id": started.strftime("%Y%m%dT%H%M%S.%fZ"),
        "kind": kind,
        "from_release": current_release(settings),
        "to_release": to_release,
        "commit": commit or release_info(settings, to_release).get("commit"),
        "by": by,
        "started_at": started.isoformat(timespec="milliseconds"),
        "migrations": [],
        "snapshot": None,
    }


def pending_record(settings: Settings, release: str) -> dict[str, Any] | None:
    with contextlib.suppress(FileNotFoundError, ValueError):
        record = json.loads(settings.pending_file.read_text(encoding="utf-8"))
        if isinstance(record, dict) and record.get("to_release") == release:
            return record
    return None


# --------------------------------------------------------------------------- the service


def ensure_socket(settings: Settings) -> None:
    """The socket unit listening. The first time (a host set up before the socket unit
    existed) the service holds the port itself: it stops once, then the socket takes over."""
    state = unit_state(settings.socket)
    if state.get("ActiveState") == "active":
        return
    if state.get("ActiveState") == "failed":
        systemctl("reset-failed", settings.socket)
    if unit_state(settings.service).get("ActiveState") in ("active", "activating"):
        print(
            f"{settings.socket} is not listening yet: stopping {settings.service} once so "
            "that the socket can take its port",
            file=sys.stderr,
        )
        systemctl("stop", settings.service)
    systemctl("start", settings.socket)


def restart_service(settings: Settings) -> int:
    """Restart (or start) the service behind the kept socket; its restart count before."""
    ensure_socket(settings)
    before = int(unit_state(settings.service).get("NRestarts", "0") or 0)
    if unit_state(settings.service).get("ActiveState") == "failed":
        systemctl("reset-failed", settings.service)
    # Type=notify: this returns once the new process accepts (or has failed to start).
    run(["systemctl", "restart", settings.service], timeout=180)
    return before


def get(url: str, timeout: float) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (our loopback URL)
            return response.status, response.read(65536).decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(65536).decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        return 0, str(getattr(exc, "reason", exc))


def wait_ready(settings: Settings, restarts_before: int, deadline: float) -> None:
    """Until /health/ready answers 200, failing at once when the process exits."""
    last = "no answer yet"
    while True:
        state = unit_state(settings.service)
        if (
            state.get("ActiveState") == "failed"
            or int(state.get("NRestarts", "0") or 0) > restarts_before
            or state.get("SubState") == "auto-restart"
        ):
            raise Failure(
                f"the service exited ({state.get('ActiveState')}/"
                f"{state.get('SubState')}, result {state.get('Result')})"
            )
        status, body = get(f"{settings.app_url}/health/ready", timeout=5)
        if status == 200:
            return
        last = f"HTTP {status}: {body.strip()[:600]}" if status else body
        if time.monotonic() >= deadline:
            raise Failure(f"/health/ready did not answer 200 in time; last answer: {last}")
        time.sleep(0.25)


def smoke_test(settings: Settings, release: str, deadline: float) -> None:
    """One chat turn through the running service, with the release's own command."""
    env = dict(os.environ, DIGITALME_RELEASE_DIR=str(settings.releases_dir / release))
    timeout = max(5.0, deadline - time.monotonic())
    result = run(
        [
            settings.admin_command,
            "smoke-test",
            "--url",
            settings.app_url,
            "--timeout",
            f"{timeout:.0f}",
        ],
        timeout=timeout + 30,
        env=env,
    )
    if result.returncode != 0:
        raise Failure(f"the smoke chat turn failed: {(result.stderr or result.stdout).strip()}")


def gate(settings: Settings, release: str, restarts_before: int, *, smoke: bool) -> float:
    """The health gate after a restart; its duration."""
    started = time.monotonic()
    deadline = started + settings.gate_timeout_seconds
    wait_ready(settings, restarts_before, deadline)
    if smoke:
        smoke_test(settings, release, deadline)
    return round(time.monotonic() - started, 3)


def point_current_at(settings: Settings, release: str) -> None:
    temporary = settings.root / f".current.{os.getpid()}"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(settings.releases_dir / release)
    os.replace(temporary, settings.current_link)


# --------------------------------------------------------------------------- commands


def plan(settings: Settings, release: str) -> dict[str, Any]:
    reasons: list[str] = []
    try:
        release_dir(settings, release)
    except Failure:
        return {
            "release": release,
            "current": current_release(settings),
            "pending_migrations": None,
            "changes": True,
            "reasons": [f"release {release} is not installed yet"],
        }
    current = current_release(settings)
    applied = database_schema(settings, release)
    pending = sorted(set(release_migrations(settings, release)) - set(applied or []))
    if pending:
        reasons.append(f"migrations {pending} to apply")
    if current != release:
        reasons.append(f"release {current or 'none'} -> {release}")
    last = last_success(settings)
    if (
        last is None
        or last.get("to_release") != release
        or last.get("fingerprint") != fingerprint(settings)
    ):
        reasons.append("settings, secrets or units changed since the service started")
    if unit_state(settings.service).get("ActiveState") != "active":
        reasons.append(f"{settings.service} is not running")
    return {
        "release": release,
        "current": current,
        "pending_migrations": pending,
        "changes": bool(reasons),
        "reasons": reasons,
    }


def prepare(settings: Settings, release: str, by: str, commit: str | None) -> dict[str, Any]:
    release_dir(settings, release)
    record = new_record(
        settings, "upgrade" if current_release(settings) else "install", release, by, commit
    )
    shipped = release_migrations(settings, release)
    applied = database_schema(settings, release)
    pending = sorted(set(shipped) - set(applied or []))
    record["schema_before"] = applied
    changed = False
    if pending:
        # An existing SQLite database: secure it first. (PostgreSQL's are the server's
        # backups; a rollback there keeps the data: docs/scale-out.md.)
        if applied is not None and settings.database_engine != "postgresql":
            record["litestream"] = sync_replica(settings)
            record["snapshot"] = as_service_user(
                settings,
                "snapshot",
                str(settings.db_path),
                str(settings.snapshot_dir / f"{record['id']}.db"),
            )
        migrate(settings, release, pending, shipped, record)
        changed = True
    record["migrations"] = [shipped[v] for v in pending]
    write_atomic(settings.pending_file, json.dumps(record, indent=2) + "\n", mode=0o600)
    return {
        "changed": changed,
        "migrations": record["migrations"],
        "snapshot": (record["snapshot"] or {}).get("path"),
        "litestream": record.get("litestream"),
    }


def sync_replica(settings: Settings) -> dict[str, Any] | None:
    """Make Litestream ship everything now; the replica's position. None without it."""
    if not settings.litestream_socket:
        return None
    why = None
    if not Path(settings.litestream_socket).exists():
        why = f"its control socket {settings.litestream_socket} does not exist (not running?)"
    else:
        result = run(
            [
                settings.litestream_binary,
                "sync",
                "-wait",
                "-json",
                "-timeout",
                f"{settings.sync_timeout_seconds:.0f}",
                "-socket",
                settings.litestream_socket,
                str(settings.db_path),
            ],
            timeout=settings.sync_timeout_seconds + 30,
        )
        if result.returncode == 0:
            with contextlib.suppress(ValueError):
                answer = json.loads(result.stdout)
                return {"txid": answer.get("txid"), "replica_txid": answer.get("replica_txid")}
        why = (result.stderr or result.stdout).strip() or f"exit {result.returncode}"
    if settings.require_replication:
        raise Failure(
            f"Litestream could not confirm the replica has everything: {why}. Nothing was "
            "changed. Fix replication first (docs/operations/backup-and-recovery.md), or "
            "upgrade on the local snapshot alone with -e digitalme_upgrade_require_replication"
            "=false."
        )
    print(f"warning: upgrading without a synced replica: {why}", file=sys.stderr)
    return {"error": why}


def migrate(
    settings: Settings,
    release: str,
    pending: list[int],
    shipped: dict[int, str],
    record: dict[str, Any],
) -> None:
    unit = settings.migrate_unit.format(release=release)
    started = time.time()
    result = run(["systemctl", "start", unit], timeout=3600)
    if result.returncode == 0:
        return
    names = ", ".join(shipped[v] for v in pending)
    record.update(
        result="failed", stage="migrate", reason=f"migrations {names} failed; nothing was applied"
    )
    if record.get("snapshot"):  # the database is unchanged: nothing to go back to
        Path(record["snapshot"]["path"]).unlink(missing_ok=True)
        record["snapshot"] = None
    save_record(settings, record)
    raise Failure(
        f"the migrations of release {release} ({names}) failed; the database is as it was "
        f"and release {record['from_release'] or '(none)'} keeps serving. Journal of {unit}:\n"
        f"{journal(unit, started)}"
    )


def switch(
    settings: Settings, release: str, by: str, commit: str | None, *, smoke: bool
) -> dict[str, Any]:
    release_dir(settings, release)
    previous = current_release(settings)
    record = pending_record(settings, release) or new_record(
        settings, "upgrade" if previous else "install", release, by, commit
    )
    state = unit_state(settings.service).get("ActiveState")
    last = last_success(settings)
    print_now = fingerprint(settings)
    if (
        previous == release
        and state == "active"
        and last is not None
        and last.get("to_release") == release
        and last.get("fingerprint") == print_now
        and not record["migrations"]
    ):
        settings.pending_file.unlink(missing_ok=True)
        return {"changed": False, "release": release}
    if previous == release:
        record["kind"] = "restart"
    record["fingerprint"] = print_now
    point_current_at(settings, release)
    restarted = time.time()
    try:
        before = restart_service(settings)
        record["restart"] = {
            "at": round(restarted, 3),
            "seconds": round(time.time() - restarted, 3),
        }
        record["gate_seconds"] = gate(settings, release, before, smoke=smoke)
    except Failure as failed:
        record.update(result="failed", stage="gate", reason=str(failed))
        record["journal"] = journal(settings.service, restarted)
        if previous is None or previous == release:
            save_record(settings, record)
            raise Failure(
                f"release {release} failed its health gate: {failed}\n"
                f"Journal of {settings.service}:\n{record['journal']}"
            ) from None
        rolled = roll_back_code(settings, previous)
        record.update(result="rolled_back", rolled_back_to=previous, rollback_seconds=rolled)
        save_record(settings, record)
        schema = ""
        if record["migrations"]:
            schema = (
                f" Its migrations ({', '.join(record['migrations'])}) stay applied: "
                f"{previous} runs on them. To put the data back as it was before "
                "the upgrade: playbooks/rollback.yml -e rollback_data=true."
            )
        raise Failure(
            f"release {release} failed its health gate: {failed}\n"
            f"Rolled back to {previous}, ready again in {rolled:.1f}s.{schema}\n"
            f"Journal of {settings.service} since the switch:\n{record['journal']}"
        ) from None
    record["result"] = "success"
    save_record(settings, record)
    pruned = prune(settings)
    return {
        "changed": True,
        "kind": record["kind"],
        "release": release,
        "from": previous,
        "gate_seconds": record["gate_seconds"],
        "duration_seconds": record["duration_seconds"],
        "pruned": pruned,
    }


def roll_back_code(settings: Settings, release: str) -> float:
    """Back to an installed release after a failed gate; seconds until it was ready."""
    started = time.monotonic()
    point_current_at(settings, release)
    try:
        before = restart_service(settings)
        wait_ready(settings, before, time.monotonic() + settings.gate_timeout_seconds)
    except Failure as failed:
        raise Failure(
            f"ROLLING BACK TO {release} FAILED TOO: {failed}\nJournal:\n"
            f"{journal(settings.service, time.time() - 120)}"
        ) from None
    return round(time.monotonic() - started, 3)


def rollback_target(settings: Settings, requested: str | None) -> str:
    current = current_release(settings)
    if requested:
        release_dir(settings, requested)
        return requested
    for record in reversed(history(settings)):
        if (
            record.get("result") == "success"
            and record.get("to_release") == current
            and record.get("from_release")
            and record["from_release"] != current
        ):
            release_dir(settings, record["from_release"])
            return str(record["from_release"])
    raise Failure(
        f"no earlier release is recorded for {current}; name one (installed: "
        f"{', '.join(installed_releases(settings)) or 'none'})"
    )


def snapshot_for(settings: Settings, target_versions: set[int]) -> dict[str, Any] | None:
    """The newest snapshot of a database whose schema the target release knows."""
    for record in reversed(history(settings)):
        snapshot = record.get("snapshot")
        if (
            record.get("result") in ("success", "rolled_back")
            and snapshot
            and set(snapshot.get("applied", [])) <= target_versions
            and Path(snapshot["path"]).exists()
        ):
            return dict(
                snapshot,
                deploy=record["id"],
                taken_before=record["to_release"],
                taken_at=record["started_at"],
            )
    return None


def rollback(
    settings: Settings, requested: str | None, data: str | None, by: str
) -> dict[str, Any]:
    target = rollback_target(settings, requested)
    current = current_release(settings)
    known = set(release_migrations(settings, target))
    applied = set(database_schema(settings, target) or [])
    unknown = sorted(applied - known)
    record = new_record(settings, "rollback", target, by)
    record["data"] = "unchanged"
    snapshot = None
    if unknown:
        snapshot = snapshot_for(settings, known)
        if data is None:
            raise Failure(refusal(settings, target, current, unknown, snapshot))
        record["data"] = data
    elif data == "restore":
        raise Failure(
            f"release {target} knows every migration of the database: there is "
            "no schema to roll back. Roll back the code alone (no rollback_data)."
        )
    if data == "restore":
        if snapshot is None:
            raise Failure(
                f"no snapshot on this host holds a database release {target} "
                "knows (they are pruned with old releases); restore from the "
                "replica at a point in time instead (playbooks/restore.yml)"
            )
        record["lost_rows"] = as_service_user(
            settings, "newer-rows", str(settings.db_path), json.dumps(snapshot["highest_rowids"])
        )
        record["snapshot"] = snapshot
        record["replaced_database"] = restore_snapshot(settings, snapshot, target, record)
    else:
        point_current_at(settings, target)
    restarted = time.time()
    try:
        before = restart_service(settings)
        record["gate_seconds"] = gate(settings, target, before, smoke=False)
    except Failure as failed:
        record.update(result="failed", stage="gate", reason=str(failed))
        save_record(settings, record)
        raise Failure(
            f"release {target} did not become ready after the rollback: {failed}\n"
            f"Journal:\n{journal(settings.service, restarted)}"
        ) from None
    record["result"] = "success"
    record["fingerprint"] = fingerprint(settings)
    save_record(settings, record)
    return {
        "changed": True,
        "release": target,
        "from": current,
        "data": record["data"],
        "lost_rows": record.get("lost_rows"),
        "gate_seconds": record["gate_seconds"],
        "duration_seconds": record["duration_seconds"],
    }


def refusal(
    settings: Settings,
    target: str,
    current: str | None,
    unknown: list[int],
    snapshot: dict[str, Any] | None,
) -> str:
    names = release_migrations(settings, current) if current else {}
    listed = ", ".join(names.get(version, f"{version:04d}") for version in unknown)
    text = (
        f"release {current} applied migrations ({listed}) that release {target} does not "
        "know. Say what to do with the data:\n"
        f"  rollback_data=false: keep it; {target} runs on the newer schema (migrations "
        "only add, docs/maintenance.md).\n"
    )
    if snapshot is None:
        return text + (
            "  rollback_data=true: not possible, no snapshot of the data before "
            "those migrations is left on this host."
        )
    lost = as_service_user(
        settings, "newer-rows", str(settings.db_path), json.dumps(snapshot["highest_rowids"])
    )
    return text + (
        f"  rollback_data=true: put back the snapshot taken before the upgrade to "
        f"{snapshot['taken_before']} at {snapshot['taken_at']}; this LOSES what was written "
        f"since: {lost['messages']} messages, {lost['conversations']} conversations and "
        f"{lost['inbox']} webhook deliveries (the replaced database is kept aside)."
    )


def restore_snapshot(
    settings: Settings, snapshot: dict[str, Any], target: str, record: dict[str, Any]
) -> str:
    """Swap the snapshot in with everything that uses the database stopped; the folder the
    replaced files went to."""
    aside = settings.db_path.parent / f"before-rollback-{record['id']}"
    # The socket too: a connection would start the service on a database being swapped.
    units = [settings.socket, settings.service] + (
        [settings.litestream_unit] if settings.litestream_unit else []
    )
    systemctl("stop", *units)
    aside.mkdir(mode=0o750)
    if settings.user and os.geteuid() == 0:
        shutil.chown(aside, settings.user, settings.group)
    for suffix in ("", "-wal", "-shm"):
        live = Path(f"{settings.db_path}{suffix}")
        if live.exists():
            os.replace(live, aside / live.name)
    partial = settings.db_path.with_name(f".{settings.db_path.name}.restoring")
    shutil.copyfile(snapshot["path"], partial)
    os.chmod(partial, 0o640)
    if settings.user and os.geteuid() == 0:
        shutil.chown(partial, settings.user, settings.group)
    os.replace(partial, settings.db_path)
    if settings.litestream_unit and settings.litestream_admin:
        # Litestream's local state describes the replaced database. Reset, it ships the
        # restored one as a full snapshot continuing the replica's transaction ids: restores
        # give the restored database plus what follows, earlier points in time still work.
        run([settings.litestream_admin, "reset", str(settings.db_path)], check=True)
    point_current_at(settings, target)
    if settings.litestream_unit:
        systemctl("start", settings.litestream_unit)
    systemctl("start", settings.socket)
    return str(aside)


def prune(settings: Settings) -> list[str]:
    """Keep the current release and the most recently used ones (keep_releases in all),
    with their packages; and the snapshots of the deploys into the releases kept."""
    keep: list[str] = []
    current = current_release(settings)
    if current:
        keep.append(current)
    for record in reversed(history(settings)):
        for name in (record.get("to_release"), record.get("from_release")):
            if name and name not in keep and len(keep) < settings.keep_releases:
                keep.append(name)
    removed = []
    for release in installed_releases(settings):
        if release not in keep:
            if settings.container_engine and settings.container_image:
                # Its image too (nothing runs it: the current release is kept).
                run(
                    [
                        settings.container_engine,
                        "image",
                        "rm",
                        "--ignore",
                        f"{settings.container_image}:{release}",
                    ],
                    timeout=120,
                    check=True,
                )
            shutil.rmtree(settings.releases_dir / release)
            (settings.root / "packages" / f"{release}.tar").unlink(missing_ok=True)
            removed.append(release)
    wanted = {
        Path(r["snapshot"]["path"]).name
        for r in history(settings)
        if r.get("snapshot") and (r.get("from_release") in keep)
    }
    if settings.snapshot_dir.is_dir():
        for path in settings.snapshot_dir.glob("*.db"):
            if path.name not in wanted:
                path.unlink()
    return removed


def status(settings: Settings) -> dict[str, Any]:
    records = history(settings)
    holder = lock_holder(settings)
    return {
        "current": current_release(settings),
        "installed": installed_releases(settings),
        "service": unit_state(settings.service).get("ActiveState"),
        "socket": unit_state(settings.socket).get("ActiveState"),
        "lock": holder and {k: v for k, v in holder.items() if k != "token"},
        "last_deploys": [
            {
                k: r.get(k)
                for k in (
                    "id",
                    "kind",
                    "result",
                    "from_release",
                    "to_release",
                    "by",
                    "duration_seconds",
                    "gate_seconds",
                    "reason",
                )
            }
            for r in records[-5:]
        ],
    }


def print_status(report: dict[str, Any]) -> None:
    print(
        f"current release: {report['current'] or 'none'} "
        f"(service {report['service']}, socket {report['socket']})"
    )
    for release in report["installed"]:
        print(f"  {'*' if release == report['current'] else ' '} {release}")
    if report["lock"]:
        print(f"deploy lock: held by {describe_holder(report['lock'])}")
    print("last deploys:" if report["last_deploys"] else "no deploy recorded yet")
    for r in report["last_deploys"]:
        print(
            f"  {r['id']}  {r['kind']:<8} {r['result']:<11} {r['from_release'] or '-'} -> "
            f"{r['to_release']}  by {r['by']}  {r['duration_seconds']}s"
            + (f"  ({r['reason'].splitlines()[0][:100]})" if r.get("reason") else "")
        )


# --------------------------------------------------------------------------- main


def default_by() -> str:
    user = os.environ.get("SUDO_USER") or pwd.getpwuid(os.getuid()).pw_name
    return f"{user}@{socket.gethostname()}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="digitalme-deploy",
        description=__doc__.split("\n\n")[0],
        epilog="See docs/operations/upgrades.md (on the host: /usr/share/doc/digitalme).",
    )
    parser.add_argument(
        "--settings",
        default=SETTINGS_FILE,
        help=f"JSON settings written by the role (default {SETTINGS_FILE})",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    lock = sub.add_parser("lock", help="take, release, show or break the deploy lock")
    lock.add_argument("action", choices=("acquire", "release", "show", "break"))
    lock.add_argument("--holder", help="who takes it (acquire), e.g. alice@laptop: upgrade.yml")
    lock.add_argument("--token", help="the token acquire printed (release)")
    lock.add_argument("--wait", type=float, default=0, help="seconds to wait for it (acquire)")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--lock",
            metavar="TOKEN",
            help="the caller's deploy lock; without it the command takes its own",
        )
        p.add_argument(
            "--lock-wait",
            type=float,
            default=0,
            help="without --lock: seconds to wait for another deploy's lock",
        )
        p.add_argument("--by", default=None, help="who deploys (recorded); default user@host")

    p = sub.add_parser("plan", help="what prepare and switch would do (read-only)")
    p.add_argument("release")
    p = sub.add_parser("prepare", help="secure the data and run the release's migrations")
    p.add_argument("release")
    p.add_argument("--commit", help="the source commit (recorded)")
    common(p)
    p = sub.add_parser("switch", help="make the release the running one, behind the gate")
    p.add_argument("release")
    p.add_argument("--commit", help="the source commit (recorded)")
    p.add_argument(
        "--smoke",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a smoke chat turn in the gate (default: the settings' smoke_chat)",
    )
    p.add_argument("--gate-timeout", type=float, help="seconds the gate may take")
    common(p)
    p = sub.add_parser("rollback", help="back to the previous release (or --to RELEASE)")
    p.add_argument("--to", dest="target", help="the release to go back to")
    p.add_argument(
        "--data",
        choices=("keep", "restore"),
        help="when the schema differs: keep the data, or restore the snapshot",
    )
    common(p)
    p = sub.add_parser("status", help="releases, the running one, the last deploys, the lock")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("internal", help=argparse.SUPPRESS)
    p.add_argument("what", choices=("schema", "snapshot", "newer-rows"))
    p.add_argument("arguments", nargs="*")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "internal":
            handlers: dict[str, Callable[..., Any]] = {
                "schema": internal_schema,
                "snapshot": internal_snapshot,
                "newer-rows": internal_newer_rows,
            }
            print(json.dumps(handlers[args.what](*args.arguments)))
            return 0
        settings = Settings.load(args.settings)
        if getattr(args, "gate_timeout", None):
            settings.gate_timeout_seconds = args.gate_timeout
        by = getattr(args, "by", None) or default_by()
        if args.command == "lock":
            return lock_command(settings, args)
        if args.command == "status":
            report = status(settings)
            if args.json:
                print(json.dumps(report, indent=2))
            else:
                print_status(report)
            return 0
        if args.command == "plan":
            print(json.dumps(plan(settings, check_release_name(args.release))))
            return 0
        with locked(settings, args.lock, by, args.command, args.lock_wait):
            if args.command == "prepare":
                answer = prepare(settings, check_release_name(args.release), by, args.commit)
            elif args.command == "switch":
                smoke = settings.smoke_chat if args.smoke is None else args.smoke
                answer = switch(
                    settings, check_release_name(args.release), by, args.commit, smoke=smoke
                )
            else:
                answer = rollback(settings, args.target, args.data, by)
        print(json.dumps(answer))
        return 0
    except Failure as failed:
        print(f"digitalme-deploy: {failed}", file=sys.stderr)
        return EXIT_REFUSED if "Say what to do with the data" in str(failed) else 1
    except KeyboardInterrupt:
        return 130


def lock_command(settings: Settings, args: argparse.Namespace) -> int:
    if args.action == "acquire":
        if not args.holder:
            raise Failure("lock acquire needs --holder (who is deploying, from where)")
        print(json.dumps({"token": acquire_lock(settings, args.holder, args.wait)}))
    elif args.action == "release":
        if not args.token:
            raise Failure("lock release needs --token")
        release_lock(settings, args.token)
    elif args.action == "show":
        holder = lock_holder(settings)
        print(f"held by {describe_holder(holder)}" if holder else "not held")
    else:
        holder = lock_holder(settings)
        settings.lock_file.unlink(missing_ok=True)
        print(
            f"broke the lock held by {describe_holder(holder)}"
            if holder
            else "the lock was not held"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
