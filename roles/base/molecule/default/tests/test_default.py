"""Testinfra checks of the base role on a sandbox host (run by `molecule verify`).

Host-side checks run as the admin user through sudo (see conftest.py); logins, the
firewall and the check-mode run are tested from the controller, as an attacker or the
next `ansible-playbook` run would see the host.
"""

# The tests run ssh, ansible-playbook and ssh-keygen from the controller on purpose.

from __future__ import annotations

import errno
import json
import re
import socket
import subprocess
from pathlib import Path

import pytest

OPEN_TCP_PORTS = (22, 80, 443, 8443)  # SSH, HTTP, HTTPS, base_firewall_extra_tcp_ports
HIDDEN_PORT = 8081  # the throwaway listener of prepare.yml, on all addresses


# --- packages ----------------------------------------------------------------


@pytest.mark.parametrize(
    "package",
    [
        "acl",
        "ca-certificates",
        "curl",
        "python3-venv",
        "sqlite3",
        "nftables",
        "openssh-server",
        "sudo",
        "systemd-timesyncd",
        "unattended-upgrades",
    ],
)
def test_package_is_installed(host, package):
    assert host.package(package).is_installed


# --- admin user --------------------------------------------------------------


def test_admin_user_has_a_locked_password_and_log_groups(host, target):
    user = host.user(target.admin_user)
    assert user.exists
    assert user.shell == "/bin/bash"
    assert {"adm", "systemd-journal"} <= set(user.groups)
    shadow = host.run(f"getent shadow {target.admin_user}").stdout.split(":")
    assert shadow[1].startswith("!"), "the admin user must not have a usable password"


def test_admin_user_authorized_keys_hold_exactly_the_configured_key(host, target):
    home = host.user(target.admin_user).home
    ssh_dir = host.file(f"{home}/.ssh")
    assert ssh_dir.is_directory and ssh_dir.user == target.admin_user and ssh_dir.mode == 0o700
    keys = host.file(f"{home}/.ssh/authorized_keys")
    assert keys.user == target.admin_user and keys.mode == 0o600
    public_key = Path(f"{target.private_key}.pub").read_text().split()[:2]
    lines = [line.split()[:2] for line in keys.content_string.splitlines() if line.strip()]
    assert lines == [public_key]


def test_sudoers_drop_in_is_valid_and_grants_passwordless_sudo(host, target):
    drop_in = host.file("/etc/sudoers.d/digitalme-admin")
    assert drop_in.user == "root" and drop_in.group == "root" and drop_in.mode == 0o440
    assert host.run("visudo -c").rc == 0
    listed = host.run(f"sudo -l -U {target.admin_user}").stdout
    assert "(ALL : ALL) NOPASSWD: ALL" in listed


# --- SSH ---------------------------------------------------------------------


def sshd_effective(host) -> dict[str, str]:
    lines = host.check_output("sshd -T").splitlines()
    return dict(line.split(" ", 1) for line in lines if " " in line)


def test_sshd_enforces_keys_only_and_no_root_even_with_a_cloud_init_drop_in(host):
    planted = host.file("/etc/ssh/sshd_config.d/50-cloud-init.conf")
    assert "PasswordAuthentication yes" in planted.content_string  # still there
    drop_in = host.file("/etc/ssh/sshd_config.d/00-digitalme.conf")
    assert drop_in.user == "root" and drop_in.mode == 0o644
    effective = sshd_effective(host)
    assert effective["permitrootlogin"] == "no"
    assert effective["passwordauthentication"] == "no"
    assert effective["kbdinteractiveauthentication"] == "no"
    assert effective["authenticationmethods"] == "publickey"
    assert effective["permitemptypasswords"] == "no"
    assert effective["x11forwarding"] == "no"
    assert effective["maxauthtries"] == "3"
    assert host.run("sshd -t").rc == 0


def test_sshd_was_reloaded_and_listens_on_22(host, journal):
    assert host.service("ssh").is_running, journal("ssh")
    assert host.service("ssh").is_enabled
    assert host.socket("tcp://0.0.0.0:22").is_listening


def test_root_login_is_refused(target):
    result = target.ssh("root")
    assert result.returncode == 255, result
    assert "Permission denied (publickey)" in result.stderr, result.stderr


def test_admin_login_works_and_sudo_needs_no_password(target):
    result = target.ssh(target.admin_user, command="id -un && sudo -n id -un")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [target.admin_user, "root"]


