"""What the roles' Molecule verifiers (testinfra, roles/*/molecule/default/tests/) share:
the scenario's other hosts, running a playbook of the scenario again against its hosts,
reading which tasks and handlers it changed, and keeping measurements for the report.
Importable there because the shared .config/molecule/config.yml puts this folder on the
verifier's PYTHONPATH."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import testinfra

REPO = Path(__file__).resolve().parents[2]


def other_host(name: str) -> Any:
    """A testinfra host of the scenario by its inventory name (not only the one under test)."""
    inventory = os.environ["MOLECULE_INVENTORY_FILE"]
    return testinfra.get_host(f"ansible://{name}?ansible_inventory={inventory}")


def address(name: str) -> str:
    """A host's address in the scenario's inventory."""
    value: str = other_host(name).ansible.get_variables()["ansible_host"]
    return value


def ansible_playbook(
    *args: str, playbook: str = "converge.yml", timeout: float = 900
) -> tuple[int, str]:
    """Run a playbook of the scenario (converge.yml by default) with Molecule's inventory
    and settings, as the next run would go: (exit status, output without colours)."""
    path = os.path.join(os.environ["MOLECULE_SCENARIO_DIRECTORY"], playbook)
    proc = subprocess.run(
        ["ansible-playbook", "-i", os.environ["MOLECULE_INVENTORY_FILE"], *args, path],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", NO_COLOR="1"),
    )
    return proc.returncode, proc.stdout + proc.stderr


def changed_tasks(output: str) -> list[str]:
    """Names of the tasks and handlers an ansible-playbook output reports as changed."""
    step, changed = None, []
    for line in output.splitlines():
        if line.startswith(("TASK [", "RUNNING HANDLER [")):
            step = line[line.index("[") + 1 : line.rindex("]")]
        elif line.startswith("changed:"):
            changed.append(step)
    return changed


def record(report: str, keys: tuple[str, ...], value: Any) -> None:
    """Keep a measurement in artifacts/<report>.json at the repository's root, under keys
    (nested objects)."""
    path = REPO / "artifacts" / f"{report}.json"
    path.parent.mkdir(exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {}
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
