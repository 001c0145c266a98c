"""Backup and disaster recovery end to end: site.yml and restore.yml on sandbox hosts.

One module-scoped deployment of site.yml: an app host (`digitalme`) replicating over SFTP to
a second host (`backup_targets`), so that losing the app host loses no replica. In order:

1. Litestream killed with SIGKILL during writes: systemd restarts it, and a restore holds
   every acknowledged write (the replica stayed continuous).
2. The disaster: the database grown past 100 MB, writes through the API at a steady rate,
   then the app host cut off without shutdown (`sandbox.py kill`). A fresh host under the
   same name and address gets `site.yml` and `restore.yml` with the same inventory; every
   write acknowledged more than a second before the loss must be there. RPO (the lost
   tail) and RTO (from the start of site.yml on the new host to ready) are measured, with
   the raw SFTP copy of the same file between the same hosts as the floor.
3. On the recovered host: a restore drill succeeds and its metrics reach node-exporter;
   a stalled Litestream shows in readiness and in the app's metrics, and a drill then
   finds the replica stale.
4. A drill against a corrupted replica fails loudly, and the metric and readiness say so;
   then the documented repair (the replica moved aside, backup.yml, Litestream restarted)
   gives a new replica that passes the drill.

Measurements go to artifacts/recovery-timings.json (and the test output).
"""

from __future__ import annotations

import json
import shlex
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.e2e.deployments import (
    ADMIN,
    DB,
    DOMAIN,
    METRICS_CURL,
    STANDIN_PORT,
    Deployment,
    chat_turn,
    metric,
    recap,
    run_drill,
)
from tests.e2e.sandboxes import REPO, SandboxHost, add_group_vars, run_tool
from tests.support.process import StandinProcess

pytestmark = pytest.mark.e2e

HOSTS = ("app:digitalme", "replica:backup_targets")
TIMINGS = REPO / "artifacts" / "recovery-timings.json"
BALLAST_MB = 104  # the database must be at least 100 MB for the RPO/RTO measurement
WRITE_INTERVAL = 0.1  # seconds between writes of the steady writer
SFTP_KEY = "/etc/litestream/sftp-key"  # the litestream role's copy of the SFTP key
REPLICA_FOLDER = "/replicas/digitalme"  # litestream_sftp_path (inside the target's chroot)
BACKUP = "/usr/local/sbin/digitalme-backup"  # the backup tool, as the app's user
NODE_EXPORTER = "http://127.0.0.1:9100/metrics"


@dataclass
class Write:
    conversation: str
    acknowledged: float  # time.monotonic() when the 201 came back


@dataclass
class SteadyWriter:
    """Creates conversations through the API, one every WRITE_INTERVAL, from a thread."""

    deployment: Deployment
    token: str
    acknowledged: list[Write] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # why each failed write failed
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            said = self.deployment.curl(
                f"https://{DOMAIN}/api/v1/conversations",
                "--fail",
                "--request",
                "POST",
                "--header",
                f"Authorization: Bearer {self.token}",
                max_time=5,
            )
            if said.returncode == 0:
                self.acknowledged.append(Write(json.loads(said.stdout)["id"], time.monotonic()))
            else:
                self.failures.append(f"curl exit {said.returncode}: {said.stderr.strip()}")
            self._stop.wait(max(0.0, WRITE_INTERVAL - (time.monotonic() - started)))

    def __enter__(self) -> SteadyWriter:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=30)


def conversations_in(deployment: Deployment, path: str) -> set[str]:
    """Conversation ids in a database file on the app host (read-only)."""
    listed = deployment.on_app(
        f"sqlite3 -readonly {shlex.quote(path)} 'SELECT id FROM conversations'", timeout=120
    )
    return set(listed.stdout.split())


def readiness_backup(deployment: Deployment) -> dict[str, Any]:
    ready = deployment.on_app("curl -sS http://127.0.0.1:8080/health/ready", check=False)
    checks = json.loads(ready.stdout)["checks"]
    return checks["backup"]


def deploy(deployment: Deployment, name: str) -> float:
    started = time.monotonic()
    result = deployment.sandbox.ansible_playbook("playbooks/site.yml", "--limit", "app,replica")
    seconds = time.monotonic() - started
    (REPO / "artifacts" / f"recovery-{name}.log").write_text(result.stdout)
    counts = recap(result.stdout)
    assert counts["app"]["failed"] == 0, result.stdout[-3000:]
    return seconds


