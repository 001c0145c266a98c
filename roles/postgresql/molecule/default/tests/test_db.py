"""Testinfra checks of the database host `db`."""

from __future__ import annotations

import re
import time

import pytest
import verifier
from conftest import (
    DATABASE,
    PORT,
    TLS_DIR,
    USER,
    app_password,
    conninfo,
    install_client_files,
    psql,
)
from verifier import ansible_playbook, changed_tasks

testinfra_hosts = ["db"]

VERSIONS = {"12": "15", "13": "17"}


@pytest.fixture(scope="module")
def version(host) -> str:
    major = host.system_info.release.split(".")[0]
    return VERSIONS[major]


@pytest.fixture(scope="module")
def address(host) -> str:
    return host.ansible.get_variables()["ansible_host"]


def sql(host, query: str) -> str:
    """A query as postgres over the socket (peer), one value per line."""
    result = host.run(f'runuser -u postgres -- psql -XAtq -d postgres -c "{query}"')
    assert result.rc == 0, result.stderr
    return result.stdout.strip()


def test_debian_package_of_the_release_runs_its_main_cluster(host, version, journal):
    assert host.package(f"postgresql-{version}").is_installed
    clusters = host.check_output("pg_lsclusters --no-header").splitlines()
    assert [line.split()[:4] for line in clusters] == [[version, "main", str(PORT), "online"]]
    service = host.service(f"postgresql@{version}-main")
    assert service.is_enabled
    assert service.is_running, journal()
    failed = host.run("systemctl --failed --plain --no-legend").stdout
    assert failed.strip() == "", failed


def test_settings_are_in_conf_d_and_debian_postgresql_conf_is_untouched(host, version, address):
    conf = host.file(f"/etc/postgresql/{version}/main/conf.d/digitalme.conf")
    assert (conf.user, conf.group, conf.mode) == ("postgres", "postgres", 0o644)
    assert f"listen_addresses = 'localhost,{address}'" in conf.content_string
    verify = host.run(f"dpkg --verify postgresql-{version} postgresql-common")
    assert "postgresql.conf" not in verify.stdout, verify.stdout
    settings = dict(
        line.split("|")
        for line in sql(
            host,
            (
                "SELECT name, setting FROM pg_settings WHERE name IN ('ssl', 'ssl_cert_file', "
                "'ssl_key_file', 'ssl_min_protocol_version', 'password_encryption', "
                "'listen_addresses', 'port')"
            ),
        ).splitlines()
    )
    assert settings == {
        "listen_addresses": f"localhost,{address}",
        "password_encryption": "scram-sha-256",
        "port": str(PORT),
        "ssl": "on",
        "ssl_cert_file": f"{TLS_DIR}/server.crt",
        "ssl_key_file": f"{TLS_DIR}/server.key",
        "ssl_min_protocol_version": "TLSv1.2",
    }
    assert sql(host, "SELECT count(*) FROM pg_settings WHERE pending_restart") == "0"


def test_listens_on_its_address_and_loopback_only(host, address, journal):
    listeners = {
        field
        for field in host.check_output(f"ss -Htln 'sport = :{PORT}'").split()
        if field.endswith(f":{PORT}")
    }
    assert f"{address}:{PORT}" in listeners, journal()
    assert f"127.0.0.1:{PORT}" in listeners
    assert listeners <= {f"{address}:{PORT}", f"127.0.0.1:{PORT}", f"[::1]:{PORT}"}, listeners


def test_pg_hba_conf_is_the_roles_own(host, version):
    hba = host.file(f"/etc/postgresql/{version}/main/pg_hba.conf")
    assert (hba.user, hba.group, hba.mode) == ("postgres", "postgres", 0o640)
    rules = sql(
        host,
        (
            "SELECT type, array_to_string(database, ','), array_to_string(user_name, ','), "
            "coalesce(address, ''), coalesce(netmask, ''), auth_method "
            "FROM pg_hba_file_rules ORDER BY line_number"
        ),
    ).splitlines()
    client = verifier.address("app")
    assert rules == [
        "local|all|postgres|||peer",
        "local|postgres|prometheus|||peer",
        "hostnossl|all|all|0.0.0.0|0.0.0.0|reject",
        "hostnossl|all|all|::|::|reject",
        f"hostssl|{DATABASE}|{USER}|{client}|255.255.255.255|scram-sha-256",
        "host|all|all|0.0.0.0|0.0.0.0|reject",
        "host|all|all|::|::|reject",
    ]


def test_app_role_owns_the_database_and_has_no_other_power(host):
    role = sql(
        host,
        (
            "SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls, "
            f"rolcanlogin, left(rolpassword, 14) FROM pg_authid WHERE rolname = '{USER}'"
        ),
    )
    assert role == "f|f|f|f|f|t|SCRAM-SHA-256$"
    database = sql(
        host,
        (
            "SELECT pg_get_userbyid(datdba), pg_encoding_to_char(encoding), datcollate, datctype "
            f"FROM pg_database WHERE datname = '{DATABASE}'"
        ),
    )
    assert database == f"{USER}|UTF8|C.UTF-8|C.UTF-8"
    # PUBLIC may not connect: only the owner (and superusers) may.
    assert sql(host, f"SELECT has_database_privilege('prometheus', '{DATABASE}', 'CONNECT')") == "f"


