"""A throw-away PostgreSQL cluster for the tests, from Debian's ``postgresql`` package.

:class:`Cluster` runs ``initdb`` and ``pg_ctl`` from ``/usr/lib/postgresql/<version>/bin``
(the newest installed) in a temporary directory, as ``nobody`` when the tests run as root
(PostgreSQL refuses to run as root). It listens on no TCP port at all, only on a Unix
socket in that directory, so parallel test runs never race for a port; ``trust``
authentication, since only this machine's users reach the socket. Durability is off
(``fsync``, ``synchronous_commit``, ``full_page_writes``): the cluster dies with the tests.

A test run that is killed cannot stop its cluster; the next one does (:func:`reap_orphans`:
a cluster whose owning process is gone is stopped and removed).

Each test gets a database of its own, created from a template (:meth:`Cluster.database`):
copying a migrated template takes a few milliseconds, migrating takes much longer.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg

PG_ROOT = Path("/usr/lib/postgresql")
PREFIX = "digitalme-pg-"
OWNER_FILE = "owner.pid"
SUPERUSER = "postgres"
# A role that must log in with its password (scram-sha-256), for the tests of
# DIGITALME_DATABASE_PASSWORD; every other local connection is trusted.
PASSWORD_USER = "digitalme_app"
PASSWORD = "app-password-for-tests"
SETTINGS = {
    "listen_addresses": "''",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "32MB",
    "log_min_messages": "warning",
}


def bin_dir() -> Path | None:
    """The newest installed PostgreSQL's bin directory, or None."""
    found = sorted(
        (p for p in PG_ROOT.glob("*/bin") if (p / "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    return found[-1] if found else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_orphans(bin: Path) -> None:
    """Stop and remove the clusters of test runs that died without stopping theirs."""
    for directory in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        try:
            owner = int((directory / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if _alive(owner):
            continue
        if (directory / "data" / "postmaster.pid").exists():
            command = [
                str(bin / "pg_ctl"),
                "-D",
                str(directory / "data"),
                "-m",
                "immediate",
                "-w",
                "stop",
            ]
            if os.geteuid() == 0:
                command = ["runuser", "-u", "nobody", "--", *command]
            subprocess.run(command, capture_output=True, timeout=60, check=False)
        shutil.rmtree(directory, ignore_errors=True)


class Cluster:
    def __init__(self, bin: Path) -> None:
        self.bin = bin
        reap_orphans(bin)
        self.dir = Path(tempfile.mkdtemp(prefix=PREFIX))
        (self.dir / OWNER_FILE).write_text(str(os.getpid()))
        self.data = self.dir / "data"
        self._user: str | None = None
        if os.geteuid() == 0:
            self._user = "nobody"
            os.chown(self.dir, pwd.getpwnam(self._user).pw_uid, -1)
        self._names = itertools.count(1)

    def _run(self, *argv: str) -> None:
        command = [*(["runuser", "-u", self._user, "--"] if self._user else []), *argv]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=self.dir)
        if result.returncode != 0:
            log = self.dir / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(argv)} failed:\n{result.stdout}{result.stderr}{tail}")

    def start(self) -> None:
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        )
        options = " ".join(f"-c {name}={value}" for name, value in SETTINGS.items())
        hba = self.data / "pg_hba.conf"
        rules = hba.read_text()
        hba.write_text(f"local all {PASSWORD_USER} scram-sha-256\n{rules}")
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.dir / "server.log"),
            "-w",
            "-o",
            f"{options} -c unix_socket_directories={self.dir}",
            "start",
        )
        with self.admin() as conn:
            conn.execute(f"CREATE ROLE {PASSWORD_USER} LOGIN PASSWORD '{PASSWORD}'")

    def stop(self) -> None:
        try:
            self._run(
                str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"
            )
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, dbname: str, user: str = SUPERUSER) -> str:
        return f"postgresql://{user}@/{dbname}?host={self.dir}"

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.url("postgres"), autocommit=True)

    def database(self, template: str = "template1") -> str:
        """A new, empty or templated, database; returns its name."""
        name = f"test_{next(self._names)}"
        with self.admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY')
        return name

    def drop(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
