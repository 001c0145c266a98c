#!/usr/bin/env python3
"""Throw-away Debian 12 or 13 hosts for DigitalMe's roles, tests and demo.

Each host is a real systemd system (systemd is PID 1, booted with systemd-nspawn) in its own
network namespace with its own address, reachable over SSH with a per-sandbox key and a
pinned host key. Hosts of one sandbox share a bridge and a private /24; they reach each other
and the controller (this machine, at the bridge address), and nothing outside the machine but
the Debian package mirror, through a small caching HTTP proxy that this tool runs on the
bridge address and that forwards only to the mirror of the machine's own apt sources.

    sandbox.py up [--name NAME] [--suite bookworm|trixie] [--inventory PATH] [--json]
                  HOST[@containers][:GROUP[,GROUP...]]...
    sandbox.py down [--name NAME | --all]
    sandbox.py status [--name NAME] [--json]
    sandbox.py ssh [--name NAME] HOST [COMMAND...]
    sandbox.py kill [--name NAME] HOST...
    sandbox.py image [--suite bookworm|trixie] [--rebuild]

`up` is declarative: the sandbox ends up with exactly the hosts asked for (hosts already
running are kept, others are booted, hosts no longer asked for are removed), so running it
twice changes nothing; a host that died, or that `kill` cut off like a power failure, is
booted fresh under its name and address. All hosts of a sandbox run one Debian release,
`--suite`: bookworm (Debian 12, the default) or trixie (Debian 13), each from its own
cached base image. `down` removes every host, network namespace, mount, cgroup, firewall
table and process the sandbox created, and nothing else. See docs/sandbox.md.

A host named `HOST@containers` is of the opt-in kind that can run container engines
(Docker Engine, rootful Podman) with their memory and PID limits enforced: its nspawn gets
`/proc/sys/net` writable, real-disk folders bound at /var/lib/docker and
/var/lib/containers, the keyring system calls, and a cgroup of its own in every cgroup v1
controller, which a unit inside remounts read-write (docs/sandbox.md says what that costs).

Stdlib only (runs with the system python3 before any virtualenv exists); must run as root.
"""

# ruff: noqa: S603, S606, S607 (this tool runs system commands by design, never a shell)
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import http.client
import http.server
import inspect
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# Runtime state of every sandbox on this machine (keys, known_hosts, logs, state.json).
# /run is the right place: like the namespaces and mounts it describes, it does not
# survive a reboot.
RUN_ROOT = Path(os.environ.get("SANDBOX_RUN_DIR", "/run/digitalme-sandbox"))
# The base image, the debootstrap package cache, the proxy's package cache and the
# hosts' overlay upper layers (these need a real disk, not /run).
CACHE = Path(os.environ.get("SANDBOX_CACHE_DIR", str(REPO / ".cache" / "sandbox"))).resolve()
LOCK_FILE = Path("/run/lock/digitalme-sandbox.lock")
CONTAINER_BASE_LOCK = Path("/run/lock/digitalme-container-base.lock")

PREFIX = "dmsb"  # DigitalMe SandBox: names of bridges, veths, netns, nft tables, cgroups
SUBNET_BASE = "10.213"  # sandbox N gets 10.213.N.0/24, the controller is .1, hosts .11 up
FIRST_SLOT, LAST_SLOT = 7, 254
FIRST_HOST_OCTET = 11
MAX_HOSTS = 200
PROXY_PORT = 3142
DEFAULT_NAME = "dev"
DEFAULT_GROUPS = ("digitalme", "backup_targets")  # first host, then every other host

# The Debian releases hosts can run (`up --suite`): the ones the roles are tested on.
SUITES = ("bookworm", "trixie")  # Debian 12, Debian 13
DEFAULT_SUITE = "bookworm"
BASE_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "sudo",
    "iproute2",
    "ca-certificates",
    "procps",
    "python3",
    "python3-apt",
)
# Timers that would start apt or dpkg behind a role's back (dpkg-lock races) or do disk
# maintenance that makes no sense in a container. Disabled, not masked: a role may enable
# them (unattended-upgrades needs the apt ones).
DISABLED_TIMERS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
)
IMAGE_MAX_AGE_DAYS = float(os.environ.get("SANDBOX_IMAGE_MAX_AGE_DAYS", "14"))

# Host kinds: "plain" (every host), "containers" (opt-in, HOST@containers: can run Docker
# Engine and rootful Podman inside; see start_host and docs/sandbox.md).
HOST_KINDS = ("plain", "containers")
# The container engines' storage, on the controller's real disk (overlay on overlay fails).
CONTAINER_STORAGE = {"docker": "/var/lib/docker", "containers": "/var/lib/containers"}
CGROUP_RW_UNIT = "sandbox-cgroup-rw.service"

NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?$")
HOST_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?$")
GROUP_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SandboxError(Exception):
    """A failure to report to the user as it is (no traceback)."""


