#!/usr/bin/env python3
"""Builds (once) the package a host installs DigitalMe from, on the controller.

    wheelhouse.py SOURCE_DIR CACHE_DIR PYTHON_VERSION MACHINE [TARGET]

SOURCE_DIR is the repository (pyproject.toml, app/, requirements/app.lock, docs/). The
release id is a hash of everything that goes into the install: the app's sources,
pyproject.toml, the lock file, the docs and the target (Python version, machine, and TARGET
when given: the container runtime names its image recipe and base there, so that a release,
which is also an image tag, changes with them). The
package is CACHE_DIR/<release>.tar: `wheels/` (the app and every pinned dependency, built
for the target), `docs/` and `release.json` (what /info shows). One file, so it crosses to
the host in one transfer. It is built aside and renamed into place, and reused while the
release id is unchanged; the dependencies' wheels are downloaded once per lock file and
target. Prints one JSON line: {"release", "version", "path", "built"}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from datetime import UTC, datetime
from pathlib import Path

# manylinux tags pip should accept for a glibc x86_64/aarch64 host; pip does not expand
# --platform to older tags by itself.
KEEP_PACKAGES = 5
GLIBC_TAGS = ["2_17", "2_24", "2_26", "2_27", "2_28", "2_31", "2_34", "2_35", "2_36", "2_39"]


def release_id(source: Path, python_version: str, machine: str, target: str = "") -> str:
    digest = hashlib.sha256(f"{python_version}\0{machine}\0".encode())
    if target:
        digest.update(f"{target}\0".encode())
    files = [source / "pyproject.toml", source / "requirements" / "app.lock"]
    for folder in ("app", "docs"):
        files += sorted(
            p
            for p in (source / folder).rglob("*")
            if p.is_file()
            and "__pycache__" not in p.parts
            and ".egg-info" not in str(p)
            and not p.name.endswith(".pyc")
        )
    for path in files:
        digest.update(str(path.relative_to(source)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def project_version(source: Path) -> str:
    match = re.search(
        r'^version\s*=\s*"([^"]+)"', (source / "pyproject.toml").read_text(), re.MULTILINE
    )
    if not match:
        raise SystemExit("wheelhouse: no version in pyproject.toml")
    return match[1]


def dependency_wheels(source: Path, cache: Path, python_version: str, machine: str) -> Path:
    """The pinned dependencies' wheels for the target, downloaded once per lock file: every
    release built from the same lock reuses them (a release then costs the app's own
    wheel). CACHE_DIR/deps-<hash of the lock and the target>/, made aside and renamed."""
    lock = source / "requirements" / "app.lock"
    key = hashlib.sha256(f"{python_version}\0{machine}\0".encode() + lock.read_bytes())
    folder = cache / f"deps-{key.hexdigest()[:12]}"
    if folder.is_dir():
        return folder
    partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=cache))
    try:
        major_minor = ".".join(python_version.split(".")[:2])
        platforms = [f"--platform=manylinux_{tag}_{machine}" for tag in GLIBC_TAGS]
        run(
            sys.executable,
            "-m",
            "pip",
            "--disable-pip-version-check",
            "download",
            "--quiet",
            "--dest",
            str(partial),
            "--only-binary=:all:",
            f"--python-version={major_minor}",
            "--implementation=cp",
            *platforms,
            "-r",
            str(lock),
        )
        os.rename(partial, folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return folder


def release_description(source: Path, release: str, version: str) -> dict[str, object]:
    """release.json: what the service shows in /info (DIGITALME_RELEASE_INFO) and the
    deploy record names. The commit is the sources' when they are a git checkout; dirty
    when what goes into the release differs from it."""

    def git(*args: str) -> str | None:
        try:
            found = subprocess.run(  # noqa: S603
                ["git", "-C", str(source), *args],  # noqa: S607
                capture_output=True,
                text=True,
                check=False,
                timeout=30,
            )
        except OSError:
            return None
        return found.stdout.strip() if found.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    changes = git("status", "--porcelain", "--", "app", "docs", "pyproject.toml", "requirements")
    return {
        "release": release,
        "version": version,
        "commit": commit,
        "dirty": bool(changes) if commit else None,
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def run(*args: str) -> None:
    result = subprocess.run(args, capture_output=True, text=True, check=False)  # noqa: S603 (our own pip/tar argv)
    if result.returncode != 0:
        sys.stderr.write(f"wheelhouse: {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
        raise SystemExit(result.returncode)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="wheelhouse.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("source", type=Path, help="the repository (pyproject.toml, app/, ...)")
    parser.add_argument("cache", type=Path, help="where packages and wheels are kept")
    parser.add_argument("python_version", help="the Python the release runs on (3.11.2)")
    parser.add_argument("machine", help="the host's machine (x86_64, aarch64)")
    parser.add_argument(
        "target",
        nargs="?",
        default="",
        help="more that the release depends on (the container runtime's recipe and base)",
    )
    args = parser.parse_args(argv)
    source, cache = args.source, args.cache
    version = project_version(source)
    release = f"{version}-{release_id(source, args.python_version, args.machine, args.target)}"
    package = cache / f"{release}.tar"
    built = False
    if not package.exists():
        cache.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{release}.", dir=cache))
        try:
            wheels = work / "wheels"
            pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
            shutil.copytree(
                dependency_wheels(source, cache, args.python_version, args.machine), wheels
            )
            # The app itself: a pure-Python wheel built from a copy of the sources (a build
            # in place would leave build/ and egg-info behind in the repository).
            with tempfile.TemporaryDirectory() as build:
                shutil.copytree(
                    source / "app",
                    Path(build) / "app",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
                )
                for name in ("pyproject.toml", "README.md"):
                    shutil.copy2(source / name, Path(build) / name)
                run(*pip, "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels), build)
            description = work / "release.json"
            description.write_text(
                json.dumps(release_description(source, release, version), indent=2) + "\n"
            )
            partial = work / "package.tar"
            with tarfile.open(partial, "w") as tar:
                tar.add(wheels, arcname="wheels")
                tar.add(source / "docs", arcname="docs")
                tar.add(description, arcname="release.json")
            os.rename(partial, package)
            built = True
        finally:
            shutil.rmtree(work, ignore_errors=True)
    # The controller keeps the few newest packages, for rollbacks and other hosts, and the
    # dependency wheels of the newest lock files.
    for old in sorted(cache.glob("*.tar"), key=lambda p: p.stat().st_mtime)[:-KEEP_PACKAGES]:
        if old != package:
            old.unlink()
    for old in sorted(cache.glob("deps-*"), key=lambda p: p.stat().st_mtime)[:-KEEP_PACKAGES]:
        shutil.rmtree(old, ignore_errors=True)
    print(
        json.dumps({"release": release, "version": version, "path": str(package), "built": built})
    )


if __name__ == "__main__":
    main()