def test_tls_files_have_the_modes_postgresql_and_the_clients_need(host):
    expected = {
        "ca.crt": ("root", "root", 0o644),
        "ca.key": ("root", "root", 0o600),
        "server.crt": ("root", "root", 0o644),
        "server.key": ("root", "postgres", 0o640),
    }
    for name, owner in expected.items():
        file = host.file(f"{TLS_DIR}/{name}")
        assert (file.user, file.group, file.mode) == owner, name
    assert host.file(TLS_DIR).mode == 0o755


def test_server_certificate_is_signed_by_the_ca_for_the_listen_address(host, address):
    cert = f"{TLS_DIR}/server.crt"
    san = host.check_output(f"openssl x509 -in {cert} -noout -ext subjectAltName")
    assert f"IP Address:{address}, DNS:db" in san, san
    verify = host.run(f"openssl verify -CAfile {TLS_DIR}/ca.crt -purpose sslserver {cert}")
    assert verify.rc == 0 and verify.stdout.strip().endswith(": OK"), verify.stdout + verify.stderr
    # Valid for more than the 30 days before renewal.
    assert host.run(f"openssl x509 -in {cert} -noout -checkend {31 * 86400}").rc == 0
    ca = host.check_output(f"openssl x509 -in {TLS_DIR}/ca.crt -noout -ext basicConstraints")
    assert "CA:TRUE" in ca


def test_a_connection_from_an_address_not_in_the_client_list_is_refused(host, address):
    """db's own network address is not a client: even over TLS with the right password."""
    install_client_files(host)
    refused = psql(host, conninfo(address))
    assert refused.rc != 0
    assert (
        f'pg_hba.conf rejects connection for host "{address}", user "{USER}", '
        f'database "{DATABASE}", SSL encryption'
    ) in refused.stderr, refused.stderr


def test_the_exporter_serves_pg_up_on_loopback_only(host, journal):
    service = host.service("prometheus-postgres-exporter")
    assert service.is_enabled
    assert service.is_running, journal()
    listeners = [
        field
        for field in host.check_output("ss -Htln 'sport = :9187'").split()
        if field.endswith(":9187")
    ]
    assert listeners == ["127.0.0.1:9187"]
    page = ""
    for _ in range(10):
        page = host.check_output(
            'python3 -c "import urllib.request; print(urllib.request.urlopen('
            "'http://127.0.0.1:9187/metrics', timeout=10).read().decode())\""
        )
        if re.search(r"^pg_up 1$", page, re.M):
            break
        time.sleep(1)
    assert re.search(r"^pg_up 1$", page, re.M), journal()
    environment = host.file("/etc/default/prometheus-postgres-exporter")
    assert environment.mode == 0o640
    data_source = re.search(r"^DATA_SOURCE_NAME='([^']*)'$", environment.content_string, re.M)[1]
    assert "password=" not in data_source and "@" not in data_source  # peer, no secret
    role = sql(
        host,
        (
            "SELECT rolsuper, pg_has_role('prometheus', 'pg_monitor', 'MEMBER') "
            "FROM pg_roles WHERE rolname = 'prometheus'"
        ),
    )
    assert role == "f|t"


def test_a_client_list_change_reloads_without_a_restart(host, address):
    """db's own address added to the clients: it can connect, and the server was reloaded,
    not restarted. Then the scenario's list again: refused again."""
    client = verifier.address("app")
    started = sql(host, "SELECT pg_postmaster_start_time()")
    loaded = sql(host, "SELECT pg_conf_load_time()")
    rc, output = ansible_playbook("-e", f'{{"postgresql_app_clients": ["{client}", "{address}"]}}')
    assert rc == 0, output[-4000:]
    changed = changed_tasks(output)
    assert "postgresql : Reload the PostgreSQL cluster" in changed, changed
    assert "postgresql : Restart the PostgreSQL cluster" not in changed, changed
    assert app_password() not in output
    assert sql(host, "SELECT pg_postmaster_start_time()") == started
    assert sql(host, "SELECT pg_conf_load_time()") != loaded
    install_client_files(host)
    allowed = psql(host, conninfo(address))
    assert allowed.rc == 0 and allowed.stdout.strip() == USER, allowed.stderr

    rc, output = ansible_playbook()
    assert rc == 0, output[-4000:]
    assert sql(host, "SELECT pg_postmaster_start_time()") == started
    refused = psql(host, conninfo(address))
    assert (
        f'pg_hba.conf rejects connection for host "{address}", user "{USER}", '
        f'database "{DATABASE}", SSL encryption'
    ) in refused.stderr, refused.stderr


def test_the_password_is_in_no_log_on_the_host(host, version):
    """Neither the server's log nor the journal holds the password (read here, not grepped
    on the host, so that it is never a command's argument)."""
    secret = app_password()
    log = host.file(f"/var/log/postgresql/postgresql-{version}-main.log").content_string
    assert "connection authorized" in log  # log_connections is on: the log is the right one
    assert secret not in log
    assert secret not in host.check_output("journalctl --no-pager -q")