def test_passwords_are_not_even_offered(target):
    result = target.ssh(
        target.admin_user,
        "-o",
        "PubkeyAuthentication=no",
        "-o",
        "PreferredAuthentications=password,keyboard-interactive",
    )
    assert result.returncode == 255
    # sshd lists the methods it accepts: public keys only.
    assert "Permission denied (publickey)." in result.stderr, result.stderr


# --- firewall ----------------------------------------------------------------


def tcp_connect(address: str, port: int, timeout: float = 3.0) -> str:
    """'open', 'closed' (the host answered with a reset) or 'filtered' (no answer)."""
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return "open"
    except ConnectionRefusedError:
        return "closed"
    except TimeoutError:
        return "filtered"
    except OSError as error:
        if error.errno == errno.EHOSTUNREACH:
            return "filtered"
        raise


def test_nftables_is_enabled_and_loaded(host, journal):
    service = host.service("nftables")
    assert service.is_enabled
    # A oneshot unit that stays "active (exited)" once the rules are loaded.
    active = host.run("systemctl is-active nftables").stdout.strip()
    assert active == "active", journal("nftables")
    config = host.file("/etc/nftables.conf")
    assert config.user == "root" and config.mode == 0o644
    assert host.run("nft --check --file /etc/nftables.conf").rc == 0
    ruleset = host.check_output("nft list table inet digitalme_base")
    assert "policy drop" in ruleset
    assert re.search(r"tcp dport \{ 22, 80, 443, 8443 \} accept", ruleset), ruleset
    assert re.search(r"udp dport 443 accept", ruleset), ruleset


@pytest.mark.parametrize("port", OPEN_TCP_PORTS)
def test_ssh_http_https_and_extra_ports_are_admitted_from_outside(target, port):
    # 22 answers; nothing listens on the others yet, so the host itself resets the
    # connection: the firewall let the packet through.
    expected = "open" if port == 22 else "closed"
    assert tcp_connect(target.address, port) == expected


def test_other_listening_ports_are_filtered_from_outside_but_reachable_locally(host, target):
    assert host.socket(f"tcp://0.0.0.0:{HIDDEN_PORT}").is_listening
    assert tcp_connect(target.address, HIDDEN_PORT) == "filtered"
    for address in ("127.0.0.1", target.address):  # from the host itself: over loopback
        probe = host.run(
            "python3 -c 'import socket, sys; "
            f"socket.create_connection((sys.argv[1], {HIDDEN_PORT}), timeout=3)' {address}"
        )
        assert probe.rc == 0, probe.stderr


# --- time, updates, journal --------------------------------------------------


def test_timesyncd_is_enabled_and_configured(host, journal):
    service = host.service("systemd-timesyncd")
    assert service.is_enabled
    assert host.file("/etc/systemd/timesyncd.conf.d/00-digitalme.conf").mode == 0o644
    virt = host.run("systemd-detect-virt --container")
    if virt.rc == 0:
        # Sandbox hosts are containers: the machine underneath keeps the clock, and the
        # unit's ConditionVirtualization=!container keeps it stopped without an error.
        show = host.check_output(
            "systemctl show -p ConditionResult -p ActiveState systemd-timesyncd"
        )
        assert "ConditionResult=no" in show and "ActiveState=inactive" in show, show
    else:
        assert service.is_running, journal("systemd-timesyncd")
        assert host.check_output("timedatectl show --property=NTP --value") == "yes"


def test_apt_periodic_settings_run_unattended_upgrades_daily(host):
    dump = host.check_output("apt-config dump APT::Periodic")
    assert 'APT::Periodic::Update-Package-Lists "1";' in dump
    assert 'APT::Periodic::Unattended-Upgrade "1";' in dump
    for timer in ("apt-daily.timer", "apt-daily-upgrade.timer"):
        assert host.service(timer).is_enabled, timer
        assert host.run(f"systemctl is-active {timer}").stdout.strip() == "active", timer


def test_unattended_upgrades_allow_the_security_archive_only(host):
    run = host.run("unattended-upgrade --dry-run --debug")
    assert run.rc == 0, run.stdout + run.stderr
    allowed = re.search(r"^Allowed origins are: (.*)$", run.stdout + run.stderr, re.MULTILINE)
    assert allowed, run.stdout + run.stderr
    codename = host.system_info.codename  # bookworm, trixie
    assert allowed.group(1).strip() == (
        f"origin=Debian,codename={codename}-security,label=Debian-Security"
    )


