"""S3-compatible replicas end to end: Litestream on the app host replicating to a real S3
server on the controller, configured as a MinIO or Backblaze B2 owner configures it (a
custom endpoint, path-style addressing, a region, an access key from the vault).

The server is moto's (`moto_server`, PyPI, installed by scripts/bootstrap.sh into
.cache/moto): Litestream's own CI tests its S3 client against it, it speaks S3's wire
protocol (SigV4-signed requests, path-style URLs, multipart uploads, ListObjectsV2) and runs
from the package registry, where MinIO cannot be had here. It keeps the bucket in memory for
the module's life.

One deployment, made once for the module: an app host alone (the replica is the bucket).
In order:

1. site.yml with `litestream_replica_type: s3`: a chat turn reaches the bucket (objects
   under the configured path, read back with a restore); the access key is in no
   world-readable file, no process's arguments and no journal.
2. The restore drill against the bucket succeeds and reports.
3. A point-in-time restore (`restore.yml -e restore_force=true -e restore_timestamp=T`)
   brings back the state at T (a turn before T there, a turn after T not; the replaced
   database kept aside with it); replication goes on from the restored state, and a forced
   restore of the latest state gives that state and the turns since.
4. The app host lost (`sandbox.py kill`) and booted fresh: site.yml restores the database
   from the bucket before the app starts, and restore.yml checks and keeps it.
"""

from __future__ import annotations

import re
import secrets
import string
import subprocess
import time
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.deployments import (
    DB,
    DOMAIN,
    STANDIN_PORT,
    Deployment,
    chat_turn,
    count_messages,
    free_port,
    recap,
    wait_replicated,
)
from tests.e2e.sandboxes import REPO, add_group_vars, run_tool
from tests.support.process import StandinProcess

pytestmark = pytest.mark.e2e

HOSTS = ("app:digitalme",)
TIMINGS = REPO / "artifacts" / "s3-timings.json"
MOTO_SERVER = REPO / ".cache" / "moto" / "bin" / "moto_server"
BUCKET = "digitalme-replica"
PREFIX = "clones/digitalme"
NODE_EXPORTER = "http://127.0.0.1:9100/metrics"
S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


@dataclass
class S3Server:
    """moto's S3 server on the controller's address in the sandbox network."""

    endpoint: str
    process: subprocess.Popen[bytes]
    log: Path

    def keys(self, prefix: str) -> list[str]:
        """The bucket's object keys under ``prefix`` (ListObjectsV2, unsigned: moto does not
        check signatures unless told to)."""
        found: list[str] = []
        token = ""
        while True:
            url = f"{self.endpoint}/{BUCKET}?list-type=2&prefix={prefix}" + (
                f"&continuation-token={urllib.parse.quote(token)}" if token else ""
            )
            with urllib.request.urlopen(url, timeout=30) as answer:
                tree = ET.fromstring(answer.read())
            found += [e.text or "" for e in tree.iter(f"{S3_NS}Key")]
            token = tree.findtext(f"{S3_NS}NextContinuationToken") or ""
            if not token:
                return found


def start_s3(address: str, workdir: Path) -> S3Server:
    assert MOTO_SERVER.exists(), f"{MOTO_SERVER} is missing: run scripts/bootstrap.sh"
    port = free_port(address)
    log = workdir / "moto.log"
    process = subprocess.Popen(
        [str(MOTO_SERVER), "-H", address, "-p", str(port)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    server = S3Server(f"http://{address}:{port}", process, log)
    deadline = time.monotonic() + 60
    while True:
        try:
            request = urllib.request.Request(f"{server.endpoint}/{BUCKET}", method="PUT")
            with urllib.request.urlopen(request, timeout=5):
                return server  # the bucket, made as an owner makes it before configuring
        except OSError:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)


def access_key() -> tuple[str, str]:
    """A key pair in AWS's shape, new for every run."""
    upper = string.ascii_uppercase + string.digits
    key_id = "AKIA" + "".join(secrets.choice(upper) for _ in range(16))
    secret = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(40))
    return key_id, secret


def deploy(deployment: Deployment, label: str) -> float:
    result = deployment.playbook("site.yml", label)
    assert result.returncode == 0 and recap(result.stdout)["app"]["failed"] == 0, result.stdout[
        -5000:
    ]
    return deployment.timings[f"{label}_seconds"]


def restore_playbook(
    deployment: Deployment,
    label: str,
    *extra: str,
) -> subprocess.CompletedProcess[str]:
    result = deployment.playbook("restore.yml", label, *extra, timeout=1800)
    assert result.returncode == 0, result.stdout[-5000:]
    return result


@dataclass
class S3Site:
    deployment: Deployment
    s3: S3Server
    secret: str


@pytest.fixture(scope="module")
def site(sandbox_hosts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Site]:
    sandbox = sandbox_hosts(*HOSTS)
    workdir = tmp_path_factory.mktemp("s3")
    s3 = start_s3(sandbox.controller_address, workdir)
    standin = StandinProcess(workdir, host=sandbox.controller_address, port=STANDIN_PORT)
    try:
        standin.start()
        key_id, secret = access_key()
        add_group_vars(
            sandbox.inventory,
            {
                "digitalme": {
                    "litestream_replica_type": "s3",
                    "litestream_s3_bucket": BUCKET,
                    "litestream_s3_path": PREFIX,
                    "litestream_s3_endpoint": s3.endpoint,
                    "litestream_s3_region": "us-east-1",
                    "litestream_s3_force_path_style": True,
                    "litestream_s3_access_key_id": key_id,
                    "litestream_s3_secret_access_key": secret,
                }
            },
        )
        TIMINGS.unlink(missing_ok=True)
        deployment = Deployment(sandbox, workdir, TIMINGS, log_prefix="s3-")
        deploy(deployment, "site_fresh")
        yield S3Site(deployment, s3, secret)
    finally:
        standin.stop()
        s3.process.terminate()
        s3.process.wait(timeout=30)


