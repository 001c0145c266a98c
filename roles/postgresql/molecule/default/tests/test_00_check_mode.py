"""Runs first (file order), before the other tests touch the hosts."""

import re

from conftest import app_password
from verifier import ansible_playbook, changed_tasks

testinfra_hosts = ["db"]


def test_check_mode_reports_no_change_on_the_converged_host():
    """`ansible-playbook --check --diff` on the converged host changes nothing and shows no
    secret (Molecule hands the verifier its inventory and ansible.cfg)."""
    rc, output = ansible_playbook("--check", "--diff")
    assert rc == 0, output[-6000:]
    recap = re.findall(r"^(\S+)\s+: ok=\d+\s+changed=(\d+)", output, re.MULTILINE)
    assert recap and all(changed == "0" for _, changed in recap), (
        f"changed in check mode: {changed_tasks(output)}\n{output[-6000:]}"
    )
    assert app_password() not in output
    assert "PRIVATE KEY" not in output


def test_preflight_refuses_a_short_password_naming_the_variable():
    rc, output = ansible_playbook("--check", "-e", "postgresql_app_password=short-secret")
    assert rc != 0, output[-4000:]
    assert "postgresql_app_password is empty or shorter than 16 characters" in output, output[
        -4000:
    ]
    assert "changed=0" in output
    assert "short-secret" not in output.split("PLAY [", 1)[1], output[-4000:]


def test_preflight_refuses_a_client_that_is_not_an_ip_address():
    rc, output = ansible_playbook(
        "--check", "-e", '{"postgresql_app_clients": ["app.example.org"]}'
    )
    assert rc != 0, output[-4000:]
    assert "list the IP addresses" in output and "changed=0" in output, output[-4000:]


def test_preflight_refuses_a_listen_address_the_host_does_not_have():
    rc, output = ansible_playbook("--check", "-e", "postgresql_listen_address=192.0.2.10")
    assert rc != 0, output[-4000:]
    assert "which is not an address of this host" in output and "changed=0" in output, output[
        -4000:
    ]
