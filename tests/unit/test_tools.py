"""The programs of tools/: those the roles install on hosts (digitalme-backup, the
PostgreSQL drill, the module both drills report through, digitalme-deploy) run on the
hosts' own Python, and wheelhouse.py on the controller's: Debian 12's python3 is 3.11, so
nothing newer, and nothing outside the standard library but each other. ruff and strict
mypy cover them with the app (tests/unit/test_code_quality.py)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"
PROGRAMS = ("digitalme_backup.py", "digitalme_deploy.py", "digitalme_postgresql_drill.py")
MODULES = ("drill_report.py",)
CONTROLLER_PROGRAMS = ("wheelhouse.py",)


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_every_tool_is_named_here() -> None:
    assert sorted(p.name for p in TOOLS.glob("*.py")) == sorted(
        PROGRAMS + MODULES + CONTROLLER_PROGRAMS
    )


@pytest.mark.parametrize("name", PROGRAMS + MODULES + CONTROLLER_PROGRAMS)
def test_a_tool_imports_only_the_standard_library_and_the_other_tools(name: str) -> None:
    ours = {Path(module).stem for module in MODULES}
    foreign = imported_modules(TOOLS / name) - set(sys.stdlib_module_names) - ours
    assert not foreign, foreign


@pytest.mark.parametrize("name", PROGRAMS)
def test_a_program_starts_with_the_hosts_python_and_answers_help(name: str, tmp_path: Path) -> None:
    program = TOOLS / name
    assert program.read_text().startswith("#!/usr/bin/python3\n")  # the roles make it 0755
    # Through a link from another folder, as the roles install it (/usr/local/libexec/...):
    # Python puts the program's own folder, where drill_report.py is, first on the path.
    link = tmp_path / name.removesuffix(".py").replace("_", "-")
    link.symlink_to(program)
    done = subprocess.run(
        [sys.executable, str(link), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def test_the_tools_need_no_python_newer_than_debian_12s() -> None:
    """3.11's grammar: ruff's target (pyproject.toml) is py311, and the code compiles with
    feature_version 3.11."""
    for path in TOOLS.glob("*.py"):
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 11))


def test_the_controllers_program_answers_help_and_refuses_missing_arguments() -> None:
    program = TOOLS / "wheelhouse.py"
    assert program.read_text().startswith("#!/usr/bin/env python3\n")
    helped = subprocess.run(
        [sys.executable, str(program), "--help"], capture_output=True, text=True, timeout=60
    )
    assert helped.returncode == 0 and "usage: wheelhouse.py" in helped.stdout, helped.stderr
    missing = subprocess.run(
        [sys.executable, str(program)], capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 2 and "the following arguments are required" in missing.stderr
    assert "Traceback" not in missing.stderr
