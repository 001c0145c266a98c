"""What the roles' Molecule verifiers (testinfra, roles/*/molecule/default/tests/) share:
running a playbook of the scenario again against its hosts, and reading which tasks it
changed. Importable there because the shared .config/molecule/config.yml puts this folder
on the verifier's PYTHONPATH."""

from __future__ import annotations

import os
import subprocess


def ansible_playbook(*args: str, playbook: str = "converge.yml",
                     timeout: float = 900) -> tuple[int, str]:
    """Run a playbook of the scenario (converge.yml by default) with Molecule's inventory
    and settings, as the next run would go: (exit status, output without colours)."""
    path = os.path.join(os.environ["MOLECULE_SCENARIO_DIRECTORY"], playbook)
    proc = subprocess.run(
        ["ansible-playbook", "-i", os.environ["MOLECULE_INVENTORY_FILE"], *args, path],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        env=dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", NO_COLOR="1"),
    )
    return proc.returncode, proc.stdout + proc.stderr


def changed_tasks(output: str) -> list[str]:
    """Names of the tasks an ansible-playbook output reports as changed."""
    task, changed = None, []
    for line in output.splitlines():
        if line.startswith("TASK ["):
            task = line[len("TASK ["):line.rindex("]")]
        elif line.startswith("changed:"):
            changed.append(task)
    return changed
