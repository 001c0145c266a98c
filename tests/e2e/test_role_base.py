"""`molecule test` of roles/base on a fresh sandbox host (see its README).

The scenario converges as root, re-converges (idempotence) as the admin user once root
login is refused, then verifies from the host and from the controller: logins, the
firewall seen from outside, and an `ansible-playbook --check --diff` reporting no change.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.e2e.sandboxes import REPO, require_root, tool_env

ROLE = "base"


@pytest.mark.e2e
def test_molecule_test_of_the_base_role_passes():
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
        timeout=900,
        stdin=subprocess.DEVNULL,
    )
    output = proc.stdout + proc.stderr
    log.write_text(output)
    assert proc.returncode == 0, f"molecule test failed ({log}):\n{output[-8000:]}"
    for step in ("create", "prepare", "converge", "idempotence", "verify", "destroy"):
        assert f"{step}: Executed: Successful" in output, step
    print(f"molecule test of roles/{ROLE}: {time.monotonic() - started:.0f}s")