@pytest.fixture(scope="module")
def deployment(sandbox_hosts, tmp_path_factory) -> Iterator[Deployment]:
    sandbox = sandbox_hosts(*HOSTS)
    # The steady writer sends ten writes a second from one address: more than the default
    # per-client limit (100 a minute) once it runs longer than a few seconds.
    add_group_vars(
        sandbox.inventory,
        {"digitalme": {"digitalme_settings": {"DIGITALME_RATE_LIMIT_PER_MINUTE": 0}}},
    )
    workdir = tmp_path_factory.mktemp("recovery")
    standin = StandinProcess(workdir, host=sandbox.controller_address, port=STANDIN_PORT)
    standin.start()
    try:
        deployment = Deployment(sandbox, workdir, TIMINGS)
        deployment.record("site_fresh_seconds", deploy(deployment, "site-first-run"))
        yield deployment
    finally:
        standin.stop()


def test_sigkill_of_litestream_keeps_the_replica_continuous(deployment: Deployment) -> None:
    restarts = int(deployment.on_app("systemctl show -P NRestarts litestream").stdout)
    with SteadyWriter(deployment, deployment.chat_token("e2e-sigkill")) as writer:
        time.sleep(3)
        deployment.on_app("systemctl kill --signal=SIGKILL litestream")
        deadline = time.monotonic() + 60
        while (
            int(deployment.on_app("systemctl show -P NRestarts litestream").stdout) == restarts
            or deployment.on_app("systemctl is-active litestream", check=False).stdout.strip()
            != "active"
        ):
            assert time.monotonic() < deadline, "systemd did not restart litestream"
            time.sleep(0.5)
        time.sleep(3)  # writes after the restart, too
    assert len(writer.acknowledged) > 30 and not writer.failures, writer.failures
    wanted = {w.conversation for w in writer.acknowledged}
    out = "/var/lib/digitalme/e2e-sigkill.db"
    deadline = time.monotonic() + 60
    while True:  # the last writes reach the replica within a sync interval or two
        deployment.on_app(f"rm -f {out}")
        restored = deployment.on_app(f"{BACKUP} restore --output {out}", check=False)
        missing = wanted - conversations_in(deployment, out) if restored.returncode == 0 else wanted
        if not missing:
            break
        assert time.monotonic() < deadline, (len(missing), restored.stderr[-2000:])
        time.sleep(2)
    integrity = deployment.on_app(f"sqlite3 -readonly {out} 'PRAGMA integrity_check'").stdout
    assert integrity.strip() == "ok"
    deployment.on_app(f"rm -f {out}")
    deployment.record("sigkill_acknowledged_writes_restored", len(wanted))


@dataclass
class Loss:
    killed: float  # time.monotonic() just before the host was cut off
    writes: list[Write]
    present: set[str]

    @property
    def lost(self) -> list[Write]:
        return [w for w in self.writes if w.conversation not in self.present]

    @property
    def rpo_seconds(self) -> float:
        """How far before the loss the oldest lost write was acknowledged (0: none lost)."""
        return max((self.killed - w.acknowledged for w in self.lost), default=0.0)


def _sftp_on_app(deployment: Deployment, batch: str, timeout: float = 900) -> float:
    """Run an sftp batch on the app host against the replica host, with Litestream's key
    and the replica's pinned host key; the seconds it took."""
    replica = deployment.sandbox.hosts["replica"]
    pinned = next(
        line
        for line in deployment.sandbox.known_hosts.read_text().splitlines()
        if line.startswith(f"{replica.address} ")
    )
    script = (
        f"printf '%s\\n' {shlex.quote(pinned)} > /run/e2e-known-hosts && "
        f"printf {shlex.quote(batch)} > /run/e2e-batch && "
        "python3 -c 'import subprocess, sys, time; t = time.monotonic(); "
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
        "print(time.monotonic() - t)' "
        f"sftp -q -b /run/e2e-batch -i {SFTP_KEY} -o IdentitiesOnly=yes -o BatchMode=yes "
        "-o StrictHostKeyChecking=yes -o UserKnownHostsFile=/run/e2e-known-hosts "
        f"litestream@{replica.address}"
    )
    return float(deployment.on_app(script, timeout=timeout).stdout.strip())