def log(message: str) -> None:
    print(f"sandbox: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- commands


def run(
    argv: list[str],
    step: str,
    *,
    timeout: float = 60,
    input_text: str | None = None,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command; failures and timeouts name the step they hit."""
    try:
        proc = subprocess.run(
            argv,
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            stdin=None if input_text is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise SandboxError(
            f"timeout after {timeout:g}s in step '{step}': {' '.join(argv)}"
        ) from exc
    except FileNotFoundError as exc:
        raise SandboxError(
            f"step '{step}': {argv[0]} is not installed (run scripts/bootstrap.sh)"
        ) from exc
    if check and proc.returncode != 0:
        output = (proc.stderr or proc.stdout).strip()
        raise SandboxError(
            f"step '{step}' failed (exit {proc.returncode}): {' '.join(argv)}\n{output}"
        )
    return proc


def wait_for(step: str, timeout: float, probe: Any, interval: float = 0.1) -> Any:
    """Call probe() until it returns something truthy; on timeout name the step."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise SandboxError(f"timeout after {timeout:g}s in step '{step}'")
        time.sleep(interval)


@contextlib.contextmanager
def machine_lock(lock_file: Path = LOCK_FILE) -> Iterator[None]:
    """One sandbox operation at a time on this machine (allocation, boot, teardown)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another sandbox operation to finish ({lock_file})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)


def require_root() -> None:
    if os.geteuid() != 0:
        raise SandboxError(
            "must run as root (network namespaces, mounts and systemd-nspawn need it)"
        )


# --------------------------------------------------------------------------- apt sources


@dataclasses.dataclass(frozen=True)
class AptSource:
    """One suite of one mirror, as an apt sources entry names it."""

    uri: str
    suite: str  # "bookworm", "bookworm-updates", "bookworm-security"...
    components: tuple[str, ...]
    signed_by: str  # the keyring the entry names, "" if none


@dataclasses.dataclass(frozen=True)
class AptSources:
    """The Debian mirror of the machine's own apt sources, for hosts of one Debian release:
    what they use, and all the proxy lets through."""

    suite: str  # the hosts' release: a SUITES codename
    entries: tuple[AptSource, ...]  # what the hosts' debian.sources lists
    mirror: str  # for debootstrap
    hosts: frozenset[str]  # the only names the proxy forwards to
    upstream_proxy: str | None  # the machine's own apt HTTP proxy, if it has one

    @classmethod
    def from_machine(cls, suite: str) -> AptSources:
        found: list[AptSource] = []
        candidates = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
        candidates += sorted(Path("/etc/apt/sources.list.d").glob("*.list"))
        if Path("/etc/apt/sources.list").is_file():
            candidates.append(Path("/etc/apt/sources.list"))
        for path in candidates:
            entries = _parse_sources(path.read_text(), deb822=path.suffix == ".sources")
            found += [e for e in entries if _is_debian_mirror(e.uri)]
        if not found:
            raise SandboxError("no Debian mirror found in the machine's apt sources")
        entries = _entries_for_suite(found, suite, _machine_codename())
        mirror = next((e.uri for e in entries if e.suite == suite), None)
        if mirror is None:
            listed = sorted({e.suite for e in found})
            raise SandboxError(
                f"no Debian mirror for {suite} in the machine's apt sources (they list "
                f"{', '.join(listed)})"
            )
        hosts = frozenset(urllib.parse.urlsplit(e.uri).hostname or "" for e in found) - {""}
        proxy = run(
            ["apt-config", "shell", "P", "Acquire::http::Proxy"], "read apt proxy", check=False
        ).stdout.strip()
        match = re.match(r"^P='(.*)'$", proxy)
        upstream = match.group(1) if match and match.group(1) not in ("", "DIRECT") else None
        return cls(
            suite=suite, entries=tuple(entries), mirror=mirror, hosts=hosts, upstream_proxy=upstream
        )

    def sources_file(self) -> str:
        """The hosts' /etc/apt/sources.list.d/debian.sources (deb822): one stanza per mirror,
        components and keyring, its suites in the machine's order."""
        stanzas: dict[tuple[str, tuple[str, ...], str], list[str]] = {}
        for entry in self.entries:
            suites = stanzas.setdefault((entry.uri, entry.components, entry.signed_by), [])
            if entry.suite not in suites:
                suites.append(entry.suite)
        text = (
            f"# Sandbox host ({self.suite}): the Debian mirror of the controller's apt sources,\n"
            "# reached through the controller's proxy (apt.conf.d/00sandbox-proxy).\n"
        )
        for (uri, components, signed_by), suites in stanzas.items():
            text += (
                f"\nTypes: deb\nURIs: {uri}\nSuites: {' '.join(suites)}\n"
                f"Components: {' '.join(components)}\n"
            )
            if signed_by:
                text += f"Signed-By: {signed_by}\n"
        return text


def _codename(suite: str) -> str:
    """The release a suite belongs to: trixie-security -> trixie."""
    return suite.split("-", 1)[0].split("/", 1)[0]


def _machine_codename() -> str:
    match = re.search(
        r"^VERSION_CODENAME=\"?([a-z]+)", Path("/etc/os-release").read_text(), re.MULTILINE
    )
    return match.group(1) if match else ""


def _entries_for_suite(found: list[AptSource], suite: str, own: str) -> list[AptSource]:
    """The machine's entries for the release `suite` if it lists that release, or else the
    entries of its own release renamed (bookworm-security -> trixie-security): a Debian
    mirror serves every release under the same addresses."""
    listed = [e for e in found if _codename(e.suite) == suite]
    if listed:
        return listed
    if own not in {_codename(e.suite) for e in found}:
        own = _codename(found[0].suite)
    return [
        dataclasses.replace(e, suite=suite + e.suite[len(own) :])
        for e in found
        if _codename(e.suite) == own
    ]


def _is_debian_mirror(uri: str) -> bool:
    parts = urllib.parse.urlsplit(uri)
    return parts.scheme == "http" and "debian" in (parts.hostname or "") + parts.path


def _parse_sources(text: str, deb822: bool) -> list[AptSource]:
    found: list[AptSource] = []
    if deb822:
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[0].isspace():
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if "deb" not in fields.get("types", "").split():
                continue
            if fields.get("enabled", "yes").lower() == "no":
                continue
            components = tuple(fields.get("components", "main").split())
            for uri in fields.get("uris", "").split():
                for suite in fields.get("suites", "").split():
                    found.append(AptSource(uri, suite, components, fields.get("signed-by", "")))
    else:
        for line in text.splitlines():
            options = re.search(r"\[([^]]*)\]", line)
            words = re.sub(r"\[[^]]*\]", "", line).split()
            if len(words) >= 3 and words[0] == "deb":
                keyring = re.search(r"signed-by=(\S+)", options.group(1)) if options else None
                found.append(
                    AptSource(
                        words[1],
                        words[2],
                        tuple(words[3:]) or ("main",),
                        keyring.group(1) if keyring else "",
                    )
                )
    return found


# --------------------------------------------------------------------------- base image


def _image_recipe_script() -> str:
    """Runs inside the debootstrapped tree (chroot) to finish the base image."""
    return """set -eu
export DEBIAN_FRONTEND=noninteractive LC_ALL=C
printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
rm -f /etc/apt/sources.list
apt-get -q -o Acquire::Retries=3 update
apt-get -q -y -o Acquire::Retries=3 -o Dpkg::Options::=--force-confold dist-upgrade
update-ca-certificates >/dev/null
apt-get clean
rm -f /usr/sbin/policy-rc.d
"""


def _configure_image(root: Path, sources: AptSources) -> None:
    """Files of the base image, written from the controller (before and after the chroot)."""
    (root / "etc/apt/sources.list.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/apt/sources.list.d/debian.sources").write_text(sources.sources_file())
    # The TLS-intercepting proxy's CAs: harmless, and a host that must reach a registry
    # over HTTPS (never relied on) would need them.
    cas = root / "usr/local/share/ca-certificates"
    cas.mkdir(parents=True, exist_ok=True)
    for cert in sorted(Path("/usr/local/share/ca-certificates").glob("*.crt")):
        shutil.copy2(cert, cas / cert.name)


def _finish_image(root: Path) -> None:
    for timer in DISABLED_TIMERS:
        (root / "etc/systemd/system/timers.target.wants" / timer).unlink(missing_ok=True)
    (root / "etc/machine-id").write_text("")  # each host gets its own at first boot
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()  # each host gets its own, pinned in the sandbox's known_hosts
    (root / "etc/ssh/sshd_config.d/sandbox.conf").write_text(
        "# Sandbox host: one pinned host key, keys only.\n"
        "HostKey /etc/ssh/ssh_host_ed25519_key\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
    )
    (root / "var/log/journal").mkdir(parents=True, exist_ok=True)  # persistent: shown on failure
    (root / "etc/hostname").write_text("localhost\n")
    (root / "etc/hosts").write_text(
        "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n"
    )
    (root / "etc/resolv.conf").write_text(
        "# Sandbox host: no DNS. Sandbox names are in /etc/hosts; apt goes through the\n"
        "# controller's mirror proxy (/etc/apt/apt.conf.d/00sandbox-proxy).\n"
    )
    root_ssh = root / "root/.ssh"
    root_ssh.mkdir(mode=0o700, exist_ok=True)


def image_key(sources: AptSources) -> str:
    """The recipe's hash, after the release: "trixie-0123456789abcdef"."""
    digest = hashlib.sha256()
    for part in (
        sources.suite,
        sources.mirror,
        sources.sources_file(),
        " ".join(BASE_PACKAGES),
        " ".join(DISABLED_TIMERS),
        _image_recipe_script(),
        inspect.getsource(_configure_image),
        inspect.getsource(_finish_image),
        inspect.getsource(build_image),
    ):
        digest.update(part.encode())
        digest.update(b"\0")
    for cert in sorted(Path("/usr/local/share/ca-certificates").glob("*.crt")):
        digest.update(cert.read_bytes())
    return f"{sources.suite}-{digest.hexdigest()[:16]}"


IMAGE_MARKERS = ("usr/lib/systemd/systemd", "usr/sbin/sshd", "usr/bin/python3", "etc/os-release")


def _image_problem(image_dir: Path, key: str) -> str | None:
    """Why a cached image cannot be used, or None if it can."""
    meta_file = image_dir / "image.json"
    if not meta_file.is_file():
        return "incomplete (no image.json)"
    try:
        meta = json.loads(meta_file.read_text())
    except ValueError:
        return "broken image.json"
    if meta.get("key") != key:
        return "built from another recipe"
    for marker in IMAGE_MARKERS:
        if not (image_dir / "rootfs" / marker).exists():
            return f"broken (missing /{marker})"
    age_days = (time.time() - float(meta.get("built_at", 0))) / 86400
    if age_days > IMAGE_MAX_AGE_DAYS:
        return f"stale ({age_days:.0f} days old, limit {IMAGE_MAX_AGE_DAYS:g})"
    return None


def ensure_image(suite: str = DEFAULT_SUITE, rebuild: bool = False) -> Path:
    """The base image's rootfs for a Debian release, built (debootstrap) when missing, stale
    or broken."""
    sources = AptSources.from_machine(suite)
    key = image_key(sources)
    images = CACHE / "images"
    images.mkdir(parents=True, exist_ok=True)
    candidates = sorted(images.glob(f"{key}.*"), reverse=True)  # newest first
    if not rebuild:
        for candidate in candidates:
            problem = _image_problem(candidate, key)
            if problem is None:
                return candidate / "rootfs"
            log(f"cached image {candidate.name} is {problem}: not using it")
    image_dir = build_image(sources, key)
    _gc_images(keep=image_dir)
    return image_dir / "rootfs"


def build_image(sources: AptSources, key: str) -> Path:
    started = time.monotonic()
    images = CACHE / "images"
    build_dir = images / f".build-{key}-{os.getpid()}"
    shutil.rmtree(build_dir, ignore_errors=True)
    root = build_dir / "rootfs"
    root.mkdir(parents=True)
    build_log = images / f"build-{sources.suite}.log"
    log(
        f"building the base image with debootstrap ({sources.suite}, {sources.mirror}); "
        f"log: {build_log}"
    )
    env = dict(os.environ, LC_ALL="C")
    if sources.upstream_proxy:
        env["http_proxy"] = sources.upstream_proxy
    with open(build_log, "w") as out:
        _debootstrap(root, BASE_PACKAGES, sources, out, env)
        _configure_image(root, sources)
        resolv = root / "etc/resolv.conf"  # the chroot's apt resolves the mirror like we do
        resolv.unlink(missing_ok=True)
        shutil.copyfile("/etc/resolv.conf", resolv)
        # A private mount and PID namespace: /proc, /sys and /dev for maintainer scripts
        # vanish with it, and so does any process a script might leave behind.
        chroot = (
            f"mount -t proc proc {root}/proc && mount -t sysfs sysfs {root}/sys && "
            f'mount --rbind /dev {root}/dev && exec chroot {root} /bin/sh -c "$0"'
        )
        _logged_step(
            "finish image (apt update, upgrade, CAs)",
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--pid",
                "--fork",
                "/bin/sh",
                "-c",
                chroot,
                _image_recipe_script(),
            ],
            900,
            out,
            env,
        )
    _finish_image(root)
    seconds = time.monotonic() - started
    meta = {
        "key": key,
        "built_at": time.time(),
        "build_seconds": round(seconds, 1),
        "suite": sources.suite,
        "owner": str(REPO),
        "mirror": sources.mirror,
        "packages": list(BASE_PACKAGES),
    }
    (build_dir / "image.json").write_text(json.dumps(meta, indent=2) + "\n")
    final = images / f"{key}.{time.strftime('%Y%m%d%H%M%S')}"
    os.replace(build_dir, final)
    log(f"base image built in {seconds:.0f}s: {final}")
    return final


def _logged_step(step: str, argv: list[str], timeout: float, out: Any, env: dict[str, str]) -> None:
    out.write(f"\n### {step}: {' '.join(argv[:12])}\n")
    out.flush()
    try:
        proc = subprocess.run(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired as exc:
        raise SandboxError(
            f"timeout after {timeout:g}s in image step '{step}'; see {out.name}"
        ) from exc
    if proc.returncode != 0:
        out.flush()
        tail = "\n".join(Path(out.name).read_text().splitlines()[-25:])
        raise StepFailed(
            f"image step '{step}' failed (exit {proc.returncode}); {out.name} ends:\n{tail}"
        )


class StepFailed(SandboxError):
    """An image step that ran to its end and failed (not one that timed out)."""


DEBOOTSTRAP_ATTEMPTS = 3


def _debootstrap(
    root: Path, packages: Iterable[str], sources: AptSources, out: Any, env: dict[str, str]
) -> None:
    """A minimal Debian tree in `root`, tried again from an empty `root` when a run fails:
    a download from the mirror fails now and then (debootstrap does not retry one), and
    the shared package cache keeps what earlier attempts fetched."""
    debs = CACHE / "debootstrap-debs"
    debs.mkdir(parents=True, exist_ok=True)
    argv = [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(packages)}",
        f"--cache-dir={debs}",
        sources.suite,
        str(root),
        sources.mirror,
    ]
    for attempt in range(1, DEBOOTSTRAP_ATTEMPTS + 1):
        try:
            _logged_step(f"debootstrap, attempt {attempt}", argv, 900, out, env)
            return
        except StepFailed:
            if attempt == DEBOOTSTRAP_ATTEMPTS:
                raise
        log(f"debootstrap failed (attempt {attempt} of {DEBOOTSTRAP_ATTEMPTS}); trying again")
        shutil.rmtree(root)
        root.mkdir()
        time.sleep(5 * attempt)


def _gc_images(keep: Path) -> None:
    """Remove the images `keep` replaces (this checkout's others of its release), and any
    image that is stale, broken or left by a dead build; never one a registered sandbox
    still boots from. Images of the other releases stay, and so do the current images of
    other checkouts sharing the cache (SANDBOX_CACHE_DIR): each would rebuild its own in
    turn otherwise."""
    suite = json.loads((keep / "image.json").read_text())["suite"]
    in_use = {Path(s.get("image", "")).parent for s in all_states()}
    for candidate in (CACHE / "images").iterdir():
        if candidate == keep or candidate in in_use or not candidate.is_dir():
            continue
        if candidate.name.startswith(".build-") and _pid_alive(
            int(candidate.name.rsplit("-", 1)[1])
        ):
            continue
        try:
            meta = json.loads((candidate / "image.json").read_text())
        except (OSError, ValueError):
            meta = {}
        age_days = (time.time() - float(meta.get("built_at", 0))) / 86400
        replaced = meta.get("suite") == suite and meta.get("owner") == str(REPO)
        if replaced or age_days > IMAGE_MAX_AGE_DAYS:
            shutil.rmtree(candidate, ignore_errors=True)


# --------------------------------------------------------------------------- container base

# The base of DigitalMe's container image when no registry can be reached (the sandbox
# hosts reach none): Debian 12 with Python, made here with debootstrap, as a root file
# system archive that a container engine imports (`podman import`, `docker import`). Like
# python:3.11-slim it has python3 and its venv/ensurepip; the Dockerfile keeps pip out of
# the final image. Cached in .cache/sandbox/container-base/<recipe hash>.<date>/rootfs.tar.
CONTAINER_BASE_SUITE = "bookworm"  # its Python (3.11) is the Dockerfile's default base's
CONTAINER_BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
CONTAINER_BASE_MARKERS = ("usr/bin/python3", "usr/lib/python3.11/ensurepip", "etc/os-release")


def _container_base_recipe_script() -> str:
    """Runs inside the debootstrapped tree (chroot): updates, then what an image needs not."""
    return """set -eu
export DEBIAN_FRONTEND=noninteractive LC_ALL=C
printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
rm -f /etc/apt/sources.list
apt-get -q -o Acquire::Retries=3 update
apt-get -q -y -o Acquire::Retries=3 -o Dpkg::Options::=--force-confold dist-upgrade
apt-get clean
rm -f /usr/sbin/policy-rc.d
# Slim, as Debian's own -slim images: no docs (but the licences), manuals or translations.
cat > /etc/dpkg/dpkg.cfg.d/slim <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
EOF
find /usr/share/doc -mindepth 1 -not -name copyright -not -type d -delete
find /usr/share/doc -mindepth 1 -type d -empty -delete
rm -rf /usr/share/man/* /usr/share/info/* /usr/share/locale/* /usr/share/lintian/*
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/debconf/*-old \\
    /var/cache/ldconfig/aux-cache /var/log/apt /var/log/*.log /etc/machine-id /etc/hostname \\
    /etc/resolv.conf
: > /etc/machine-id
"""


def container_base_key(sources: AptSources) -> str:
    digest = hashlib.sha256()
    for part in (
        sources.suite,
        sources.mirror,
        sources.sources_file(),
        " ".join(CONTAINER_BASE_PACKAGES),
        _container_base_recipe_script(),
        inspect.getsource(build_container_base),
    ):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _container_base_problem(folder: Path, key: str) -> str | None:
    """Why a cached container base cannot be used, or None if it can."""
    try:
        meta = json.loads((folder / "image.json").read_text())
    except (OSError, ValueError):
        return "incomplete (no valid image.json)"
    if meta.get("key") != key:
        return "built from another recipe"
    if not (folder / "rootfs.tar").is_file():
        return "broken (no rootfs.tar)"
    if sorted(meta.get("markers", [])) != sorted(CONTAINER_BASE_MARKERS):
        return "broken (its archive lacks a key file)"
    age_days = (time.time() - float(meta.get("built_at", 0))) / 86400
    if age_days > IMAGE_MAX_AGE_DAYS:
        return f"stale ({age_days:.0f} days old, limit {IMAGE_MAX_AGE_DAYS:g})"
    return None


def ensure_container_base(rebuild: bool = False) -> Path:
    """The container base's rootfs.tar, built when missing, stale or broken."""
    sources = AptSources.from_machine(CONTAINER_BASE_SUITE)
    key = container_base_key(sources)
    bases = CACHE / "container-base"
    bases.mkdir(parents=True, exist_ok=True)
    if not rebuild:
        for candidate in sorted(bases.glob(f"{key}.*"), reverse=True):
            problem = _container_base_problem(candidate, key)
            if problem is None:
                return candidate / "rootfs.tar"
            log(f"cached container base {candidate.name} is {problem}: not using it")
    folder = build_container_base(sources, key)
    for old in bases.iterdir():
        if (
            old != folder
            and old.is_dir()
            and not (old.name.startswith(".build-") and _pid_alive(int(old.name.rsplit("-", 1)[1])))
        ):
            shutil.rmtree(old, ignore_errors=True)
    return folder / "rootfs.tar"


def build_container_base(sources: AptSources, key: str) -> Path:
    started = time.monotonic()
    bases = CACHE / "container-base"
    build_dir = bases / f".build-{key}-{os.getpid()}"
    shutil.rmtree(build_dir, ignore_errors=True)
    root = build_dir / "rootfs"
    root.mkdir(parents=True)
    build_log = bases / "build.log"
    log(f"building the container base with debootstrap ({sources.suite}); log: {build_log}")
    env = dict(os.environ, LC_ALL="C")
    if sources.upstream_proxy:
        env["http_proxy"] = sources.upstream_proxy
    with open(build_log, "w") as out:
        _debootstrap(root, CONTAINER_BASE_PACKAGES, sources, out, env)
        (root / "etc/apt/sources.list.d").mkdir(parents=True, exist_ok=True)
        (root / "etc/apt/sources.list.d/debian.sources").write_text(sources.sources_file())
        resolv = root / "etc/resolv.conf"
        resolv.unlink(missing_ok=True)
        shutil.copyfile("/etc/resolv.conf", resolv)
        chroot = (
            f"mount -t proc proc {root}/proc && mount -t sysfs sysfs {root}/sys && "
            f'mount --rbind /dev {root}/dev && exec chroot {root} /bin/sh -c "$0"'
        )
        _logged_step(
            "finish the container base (apt update, upgrade, clean)",
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--pid",
                "--fork",
                "/bin/sh",
                "-c",
                chroot,
                _container_base_recipe_script(),
            ],
            900,
            out,
            env,
        )
        missing = [m for m in CONTAINER_BASE_MARKERS if not (root / m).exists()]
        if missing:
            raise SandboxError(f"the container base lacks {', '.join(missing)}; see {build_log}")
        # One archive, sorted and with numeric owners: the same tree gives the same bytes.
        _logged_step(
            "archive the root file system",
            [
                "tar",
                "--sort=name",
                "--numeric-owner",
                "--xattrs",
                "-C",
                str(root),
                "--exclude=./dev/*",
                "--exclude=./proc/*",
                "--exclude=./sys/*",
                "-cf",
                str(build_dir / "rootfs.tar"),
                ".",
            ],
            300,
            out,
            env,
        )
    shutil.rmtree(root)
    seconds = time.monotonic() - started
    meta = {
        "key": key,
        "built_at": time.time(),
        "build_seconds": round(seconds, 1),
        "suite": sources.suite,
        "packages": list(CONTAINER_BASE_PACKAGES),
        "markers": list(CONTAINER_BASE_MARKERS),
        "bytes": (build_dir / "rootfs.tar").stat().st_size,
    }
    (build_dir / "image.json").write_text(json.dumps(meta, indent=2) + "\n")
    final = bases / f"{key}.{time.strftime('%Y%m%d%H%M%S')}"
    os.replace(build_dir, final)
    log(f"container base built in {seconds:.0f}s: {final / 'rootfs.tar'}")
    return final


