"""Changes an operator makes on a running server: a new password, a new listen address,
a certificate near its end. Last (file order): each converges with other values, then
with the scenario's own again."""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path

import verifier
from conftest import (
    DATABASE,
    PGPASS_ON_HOST,
    TLS_DIR,
    USER,
    app_password,
    conninfo,
    psql,
)
from verifier import ansible_playbook, changed_tasks, other_host

testinfra_hosts = ["db"]


def extra_vars_file(name: str, values: dict) -> str:
    """-e @FILE: values (a password) that must not appear in a command line."""
    path = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / f"extra-{name}.json"
    path.touch(mode=0o600)
    path.write_text(json.dumps(values))
    return f"@{path}"


def start_time(host) -> str:
    return host.check_output(
        "runuser -u postgres -- psql -XAtq -d postgres -c 'SELECT pg_postmaster_start_time()'"
    )


def test_password_rotation_takes_effect_at_the_next_run():
    """The README's rotation: the vault's new value, one run; the old one stops working."""
    app = other_host("app")
    address = verifier.address("db")
    new = "rotated-throwaway-" + secrets.token_hex(12)
    rc, output = ansible_playbook(
        "-e", extra_vars_file("password", {"postgresql_app_password": new})
    )
    assert rc == 0, output[-4000:]
    assert new not in output and app_password() not in output
    old = psql(app, conninfo(address))
    assert "password authentication failed" in old.stderr, old.stderr
    ephemeral = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"])
    pgpass = ephemeral / "client-pgpass-rotated"
    pgpass.touch(mode=0o600)
    pgpass.write_text(f"*:*:{DATABASE}:{USER}:{new}\n")
    rotated = f"{PGPASS_ON_HOST}-rotated"
    copied = app.ansible("copy", f"src={pgpass} dest={rotated} mode=0600", check=False)
    assert not copied.get("failed"), copied.get("msg")
    result = psql(app, conninfo(address), passfile=rotated)
    assert result.rc == 0 and result.stdout.strip() == USER, result.stderr

    rc, output = ansible_playbook()
    assert rc == 0, output[-4000:]
    result = psql(app, conninfo(address))
    assert result.rc == 0 and result.stdout.strip() == USER, result.stderr


def test_a_new_listen_address_restarts_and_reissues_the_certificate(host):
    """A second address on db: the server moves there (restart), the certificate is signed
    again for it, and the app verifies it there; then back."""
    app = other_host("app")
    address = host.ansible.get_variables()["ansible_host"]
    moved = re.sub(r"\.\d+$", ".200", address)
    host.check_output(f"ip address add {moved}/24 dev eth0")
    try:
        before = start_time(host)
        rc, output = ansible_playbook("-e", f"postgresql_listen_address={moved}")
        assert rc == 0, output[-4000:]
        changed = changed_tasks(output)
        assert "postgresql : Sign the server certificate with the CA" in changed, changed
        assert "postgresql : Restart the PostgreSQL cluster" in changed, changed
        assert start_time(host) != before
        san = host.check_output(f"openssl x509 -in {TLS_DIR}/server.crt -noout -ext subjectAltName")
        assert f"IP Address:{moved}, DNS:db" in san, san
        result = psql(app, conninfo(moved))
        assert result.rc == 0 and result.stdout.strip() == USER, result.stderr
        assert psql(app, conninfo(address)).rc != 0  # no longer listening there
    finally:
        rc, output = ansible_playbook()
        host.run(f"ip address del {moved}/24 dev eth0")
    assert rc == 0, output[-4000:]
    san = host.check_output(f"openssl x509 -in {TLS_DIR}/server.crt -noout -ext subjectAltName")
    assert f"IP Address:{address}, DNS:db" in san, san
    result = psql(app, conninfo(address))
    assert result.rc == 0, result.stderr


def test_a_certificate_expiring_within_30_days_is_renewed_with_a_reload(host):
    """A server certificate valid for 10 more days (signed here by the same CA, as an old one
    would be) is signed again at the next run, and PostgreSQL serves it after a reload."""
    cert = f"{TLS_DIR}/server.crt"
    host.check_output(
        f"openssl x509 -req -in {TLS_DIR}/server.csr -CA {TLS_DIR}/ca.crt "
        f"-CAkey {TLS_DIR}/ca.key -days 10 -copy_extensions copy -out {cert}"
    )
    assert host.run(f"openssl x509 -in {cert} -noout -checkend {30 * 86400}").rc != 0
    before = start_time(host)
    rc, output = ansible_playbook()
    assert rc == 0, output[-4000:]
    changed = changed_tasks(output)
    assert "postgresql : Sign the server certificate with the CA" in changed, changed
    assert "postgresql : Reload the PostgreSQL cluster" in changed, changed
    assert "postgresql : Restart the PostgreSQL cluster" not in changed, changed
    assert start_time(host) == before
    assert host.run(f"openssl x509 -in {cert} -noout -checkend {300 * 86400}").rc == 0
    # What the server presents is the new certificate.
    address = host.ansible.get_variables()["ansible_host"]
    served = other_host("app").run(
        f"openssl s_client -starttls postgres -connect {address}:5432 "
        f"-CAfile /root/digitalme-ca.crt -verify_return_error </dev/null 2>/dev/null "
        "| openssl x509 -noout -enddate"
    )
    on_disk = host.check_output(f"openssl x509 -in {cert} -noout -enddate")
    assert served.rc == 0 and served.stdout.strip() == on_disk, served.stdout + served.stderr
    rc, output = ansible_playbook()
    assert rc == 0 and "changed=0" in output, output[-4000:]
