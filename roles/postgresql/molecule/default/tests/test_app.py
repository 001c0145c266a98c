"""The app host's view: TLS with sslmode=verify-full against the role's CA, the password,
and nothing without TLS."""

from __future__ import annotations

import pytest
from conftest import (
    CA_ON_CLIENT,
    TLS_DIR,
    USER,
    WRONG_PGPASS_ON_HOST,
    conninfo,
    install_client_files,
    psql,
)
from verifier import address, other_host

testinfra_hosts = ["app"]


@pytest.fixture(scope="module", autouse=True)
def client_files(host):
    """The password files; the CA certificate is the one converge.yml installed."""
    install_client_files(host, with_ca=False)


def test_the_ca_certificate_reached_the_app_host_through_the_published_fact(host):
    """converge.yml's second play wrote hostvars[db].postgresql_server.ca_certificate."""
    written = host.file(CA_ON_CLIENT)
    assert written.content_string == other_host("db").file(f"{TLS_DIR}/ca.crt").content_string


def test_app_connects_with_verify_full_over_tls_with_the_password(host):
    result = psql(
        host,
        conninfo(address("db")),
        ("SELECT current_user, ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"),
    )
    assert result.rc == 0, result.stderr
    user, ssl, version = result.stdout.strip().split("|")
    assert (user, ssl) == (USER, "t")
    assert version in ("TLSv1.2", "TLSv1.3")


def test_the_certificate_also_names_the_host(host):
    """verify-full by name: `db` is in the SAN too (the sandbox's /etc/hosts resolves it)."""
    result = psql(host, conninfo("db"))
    assert result.rc == 0 and result.stdout.strip() == USER, result.stderr


def test_verify_full_refuses_a_name_the_certificate_does_not_hold(host):
    """The check is real: the same server under another name is refused by the client."""
    result = psql(host, conninfo("not-the-database", hostaddr=address("db")))
    assert result.rc != 0
    assert 'does not match host name "not-the-database"' in result.stderr, result.stderr


def test_a_connection_without_tls_is_refused_by_pg_hba(host):
    result = psql(host, conninfo(address("db"), sslmode="disable"))
    assert result.rc != 0
    assert "no encryption" in result.stderr and "pg_hba.conf rejects connection" in result.stderr, (
        result.stderr
    )


def test_a_wrong_password_is_refused(host):
    result = psql(host, conninfo(address("db")), passfile=WRONG_PGPASS_ON_HOST)
    assert result.rc != 0
    assert f'password authentication failed for user "{USER}"' in result.stderr, result.stderr


def test_the_app_role_cannot_create_roles_or_databases(host):
    for statement in ("CREATE ROLE intruder", "CREATE DATABASE other"):
        result = psql(host, conninfo(address("db")), statement)
        assert result.rc != 0 and "permission denied" in result.stderr, (statement, result.stderr)
    # It owns its database: the app's migrations create its tables.
    result = psql(
        host,
        conninfo(address("db")),
        "CREATE TABLE molecule_probe (id int); DROP TABLE molecule_probe",
    )
    assert result.rc == 0, result.stderr


def test_only_the_app_database_is_open_to_it(host):
    result = psql(host, conninfo(address("db"), dbname="postgres"))
    assert result.rc != 0
    assert (
        "pg_hba.conf rejects connection for host" in result.stderr
        and 'database "postgres", SSL encryption' in result.stderr
    ), result.stderr