# --------------------------------------------------------------------------- state


def state_dir(name: str) -> Path:
    return RUN_ROOT / name


def load_state(name: str) -> dict[str, Any] | None:
    path = state_dir(name) / "state.json"
    if not path.is_file():
        return None
    state: dict[str, Any] = json.loads(path.read_text())
    return state


def save_state(state: dict[str, Any]) -> None:
    write_atomic(state_dir(state["name"]) / "state.json", json.dumps(state, indent=2) + "\n", 0o600)


def all_states() -> list[dict[str, Any]]:
    if not RUN_ROOT.is_dir():
        return []
    states = []
    for path in sorted(RUN_ROOT.glob("*/state.json")):
        with contextlib.suppress(ValueError, OSError):
            states.append(json.loads(path.read_text()))
    return states


def _routes_overlapping(subnet: ipaddress.IPv4Network) -> list[str]:
    out = run(["ip", "-4", "-j", "route", "show", "table", "all"], "read routes").stdout
    clashes = []
    for route in json.loads(out or "[]"):
        dst = route.get("dst", "")
        if dst in ("default", "") or ":" in dst:
            continue
        with contextlib.suppress(ValueError):
            if ipaddress.ip_network(dst, strict=False).overlaps(subnet):
                clashes.append(f"{dst} dev {route.get('dev', '?')}")
    return clashes


def allocate_slot() -> int:
    used = {s["slot"] for s in all_states()}
    links = {
        link.get("ifname") for link in json.loads(run(["ip", "-j", "link"], "read links").stdout)
    }
    for slot in range(FIRST_SLOT, LAST_SLOT + 1):
        if slot in used or f"{PREFIX}{slot}" in links:
            continue
        if _routes_overlapping(ipaddress.IPv4Network(f"{SUBNET_BASE}.{slot}.0/24")):
            continue
        return slot
    raise SandboxError(f"no free /24 left in {SUBNET_BASE}.{FIRST_SLOT}-{LAST_SLOT}.0")


def new_state(name: str, suite: str) -> dict[str, Any]:
    slot = allocate_slot()
    return {
        "name": name,
        "suite": suite,
        "owner": str(REPO),
        "slot": slot,
        "subnet": f"{SUBNET_BASE}.{slot}.0/24",
        "gateway": f"{SUBNET_BASE}.{slot}.1",
        "bridge": f"{PREFIX}{slot}",
        "nft_table": f"{PREFIX}{slot}",
        "cgroup": f"{PREFIX}/{name}",
        "run_dir": str(state_dir(name)),
        "cache_dir": str(CACHE / "hosts" / name),
        "image": "",
        "proxy": None,
        "inventory": None,
        "hosts": {},
        "created_at": time.time(),
    }