def test_writes_reach_the_bucket_and_the_key_stays_secret(site: S3Site) -> None:
    deployment = site.deployment
    config = deployment.on_app("cat /etc/litestream.yml").stdout
    assert "type: s3" in config and f'"{site.s3.endpoint}"' in config
    assert "force-path-style: true" in config
    chat_turn(deployment, token_name="e2e-s3", text="first words to the bucket")
    wait_replicated(deployment, "first words to the bucket")
    keys = site.s3.keys(PREFIX + "/")
    assert keys and all(k.startswith(PREFIX + "/") for k in keys), keys
    # Path-style requests from Litestream reached the server (not bucket.host URLs).
    assert re.search(rf'"PUT /{BUCKET}/{re.escape(PREFIX)}/', site.s3.log.read_text())

    # The secret key: only in root-only files, in no process's arguments, in no journal.
    # Our own commands must not put it in the journal either (sudo logs each command line):
    # the shell joins the two quoted halves into the key.
    key = f"'{site.secret[:20]}''{site.secret[20:]}'"
    listed = deployment.on_app(
        f"grep -rlF {key} /etc /usr/local /var/lib /run 2>/dev/null | xargs -r stat -c '%a %U %n'",
        check=False,
    ).stdout
    holders = [line.split(" ", 2) for line in listed.splitlines() if line]
    assert holders, "the key is nowhere on the host"
    for mode, owner, path in holders:
        assert owner == "root" and mode[-1] == "0" and mode[-2] in "04", (mode, owner, path)
    assert site.secret not in config
    assert site.secret not in deployment.on_app("ps -eo args").stdout
    journal = deployment.on_app(f"journalctl --no-pager | grep -cF {key}", check=False)
    assert journal.stdout.strip() == "0"


def test_the_drill_restores_from_the_bucket(site: S3Site) -> None:
    deployment = site.deployment
    chat_turn(deployment, token_name="e2e-s3", text="before the s3 drill")
    ran = deployment.on_app(
        "systemctl start digitalme-backup-drill.service", check=False, timeout=1200
    )
    journal = deployment.on_app("journalctl -u digitalme-backup-drill -o cat --no-pager -n 30")
    assert ran.returncode == 0, journal.stdout
    metrics = deployment.on_app(f"curl -fsS {NODE_EXPORTER}").stdout
    assert re.search(r"^digitalme_backup_drill_success 1$", metrics, re.MULTILINE), metrics[-2000:]


def test_a_point_in_time_restore_from_the_bucket(site: S3Site) -> None:
    deployment = site.deployment
    chat_turn(deployment, token_name="e2e-s3", text="said before the point")
    wait_replicated(deployment, "said before the point")
    time.sleep(3)
    point = deployment.on_app("date -u +%Y-%m-%dT%H:%M:%SZ").stdout.strip()
    time.sleep(3)
    chat_turn(deployment, token_name="e2e-s3", text="said after the point")
    wait_replicated(deployment, "said after the point")

    result = restore_playbook(
        deployment,
        "restore_point_in_time",
        "-e",
        "restore_force=true",
        "-e",
        f"restore_timestamp={point}",
    )
    assert '"outcome": "restored"' in result.stdout, result.stdout[-3000:]
    assert count_messages(deployment, DB, "said before the point") == 2
    assert count_messages(deployment, DB, "said after the point") == 0
    assert deployment.curl(f"https://{DOMAIN}/health/ready", "--fail").returncode == 0
    # What the restore replaced is kept aside, the turn after the point in it.
    aside = re.search(r'"replaced_files_kept_in": "([^"]+)"', result.stdout)
    assert aside, result.stdout[-3000:]
    assert count_messages(deployment, f"{aside[1]}/digitalme.db", "said after the point") == 2

    # The replica's history goes on from the restored state: a new turn reaches the bucket,
    # and the latest state is the restored one with that turn (not the abandoned one).
    chat_turn(deployment, token_name="e2e-s3", text="said after the restore")
    wait_replicated(deployment, "said after the restore")
    restore_playbook(deployment, "restore_latest", "-e", "restore_force=true")
    assert count_messages(deployment, DB, "said before the point") == 2
    assert count_messages(deployment, DB, "said after the restore") == 2
    assert count_messages(deployment, DB, "said after the point") == 0


def test_a_fresh_host_comes_back_from_the_bucket(site: S3Site, sandbox_hosts) -> None:
    deployment = site.deployment
    chat_turn(deployment, token_name="e2e-s3", text="before the loss")
    wait_replicated(deployment, "before the loss")
    run_tool("kill", "--name", deployment.sandbox.name, "app", timeout=120)
    deployment.rebooted(sandbox_hosts(*HOSTS))
    assert deployment.on_app(f"test -e {DB}", check=False).returncode != 0
    deploy(deployment, "site_recovery")
    journal = deployment.on_app("journalctl -u litestream-restore -o cat --no-pager").stdout
    assert "restored" in journal, journal
    assert count_messages(deployment, DB, "before the loss") == 2
    assert count_messages(deployment, DB, "said before the point") == 2
    result = restore_playbook(deployment, "restore_check")
    assert '"outcome": "kept"' in result.stdout, result.stdout[-3000:]
    assert deployment.curl(f"https://{DOMAIN}/health/ready", "--fail").returncode == 0
