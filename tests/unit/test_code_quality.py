"""The whole tree passes ruff and is as `ruff format` writes it (one formatter for the
house), and the typed code (app/digitalme, sandbox/sandbox.py: the
`files` of [tool.mypy] in pyproject.toml) passes strict mypy, as `make lint` runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=600, cwd=REPO
    )


def test_ruff_finds_nothing() -> None:
    proc = run("ruff", "check", ".")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_tree_is_formatted_by_ruff_format() -> None:
    proc = run("ruff", "format", "--check", ".")
    assert proc.returncode == 0, "run `ruff format .`:\n" + proc.stdout + proc.stderr


def test_mypy_strict_finds_nothing() -> None:
    proc = run("mypy")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success: no issues found" in proc.stdout