# --------------------------------------------------------------------------- processes


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return Path(f"/proc/{pid}").exists() and _proc_state(pid) != "Z"


def _proc_state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[0]


def _proc_start(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat.rsplit(")", 1)[1].split()[19])


def _same_process(record: dict[str, Any] | None) -> bool:
    """Is the process recorded (pid + start time) still the one we started?"""
    if not record:
        return False
    return _pid_alive(record["pid"]) and _proc_start(record["pid"]) == record["start"]


def _wait_reaped(pid: int, timeout: float = 5) -> None:
    """Our detached processes are reparented to PID 1: give it a moment to reap the zombie."""
    with contextlib.suppress(SandboxError):
        wait_for(f"reap process {pid}", timeout, lambda: not Path(f"/proc/{pid}").exists(), 0.1)


def _cgroup_roots() -> list[Path]:
    """The hierarchies that track processes: name=systemd (+ unified) on v1/hybrid, or v2."""
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    roots = []
    for line in mounts:
        _, target, fstype, options = line.split()[:4]
        if (fstype == "cgroup" and "name=systemd" in options.split(",")) or (
            fstype == "cgroup2" and target in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")
        ):
            roots.append(Path(target))
    if not roots:
        raise SandboxError("no cgroup hierarchy found at /sys/fs/cgroup")
    return roots


def _controller_roots() -> list[Path]:
    """The cgroup v1 resource controllers' hierarchies (memory, pids, cpu...), if any."""
    roots = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, target, fstype, options = line.split()[:4]
        if fstype == "cgroup" and not any(o.startswith("name=") for o in options.split(",")):
            roots.append(Path(target))
    return roots


def _make_cgroup(root: Path, relative: str) -> Path:
    """mkdir -p of a cgroup; a new cpuset cgroup gets its parent's CPUs and memory nodes
    (cgroup v1 starts it empty, and a process cannot join an empty cpuset)."""
    path = root / relative
    missing = [path, *path.parents]
    missing = [p for p in missing if root in p.parents and not p.is_dir()]
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)
        for name in ("cpuset.cpus", "cpuset.mems"):
            own = directory / name
            if own.exists() and not own.read_text().strip():
                own.write_text((directory.parent / name).read_text())
    return path


def _cgroup_procs_files(relative: str, controllers: bool = False) -> list[str]:
    """Create our cgroup in every hierarchy that tracks processes (and, with controllers,
    in every cgroup v1 resource controller too); the cgroup.procs files to join it."""
    roots = _cgroup_roots() + (_controller_roots() if controllers else [])
    return [str(_make_cgroup(root, relative) / "cgroup.procs") for root in roots]


def _spawn_in_cgroup(
    argv: list[str],
    log_path: Path | str,
    mode: str,
    cgroup: str,
    *,
    env: dict[str, str] | None = None,
    controllers: bool = False,
) -> subprocess.Popen[bytes]:
    """Start a long-lived child in its own session, inside the sandbox's cgroup (so that
    `down` finds and kills it), with its output appended to (or replacing) log_path.
    controllers: in its own cgroup of every cgroup v1 resource controller too (a
    container-kind host: what its engines create lands under it, not at the top)."""
    with open(log_path, mode) as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            preexec_fn=_joiner(_cgroup_procs_files(cgroup, controllers)),
        )


def _joiner(procs_files: list[str]) -> Any:
    """A preexec_fn moving the child into our cgroup before exec (only os calls: fork-safe)."""

    def join() -> None:
        pid = str(os.getpid()).encode()
        for procs in procs_files:
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)

    return join


def _cgroup_pids(relative: str) -> set[int]:
    pids: set[int] = set()
    for root in _cgroup_roots():
        base = root / relative
        if not base.is_dir():
            continue
        for procs in base.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                pids.update(int(p) for p in procs.read_text().split())
    return pids


def _kill_cgroup(relative: str, step: str, timeout: float = 10) -> None:
    """SIGKILL everything left in a cgroup tree, then remove the tree."""

    def empty() -> bool:
        pids = _cgroup_pids(relative)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return not pids

    wait_for(step, timeout, empty, 0.1)
    # The resource controllers too: a container-kind host has a cgroup in each, and its
    # engines' cgroups below it.
    for root in _cgroup_roots() + _controller_roots():
        base = root / relative
        if not base.is_dir():
            continue
        for directory in sorted(
            (p for p in base.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
        ):
            with contextlib.suppress(OSError):
                directory.rmdir()
        with contextlib.suppress(OSError):
            base.rmdir()
        # Remove the parents we created (dmsb/<name>, dmsb) once empty; never the root.
        parent = base.parent
        while parent != root and root in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent


def _mux_masters_to(addresses: set[str]) -> list[int]:
    """ssh ControlPersist masters (Ansible's, testinfra's...) connected to these addresses."""
    wanted_inodes: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            remote_hex = fields[2].split(":")[0]
            remote = socket.inet_ntoa(int(remote_hex, 16).to_bytes(4, "little"))
            if remote in addresses:
                wanted_inodes.add(fields[9])
    if not wanted_inodes:
        return []
    masters = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "comm").read_text().strip() != "ssh":
                continue
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            if not (cmdline.startswith("ssh: ") and "[mux]" in cmdline):
                continue
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in wanted_inodes:
                    masters.append(int(proc.name))
                    break
        except OSError:
            continue
    return masters


# --------------------------------------------------------------------------- network


def ensure_network(state: dict[str, Any]) -> None:
    bridge, gateway, table = state["bridge"], state["gateway"], state["nft_table"]
    _note_shared_runtime_dirs()
    if not Path(f"/sys/class/net/{bridge}").exists():
        run(["ip", "link", "add", bridge, "type", "bridge"], "create bridge")
        run(["ip", "addr", "add", f"{gateway}/24", "dev", bridge], "address bridge")
    run(["ip", "link", "set", bridge, "up"], "bring bridge up")
    # Hosts get no routed way out: no NAT, and whatever net.ipv4.ip_forward says (this
    # tool never changes it), forwarded traffic from or to the sandbox's subnet is dropped,
    # and a host's packet to anything but the sandbox or the controller is refused at once
    # (an ICMP error back to the host: nothing leaves the machine, nothing waits a timeout).
    # Bridged traffic between hosts of one sandbox stays on the bridge; the mirror is
    # reached through the proxy on the controller.
    subnet = state["subnet"]
    rules = f"""table inet {table} {{
    chain prerouting {{
        type filter hook prerouting priority filter - 10; policy accept;
        iifname "{bridge}" ip daddr != {subnet} \\
            fib daddr type != {{ local, broadcast, multicast }} \\
            reject with icmpx type admin-prohibited
    }}
    chain forward {{
        type filter hook forward priority filter - 10; policy accept;
        iifname "{bridge}" oifname != "{bridge}" drop
        oifname "{bridge}" iifname != "{bridge}" drop
        ip saddr {subnet} ip daddr != {subnet} drop
        ip daddr {subnet} ip saddr != {subnet} drop
    }}
}}
"""
    if run(["nft", "list", "table", "inet", table], "read firewall", check=False).returncode == 0:
        run(["nft", "delete", "table", "inet", table], "replace firewall")
    run(["nft", "-f", "-"], "load firewall", input_text=rules)


def teardown_network(state: dict[str, Any]) -> None:
    if (
        run(
            ["nft", "list", "table", "inet", state["nft_table"]], "read firewall", check=False
        ).returncode
        == 0
    ):
        run(["nft", "delete", "table", "inet", state["nft_table"]], "delete firewall")
    if Path(f"/sys/class/net/{state['bridge']}").exists():
        run(["ip", "link", "del", state["bridge"]], "delete bridge")


SHARED_MARKERS = {
    # path: what `ip netns add` / systemd-nspawn create on first use, that we undo when the
    # last sandbox is gone (only if they did not exist before the first sandbox).
    "/run/netns": "run-netns",
    "/run/systemd/nspawn": "run-systemd-nspawn",
}


def _note_shared_runtime_dirs() -> None:
    RUN_ROOT.mkdir(parents=True, exist_ok=True)
    for path, marker in SHARED_MARKERS.items():
        marker_file = RUN_ROOT / f".created-{marker}"
        if marker_file.exists() or (path == "/run/netns" and _is_mounted(Path(path))):
            continue
        if path == "/run/systemd/nspawn" and Path(path).exists():
            continue
        marker_file.write_text("existed\n" if Path(path).exists() else "created\n")


def _undo_shared_runtime_dirs() -> None:
    if any(True for _ in all_states()):
        return
    for path, marker in SHARED_MARKERS.items():
        marker_file = RUN_ROOT / f".created-{marker}"
        if not marker_file.exists():
            continue
        existed = marker_file.read_text().strip() == "existed"
        target = Path(path)
        if path == "/run/netns":
            if target.is_dir() and not any(target.iterdir()):
                if _is_mounted(Path(path)):
                    run(["umount", path], "unmount /run/netns", check=False)
                if not existed:
                    with contextlib.suppress(OSError):
                        target.rmdir()
        elif not existed and target.is_dir():
            for sub in ("locks", "propagate"):
                with contextlib.suppress(OSError):
                    (target / sub).rmdir()
            with contextlib.suppress(OSError):
                target.rmdir()
        marker_file.unlink()
    with contextlib.suppress(OSError):
        RUN_ROOT.rmdir()


# --------------------------------------------------------------------------- the mirror proxy


HOP_BY_HOP = {
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
}
CACHEABLE = re.compile(r"/(pool|by-hash)/[A-Za-z0-9._+~%/-]+$")


