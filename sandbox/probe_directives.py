#!/usr/bin/env python3
"""Which systemd sandboxing directives take effect on this host? (run it as root on a host)

    python3 sandbox/sandbox.py ssh app -- python3 - < sandbox/probe_directives.py

Each probe starts a transient service with `systemd-run` and the directive under test, runs
a command that can only succeed (or only fail) if the directive is enforced, and prints one
Markdown table row: enforced / NOT enforced / unit fails to start. docs/sandbox.md keeps the
result for sandbox hosts; roles must not rely on what is not enforced here.
"""

# ruff: noqa: S603, S607, S108 (runs fixed system commands, as root, on a throw-away host)
from __future__ import annotations

import subprocess
import sys

# (directive as written in a unit, extra properties, shell command, check, evidence)
# check(rc, out) -> True when the directive took effect.
PROBES: list[tuple[str, list[str], str, object, str]] = [
    (
        "DynamicUser=yes",
        ["DynamicUser=yes"],
        "id -u",
        lambda rc, out: rc == 0 and int(out) >= 61184,
        "runs as a transient UID (61184-65519)",
    ),
    (
        "StateDirectory=probe (with DynamicUser)",
        ["DynamicUser=yes", "StateDirectory=probe"],
        "touch /var/lib/probe/f && stat -c %U /var/lib/probe/f",
        lambda rc, out: rc == 0,
        "the dynamic user can write /var/lib/probe",
    ),
    (
        "ProtectSystem=strict",
        ["ProtectSystem=strict"],
        "touch /etc/probe-x",
        lambda rc, out: rc != 0,
        "root cannot write /etc",
    ),
    (
        "ProtectSystem=strict + ReadWritePaths=",
        ["ProtectSystem=strict", "ReadWritePaths=/srv"],
        "touch /srv/probe-rw && rm /srv/probe-rw",
        lambda rc, out: rc == 0,
        "/srv stays writable",
    ),
    (
        "ProtectSystem=full",
        ["ProtectSystem=full"],
        "touch /usr/probe-x",
        lambda rc, out: rc != 0,
        "root cannot write /usr",
    ),
    (
        "ProtectHome=yes",
        ["ProtectHome=yes"],
        "test ! -e /root/.ssh/authorized_keys",
        lambda rc, out: rc == 0,
        "/root's files are hidden",
    ),
    (
        "PrivateTmp=yes",
        ["PrivateTmp=yes"],
        "test ! -e /tmp/probe-host-file",
        lambda rc, out: rc == 0,
        "a file in the host's /tmp is not visible",
    ),
    (
        "PrivateDevices=yes",
        ["PrivateDevices=yes"],
        "test ! -e /dev/net/tun && ls /dev | wc -l",
        lambda rc, out: rc == 0,
        "/dev/net/tun gone, minimal /dev",
    ),
    (
        "ProtectKernelTunables=yes",
        ["ProtectKernelTunables=yes"],
        "echo 1 > /proc/sys/vm/drop_caches",
        lambda rc, out: rc != 0,
        "/proc/sys is read-only",
    ),
    (
        "ProtectKernelModules=yes",
        ["ProtectKernelModules=yes"],
        "ls /usr/lib/modules",
        lambda rc, out: rc != 0,
        "/usr/lib/modules inaccessible",
    ),
    (
        "ProtectKernelLogs=yes",
        ["ProtectKernelLogs=yes"],
        "test ! -r /dev/kmsg",
        lambda rc, out: rc == 0,
        "/dev/kmsg not readable",
    ),
    (
        "ProtectControlGroups=yes",
        ["ProtectControlGroups=yes"],
        "grep -E ' /sys/fs/cgroup ' /proc/self/mountinfo | grep -q ' ro,'",
        lambda rc, out: rc == 0,
        "/sys/fs/cgroup mounted read-only",
    ),
    (
        "ProtectClock=yes",
        ["ProtectClock=yes"],
        'date -s "$(date)"',
        lambda rc, out: rc != 0,
        "root cannot set the clock",
    ),
    (
        "ProtectHostname=yes",
        ["ProtectHostname=yes"],
        "hostname probe-renamed",
        lambda rc, out: rc != 0,
        "sethostname refused",
    ),
    (
        "ProtectProc=invisible (with DynamicUser)",
        ["DynamicUser=yes", "ProtectProc=invisible"],
        "test ! -e /proc/1/comm",
        lambda rc, out: rc == 0,
        "PID 1 invisible",
    ),
    (
        "ProcSubset=pid",
        ["ProcSubset=pid"],
        "test ! -e /proc/sys",
        lambda rc, out: rc == 0,
        "/proc/sys hidden",
    ),
    (
        "PrivateUsers=yes",
        ["PrivateUsers=yes"],
        "cat /proc/self/uid_map",
        lambda rc, out: rc == 0 and "4294967295" not in out,
        "own user namespace (uid_map)",
    ),
    (
        "NoNewPrivileges=yes",
        ["NoNewPrivileges=yes"],
        "grep NoNewPrivs /proc/self/status",
        lambda rc, out: out.split()[-1] == "1",
        "NoNewPrivs: 1",
    ),
    (
        "CapabilityBoundingSet= (empty)",
        ["CapabilityBoundingSet="],
        "grep CapBnd /proc/self/status",
        lambda rc, out: int(out.split()[-1], 16) == 0,
        "CapBnd: 0",
    ),
    (
        "AmbientCapabilities=CAP_NET_BIND_SERVICE (DynamicUser)",
        ["DynamicUser=yes", "AmbientCapabilities=CAP_NET_BIND_SERVICE"],
        "python3 -c 'import socket; socket.socket().bind((\"127.0.0.1\", 81))'",
        lambda rc, out: rc == 0,
        "an unprivileged service binds port 81",
    ),
    (
        "SystemCallFilter=@system-service",
        ["SystemCallFilter=@system-service"],
        "python3 -c 'import ctypes; l=ctypes.CDLL(None,use_errno=True); "
        'l.syscall(165,b"none",b"/nonexistent",b"tmpfs",0,None); print(ctypes.get_errno())\'',
        lambda rc, out: rc != 0 and not out.endswith("2"),
        "mount() kills the process (SIGSYS); without the filter it gets ENOENT",
    ),
    (
        "SystemCallArchitectures=native",
        ["SystemCallArchitectures=native"],
        "grep Seccomp: /proc/self/status",
        lambda rc, out: out.split()[-1] == "2",
        "seccomp filter on",
    ),
    (
        "MemoryDenyWriteExecute=yes",
        ["MemoryDenyWriteExecute=yes"],
        "python3 -c 'import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE|mmap.PROT_EXEC)'",
        lambda rc, out: rc != 0,
        "W+X mapping refused",
    ),
    (
        "RestrictNamespaces=yes",
        ["RestrictNamespaces=yes"],
        "unshare --uts true",
        lambda rc, out: rc != 0,
        "unshare refused",
    ),
    (
        "RestrictAddressFamilies=AF_UNIX",
        ["RestrictAddressFamilies=AF_UNIX"],
        "python3 -c 'import socket; socket.socket(socket.AF_INET)'",
        lambda rc, out: rc != 0,
        "AF_INET socket refused",
    ),
    (
        "RestrictRealtime=yes",
        ["RestrictRealtime=yes"],
        "chrt -f 1 true",
        lambda rc, out: rc != 0,
        "SCHED_FIFO refused",
    ),
    (
        "RestrictSUIDSGID=yes",
        ["RestrictSUIDSGID=yes"],
        "f=$(mktemp -p /root) && chmod u+s $f; r=$?; rm -f $f; exit $r",
        lambda rc, out: rc != 0,
        "chmod u+s refused",
    ),
    (
        "LockPersonality=yes",
        ["LockPersonality=yes"],
        "setarch linux32 true",
        lambda rc, out: rc != 0,
        "personality change refused",
    ),
    (
        "PrivateNetwork=yes",
        ["PrivateNetwork=yes"],
        "ip -o link | awk '{print $2}' | tr '\\n' ' '; ip -o link show lo | grep -q UP",
        lambda rc, out: rc == 0 and out.split() == ["lo:"],
        "only lo, and it is up",
    ),
    (
        "PrivateIPC=yes",
        ["PrivateIPC=yes"],
        "readlink /proc/self/ns/ipc",
        lambda rc, out: out.strip() != _host_ns("ipc"),
        "own IPC namespace",
    ),
    (
        "PrivateMounts=yes",
        ["PrivateMounts=yes"],
        "readlink /proc/self/ns/mnt",
        lambda rc, out: out.strip() != _host_ns("mnt"),
        "own mount namespace",
    ),
    (
        "TemporaryFileSystem=/var:ro + BindReadOnlyPaths=",
        ["TemporaryFileSystem=/var:ro", "BindReadOnlyPaths=/var/lib/dpkg/status"],
        "test ! -e /var/log && test -r /var/lib/dpkg/status",
        lambda rc, out: rc == 0,
        "/var empty but for the bound file",
    ),
    (
        "InaccessiblePaths=/etc/ssh",
        ["InaccessiblePaths=/etc/ssh"],
        "test ! -e /etc/ssh/sshd_config",
        lambda rc, out: rc == 0,
        "/etc/ssh's files are hidden",
    ),
    (
        "ReadOnlyPaths=/srv",
        ["ReadOnlyPaths=/srv"],
        "touch /srv/probe-ro",
        lambda rc, out: rc != 0,
        "/srv read-only",
    ),
    (
        "LoadCredential=",
        ["LoadCredential=probe:/etc/hostname"],
        'cat "$CREDENTIALS_DIRECTORY/probe"',
        lambda rc, out: rc == 0 and out.strip() != "",
        "credential readable",
    ),
    (
        "SetCredential=",
        ["SetCredential=probe:secret"],
        'cat "$CREDENTIALS_DIRECTORY/probe"',
        lambda rc, out: out.strip() == "secret",
        "credential readable",
    ),
    (
        "UMask=0077",
        ["UMask=0077"],
        "f=$(mktemp -u) && touch $f && stat -c %a $f && rm $f",
        lambda rc, out: out.strip() == "600",
        "new files 0600",
    ),
    (
        "LimitNOFILE=1048576 (Caddy's unit)",
        ["LimitNOFILE=1048576"],
        "ulimit -n",
        lambda rc, out: out.strip() == "1048576" or f"clamped to {out.strip()} (the hard limit)",
        "the soft limit seen by the service",
    ),
    (
        "LimitNOFILE=4096",
        ["LimitNOFILE=4096"],
        "ulimit -n",
        lambda rc, out: out.strip() == "4096",
        "the soft limit seen by the service",
    ),
    (
        "LimitNPROC=512",
        ["LimitNPROC=512"],
        "grep 'Max processes' /proc/self/limits",
        lambda rc, out: out.split()[2] == "512",
        "Max processes in /proc/self/limits",
    ),
    (
        "OOMScoreAdjust=-500",
        ["OOMScoreAdjust=-500"],
        "cat /proc/self/oom_score_adj",
        lambda rc, out: (
            out.strip() == "-500" or f"ignored (stays {out.strip()}; no CAP_SYS_RESOURCE)"
        ),
        "oom_score_adj lowered",
    ),
    (
        "OOMScoreAdjust=500",
        ["OOMScoreAdjust=500"],
        "cat /proc/self/oom_score_adj",
        lambda rc, out: out.strip() == "500",
        "oom_score_adj raised",
    ),
    ("Nice=10", ["Nice=10"], "nice", lambda rc, out: out.strip() == "10", "niceness 10"),
    (
        "MemoryMax=32M",
        ["MemoryMax=32M"],
        "python3 -c 'b = bytearray(200 * 1024 * 1024); print(len(b))'",
        lambda rc, out: rc != 0,
        "allocating 200 MiB is killed",
    ),
    (
        "TasksMax=4",
        ["TasksMax=4"],
        "for i in 1 2 3 4 5 6 7 8; do sleep 2 & done; wait",
        lambda rc, out: rc != 0,
        "the 5th process cannot fork",
    ),
    (
        "CPUQuota=10%",
        ["CPUQuota=10%"],
        "cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu.max 2>/dev/null | head -1",
        lambda rc, out: out.strip() not in ("", "-1", "max 100000"),
        "a CPU quota in the cgroup",
    ),
    (
        "IPAddressDeny=any",
        ["IPAddressDeny=any"],
        "python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 22), 3)'",
        lambda rc, out: rc != 0,
        "connect to 127.0.0.1:22 blocked",
    ),
    (
        "SocketBindDeny=any",
        ["SocketBindDeny=any"],
        "python3 -c 'import socket; socket.socket().bind((\"127.0.0.1\", 0))'",
        lambda rc, out: rc != 0,
        "bind refused",
    ),
    (
        "RestrictFileSystems=ext4",
        ["RestrictFileSystems=ext4"],
        "ls /proc/self >/dev/null",
        lambda rc, out: rc != 0,
        "access to procfs refused",
    ),
    (
        "DeviceAllow=/dev/null (DevicePolicy=closed)",
        ["DevicePolicy=closed", "DeviceAllow=/dev/null"],
        "head -c1 /dev/urandom >/dev/null",
        lambda rc, out: rc != 0,
        "/dev/urandom refused",
    ),
]


