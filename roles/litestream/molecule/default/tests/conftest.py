"""Shared helpers of the litestream scenario's testinfra checks.

The scenario has two app hosts (app-file: file replica on itself; app-sftp: SFTP replica on
`replica`) and the backup target `replica`. Measurements (replication lag, exposure scores)
are written to artifacts/litestream-measurements.json at the repository root.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import testinfra

DB = "/var/lib/digitalme/digitalme.db"
REPO = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).parents[4])).parents[1]
MEASUREMENTS = REPO / "artifacts" / "litestream-measurements.json"
UNITS = ("litestream", "litestream-restore", "digitalme")


def record(host_name: str, key: str, value) -> None:
    """Keep a measurement for the report (one JSON object per host)."""
    MEASUREMENTS.parent.mkdir(exist_ok=True)
    data = json.loads(MEASUREMENTS.read_text()) if MEASUREMENTS.exists() else {}
    data.setdefault(host_name, {})[key] = value
    MEASUREMENTS.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def other_host(name: str):
    """A testinfra host of the scenario other than the one under test."""
    inventory = os.environ["MOLECULE_INVENTORY_FILE"]
    return testinfra.get_host(f"ansible://{name}?ansible_inventory={inventory}")


def run_playbook(*args: str, timeout: int = 900) -> str:
    """ansible-playbook from the controller with Molecule's inventory and settings."""
    proc = subprocess.run(
        ["ansible-playbook", "-i", os.environ["MOLECULE_INVENTORY_FILE"], *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", NO_COLOR="1"),
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


@pytest.fixture
def name(host) -> str:
    return host.backend.host


@pytest.fixture
def journal(host):
    """The journal of the units involved, to show in a failure message."""
    units = " ".join(f"-u {unit}" for unit in UNITS)
    return lambda: "\n--- journal ---\n" + host.run(
        f"journalctl {units} --no-pager -n 80 | grep -v 'compaction monitor'"
    ).stdout