class MirrorProxy(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """HTTP proxy for the hosts: GET/HEAD to the mirror's names on port 80, nothing else.

    Packages (pool/) and by-hash indexes never change under one name, so they are cached
    on disk and served to later hosts without touching the mirror.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], allowed: frozenset[str], cache: Path, upstream: str | None
    ) -> None:
        super().__init__(address, MirrorProxyHandler)
        self.allowed = allowed
        self.cache = cache
        self.upstream = urllib.parse.urlsplit(upstream) if upstream else None
        self.log_lock = threading.Lock()

    def cache_path(self, url: urllib.parse.SplitResult) -> Path | None:
        if not CACHEABLE.search(url.path) or ".." in url.path or url.query:
            return None
        return self.cache / (url.hostname or "") / url.path.lstrip("/")


class MirrorProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: MirrorProxy

    def log_message(self, format: str, *args: Any) -> None:
        with self.server.log_lock:
            sys.stderr.write(
                f"{time.strftime('%H:%M:%S')} {self.client_address[0]} {format % args}\n"
            )
            sys.stderr.flush()

    def do_GET(self) -> None:
        self._relay()

    def do_HEAD(self) -> None:
        self._relay()

    def _refuse_method(self) -> None:
        self._refuse(405, f"{self.command} is not allowed: this proxy only fetches from the mirror")

    do_CONNECT = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method

    def _refuse(self, status: int, why: str) -> None:
        body = f"sandbox mirror proxy: {why}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.close_connection = True

    def _relay(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        host = (url.hostname or "").lower()
        if url.scheme != "http" or host not in self.server.allowed or url.port not in (None, 80):
            self._refuse(
                403,
                f"only http://{{{','.join(sorted(self.server.allowed))}}}/ is reachable "
                f"from sandbox hosts, not {self.path}",
            )
            return
        cached = None
        if self.command == "GET" and "Range" not in self.headers:
            cached = self.server.cache_path(url)
        if cached is not None and cached.is_file():
            self._send_file(cached)
            return
        try:
            self._forward(url, host, cached)
        except (OSError, http.client.HTTPException) as exc:
            self._refuse(502, f"mirror unreachable: {exc}")

    def _send_file(self, path: Path) -> None:
        size = path.stat().st_size
        self.send_response(200, "OK (sandbox cache)")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        with open(path, "rb") as handle:
            shutil.copyfileobj(handle, self.wfile, 256 * 1024)

    def _forward(self, url: urllib.parse.SplitResult, host: str, cache_to: Path | None) -> None:
        upstream = self.server.upstream
        if upstream:
            conn = http.client.HTTPConnection(
                upstream.hostname or "", upstream.port or 80, timeout=60
            )
            target = self.path
        else:
            conn = http.client.HTTPConnection(host, 80, timeout=60)
            target = urllib.parse.urlunsplit(("", "", url.path or "/", url.query, ""))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Host"] = host
        conn.request(self.command, target, headers=headers)
        resp = conn.getresponse()
        try:
            length = resp.getheader("Content-Length")
            self.send_response(resp.status, resp.reason)
            for key, value in resp.getheaders():
                if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                    self.send_header(key, value)
            no_body = self.command == "HEAD" or resp.status in (204, 304) or resp.status < 200
            if no_body:
                if length is not None:
                    self.send_header("Content-Length", length)
                self.end_headers()
                return
            if length is None:  # chunked upstream: spool, then send with a length
                with tempfile.TemporaryFile() as spool:
                    shutil.copyfileobj(resp, spool, 256 * 1024)
                    self.send_header("Content-Length", str(spool.tell()))
                    self.end_headers()
                    spool.seek(0)
                    shutil.copyfileobj(spool, self.wfile, 256 * 1024)
                return
            self.send_header("Content-Length", length)
            self.end_headers()
            self._copy_body(resp, int(length), cache_to if resp.status == 200 else None)
        finally:
            conn.close()

    def _copy_body(
        self, resp: http.client.HTTPResponse, length: int, cache_to: Path | None
    ) -> None:
        part = None
        if cache_to is not None:
            cache_to.parent.mkdir(parents=True, exist_ok=True)
            part = cache_to.with_name(f"{cache_to.name}.{threading.get_ident()}.part")
        written = 0
        with open(part, "wb") if part else contextlib.nullcontext() as sink:
            while chunk := resp.read(256 * 1024):
                self.wfile.write(chunk)
                if sink:
                    sink.write(chunk)
                written += len(chunk)
        if part:
            if written == length:
                os.replace(part, cache_to)  # type: ignore[arg-type]
            else:
                part.unlink(missing_ok=True)


def serve_proxy(args: argparse.Namespace) -> int:
    server = MirrorProxy(
        (args.listen, args.port), frozenset(args.allow), Path(args.cache), args.upstream or None
    )
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(
        f"{time.strftime('%H:%M:%S')} mirror proxy for {', '.join(args.allow)} on "
        f"{args.listen}:{args.port} (cache {args.cache})",
        file=sys.stderr,
        flush=True,
    )
    server.serve_forever()
    return 0


def ensure_proxy(state: dict[str, Any]) -> None:
    if _same_process(state.get("proxy")) and _port_open(state["gateway"], PROXY_PORT, 0.5):
        return
    stop_proxy(state)
    sources = AptSources.from_machine(state.get("suite", DEFAULT_SUITE))
    cache = CACHE / "apt-proxy"
    cache.mkdir(parents=True, exist_ok=True)
    log_path = Path(state["run_dir"]) / "proxy.log"
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "proxy",
        "--listen",
        state["gateway"],
        "--port",
        str(PROXY_PORT),
        "--cache",
        str(cache),
        "--sandbox",
        state["name"],
    ]
    for host in sorted(sources.hosts):
        argv += ["--allow", host]
    if sources.upstream_proxy:
        argv += ["--upstream", sources.upstream_proxy]
    cgroup = f"{state['cgroup']}/proxy"
    proc = _spawn_in_cgroup(argv, log_path, "a", cgroup)
    state["proxy"] = {"pid": proc.pid, "start": _proc_start(proc.pid), "cgroup": cgroup}
    save_state(state)
    try:
        wait_for(
            "start the mirror proxy",
            10,
            lambda: proc.poll() is not None or _port_open(state["gateway"], PROXY_PORT, 0.2),
        )
    except SandboxError as exc:
        raise SandboxError(f"{exc}; {log_path}:\n{_tail(log_path, 20)}") from exc
    if proc.poll() is not None:
        raise SandboxError(f"the mirror proxy exited at start; {log_path}:\n{_tail(log_path, 20)}")


def stop_proxy(state: dict[str, Any]) -> None:
    record = state.get("proxy")
    if not record:
        return
    if _same_process(record):
        os.kill(record["pid"], signal.SIGTERM)
        with contextlib.suppress(SandboxError):
            wait_for("stop the mirror proxy", 5, lambda: not _pid_alive(record["pid"]))
    _kill_cgroup(record["cgroup"], "stop the mirror proxy")
    _wait_reaped(record["pid"])
    state["proxy"] = None
    save_state(state)


def _port_open(address: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def _ssh_banner(address: str) -> bool:
    try:
        with socket.create_connection((address, 22), timeout=1) as conn:
            conn.settimeout(2)
            return conn.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} unreadable)"


# --------------------------------------------------------------------------- hosts


def _split_spec(spec: str) -> tuple[str, str, str]:
    """ "app@containers:digitalme,monitoring" -> ("app", "containers", "digitalme,monitoring")."""
    host, _, group_text = spec.partition(":")
    name, _, kind = host.partition("@")
    if "@" in host and kind not in HOST_KINDS:
        raise SandboxError(
            f"bad host kind {kind!r} in {spec!r}: use HOST or HOST@containers "
            "(a host that can run container engines)"
        )
    return name, kind or "plain", group_text


def parse_host_kinds(specs: list[str]) -> dict[str, str]:
    """["app@containers", "replica"] -> {"app": "containers", "replica": "plain"}."""
    return {name: kind for name, kind, _ in map(_split_spec, specs or ["app"])}


def parse_host_specs(specs: list[str]) -> dict[str, list[str]]:
    """["app", "replica:backup_targets,monitoring"] -> {host: [groups]} (order kept)."""
    hosts: dict[str, list[str]] = {}
    for index, spec in enumerate(specs or ["app"]):
        name, _, group_text = _split_spec(spec)
        if not HOST_RE.match(name):
            raise SandboxError(
                f"bad host name {name!r}: use a-z, 0-9 and '-' (a valid hostname, "
                "at most 32 characters)"
            )
        if name in hosts:
            raise SandboxError(f"host {name!r} is listed twice")
        groups = (
            [g for g in group_text.split(",") if g]
            if group_text
            else [DEFAULT_GROUPS[0] if index == 0 else DEFAULT_GROUPS[1]]
        )
        for group in groups:
            if not GROUP_RE.match(group) or group in ("all", "ungrouped"):
                raise SandboxError(f"bad group name {group!r} for host {name!r}")
        hosts[name] = groups
    if len(hosts) > MAX_HOSTS:
        raise SandboxError(f"at most {MAX_HOSTS} hosts per sandbox")
    return hosts


def ssh_base(state: dict[str, Any]) -> list[str]:
    run_dir = Path(state["run_dir"])
    return [
        "ssh",
        "-i",
        str(run_dir / "id_ed25519"),
        "-o",
        f"UserKnownHostsFile={run_dir / 'known_hosts'}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=5",
        "-o",
        "LogLevel=ERROR",
        "-l",
        "root",
    ]


def ssh_run(
    state: dict[str, Any],
    address: str,
    command: str,
    step: str,
    timeout: float = 60,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    return run([*ssh_base(state), address, command], step, timeout=timeout, check=check)


def ensure_keys(state: dict[str, Any]) -> None:
    run_dir = Path(state["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = run_dir / "id_ed25519"
    if not key.exists():
        run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                f"sandbox-{state['name']}",
                "-f",
                str(key),
            ],
            "generate the sandbox ssh key",
        )


def _host_paths(state: dict[str, Any], host: str) -> dict[str, Path]:
    cache = Path(state["cache_dir"]) / host
    run_dir = Path(state["run_dir"]) / "hosts" / host
    return {
        "upper": cache / "upper",
        "work": cache / "work",
        "cache": cache,
        "root": run_dir / "root",
        "run": run_dir,
        "console": run_dir / "console.log",
        "hostkey": run_dir / "ssh_host_ed25519_key",
    }


def _is_mounted(path: Path) -> bool:
    target = str(path)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if line.split()[4] == target:
            return True
    return False


def prepare_host(state: dict[str, Any], host: str, image: Path) -> None:
    """Overlay root, per-host files and network, ready for nspawn."""
    record = state["hosts"][host]
    paths = _host_paths(state, host)
    if not _is_mounted(paths["root"]):  # a fresh host: no upper layer left from an earlier one
        shutil.rmtree(paths["cache"], ignore_errors=True)
    for key in ("upper", "work", "root", "run"):
        paths[key].mkdir(parents=True, exist_ok=True)
    if not _is_mounted(paths["root"]):
        run(
            [
                "mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                f"lowerdir={image},upperdir={paths['upper']},workdir={paths['work']}",
                str(paths["root"]),
            ],
            f"{host}: mount the overlay root",
        )
    record["mounted"] = True
    save_state(state)
    root = paths["root"]
    # Host key: generated here so that it can be pinned before the host ever answers.
    if not paths["hostkey"].exists():
        run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                f"root@{host}",
                "-f",
                str(paths["hostkey"]),
            ],
            f"{host}: generate the host key",
        )
    for suffix, mode in (("", 0o600), (".pub", 0o644)):
        dest = root / f"etc/ssh/ssh_host_ed25519_key{suffix}"
        shutil.copyfile(f"{paths['hostkey']}{suffix}", dest)
        dest.chmod(mode)
    record["host_key"] = Path(f"{paths['hostkey']}.pub").read_text().split()[:2]
    authorized = root / "root/.ssh/authorized_keys"
    authorized.parent.mkdir(mode=0o700, exist_ok=True)
    shutil.copyfile(Path(state["run_dir"]) / "id_ed25519.pub", authorized)
    authorized.chmod(0o600)
    (root / "etc/hostname").write_text(f"{host}\n")
    (root / "etc/apt/apt.conf.d/00sandbox-proxy").write_text(
        "// Sandbox host: the package mirror is reached through the controller's proxy only.\n"
        f'Acquire::http::Proxy "http://{state["gateway"]}:{PROXY_PORT}/";\n'
    )
    _write_etc_hosts(state, root)
    if record.get("kind") == "containers":
        _prepare_container_kind(paths, root)
    # Network: a namespace with one veth to the sandbox bridge.
    netns, veth = record["netns"], record["veth"]
    if not Path(f"/run/netns/{netns}").exists():
        run(["ip", "netns", "add", netns], f"{host}: create the network namespace")
    if not Path(f"/sys/class/net/{veth}").exists():
        run(
            ["ip", "link", "add", veth, "type", "veth", "peer", "name", f"{veth}p", "netns", netns],
            f"{host}: create the veth pair",
        )
        run(["ip", "-n", netns, "link", "set", f"{veth}p", "name", "eth0"], f"{host}: name eth0")
        run(
            ["ip", "-n", netns, "addr", "add", f"{record['address']}/24", "dev", "eth0"],
            f"{host}: address eth0",
        )
        run(
            ["ip", "link", "set", veth, "master", state["bridge"], "up"],
            f"{host}: plug into bridge",
        )
        run(["ip", "-n", netns, "link", "set", "lo", "up"], f"{host}: loopback up")
        run(["ip", "-n", netns, "link", "set", "eth0", "up"], f"{host}: eth0 up")
        run(
            ["ip", "-n", netns, "route", "add", "default", "via", state["gateway"]],
            f"{host}: default route",
        )


def _prepare_container_kind(paths: dict[str, Path], root: Path) -> None:
    """A container-kind host: its engines' storage folders on the controller's disk (bound
    by start_host), and a unit that makes the cgroup v1 controllers writable at boot."""
    for name in CONTAINER_STORAGE:
        (paths["cache"] / "storage" / name).mkdir(parents=True, exist_ok=True)
    units = root / "etc/systemd/system"
    (units / CGROUP_RW_UNIT).write_text(
        "# Sandbox host of the containers kind (sandbox/sandbox.py, docs/sandbox.md).\n"
        "# systemd-nspawn mounts the cgroup v1 controllers read-only; container engines\n"
        "# must create cgroups in them to enforce memory and PID limits. A plain\n"
        "# remount,rw fails (busy): the bind remount works. Runs before anything else.\n"
        "[Unit]\n"
        "Description=Make the cgroup v1 controllers writable (sandbox containers kind)\n"
        "DefaultDependencies=no\n"
        "Before=sysinit.target\n"
        "ConditionPathIsDirectory=/sys/fs/cgroup/memory\n"
        "\n"
        "[Service]\n"
        "Type=oneshot\n"
        "RemainAfterExit=yes\n"
        "ExecStart=/bin/sh -ec 'for d in /sys/fs/cgroup/*/; do "
        'mount -o remount,bind,rw "$$d"; done\'\n'
        "\n"
        "[Install]\n"
        "WantedBy=sysinit.target\n"
    )
    wants = units / "sysinit.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / CGROUP_RW_UNIT
    if not link.is_symlink():
        link.symlink_to(f"/etc/systemd/system/{CGROUP_RW_UNIT}")


def _write_etc_hosts(state: dict[str, Any], root: Path) -> None:
    lines = [
        "127.0.0.1 localhost",
        "::1 localhost ip6-localhost ip6-loopback",
        f"{state['gateway']} sandbox-controller",
    ]
    for name, record in sorted(state["hosts"].items(), key=lambda item: item[1]["index"]):
        lines.append(f"{record['address']} {name}")
    (root / "etc/hosts").write_text("\n".join(lines) + "\n")


def start_host(state: dict[str, Any], host: str) -> None:
    record = state["hosts"][host]
    paths = _host_paths(state, host)
    cgroup = f"{state['cgroup']}/{host}"
    argv = [
        "systemd-nspawn",
        "--quiet",
        "--boot",
        f"--directory={paths['root']}",
        f"--machine={record['netns']}",
        f"--hostname={host}",
        # No machined or system D-Bus on the controller: no registration, no scope unit.
        "--register=no",
        "--keep-unit",
        "--console=read-only",
        "--resolv-conf=off",
        "--link-journal=no",
        "--timezone=copy",
        f"--network-namespace-path=/run/netns/{record['netns']}",
        # Without it, PrivateNetwork= services get a loopback that is down and a host
        # firewall cannot be loaded. It only acts on the host's own namespace.
        "--capability=CAP_NET_ADMIN",
    ]
    env = None
    containers = record.get("kind") == "containers"
    if containers:
        # What Docker Engine and rootful Podman need (docs/sandbox.md, "Container hosts"):
        # /proc/sys/net writable (IP forwarding, route_localnet; not the other sysctls),
        # the keyring calls (runc joins a session keyring), their storage on a real disk
        # (overlay2 on the host's overlay root fails).
        env = dict(os.environ, SYSTEMD_NSPAWN_API_VFS_WRITABLE="network")
        argv.append("--system-call-filter=@keyring")
        for name, target in CONTAINER_STORAGE.items():
            argv.append(f"--bind={paths['cache'] / 'storage' / name}:{target}")
    # A container-kind host gets its own cgroup in every v1 controller too: the cgroup
    # namespace nspawn gives the guest is rooted there, so what its engines create (and
    # what the guest may write once it remounts them) stays below it.
    proc = _spawn_in_cgroup(argv, paths["console"], "w", cgroup, env=env, controllers=containers)
    record["nspawn"] = {"pid": proc.pid, "start": _proc_start(proc.pid), "cgroup": cgroup}
    record["started_at"] = time.time()
    save_state(state)


def wait_host(state: dict[str, Any], host: str, timeout: float) -> dict[str, Any]:
    """Wait for sshd, then for systemd to finish booting. Failures show the host's journal."""
    record = state["hosts"][host]
    started = time.monotonic()
    address = record["address"]
    nspawn = record["nspawn"]

    def sshd_or_dead() -> str | None:
        if not _pid_alive(nspawn["pid"]):
            return "dead"
        return "up" if _ssh_banner(address) else None

    try:
        if wait_for(f"{host}: wait for sshd on {address}:22", timeout, sshd_or_dead, 0.1) == "dead":
            raise SandboxError(f"{host}: systemd-nspawn exited during boot")
        sshd_seconds = time.monotonic() - started
        remaining = max(5.0, timeout - sshd_seconds)
        proc = ssh_run(
            state,
            address,
            "systemctl is-system-running --wait",
            f"{host}: wait for systemd to finish booting (systemctl is-system-running --wait)",
            timeout=remaining,
            check=False,
        )
        status = proc.stdout.strip() or proc.stderr.strip()
        if proc.returncode == 255:
            raise SandboxError(f"{host}: ssh to {address} failed: {proc.stderr.strip()}")
        reason = ""
        if status == "degraded":
            failed = ssh_run(
                state,
                address,
                "systemctl --failed --plain --no-legend --no-pager",
                f"{host}: list failed units",
                check=False,
            ).stdout.strip()
            reason = f"failed units: {failed or '(none listed)'}"
        elif status != "running":
            raise SandboxError(f"{host}: systemd reports {status!r} after boot")
    except SandboxError as exc:
        raise SandboxError(f"{exc}\n{host_diagnostics(state, host)}") from exc
    return {
        "sshd_seconds": round(sshd_seconds, 2),
        "boot_seconds": round(time.monotonic() - started, 2),
        "system_state": status,
        "degraded_reason": reason,
    }


def host_diagnostics(state: dict[str, Any], host: str) -> str:
    paths = _host_paths(state, host)
    parts = [f"--- {host}: console ({paths['console']}), last lines:", _tail(paths["console"], 30)]
    journals = sorted((paths["upper"] / "var/log/journal").glob("*/"))
    for journal in journals[-1:]:
        proc = run(
            [
                "journalctl",
                f"--directory={journal}",
                "--no-pager",
                "-n",
                "60",
                "-o",
                "short-monotonic",
            ],
            f"{host}: read the journal",
            check=False,
        )
        parts += [
            f"--- {host}: journal ({journal}), last lines:",
            (proc.stdout or proc.stderr).strip(),
        ]
    if not journals:
        parts.append(f"--- {host}: no journal written (systemd did not get as far as journald)")
    return "\n".join(parts)


def stop_hosts(state: dict[str, Any], hosts: list[str]) -> None:
    """Stop hosts cleanly (SIGTERM to nspawn = poweroff), then remove all they used."""
    if not hosts:
        return
    addresses = {state["hosts"][h]["address"] for h in hosts}
    for pid in _mux_masters_to(addresses):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for host in hosts:
        nspawn = state["hosts"][host].get("nspawn")
        if _same_process(nspawn):
            with contextlib.suppress(ProcessLookupError):
                os.kill(nspawn["pid"], signal.SIGTERM)

    def finish(host: str) -> None:
        record = state["hosts"][host]
        nspawn = record.get("nspawn")
        if nspawn:
            try:
                wait_for(f"{host}: power off", 20, lambda: not _same_process(nspawn), 0.1)
            except SandboxError:
                log(f"{host}: did not power off within 20s; killing it")
            _kill_cgroup(nspawn["cgroup"], f"{host}: kill remaining processes")
            _wait_reaped(nspawn["pid"])
        paths = _host_paths(state, host)
        if _is_mounted(paths["root"]):
            for _attempt in range(20):
                if (
                    run(["umount", str(paths["root"])], f"{host}: unmount", check=False).returncode
                    == 0
                ):
                    break
                time.sleep(0.2)
            else:
                run(["umount", "--lazy", str(paths["root"])], f"{host}: unmount (lazy)")
        if Path(f"/run/netns/{record['netns']}").exists():
            run(["ip", "netns", "del", record["netns"]], f"{host}: delete the network namespace")
        if Path(f"/sys/class/net/{record['veth']}").exists():
            run(["ip", "link", "del", record["veth"]], f"{host}: delete the veth", check=False)
        propagate = Path("/run/systemd/nspawn/propagate") / record["netns"]
        with contextlib.suppress(OSError):
            propagate.rmdir()
        shutil.rmtree(paths["cache"], ignore_errors=True)
        shutil.rmtree(paths["run"], ignore_errors=True)

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(finish, hosts))
    for host in hosts:
        del state["hosts"][host]
    save_state(state)
    _write_known_hosts(state)


