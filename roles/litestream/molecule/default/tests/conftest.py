"""Shared helpers of the litestream scenario's testinfra checks.

The scenario has two app hosts (app-file: file replica on itself; app-sftp: SFTP replica on
`replica`) and the backup target `replica`. Measurements (replication lag, exposure scores)
are written to artifacts/litestream-measurements.json at the repository root
(verifier.record, one object per host).
"""

from __future__ import annotations

import pytest

DB = "/var/lib/digitalme/digitalme.db"
UNITS = ("litestream", "litestream-restore", "digitalme")
REPORT = "litestream-measurements"  # artifacts/<REPORT>.json


@pytest.fixture
def name(host) -> str:
    return host.backend.host


@pytest.fixture
def journal(host):
    """The journal of the units involved, to show in a failure message."""
    units = " ".join(f"-u {unit}" for unit in UNITS)
    return lambda: (
        "\n--- journal ---\n"
        + host.run(f"journalctl {units} --no-pager -n 80 | grep -v 'compaction monitor'").stdout
    )
