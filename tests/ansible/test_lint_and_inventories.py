"""Static checks of the Ansible side: lint, syntax, and the example inventories."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / ".venv" / "bin"
EXAMPLE_VAULT_PASSWORD = "digitalme-example-vault-password"  # documented, throw-away


def _run(*argv: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900, **kwargs)  # type: ignore[call-overload]


def test_ansible_lint_production_profile_is_clean() -> None:
    result = _run(str(BIN / "ansible-lint"), "--nocolor")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "Profile 'production' was required, and it passed" in result.stdout + result.stderr


def test_site_playbook_syntax(tmp_path: Path) -> None:
    password = tmp_path / "pass"
    password.write_text(EXAMPLE_VAULT_PASSWORD)
    result = _run(
        str(BIN / "ansible-playbook"),
        "--syntax-check",
        "-i",
        "inventory/production",
        "--vault-password-file",
        str(password),
        "playbooks/site.yml",
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_production_example_defines_every_vault_variable_it_names(tmp_path: Path) -> None:
    password = tmp_path / "pass"
    password.write_text(EXAMPLE_VAULT_PASSWORD)
    main = (REPO / "inventory/production/group_vars/all/main.yml").read_text()
    named = set(re.findall(r"\bvault_[a-z0-9_]+", main))
    assert named, "main.yml should name its secrets as vault_* variables"
    view = _run(
        str(BIN / "ansible-vault"),
        "view",
        "--vault-password-file",
        str(password),
        "inventory/production/group_vars/all/vault.yml",
    )
    assert view.returncode == 0, view.stderr
    defined = set(yaml.safe_load(view.stdout))
    assert named == defined
    # Nothing secret sits unencrypted in main.yml.
    assert "sk-ant" not in main and "PRIVATE KEY" not in main


def test_vault_file_is_encrypted() -> None:
    head = (REPO / "inventory/production/group_vars/all/vault.yml").read_text()[:40]
    assert head.startswith("$ANSIBLE_VAULT;1.1;AES256")