def test_journald_limits_are_in_force(host):
    drop_in = host.file("/etc/systemd/journald.conf.d/00-digitalme.conf")
    assert drop_in.mode == 0o644 and "SystemMaxUse=500M" in drop_in.content_string
    # journald reports the limits it applies when it (re)opens the system journal.
    report = host.check_output(
        "journalctl -b -u systemd-journald --no-pager -o cat | grep 'System Journal' | tail -n 1"
    )
    # systemd 252 (Debian 12) says "max 500.0M", 257 (Debian 13) "max 500M".
    assert re.search(r"\bmax 500(\.0)?M\b", report), report
    assert host.file("/var/log/journal").is_directory


# --- runs of the playbook from the controller -----------------------------------


def ansible_playbook(env: dict[str, str], *args: str, **extra_env: str) -> tuple[int, str]:
    """converge.yml with Molecule's inventory and ansible.cfg, as the next run would go."""
    scenario = Path(env["MOLECULE_SCENARIO_DIRECTORY"])
    result = subprocess.run(
        [
            "ansible-playbook",
            "-i",
            env["MOLECULE_INVENTORY_FILE"],
            *args,
            str(scenario / "converge.yml"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(env, ANSIBLE_FORCE_COLOR="0", NO_COLOR="1", **extra_env),
        stdin=subprocess.DEVNULL,
    )
    return result.returncode, result.stdout + result.stderr


def recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP counters per host: {"base": {"ok": 39, "changed": 0, ...}}."""
    return {
        line.split()[0]: {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", line)}
        for line in output.split("PLAY RECAP", 1)[-1].splitlines()
        if re.match(r"^\S+\s+:\s+ok=", line)
    }


def test_check_mode_on_the_converged_host_reports_no_change(molecule_env):
    rc, output = ansible_playbook(molecule_env, "--check", "--diff")
    assert rc == 0, output[-6000:]
    hosts = recap(output)
    assert hosts, output[-6000:]
    for counters in hosts.values():
        # ignored: the role tolerates some failures in check mode (fresh hosts), not here.
        for counter in ("changed", "unreachable", "failed", "ignored"):
            assert counters[counter] == 0, f"{counter}:\n{output[-6000:]}"


def test_preflight_refuses_a_firewall_that_would_not_admit_ssh(host, target, molecule_env):
    """sshd (and this session) use 22: a firewall for 2222 would lock everybody out."""
    before = host.file("/etc/nftables.conf").sha256sum
    rc, output = ansible_playbook(
        molecule_env,
        "--tags",
        "base_firewall",
        "-e",
        "base_ssh_port=2222",
        ANSIBLE_GATHERING="explicit",  # faster: the role's preflight gathers what it needs
    )
    assert rc != 0, output[-6000:]
    assert "Set base_ssh_port to the port sshd listens on" in output, output[-6000:]
    assert host.file("/etc/nftables.conf").sha256sum == before
    assert tcp_connect(target.address, 22) == "open"


def test_a_key_list_without_ansibles_key_is_undone_before_it_locks_anybody_out(
    host, target, molecule_env, tmp_path
):
    """The owner's new key list lacks the key Ansible uses (a typo, a rotation done in the
    wrong order): the role puts the previous keys back and stops before sshd."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "alien")],
        check=True,
    )
    alien_key = (tmp_path / "alien.pub").read_text().strip()
    home = host.user(target.admin_user).home
    watched = (f"{home}/.ssh/authorized_keys", "/etc/ssh/sshd_config.d/00-digitalme.conf")
    before = {path: host.file(path).sha256sum for path in watched}
    rc, output = ansible_playbook(
        molecule_env,
        "--tags",
        "base_admin,base_ssh",
        "-e",
        json.dumps({"base_admin_ssh_public_keys": [alien_key]}),
        ANSIBLE_GATHERING="explicit",
    )
    assert rc != 0, output[-6000:]
    assert f"Ansible could not log in as {target.admin_user}" in output, output[-6000:]
    assert "The previous authorized_keys were put back" in output, output[-6000:]
    assert {path: host.file(path).sha256sum for path in watched} == before
    assert target.ssh(target.admin_user, command="sudo -n true").returncode == 0