def test_disaster_a_fresh_host_comes_back_with_every_acknowledged_write(
    deployment: Deployment, sandbox_hosts
) -> None:
    # A database of more than 100 MB: old history, written as the app's user in one go.
    rows = BALLAST_MB * 1024 // 4
    deployment.on_app(
        f"runuser -u digitalme -- sqlite3 -bail -cmd '.timeout 30000' {DB} "
        + shlex.quote(
            "BEGIN;"
            "INSERT INTO conversations (id, channel, external_id, title, created_at, updated_at)"
            " VALUES ('e2e-history', 'api', 'e2e-history', 'history', "
            "'2026-01-01T00:00:00+00:00', '2026-01-01T00:00:00+00:00');"
            f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows}) "
            "INSERT INTO messages (conversation_id, role, text, created_at) "
            "SELECT 'e2e-history', CASE i % 2 WHEN 0 THEN 'user' ELSE 'assistant' END, "
            "hex(randomblob(2000)), '2026-01-01T00:00:00+00:00' FROM n;"
            "COMMIT;"
        ),
        timeout=600,
    )
    # The database's own size (much of it is still in the WAL until Litestream checkpoints).
    size = int(
        deployment.on_app(
            f"sqlite3 -readonly {DB} 'SELECT page_count * page_size FROM pragma_page_count, "
            "pragma_page_size'"
        ).stdout
    )
    deployment.record("database_bytes", size)
    assert size >= 100 * 1024 * 1024

    token = deployment.chat_token("e2e-disaster")
    with SteadyWriter(deployment, token) as writer:
        time.sleep(20)  # the history reaches the replica while writes go on
        killed = time.monotonic()
        run_tool("kill", "--name", deployment.sandbox.name, "app", timeout=120)
        time.sleep(2)
    before = [w for w in writer.acknowledged if w.acknowledged < killed]
    assert len(before) > 50, writer

    # The recovery, as an operator runs it: a new host (same name and address), then
    # site.yml and restore.yml with the same inventory, until ready through Caddy.
    booting = time.monotonic()
    deployment.rebooted(sandbox_hosts(*HOSTS))
    deployment.record("host_boot_seconds", time.monotonic() - booting)
    assert not deployment.on_app(f"test -e {DB}", check=False).returncode == 0
    started = time.monotonic()
    deployment.record("recovery_site_seconds", deploy(deployment, "site-recovery"))
    # site.yml restored the database before the app started, and waited for readiness.
    while deployment.curl(f"https://{DOMAIN}/health/ready", "--fail").returncode != 0:
        assert time.monotonic() - started < 1800, "not ready after recovery"
        time.sleep(0.5)
    rto = time.monotonic() - started
    deployment.record("rto_seconds", rto)
    # restore.yml then checks the database against the replica (a second full restore into
    # a staging folder) and keeps it.
    checking = time.monotonic()
    restore = deployment.sandbox.ansible_playbook(
        "playbooks/restore.yml", "--limit", "app", timeout=1800
    )
    deployment.record("restore_playbook_seconds", time.monotonic() - checking)
    (REPO / "artifacts" / "recovery-restore.log").write_text(restore.stdout)
    assert '"outcome": "kept"' in restore.stdout, restore.stdout[-3000:]
    assert deployment.curl(f"https://{DOMAIN}/health/ready", "--fail").returncode == 0
    restore_unit = deployment.on_app(
        "systemctl show -P ExecMainStartTimestampMonotonic -P ExecMainExitTimestampMonotonic "
        "litestream-restore"
    ).stdout.split()
    restore_seconds = (int(restore_unit[1]) - int(restore_unit[0])) / 1e6
    deployment.record("restore_seconds", restore_seconds)
    journal = deployment.on_app("journalctl -u litestream-restore -o cat --no-pager").stdout
    assert "restored" in journal, journal

    # Every write acknowledged more than a second before the loss is there.
    loss = Loss(killed, before, conversations_in(deployment, DB))
    late = [w for w in loss.lost if killed - w.acknowledged > 1.0]
    deployment.record("acknowledged_before_loss", len(before))
    deployment.record("lost_tail_writes", len(loss.lost))
    deployment.record("rpo_seconds", loss.rpo_seconds)
    assert not late, f"{len(late)} writes acknowledged >1s before the loss are missing"
    assert "e2e-history" in loss.present
    integrity = deployment.on_app(f"sqlite3 -readonly {DB} 'PRAGMA quick_check'").stdout
    assert integrity.strip() == "ok"
    # The old token came back with the data: the API serves the recovered conversations.
    survivor = before[0].conversation
    listed = deployment.curl(
        f"https://{DOMAIN}/api/v1/conversations/{survivor}/messages",
        "--fail",
        "--header",
        f"Authorization: Bearer {token}",
    )
    assert listed.returncode == 0, listed.stderr

    # The floor: the same file, copied raw over the same link (SFTP from the replica host).
    folder = REPLICA_FOLDER
    deployment.on_app(f"cp {DB} /var/tmp/e2e-floor.db")
    _sftp_on_app(deployment, f"put /var/tmp/e2e-floor.db {folder}/e2e-floor.db\n")
    copy = _sftp_on_app(deployment, f"get {folder}/e2e-floor.db /var/tmp/e2e-floor-back.db\n")
    _sftp_on_app(deployment, f"rm {folder}/e2e-floor.db\n")
    deployment.on_app("rm -f /var/tmp/e2e-floor.db /var/tmp/e2e-floor-back.db")
    deployment.record("raw_copy_seconds", copy)
    deployment.record("rto_over_raw_copy", rto / copy)
    deployment.record("restore_over_raw_copy", restore_seconds / copy)
    print(
        f"database {size / 2**20:.0f} MiB: RPO {loss.rpo_seconds:.2f}s "
        f"({len(loss.lost)} of {len(before)} acknowledged writes lost); RTO {rto:.0f}s "
        f"(restore {restore_seconds:.1f}s) against a raw copy of {copy:.1f}s"
    )


