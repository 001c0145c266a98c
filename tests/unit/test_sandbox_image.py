"""The sandbox's image build tries debootstrap again after a failed download: a fake
debootstrap on PATH fails as many times as asked, and the build goes on or gives up."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.e2e.sandboxes import load_sandbox_tool

sandbox = load_sandbox_tool()

FAKE_DEBOOTSTRAP = """#!/bin/sh
# Fails until its counter reaches the wanted number of failures, then "builds" a tree.
count_file="$FAKE_COUNT"
count=$(cat "$count_file" 2>/dev/null || echo 0)
count=$((count + 1))
echo "$count" > "$count_file"
target="$5"
if [ -n "$(ls -A "$target")" ]; then echo "target not empty" >&2; exit 2; fi
touch "$target/partial"
if [ "$count" -le "$FAKE_FAILURES" ]; then echo "I: Validating libnettle8"; exit 1; fi
mkdir -p "$target/etc" && echo bookworm > "$target/etc/debian_version"
"""


@pytest.fixture
def fake_debootstrap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    program = bin_dir / "debootstrap"
    program.write_text(FAKE_DEBOOTSTRAP)
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(sandbox, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(sandbox.time, "sleep", lambda seconds: None)
    return bin_dir


def _run(tmp_path: Path, bin_dir: Path, failures: int) -> tuple[Path, Path]:
    root = tmp_path / "rootfs"
    root.mkdir()
    log_file = tmp_path / "build.log"
    sources = sandbox.AptSources(
        suite="bookworm",
        entries=(),
        mirror="http://deb.example/debian",
        hosts=frozenset({"deb.example"}),
        upstream_proxy=None,
    )
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        FAKE_COUNT=str(tmp_path / "count"),
        FAKE_FAILURES=str(failures),
    )
    with open(log_file, "w") as out:
        sandbox._debootstrap(root, ["python3"], sources, out, env)
    return root, log_file


def test_a_failed_download_is_tried_again_from_an_empty_tree(
    tmp_path: Path, fake_debootstrap: Path
) -> None:
    root, log_file = _run(tmp_path, fake_debootstrap, failures=2)
    assert (root / "etc/debian_version").read_text() == "bookworm\n"
    assert (tmp_path / "count").read_text().strip() == "3"
    text = log_file.read_text()
    assert "### debootstrap, attempt 1" in text and "### debootstrap, attempt 3" in text
    assert (tmp_path / "cache/debootstrap-debs").is_dir()


def test_it_gives_up_after_the_last_attempt_and_shows_the_log(
    tmp_path: Path, fake_debootstrap: Path
) -> None:
    with pytest.raises(sandbox.SandboxError, match="image step 'debootstrap, attempt 3' failed"):
        _run(tmp_path, fake_debootstrap, failures=sandbox.DEBOOTSTRAP_ATTEMPTS)
    assert (tmp_path / "count").read_text().strip() == str(sandbox.DEBOOTSTRAP_ATTEMPTS)
