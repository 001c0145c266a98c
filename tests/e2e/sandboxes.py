"""Sandbox hosts for end-to-end tests: the objects behind the ``sandbox_hosts`` fixture.

See tests/e2e/conftest.py for the fixture and docs/sandbox.md for the sandbox itself.
Import from here (``from tests.e2e.sandboxes import Sandbox, run_tool``) for types and the
lower-level helpers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SANDBOX_TOOL = REPO / "sandbox" / "sandbox.py"
RUN_ROOT = Path(os.environ.get("SANDBOX_RUN_DIR", "/run/digitalme-sandbox"))
VENV_BIN = Path(sys.executable).parent


def load_sandbox_tool() -> ModuleType:
    """sandbox/sandbox.py as a module (standard library only; nothing runs at import)."""
    spec = importlib.util.spec_from_file_location("sandbox_tool", SANDBOX_TOOL)
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, tool)  # its dataclasses look the module up
    spec.loader.exec_module(tool)
    return tool


# The Debian releases sandbox hosts can run (`sandbox.py up --suite`), the default first.
SUITES: tuple[str, ...] = load_sandbox_tool().SUITES


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail(
            "sandbox e2e tests need root (network namespaces, mounts, systemd-nspawn); "
            "CI runs them as root",
            pytrace=False,
        )


def tool_env() -> dict[str, str]:
    """Environment for sandbox.py, ansible and molecule: the venv's tools first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("ANSIBLE_CONFIG", None)  # ansible.cfg of the repository, not a Molecule one
    return env