def test_drill_on_a_healthy_host_succeeds_and_reports(deployment: Deployment) -> None:
    # A chat turn a moment before the drill, which Litestream may not have synced yet when
    # the drill restores: lag within the allowance, not a stale replica (a CI run once
    # failed here when the drill compared newest rows instead).
    chat_turn(deployment, token_name="e2e-drill", text="Before the drill")
    inode = deployment.on_app(f"stat -c %i {DB}").stdout
    returncode, journal = run_drill(deployment)
    assert returncode == 0, journal
    metrics = deployment.on_app(f"curl -fsS {NODE_EXPORTER}").stdout
    assert metric(metrics, "digitalme_backup_drill_success") == 1, metrics[-2000:]
    duration = metric(metrics, "digitalme_backup_drill_duration_seconds")
    assert duration is not None and duration > 0
    deployment.record("drill_seconds", duration)
    assert metric(metrics, "digitalme_backup_replica_age_seconds") is not None
    behind = metric(metrics, "digitalme_backup_drill_behind_seconds")
    assert behind is not None and behind < 60
    result = json.loads(deployment.on_app("cat /var/lib/digitalme/backup-drill/result.json").stdout)
    # The ballast is there; the new turn's two rows only if Litestream synced them in time.
    assert result["ok"] is True and result["rows"]["messages"] >= BALLAST_MB * 1024 // 4
    assert result["behind_seconds"] < 60, result
    backup = readiness_backup(deployment)
    assert backup["ok"] is True, backup
    assert backup["drill"]["ok"] is True, backup
    assert backup["replication_lag_seconds"] < 30, backup
    # The drill never touched the live database.
    assert deployment.on_app(f"stat -c %i {DB}").stdout == inode
    assert deployment.on_app("systemctl is-active digitalme litestream").stdout.split() == [
        "active",
        "active",
    ]


def test_a_stalled_litestream_shows_in_readiness_and_metrics(deployment: Deployment) -> None:
    deployment.on_app("systemctl stop litestream")
    try:
        backup = readiness_backup(deployment)
        assert backup["ok"] is False and backup["litestream"] == "not answering", backup
        metrics = deployment.on_app(METRICS_CURL).stdout
        assert metric(metrics, "digitalme_backup_litestream_up") == 0
        # Reported, not required: the service stays in rotation.
        assert deployment.curl(f"https://{DOMAIN}/health/ready", "--fail").returncode == 0
        # A drill now finds the replica stale: a turn written while Litestream is stopped is
        # missing from the copy. Allowance 2 s (instead of 60) to keep the test short; its
        # own workdir and no metrics, so the timer's last result stays as it was.
        chat_turn(deployment, token_name="e2e-drill", text="While Litestream is stopped")
        time.sleep(3)
        stale = deployment.on_app(
            f"{BACKUP} drill --workdir /var/tmp/e2e-stale-drill --textfile-dir '' "
            "--max-behind-seconds 2",
            check=False,
        )
        assert stale.returncode == 1, stale.stdout + stale.stderr
        assert (
            "the replica is stale: the restored copy lacks messages rows written" in stale.stderr
        ), stale.stderr
        result = json.loads(deployment.on_app("cat /var/tmp/e2e-stale-drill/result.json").stdout)
        assert result["ok"] is False and result["behind_seconds"] >= 3, result
        deployment.on_app("rm -rf /var/tmp/e2e-stale-drill")
    finally:
        deployment.on_app("systemctl start litestream")
    deadline = time.monotonic() + 30
    while not readiness_backup(deployment)["ok"]:
        assert time.monotonic() < deadline, readiness_backup(deployment)
        time.sleep(1)
    metrics = deployment.on_app(METRICS_CURL).stdout
    assert metric(metrics, "digitalme_backup_litestream_up") == 1