def _write_known_hosts(state: dict[str, Any]) -> None:
    lines = [
        f"{r['address']} {' '.join(r['host_key'])}"
        for r in state["hosts"].values()
        if r.get("host_key")
    ]
    write_atomic(
        Path(state["run_dir"]) / "known_hosts", "\n".join(lines) + ("\n" if lines else ""), 0o644
    )


def host_is_healthy(state: dict[str, Any], host: str) -> bool:
    record = state["hosts"][host]
    paths = _host_paths(state, host)
    return (
        _same_process(record.get("nspawn"))
        and _is_mounted(paths["root"])
        and Path(f"/run/netns/{record['netns']}").exists()
        and _ssh_banner(record["address"])
    )


# --------------------------------------------------------------------------- inventory


def _yaml(value: Any, indent: int = 0) -> str:
    """A tiny YAML emitter for dicts of dicts/lists/scalars (strings quoted as JSON)."""
    pad = "  " * indent
    if isinstance(value, dict):
        if not value:
            return " {}\n"
        out = "\n"
        for key, item in value.items():
            if item is None:
                out += f"{pad}{key}:\n"
            elif isinstance(item, (dict, list)):
                out += f"{pad}{key}:{_yaml(item, indent + 1)}"
            else:
                out += f"{pad}{key}: {_scalar(item)}\n"
        return out
    if isinstance(value, list):
        if not value:
            return " []\n"
        return "\n" + "".join(f"{pad}- {_scalar(item)}\n" for item in value)
    return f" {_scalar(value)}\n"


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(str(value))