def _host_ns(kind: str) -> str:
    return subprocess.run(
        ["readlink", f"/proc/self/ns/{kind}"], capture_output=True, text=True
    ).stdout.strip()


def probe(properties: list[str], command: str) -> tuple[int, str]:
    argv = ["systemd-run", "--wait", "--pipe", "--quiet", "--collect", "--property=Type=exec"]
    argv += [f"--property={p}" for p in properties]
    argv += ["/bin/sh", "-c", command]
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def main() -> int:
    with open("/tmp/probe-host-file", "w"):
        pass
    version = subprocess.run(["systemctl", "--version"], capture_output=True, text=True).stdout
    print(f"<!-- {' '.join(version.split())} -->")
    print("| Directive | Inside sandbox hosts | Checked by |")
    print("|---|---|---|")
    for directive, properties, command, check, evidence in PROBES:
        rc, out = probe(properties, command)
        if 200 <= rc < 250:  # systemd's own exit codes: the service could not be set up
            last = out.splitlines()[-1][:60] if out else ""
            verdict = f"**service fails to start** (exit {rc}: {last})"
        else:
            try:
                result = check(rc, out)  # type: ignore[operator]
                verdict = (
                    result
                    if isinstance(result, str)
                    else ("enforced" if result else "**NOT enforced**")
                )
            except (ValueError, IndexError):
                verdict = f"**NOT enforced** (output {out[:60]!r})"
        print(f"| `{directive}` | {verdict} | {evidence} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
