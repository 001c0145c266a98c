"""Which releases a role supports is said once, in its meta/main.yml (galaxy_info.platforms),
and checked by one task every role imports (roles/common/tasks/supported_os.yml): here it
runs on this machine for fake roles that list, or do not list, its release."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / ".venv" / "bin"
DEPLOYMENT_ROLES = sorted(p.parents[1].name for p in REPO.glob("roles/*/tasks/preflight.yml"))
RELEASES = yaml.safe_load((REPO / "roles/common/vars/main.yml").read_text())[
    "_common_release_versions"
]
DISTRIBUTION_OF = {"bookworm": "Debian", "trixie": "Debian", "noble": "Ubuntu"}


def platforms(role: str) -> list[dict[str, list[str]]]:
    meta = yaml.safe_load((REPO / "roles" / role / "meta/main.yml").read_text())
    listed: list[dict[str, list[str]]] = meta["galaxy_info"]["platforms"]
    return listed


@pytest.mark.parametrize("role", DEPLOYMENT_ROLES)
def test_a_role_checks_the_releases_its_meta_lists(role: str) -> None:
    assert {release for entry in platforms(role) for release in entry["versions"]} <= set(
        RELEASES
    ), "a release without its version number in roles/common/vars"
    tasks = yaml.safe_load((REPO / "roles" / role / "tasks/preflight.yml").read_text())
    imported = [
        t["ansible.builtin.import_role"] for t in tasks if "ansible.builtin.import_role" in t
    ]
    assert {"name": "common", "tasks_from": "supported_os"} in imported


def this_host() -> tuple[str, str, str]:
    """(distribution as Ansible names it, release code name, version) of this machine."""
    release = platform.freedesktop_os_release()
    return (release["NAME"].split()[0], release["VERSION_CODENAME"], release["VERSION_ID"])


def check(tmp_path: Path, listed: list[dict[str, list[str]]]) -> subprocess.CompletedProcess[str]:
    """Run the check for a role named fake_role that lists `listed`, on this machine."""
    role = tmp_path / "roles" / "fake_role"
    (role / "meta").mkdir(parents=True)
    (role / "tasks").mkdir()
    (role / "meta/main.yml").write_text(yaml.safe_dump({"galaxy_info": {"platforms": listed}}))
    (role / "tasks/main.yml").write_text(
        yaml.safe_dump(
            [
                {
                    "name": "Check the release",
                    "ansible.builtin.import_role": {"name": "common", "tasks_from": "supported_os"},
                }
            ]
        )
    )
    playbook = tmp_path / "play.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "hosts": "localhost",
                    "gather_facts": True,
                    "gather_subset": ["min"],
                    "roles": ["fake_role"],
                }
            ]
        )
    )
    return subprocess.run(
        [
            str(BIN / "ansible-playbook"),
            "-i",
            "localhost,",
            "-c",
            "local",
            "-e",
            f"ansible_python_interpreter={sys.executable}",
            str(playbook),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(
            os.environ,
            ANSIBLE_NOCOLOR="1",
            ANSIBLE_ROLES_PATH=f"{tmp_path / 'roles'}:{REPO / 'roles'}",
        ),
    )


def test_a_listed_release_passes(tmp_path: Path) -> None:
    distribution, codename, _ = this_host()
    done = check(tmp_path, [{"name": distribution, "versions": [codename]}])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "ok: [localhost]" in done.stdout


def test_an_unlisted_release_is_refused_naming_the_role_and_both_releases(tmp_path: Path) -> None:
    distribution, codename, version = this_host()
    others = [release for release in RELEASES if release != codename]
    listed: dict[str, list[str]] = {}
    for release in others:
        listed.setdefault(DISTRIBUTION_OF[release], []).append(release)
    done = check(
        tmp_path, [{"name": name, "versions": versions} for name, versions in listed.items()]
    )
    assert done.returncode != 0
    supported = ", ".join(f"{DISTRIBUTION_OF[r]} {RELEASES[r]} ({r})" for r in others)
    assert (
        f"The fake_role role supports {supported}; this host runs {distribution} {version}"
    ) in " ".join(done.stdout.split()), done.stdout[-3000:]
