"""`molecule test` of roles/litestream on fresh sandbox hosts (see its README).

Three hosts: app-file (file replica), app-sftp (SFTP replica) and replica (the backup
target). The scenario's measurements (replication lag, exposure scores) are written to
artifacts/litestream-measurements.json.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.e2e.sandboxes import REPO, require_root, tool_env

ROLE = "litestream"


@pytest.mark.e2e
def test_molecule_test_of_the_litestream_role_passes():
    require_root()
    log = REPO / "artifacts" / f"molecule-{ROLE}.log"
    log.parent.mkdir(exist_ok=True)
    started = time.monotonic()
    proc = subprocess.run(
        ["molecule", "test"],
        cwd=REPO / "roles" / ROLE,
        env=dict(tool_env(), NO_COLOR="1", ANSIBLE_FORCE_COLOR="0"),
        capture_output=True,
        text=True,
        timeout=1200,
        stdin=subprocess.DEVNULL,
    )
    output = proc.stdout + proc.stderr
    log.write_text(output)
    assert proc.returncode == 0, f"molecule test failed ({log}):\n{output[-8000:]}"
    for step in ("prepare", "converge", "idempotence", "verify", "destroy"):
        assert f"{step}: Executed: Successful" in output, step
    print(f"molecule test of roles/{ROLE}: {time.monotonic() - started:.0f}s")
