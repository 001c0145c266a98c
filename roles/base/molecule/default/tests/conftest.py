"""Fixtures for the base role's testinfra checks.

Molecule's inventory logs in as root, which the role forbids: ``host`` here logs in as the
admin user with sudo instead, as Ansible does after the connect step. ``target`` has what
the controller-side tests need to open their own SSH and TCP connections.
"""

# The tests run ssh, ansible-playbook and ssh-keygen from the controller on purpose.

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import testinfra


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    address: str
    port: int
    admin_user: str
    private_key: Path
    ssh_common_args: tuple[str, ...]

    def ssh(self, user: str, *options: str, command: str = "true") -> subprocess.CompletedProcess:
        """One SSH login from the controller, with the scenario's pinned host key."""
        return subprocess.run(
            [
                "ssh",
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=10",
                "-o",
                "ControlMaster=no",
                "-o",
                "ControlPath=none",
                "-i",
                str(self.private_key),
                "-p",
                str(self.port),
                *self.ssh_common_args,
                *options,
                f"{user}@{self.address}",
                command,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )


@pytest.fixture(scope="module")
def target(_testinfra_host) -> Target:
    backend = _testinfra_host.backend
    variables = backend.ansible_runner.get_variables(backend.host)
    key = variables.get("ansible_ssh_private_key_file") or variables["ansible_private_key_file"]
    return Target(
        name=backend.host,
        address=variables["ansible_host"],
        port=int(variables.get("ansible_port") or 22),
        admin_user=variables["base_admin_user"],
        private_key=Path(key),
        ssh_common_args=tuple(shlex.split(variables.get("ansible_ssh_common_args", ""))),
    )


@pytest.fixture(scope="module")
def host(target):
    """The host as the admin user, commands run through sudo."""
    # One SSH connection for all the checks. The socket path must stay under ~104 bytes
    # (ssh adds 17 characters while it sets it up), hence not the long ephemeral directory.
    control_dir = Path.home() / ".ansible" / "cp"
    control_dir.mkdir(parents=True, exist_ok=True)
    return testinfra.get_host(
        f"ssh://{target.admin_user}@{target.address}:{target.port}",
        ssh_identity_file=str(target.private_key),
        ssh_extra_args=shlex.join(target.ssh_common_args),
        sudo=True,
        controlpath=f"{control_dir}/testinfra-%%C",  # "%%": testinfra %-formats it
    )


@pytest.fixture
def journal(host):
    """A unit's recent journal, for failure messages."""
    return lambda unit: host.run(f"journalctl -u {shlex.quote(unit)} --no-pager -n 40").stdout


@pytest.fixture(scope="session")
def molecule_env() -> dict[str, str]:
    """The environment Molecule gave the verifier (ANSIBLE_CONFIG, inventory, roles path)."""
    return dict(os.environ)
