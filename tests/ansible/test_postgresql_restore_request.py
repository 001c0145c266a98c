"""The target of a point-in-time recovery is checked in one place, the postgresql role's
tasks/pitr_request.yml, which playbooks/restore-database.yml runs before it stops anything
and tasks/pitr.yml again: here it runs on this machine (a local connection) with targets
an operator might give."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / ".venv" / "bin"

CASES = {
    "latest": ("", "", True),
    "moment": ("2026-12-07 09:30:00+00", "", True),
    "moment with milliseconds and a zone": ("2026-12-07 10:30:00.250+01:00", "", True),
    "full backup": ("", "20261207-093000F", True),
    "incremental backup": ("", "20261207-093000F_20261207-101500I", True),
    "both": ("2026-12-07 09:30:00+00", "20261207-093000F", False),
    "moment without a zone": ("2026-12-07 09:30:00", "", False),
    "a date only": ("2026-12-07", "", False),
    "a command in the moment": ("2026-12-07 09:30:00+00; rm -rf /", "", False),
    "a label pgbackrest does not make": ("", "latest", False),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """Each case's outcome (passed, or failed with the message), from one playbook run."""
    tasks = []
    for name, (timestamp, backup, _) in CASES.items():
        tasks.append(
            {
                "name": name,
                "vars": {"case": name},
                "block": [
                    {
                        "ansible.builtin.include_role": {
                            "name": "postgresql",
                            "tasks_from": "pitr_request",
                        },
                        "vars": {
                            "postgresql_restore_timestamp": timestamp,
                            "postgresql_restore_backup": backup,
                        },
                    },
                    {
                        "ansible.builtin.set_fact": {
                            "outcomes": "{{ outcomes | combine({case: {'ok': true}}) }}"
                        }
                    },
                ],
                "rescue": [
                    {
                        "ansible.builtin.set_fact": {
                            "outcomes": "{{ outcomes | combine({case: {'ok': false, "
                            "'msg': ansible_failed_result.msg}}) }}"
                        }
                    },
                ],
            }
        )
    tasks.append(
        {
            "ansible.builtin.copy": {
                "content": "{{ outcomes | to_json }}",
                "dest": "{{ result_file }}",
                "mode": "0600",
            }
        }
    )
    folder = tmp_path_factory.mktemp("pitr-request")
    playbook = folder / "play.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "hosts": "localhost",
                    "gather_facts": False,
                    "vars": {"outcomes": {}},
                    "tasks": tasks,
                }
            ]
        )
    )
    result_file = folder / "outcomes.json"
    done = subprocess.run(
        [
            str(BIN / "ansible-playbook"),
            "-i",
            "localhost,",
            "-c",
            "local",
            "-e",
            f"ansible_python_interpreter={sys.executable}",
            "-e",
            f"result_file={result_file}",
            str(playbook),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    loaded: dict[str, dict[str, str]] = json.loads(result_file.read_text())
    return loaded


@pytest.mark.parametrize("name", CASES)
def test_a_restore_target_is_accepted_or_refused_with_the_forms_named(
    name: str, outcomes: dict[str, dict[str, str]]
) -> None:
    timestamp, backup, accepted = CASES[name]
    outcome = outcomes[name]
    assert outcome["ok"] is accepted, outcome
    if not accepted:
        assert "Give restore_timestamp" in outcome["msg"], outcome
        assert f'got "{timestamp}" and "{backup}"' in outcome["msg"], outcome
        assert "Nothing was changed." in outcome["msg"]
