"""Shared helpers of the postgresql scenario's testinfra checks.

Two hosts: `db` (the role) and `app`, the only address in postgresql_app_clients. The
app's password is a throw-away value the scenario generated on the controller
(molecule.yml); it reaches the hosts only in a 0600 libpq password file copied from the
controller, never in a command line.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest
from verifier import other_host

TLS_DIR = "/etc/postgresql/digitalme-tls"
DATABASE = "digitalme"
USER = "digitalme"
PORT = 5432
CA_ON_CLIENT = "/root/digitalme-ca.crt"
PGPASS_ON_HOST = "/root/.pgpass-molecule"
WRONG_PGPASS_ON_HOST = "/root/.pgpass-molecule-wrong"
UNITS = ("postgresql@*-main", "prometheus-postgres-exporter")


def app_password() -> str:
    """The scenario's throw-away password (made by the password lookup of molecule.yml)."""
    path = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "postgresql_app_password"
    return path.read_text().split()[0]


def install_client_files(host, with_ca: bool = True) -> None:
    """libpq password files (the right password, and a wrong one), each written on the
    controller with mode 0600 and copied: their content never appears in a process's
    arguments; and the CA certificate, read from db (on app, converge.yml installed it)."""
    ca = other_host("db").file(f"{TLS_DIR}/ca.crt").content_string
    ephemeral = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"])
    files = {
        "digitalme-ca.crt": (ca, CA_ON_CLIENT, "0644"),
        "pgpass": (f"*:*:{DATABASE}:{USER}:{app_password()}\n", PGPASS_ON_HOST, "0600"),
        "pgpass-wrong": (
            f"*:*:{DATABASE}:{USER}:wrong-password-for-the-test\n",
            WRONG_PGPASS_ON_HOST,
            "0600",
        ),
    }
    if not with_ca:
        del files["digitalme-ca.crt"]
    for name, (content, dest, mode) in files.items():
        local = ephemeral / f"client-{name}"
        local.touch(mode=0o600)
        local.write_text(content)
        result = host.ansible("copy", f"src={local} dest={dest} mode={mode}", check=False)
        assert not result.get("failed"), result.get("msg")


def psql(host, conninfo: str, sql: str = "SELECT current_user", passfile: str = PGPASS_ON_HOST):
    """psql on `host` with a libpq connection string; the password from a password file."""
    return host.run(
        f"PGPASSFILE={passfile} PGCONNECT_TIMEOUT=10 psql -XAtw "
        f"{shlex.quote(conninfo)} -c {shlex.quote(sql)}"
    )


def conninfo(address: str, sslmode: str = "verify-full", **extra: str) -> str:
    params = {
        "host": address,
        "port": str(PORT),
        "dbname": DATABASE,
        "user": USER,
        "sslmode": sslmode,
        "sslrootcert": CA_ON_CLIENT,
        **extra,
    }
    return " ".join(f"{key}={value}" for key, value in params.items())


@pytest.fixture
def journal(host):
    """The journal of the units involved, to show in a failure message."""
    units = " ".join(f"-u '{unit}'" for unit in UNITS)
    return lambda: "\n--- journal ---\n" + host.run(f"journalctl {units} --no-pager -n 80").stdout