INVENTORY_HEADER = (
    "# Written by sandbox/sandbox.py for sandbox {name!r}: do not edit, it is rewritten\n"
)


def describe(state: dict[str, Any]) -> dict[str, Any]:
    run_dir = Path(state["run_dir"])
    ssh_args = (
        f"-o UserKnownHostsFile={run_dir / 'known_hosts'} -o StrictHostKeyChecking=yes "
        "-o IdentitiesOnly=yes"
    )
    hosts = []
    for name, record in sorted(state["hosts"].items(), key=lambda item: item[1]["index"]):
        hosts.append(
            {
                "name": name,
                "address": record["address"],
                "groups": record["groups"],
                "kind": record.get("kind", "plain"),
                "netns": record["netns"],
                "ssh": [*ssh_base(state), record["address"]],
                "system_state": record.get("system_state", ""),
                "degraded_reason": record.get("degraded_reason", ""),
                "timings": record.get("timings", {}),
            }
        )
    return {
        "name": state["name"],
        "suite": state.get("suite", DEFAULT_SUITE),
        "subnet": state["subnet"],
        "controller_address": state["gateway"],
        "apt_proxy": f"http://{state['gateway']}:{PROXY_PORT}/",
        "user": "root",
        "private_key": str(run_dir / "id_ed25519"),
        "known_hosts": str(run_dir / "known_hosts"),
        "ssh_common_args": ssh_args,
        "inventory": state.get("inventory"),
        "image": state["image"],
        "hosts": hosts,
    }


def render_inventory(state: dict[str, Any]) -> str:
    info = describe(state)
    groups: dict[str, dict[str, Any]] = {}
    for host in info["hosts"]:
        for group in host["groups"]:
            groups.setdefault(group, {"hosts": {}})["hosts"][host["name"]] = None
    inventory = {
        "all": {
            "vars": {
                "ansible_user": "root",
                "ansible_ssh_private_key_file": info["private_key"],
                # Host-key checking stays on: every host key is pinned in this known_hosts.
                "ansible_ssh_common_args": info["ssh_common_args"],
                "ansible_python_interpreter": "/usr/bin/python3",
                "sandbox_name": info["name"],
                "sandbox_controller_address": info["controller_address"],
                "sandbox_apt_proxy": info["apt_proxy"],
                # The client key's public half: plays authorise it for the accounts they
                # create (the base role's admin user, an SFTP replica account).
                "sandbox_ssh_public_key": Path(info["private_key"] + ".pub").read_text().strip(),
            },
            # Each host's SSH host key, for plays that must pin it themselves (e.g. an
            # SFTP replica's client).
            "hosts": {
                h["name"]: {
                    "ansible_host": h["address"],
                    "sandbox_host_key": " ".join(state["hosts"][h["name"]].get("host_key", [])),
                    # Only on hosts of the containers kind (they can run container engines).
                    **({"sandbox_host_kind": h["kind"]} if h["kind"] != "plain" else {}),
                }
                for h in info["hosts"]
            },
            "children": groups,
        }
    }
    return INVENTORY_HEADER.format(name=state["name"]) + "---" + _yaml(inventory)


def write_inventory(state: dict[str, Any], path: Path) -> None:
    write_atomic(path, render_inventory(state))
    state["inventory"] = str(path.resolve())
    save_state(state)


def remove_inventory(state: dict[str, Any]) -> None:
    path = state.get("inventory")
    if not path or not Path(path).is_file():
        return
    first = Path(path).read_text().split("\n", 1)[0] + "\n"
    if first == INVENTORY_HEADER.format(name=state["name"]):  # ours, for this sandbox
        Path(path).unlink()


# --------------------------------------------------------------------------- up / down


def sandbox_up(
    name: str,
    specs: list[str],
    inventory: Path | None,
    timeout: float,
    suite: str = DEFAULT_SUITE,
) -> dict[str, Any]:
    require_root()
    wanted = parse_host_specs(specs)
    kinds = parse_host_kinds(specs)
    with machine_lock():
        state = load_state(name)
        if state is not None and state["owner"] != str(REPO):
            raise SandboxError(
                f"sandbox {name!r} belongs to the checkout {state['owner']}: take it down "
                f"there, or use another name (--name / SANDBOX=...)"
            )
        if state is None:
            state = new_state(name, suite)
            state_dir(name).mkdir(parents=True, exist_ok=True, mode=0o700)
            save_state(state)
        if state.get("suite", DEFAULT_SUITE) != suite:
            # All hosts of a sandbox run one release: asked for another, they boot fresh.
            log(f"{name}: rebooting every host on {suite} (was {state.get('suite')})")
            stop_hosts(state, list(state["hosts"]))
            state["suite"] = suite
            save_state(state)
        started = time.monotonic()
        state["image"] = str(ensure_image(suite))
        image_seconds = time.monotonic() - started
        save_state(state)
        ensure_keys(state)
        ensure_network(state)
        ensure_proxy(state)
        gone = [h for h in state["hosts"] if h not in wanted]
        if gone:
            log(f"{name}: removing hosts no longer asked for: {', '.join(gone)}")
            stop_hosts(state, gone)
        stale = [h for h in state["hosts"] if not host_is_healthy(state, h)]
        # A host asked for as another kind is booted fresh as that kind.
        rekinded = [
            h
            for h in state["hosts"]
            if h not in stale and state["hosts"][h].get("kind", "plain") != kinds[h]
        ]
        # A host that died (or was killed) comes back fresh under its name and address.
        reused = {h: state["hosts"][h]["index"] for h in stale + rekinded}
        if stale:
            log(f"{name}: rebooting hosts that are not healthy: {', '.join(stale)}")
        if rekinded:
            log(f"{name}: rebooting hosts asked for as another kind: {', '.join(rekinded)}")
        stop_hosts(state, stale + rekinded)
        new = [h for h in wanted if h not in state["hosts"]]
        used = {r["index"] for r in state["hosts"].values()} | {
            i for h, i in reused.items() if h in new
        }
        free = (i for i in range(MAX_HOSTS) if i not in used)
        for host in new:
            index = reused[host] if host in reused else next(free)
            state["hosts"][host] = {
                "index": index,
                "address": f"{SUBNET_BASE}.{state['slot']}.{FIRST_HOST_OCTET + index}",
                "netns": f"{PREFIX}{state['slot']}-{host}",
                "veth": f"{PREFIX}{state['slot']}h{index}",
                "groups": wanted[host],
                "kind": kinds[host],
            }
        for host, groups in wanted.items():
            state["hosts"][host]["groups"] = groups
        save_state(state)
        boot_started = time.monotonic()
        for host in new:
            log(f"{name}: booting {host} ({state['hosts'][host]['address']})")
            prepare_host(state, host, Path(state["image"]))
        _write_known_hosts(state)
        for host in state["hosts"]:  # everyone learns the new names
            if host not in new:
                _write_etc_hosts(state, _host_paths(state, host)["root"])
        for host in new:
            start_host(state, host)
        errors = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(new))) as pool:
            futures = {pool.submit(wait_host, state, host, timeout): host for host in new}
            for future in concurrent.futures.as_completed(futures):
                host = futures[future]
                try:
                    result = future.result()
                except SandboxError as exc:
                    errors.append(str(exc))
                    continue
                record = state["hosts"][host]
                record["system_state"] = result.pop("system_state")
                record["degraded_reason"] = result.pop("degraded_reason")
                record["timings"] = result
                note = f" ({record['degraded_reason']})" if record["degraded_reason"] else ""
                log(
                    f"{name}: {host} is up at {record['address']}: "
                    f"sshd after {result['sshd_seconds']}s, "
                    f"systemd {record['system_state']}{note} after {result['boot_seconds']}s"
                )
        save_state(state)
        if errors:
            raise SandboxError(
                "\n".join(errors) + f"\n(the sandbox is left up for inspection: "
                f"`sandbox.py down --name {name}` removes it)"
            )
        if new:
            log(
                f"{name}: {len(new)} host(s) booted in {time.monotonic() - boot_started:.1f}s "
                f"(image ready in {image_seconds:.1f}s)"
            )
        if inventory is None and state.get("inventory"):
            inventory = Path(state["inventory"])  # keep the one written before up to date
        if inventory is not None:
            write_inventory(state, inventory)
            log(f"{name}: inventory written to {inventory}")
        return describe(state)


