"""`molecule test` of every role's scenario, each on fresh sandbox hosts of each Debian
release the roles support: a matrix of roles by releases (bookworm, Debian 12, and trixie,
Debian 13; ids like `caddy-trixie`).

Every role under roles/ with a molecule/default scenario is run: destroy, syntax, create,
(prepare,) converge, idempotence (a second converge must change nothing), verify,
destroy. What each scenario proves is described in the role's README. The sample role of
the sandbox itself is run by test_sandbox.py. Logs: artifacts/molecule-<role>-<suite>.log.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.sandboxes import REPO, SUITES, require_root, tool_env

# The slowest scenarios first (about 5, 4, 4 and 3.5 minutes in a full run; the others about
# 2.5): pytest-xdist hands out one-test units in collection order, and a long scenario
# handed out last runs on alone at the end of the suite while the other workers idle.
SLOWEST_FIRST = ("postgresql", "litestream", "monitoring", "caddy")
ROLES = sorted(
    (path.parents[2].name for path in REPO.glob("roles/*/molecule/default/molecule.yml")),
    key=lambda role: (
        SLOWEST_FIRST.index(role) if role in SLOWEST_FIRST else len(SLOWEST_FIRST),
        role,
    ),
)


def test_every_deployment_role_has_a_scenario() -> None:
    assert set(ROLES) >= {"base", "caddy", "digitalme", "litestream", "node_exporter"}


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("role", "suite"),
    [pytest.param(role, suite, id=f"{role}-{suite}") for role in ROLES for suite in SUITES],
)
def test_molecule_scenario_passes(role: str, suite: str, tmp_path: Path) -> None:
    require_root()
    log = REPO / "artifacts" / f"molecule-{role}-{suite}.log"
    log.parent.mkdir(exist_ok=True)
    started = time.monotonic()
    proc = subprocess.run(
        ["molecule", "test"],
        cwd=REPO / "roles" / role,
        # sandbox/molecule/create.yml boots the hosts on the release SANDBOX_SUITE names.
        # Molecule keeps a scenario's state (inventory, known_hosts, instance list) in a
        # folder named after the role's folder: the runs of one role on the two releases,
        # on two workers at once, would share it. Each run gets its own.
        env=dict(
            tool_env(),
            SANDBOX_SUITE=suite,
            NO_COLOR="1",
            ANSIBLE_FORCE_COLOR="0",
            MOLECULE_EPHEMERAL_DIRECTORY=str(tmp_path / "molecule"),
        ),
        capture_output=True,
        text=True,
        timeout=1800,
        stdin=subprocess.DEVNULL,
    )
    output = proc.stdout + proc.stderr
    log.write_text(output)
    assert proc.returncode == 0, f"molecule test failed ({log}):\n{output[-8000:]}"
    for step in ("converge", "idempotence", "verify", "destroy"):
        assert f"{step}: Executed: Successful" in output, step
    print(f"molecule test of roles/{role} on {suite}: {time.monotonic() - started:.0f}s")