def run_tool(
    *args: str, timeout: float = 1200, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run sandbox/sandbox.py; a failure shows its whole output (journal included)."""
    proc = subprocess.run(
        [sys.executable, str(SANDBOX_TOOL), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=tool_env(),
        cwd=REPO,
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"sandbox.py {' '.join(args)} failed (exit {proc.returncode}):\n"
            f"{proc.stderr}\n{proc.stdout}",
            pytrace=False,
        )
    return proc


@dataclasses.dataclass(frozen=True)
class SandboxHost:
    name: str
    address: str
    groups: tuple[str, ...]
    ssh_command: tuple[str, ...]

    def run(
        self,
        command: str,
        *,
        check: bool = True,
        timeout: float = 300,
        login: str = "root",
    ) -> subprocess.CompletedProcess[str]:
        """Run a shell command on the host as root; check=True fails the test with its output.

        ``login`` logs in as another user and runs the command through ``sudo`` (after the
        base role has run, root may not log in any more; its admin user may).
        """
        argv = list(self.ssh_command)
        if login != "root":
            argv[argv.index("-l") + 1] = login
            command = f"sudo -n sh -c {shlex.quote(command)}"
        proc = subprocess.run(
            [*argv, command],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            pytest.fail(
                f"{self.name}: `{command}` exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}",
                pytrace=False,
            )
        return proc


@dataclasses.dataclass(frozen=True)
class Sandbox:
    name: str
    suite: str  # the hosts' Debian release (SUITES)
    hosts: dict[str, SandboxHost]
    inventory: Path
    controller_address: str
    subnet: str
    private_key: Path
    known_hosts: Path
    apt_proxy: str

    @property
    def slot(self) -> int:
        return int(self.subnet.split(".")[2])

    def ansible(
        self, pattern: str, *args: str, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        return self._run(
            [str(VENV_BIN / "ansible"), "-i", str(self.inventory), pattern, *args], check, timeout
        )

    def ansible_playbook(
        self, playbook: str | Path, *args: str, check: bool = True, timeout: float = 1800
    ) -> subprocess.CompletedProcess[str]:
        return self._run(
            [str(VENV_BIN / "ansible-playbook"), "-i", str(self.inventory), str(playbook), *args],
            check,
            timeout,
        )

    def _run(
        self, argv: list[str], check: bool, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=tool_env(),
            cwd=REPO,
            stdin=subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            pytest.fail(
                f"`{' '.join(argv)}` exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}",
                pytrace=False,
            )
        return proc

    def down(self) -> None:
        run_tool("down", "--name", self.name, timeout=300)

    def leftovers(self) -> list[str]:
        """Anything of this sandbox still on the machine (after down(): must be empty)."""
        found = []
        prefix = f"dmsb{self.slot}"
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        found += [
            f"netns {line.split()[0]}"
            for line in netns.splitlines()
            if line.startswith(f"{prefix}-")
        ]
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        found += [f"link {m}" for m in re.findall(rf"^\d+: ({prefix}(?:h\d+)?)[@:]", links, re.M)]
        tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
        found += [f"nft {line}" for line in tables.splitlines() if line.endswith(f" {prefix}")]
        run_dir = str(RUN_ROOT / self.name)
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
        found += [
            f"mount {line.split()[4]}"
            for line in mounts
            if line.split()[4].startswith(run_dir) or f"/sandbox/hosts/{self.name}/" in line
        ]
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (
                    (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                )
            except OSError:
                continue
            if (
                f"--machine={prefix}-" in cmdline
                or f"--sandbox {self.name} " in f"{cmdline} "
                or (cmdline.startswith("ssh: ") and "[mux]" in cmdline and self._mux_is_ours(proc))
            ):
                found.append(f"process {proc.name}: {cmdline.strip()}")
        # Every hierarchy: hosts of the containers kind have a cgroup in each controller.
        roots = [Path("/sys/fs/cgroup")] + [
            p for p in Path("/sys/fs/cgroup").iterdir() if p.is_dir() and not p.is_symlink()
        ]
        for root in roots:
            if (root / "dmsb" / self.name).exists():
                found.append(f"cgroup {root / 'dmsb' / self.name}")
        # The folders bound into container-kind hosts (their engines' storage) and the
        # hosts' upper layers, on the controller's disk.
        cache = Path(os.environ.get("SANDBOX_CACHE_DIR", str(REPO / ".cache" / "sandbox")))
        if (cache / "hosts" / self.name).exists():
            found.append(f"host folders {cache / 'hosts' / self.name}")
        if Path(run_dir).exists():
            found.append(f"state {run_dir}")
        return found

    def _mux_is_ours(self, proc: Path) -> bool:
        """An ssh ControlPersist master still connected to one of our addresses?"""
        addresses = {h.address for h in self.hosts.values()}
        try:
            inodes = {
                os.readlink(fd)[8:-1]
                for fd in (proc / "fd").iterdir()
                if os.readlink(fd).startswith("socket:[")
            }
        except OSError:
            return False
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            remote = ".".join(str(b) for b in reversed(bytes.fromhex(fields[2].split(":")[0])))
            if fields[9] in inodes and remote in addresses:
                return True
        return False


def add_group_vars(inventory_dir: Path, group_vars: dict[str, dict[str, Any]]) -> None:
    """Variables for groups other than ``all`` (``{"digitalme": {...}}``), beside the
    sandbox environment's own group_vars in the inventory, so that every playbook run
    against this sandbox gets them: a test environment's settings."""
    folder = inventory_dir / "group_vars"
    own = REPO / "inventory" / "sandbox" / "group_vars"
    if folder.is_symlink():
        folder.unlink()
        folder.mkdir()
        for entry in own.iterdir():
            (folder / entry.name).symlink_to(entry)
    for group, variables in group_vars.items():
        if group == "all" or (own / group).exists() or (own / f"{group}.yml").exists():
            raise ValueError(f"group_vars for {group} would clash with the sandbox's own")
        (folder / f"{group}.json").write_text(json.dumps(variables, indent=2) + "\n")


def module_sandbox_name(module_name: str) -> str:
    stem = re.sub(r"[^a-z0-9]+", "-", module_name.rsplit(".", 1)[-1].lower()).strip("-")
    checkout = hashlib.sha1(str(REPO).encode()).hexdigest()[:6]  # clones do not clash
    return f"e2e-{stem[:26].strip('-')}-{checkout}"


def boot_sandbox(
    name: str, specs: tuple[str, ...], inventory_dir: Path, suite: str = SUITES[0]
) -> Sandbox:
    """Boot (or reconcile) a sandbox of a Debian release (SUITES) and describe it; the
    building block of the fixture."""
    require_root()
    inventory_dir.mkdir(parents=True, exist_ok=True)
    for shared in ("group_vars", "host_vars"):
        source, link = REPO / "inventory" / "sandbox" / shared, inventory_dir / shared
        if source.is_dir() and not link.exists():
            link.symlink_to(source)
    info = json.loads(
        run_tool(
            "up",
            "--json",
            "--name",
            name,
            "--suite",
            suite,
            "--inventory",
            str(inventory_dir / "hosts.yml"),
            *specs,
        ).stdout
    )
    hosts = {
        h["name"]: SandboxHost(
            name=h["name"],
            address=h["address"],
            groups=tuple(h["groups"]),
            ssh_command=tuple(h["ssh"]),
        )
        for h in info["hosts"]
    }
    return Sandbox(
        name=name,
        suite=info["suite"],
        hosts=hosts,
        inventory=inventory_dir,
        controller_address=info["controller_address"],
        subnet=info["subnet"],
        private_key=Path(info["private_key"]),
        known_hosts=Path(info["known_hosts"]),
        apt_proxy=info["apt_proxy"],
    )
