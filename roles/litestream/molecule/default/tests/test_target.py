"""Testinfra checks of the SFTP backup target `replica` (entry point sftp_target).

Runs after test_app.py (file order): the replica folder then holds Litestream's files.
"""

from __future__ import annotations

import os
import subprocess

from verifier import address, other_host

testinfra_hosts = ["replica"]

CHROOT = "/srv/litestream"
FOLDER = "/replicas/digitalme"
# On app-sftp, the target's host key is checked against the key pinned in /etc/litestream.yml.
KNOWN_HOSTS = "/tmp/litestream-known-hosts"
SSH_OPTIONS = (
    f"-o BatchMode=yes -o ConnectTimeout=10 -o StrictHostKeyChecking=yes "
    f"-o UserKnownHostsFile={KNOWN_HOSTS} -o IdentitiesOnly=yes"
)


def test_account_is_sftp_only_without_password_or_shell(host):
    user = host.user("litestream")
    assert user.exists and user.shell == "/usr/sbin/nologin" and user.uid < 1000
    assert host.check_output("getent shadow litestream | cut -d: -f2") == "*"


def test_chroot_is_root_owned_and_only_the_replica_folder_is_writable(host):
    for path in (CHROOT, CHROOT + "/replicas"):
        folder = host.file(path)
        assert (folder.user, folder.group, folder.mode) == ("root", "root", 0o755), path
    replica = host.file(CHROOT + FOLDER)
    assert (replica.user, replica.group, replica.mode) == ("litestream", "litestream", 0o700)
    files = host.check_output(f"find {CHROOT}{FOLDER}/ltx -type f -name '*.ltx' | wc -l")
    assert int(files) > 0, "no LTX file on the replica"


def test_key_is_authorised_restricted_to_the_app_host(host):
    keys = host.file("/etc/ssh/litestream_authorized_keys/litestream")
    assert (keys.user, keys.group, keys.mode) == ("root", "root", 0o644)
    line = keys.content_string.strip()
    assert line.startswith(f'restrict,from="{address("app-sftp")}" ssh-ed25519 '), line
    assert len(keys.content_string.strip().splitlines()) == 1


def test_sshd_confines_the_account(host):
    effective = host.check_output(
        f"sshd -T -C user=litestream,host=app-sftp,addr={address('app-sftp')}"
    ).splitlines()
    for expected in (
        f"forcecommand internal-sftp -d {FOLDER}",
        f"chrootdirectory {CHROOT}",
        "authorizedkeysfile /etc/ssh/litestream_authorized_keys/%u",
        "permittty no",
        "allowtcpforwarding no",
        "x11forwarding no",
        "passwordauthentication no",
    ):
        assert expected in effective, expected
    # Other users keep the global settings (the Match block does not leak).
    root = host.check_output("sshd -T -C user=root,host=x,addr=10.0.0.1").splitlines()
    assert "forcecommand none" in root and "chrootdirectory none" in root


def test_the_key_gives_sftp_in_the_chroot_and_no_shell():
    app = other_host("app-sftp")
    target = address("replica")
    app.check_output(
        f"sed -n 's/^ *host-key: \"\\(.*\\)\"$/{target} \\1/p' /etc/litestream.yml > {KNOWN_HOSTS}"
    )
    login = f"ssh {SSH_OPTIONS} -i /etc/litestream/sftp-key litestream@{target}"
    shell = app.run(f"{login} 'echo shell-$((6*7))' < /dev/null")
    assert "shell-42" not in shell.stdout
    listing = app.run(
        f"printf 'ls /\\nls {FOLDER}\\n' | sftp {SSH_OPTIONS} -i /etc/litestream/sftp-key -b - litestream@{target}"
    )
    assert listing.rc == 0, listing.stderr
    assert "/replicas" in listing.stdout and "ltx" in listing.stdout, listing.stdout
    escape = app.run(
        f"printf 'mkdir /escape\\n' | sftp {SSH_OPTIONS} -i /etc/litestream/sftp-key -b - litestream@{target}"
    )
    assert escape.rc != 0  # the chroot's root belongs to root


def test_the_key_is_refused_from_another_address():
    """The controller holds the same key but is not the app host: from= refuses it."""
    key = os.path.join(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"], "litestream_sftp_ed25519")
    known_hosts = os.path.join(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"], "known_hosts")
    proc = subprocess.run(
        [
            "ssh",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"UserKnownHostsFile={known_hosts}",
            "-o",
            "IdentitiesOnly=yes",
            "-i",
            key,
            f"litestream@{address('replica')}",
            "true",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 255 and "Permission denied" in proc.stderr, proc.stderr