def sandbox_down(name: str) -> bool:
    require_root()
    with machine_lock():
        state = load_state(name)
        if state is None:
            log(f"no sandbox named {name!r} is up")
            return False
        if _same_process(state.get("proxy")):  # stops while the hosts power off
            os.kill(state["proxy"]["pid"], signal.SIGTERM)
        stop_hosts(state, list(state["hosts"]))
        stop_proxy(state)
        teardown_network(state)
        with contextlib.suppress(SandboxError):
            _kill_cgroup(state["cgroup"], "remove the sandbox cgroup")
        remove_inventory(state)
        shutil.rmtree(state["cache_dir"], ignore_errors=True)
        with contextlib.suppress(OSError):
            Path(state["cache_dir"]).parent.rmdir()
        shutil.rmtree(state_dir(name), ignore_errors=True)
        _undo_shared_runtime_dirs()
        log(f"{name}: down")
        return True


def sandbox_kill(name: str, hosts: list[str]) -> list[str]:
    """Kill hosts without shutdown, like a power cut: SIGKILL to the nspawn process and to
    everything in the host's cgroup at once. The state keeps them, marked killed, so
    `status` shows them NOT HEALTHY and the next `up` naming them boots them fresh (new
    upper layer, new host key) with the same name and address."""
    require_root()
    with machine_lock():
        state = load_state(name)
        if state is None:
            raise SandboxError(f"no sandbox named {name!r} is up")
        unknown = [h for h in hosts if h not in state["hosts"]]
        if unknown:
            raise SandboxError(f"no host {', '.join(unknown)} in sandbox {name!r}")
        for host in hosts:
            record = state["hosts"][host]
            nspawn = record.get("nspawn")
            if nspawn:
                _kill_cgroup(nspawn["cgroup"], f"{host}: kill every process")
                _wait_reaped(nspawn["pid"])
            record["killed_at"] = time.time()
            log(f"{name}: {host} killed (no shutdown); `up` boots it fresh")
        save_state(state)
        # Connections Ansible or testinfra kept open would hang on the dead host.
        for pid in _mux_masters_to({state["hosts"][h]["address"] for h in hosts}):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        return hosts


# --------------------------------------------------------------------------- CLI


def cmd_up(args: argparse.Namespace) -> int:
    info = sandbox_up(
        args.name,
        args.hosts,
        Path(args.inventory) if args.inventory else None,
        args.timeout,
        args.suite,
    )
    if args.write_known_hosts:
        shutil.copyfile(info["known_hosts"], args.write_known_hosts)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for host in info["hosts"]:
            print(
                f"{host['name']}\t{host['address']}\t{','.join(host['groups'])}\t{host['system_state']}"
            )
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    if args.all:
        names = [s["name"] for s in all_states() if args.any_owner or s["owner"] == str(REPO)]
        for name in names:
            sandbox_down(name)
        return 0
    sandbox_down(args.name)
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    sandbox_kill(args.name, args.hosts)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    states = [s for s in all_states() if not args.name or s["name"] == args.name]
    if args.json:
        print(json.dumps([describe(s) for s in states], indent=2))
        return 0
    if not states:
        print("no sandbox is up")
        return 0 if not args.name else 1
    for state in states:
        proxy = "up" if _same_process(state.get("proxy")) else "DOWN"
        print(
            f"sandbox {state['name']} ({state.get('suite', DEFAULT_SUITE)}): {state['subnet']} "
            f"on {state['bridge']}, proxy {proxy}, owner {state['owner']}, "
            f"inventory {state.get('inventory') or '-'}"
        )
        for name, record in sorted(state["hosts"].items(), key=lambda item: item[1]["index"]):
            alive = "running" if host_is_healthy(state, name) else "NOT HEALTHY"
            kind = "" if record.get("kind", "plain") == "plain" else f" ({record['kind']} kind)"
            print(
                f"  {name:<16} {record['address']:<15} {','.join(record['groups']):<24} "
                f"{alive}{kind}"
            )
    return 0


def cmd_ssh(args: argparse.Namespace) -> int:
    state = load_state(args.name)
    if state is None or args.host not in state["hosts"]:
        raise SandboxError(
            f"no host {args.host!r} in sandbox {args.name!r} (see `sandbox.py status`)"
        )
    base = ssh_base(state)
    base[base.index("-l") + 1] = args.user
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    argv = [
        *base,
        "-o",
        "BatchMode=no",
        state["hosts"][args.host]["address"],
        *args.command,
    ]
    if sys.stdin.isatty() and not args.command:
        argv.insert(1, "-t")
    os.execvp("ssh", argv)
    return 0


def cmd_image(args: argparse.Namespace) -> int:
    require_root()
    with machine_lock():
        started = time.monotonic()
        path = ensure_image(args.suite, rebuild=args.rebuild)
    log(f"image ready in {time.monotonic() - started:.1f}s")
    print(path)
    return 0


def cmd_container_base(args: argparse.Namespace) -> int:
    require_root()
    # Its own lock: a build takes a minute or two, and must not hold up sandboxes.
    with machine_lock(CONTAINER_BASE_LOCK):
        started = time.monotonic()
        path = ensure_container_base(rebuild=args.rebuild)
    log(f"container base ready in {time.monotonic() - started:.1f}s")
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sandbox.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    name_help = f"sandbox name (default {DEFAULT_NAME}); sandboxes of different names do not clash"
    suite_help = (
        f"the hosts' Debian release: {' (Debian 12) or '.join(SUITES)} (Debian 13); "
        f"default {DEFAULT_SUITE}. Each release has its own cached image"
    )

    up = sub.add_parser("up", help="boot the hosts (declarative, idempotent)")
    up.add_argument("--name", default=DEFAULT_NAME, help=name_help)
    up.add_argument("--inventory", help="write an Ansible inventory (YAML) here")
    up.add_argument("--json", action="store_true", help="print the sandbox description as JSON")
    up.add_argument("--write-known-hosts", help="also copy the pinned known_hosts here")
    up.add_argument("--timeout", type=float, default=120, help="seconds for a host to boot")
    up.add_argument(
        "--suite",
        choices=SUITES,
        default=DEFAULT_SUITE,
        help=suite_help + "; a sandbox asked for another release boots all its hosts fresh",
    )
    up.add_argument(
        "hosts",
        nargs="*",
        metavar="HOST[@containers][:GROUP[,GROUP]]",
        help="host names (default: app); the first defaults to group digitalme, "
        "the others to backup_targets; HOST@containers: a host that can run container "
        "engines (docs/sandbox.md)",
    )
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="remove every host and everything the sandbox created")
    down.add_argument("--name", default=DEFAULT_NAME, help=name_help)
    down.add_argument("--all", action="store_true", help="every sandbox of this checkout")
    down.add_argument("--any-owner", action="store_true", help="with --all: of any checkout")
    down.set_defaults(func=cmd_down)

    kill = sub.add_parser(
        "kill", help="kill hosts without shutdown (a power cut); `up` boots them fresh"
    )
    kill.add_argument("--name", default=DEFAULT_NAME, help=name_help)
    kill.add_argument("hosts", nargs="+", metavar="HOST")
    kill.set_defaults(func=cmd_kill)

    status = sub.add_parser("status", help="list sandboxes and their hosts")
    status.add_argument("--name", help="only this sandbox")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    ssh = sub.add_parser("ssh", help="ssh into a host (pinned host key)")
    ssh.add_argument("--name", default=DEFAULT_NAME, help=name_help)
    ssh.add_argument(
        "--user",
        default="root",
        help="log in as this user (after the base role, root may not: use admin)",
    )
    ssh.add_argument("host")
    ssh.add_argument("command", nargs=argparse.REMAINDER)
    ssh.set_defaults(func=cmd_ssh)

    image = sub.add_parser("image", help="build the base image if missing, stale or broken")
    image.add_argument("--rebuild", action="store_true", help="build it even if the cache is good")
    image.add_argument("--suite", choices=SUITES, default=DEFAULT_SUITE, help=suite_help)
    image.set_defaults(func=cmd_image)

    base = sub.add_parser(
        "container-base",
        help="build the container image base (Debian 12 + Python) if missing, stale or "
        "broken; prints its rootfs.tar",
    )
    base.add_argument("--rebuild", action="store_true", help="build it even if the cache is good")
    base.set_defaults(func=cmd_container_base)

    proxy = sub.add_parser("proxy", help=argparse.SUPPRESS)  # internal: run by `up`
    proxy.add_argument("--listen", required=True)
    proxy.add_argument("--port", type=int, default=PROXY_PORT)
    proxy.add_argument("--cache", required=True)
    proxy.add_argument("--allow", action="append", required=True)
    proxy.add_argument("--upstream")
    proxy.add_argument("--sandbox", help="for ps: which sandbox this proxy serves")
    proxy.set_defaults(func=serve_proxy)

    args = parser.parse_args(argv)
    if getattr(args, "name", None) and not NAME_RE.match(args.name):
        parser.error(f"bad sandbox name {args.name!r}: use a-z, 0-9 and '-', at most 40 characters")
    try:
        return int(args.func(args))
    except SandboxError as exc:
        print(f"sandbox: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sandbox: interrupted (run `sandbox.py down` to clean up)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