def _corrupt_replica(replica: SandboxHost) -> int:
    """Overwrite bytes in the middle of every LTX file of the replica (sizes unchanged)."""
    script = (
        "import pathlib\n"
        "n = 0\n"
        "for f in pathlib.Path('/srv/litestream/replicas/digitalme').rglob('*.ltx'):\n"
        "    data = bytearray(f.read_bytes())\n"
        "    if len(data) > 200:\n"
        "        middle = len(data) // 2\n"
        "        data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])\n"
        "        f.write_bytes(bytes(data)); n += 1\n"
        "print(n)\n"
    )
    return int(replica.run(f"python3 -c {shlex.quote(script)}", login=ADMIN).stdout)


def test_a_drill_against_a_corrupted_replica_fails_loudly(deployment: Deployment) -> None:
    deployment.on_app("systemctl stop litestream")  # it would write fresh files meanwhile
    assert _corrupt_replica(deployment.sandbox.hosts["replica"]) > 0
    returncode, journal = run_drill(deployment)
    assert returncode != 0
    assert (
        deployment.on_app("systemctl is-failed digitalme-backup-drill", check=False).stdout.strip()
        == "failed"
    )
    assert "restore drill FAILED" in journal, journal
    metrics = deployment.on_app(f"curl -fsS {NODE_EXPORTER}").stdout
    assert metric(metrics, "digitalme_backup_drill_success") == 0, metrics[-2000:]
    backup = readiness_backup(deployment)
    assert backup["ok"] is False and "the last restore drill failed" in backup["detail"], backup
    assert backup["drill"]["ok"] is False
    # The live database is untouched and the service still answers.
    assert deployment.on_app(f"sqlite3 -readonly {DB} 'PRAGMA quick_check'").stdout.strip() == "ok"
    assert deployment.curl(f"https://{DOMAIN}/health", "--fail").returncode == 0
    print(
        "drill against the corrupted replica:",
        [line for line in journal.splitlines() if "restore drill FAILED" in line],
    )


def test_a_corrupted_replica_is_replaced_by_a_new_one(deployment: Deployment) -> None:
    """The runbook of docs/operations/backup-and-recovery.md: with Litestream stopped, reset
    its local state (else it tries to upload changes it no longer has to the empty replica,
    and stalls), keep the corrupted replica aside on the target, converge backup.yml (it
    recreates the folder and starts Litestream): a new replica from the live database,
    replication fresh again, and the drill passes."""
    replica = deployment.sandbox.hosts["replica"]
    deployment.on_app("systemctl stop litestream")  # already stopped by the test before
    deployment.on_app(f"litestream-admin reset {DB}")
    replica.run(
        "mv /srv/litestream/replicas/digitalme /srv/litestream/replicas/digitalme.corrupt",
        login=ADMIN,
    )
    started = time.monotonic()
    converged = deployment.sandbox.ansible_playbook(
        "playbooks/backup.yml", "--limit", "app,replica"
    )
    assert recap(converged.stdout)["replica"]["failed"] == 0
    assert deployment.on_app("systemctl is-active litestream").stdout.strip() == "active"
    # Replication is fresh again: the readiness probe's own write reaches the new replica.
    deadline = time.monotonic() + 120
    while (backup := readiness_backup(deployment)).get("replication_lag_seconds") is None:
        assert time.monotonic() < deadline, (
            backup,
            deployment.on_app("journalctl -u litestream -o cat --no-pager -n 40").stdout,
        )
        time.sleep(1)
    deployment.record("new_replica_synced_seconds", time.monotonic() - started)
    returncode, journal = run_drill(deployment)
    assert returncode == 0, journal
    metrics = deployment.on_app(f"curl -fsS {NODE_EXPORTER}").stdout
    assert metric(metrics, "digitalme_backup_drill_success") == 1
    backup = readiness_backup(deployment)
    assert backup["ok"] is True and backup["drill"]["ok"] is True, backup
    assert (
        "monitor error"
        not in deployment.on_app("journalctl -u litestream -o cat --no-pager --since -2min").stdout
    )
    assert (
        replica.run("test -d /srv/litestream/replicas/digitalme.corrupt", login=ADMIN).returncode
        == 0
    )
