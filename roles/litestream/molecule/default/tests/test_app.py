"""Testinfra checks of the app hosts: app-file (file replica) and app-sftp (SFTP replica).

The tests run in file order and build on each other: the database does not exist after
converge; the stand-in app (digitalme.service, installed by prepare.yml) creates it; rows
are written and measured on their way to the replica; Litestream is killed during writes;
the database is removed and comes back from the replica before the app starts; on app-sftp,
a converge of a host without database or Litestream state brings it back too.
"""

from __future__ import annotations

import json
import re
import statistics
import time

import pytest
from conftest import DB, REPORT
from verifier import address, ansible_playbook, record

testinfra_hosts = ["app-file", "app-sftp"]

REPLICA = {"app-file": "file", "app-sftp": "sftp"}
SOCKET = "/run/litestream/litestream.sock"
BINARY = "/usr/local/libexec/litestream"

# Runs on the host as root: restores the replica into a scratch file until it holds at
# least `want` rows (or the deadline passes); prints what it found. Calls the binary
# directly with the credentials folder (litestream-admin, tested on its own, adds a
# transient unit's start-up to every call, which would blur the lag measurement).
RESTORE_UNTIL = r"""
import json, os, sqlite3, subprocess, sys, time
db, want, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
out, start, result = "/tmp/litestream-check.db", time.monotonic(), {}
while True:
    for path in (out, out + "-wal", out + "-shm"):
        if os.path.exists(path):
            os.remove(path)
    proc = subprocess.run(["/usr/local/libexec/litestream", "restore", "-o", out, db], capture_output=True, text=True,
                          env=dict(os.environ, CREDENTIALS_DIRECTORY="/etc/litestream"))
    result = {"rc": proc.returncode, "stderr": proc.stderr[-2000:], "seconds": time.monotonic() - start}
    if proc.returncode == 0 and os.path.exists(out):
        check = sqlite3.connect(out)
        result["integrity"] = check.execute("PRAGMA integrity_check").fetchone()[0]
        result["rows"] = check.execute("SELECT count(*) FROM rows").fetchone()[0]
        result["marks"] = [m for (m,) in check.execute("SELECT what FROM rows WHERE what LIKE 'app started%'")]
        check.close()
        if result["rows"] >= want:
            break
    if time.monotonic() > deadline:
        break
    time.sleep(0.05)
print(json.dumps(result))
"""

# Runs on the host as root: commits one row at a time as the app's user (so the database's
# files keep their owner), then times how long the replica takes to hold it.
LAG = r"""
import json, os, sqlite3, subprocess, sys, time
db, trials, out, lags = sys.argv[1], int(sys.argv[2]), "/tmp/litestream-lag.db", []
insert = "import sqlite3; c = sqlite3.connect(%r, isolation_level=None); c.execute('PRAGMA busy_timeout=5000'); c.execute(\"INSERT INTO rows (what, at) VALUES ('lag', 0)\"); print(c.execute('SELECT count(*) FROM rows').fetchone()[0])" % db
for trial in range(trials):
    time.sleep(0.3 + 0.13 * trial)  # spread the writes over the sync cycle
    want = int(subprocess.run(["runuser", "-u", "digitalme", "--", "python3", "-c", insert],
                              capture_output=True, text=True, check=True).stdout)
    committed = time.monotonic()
    while True:
        for path in (out, out + "-wal", out + "-shm"):
            if os.path.exists(path):
                os.remove(path)
        proc = subprocess.run(["/usr/local/libexec/litestream", "restore", "-o", out, db], capture_output=True,
                              env=dict(os.environ, CREDENTIALS_DIRECTORY="/etc/litestream"))
        if proc.returncode == 0 and sqlite3.connect(out).execute("SELECT count(*) FROM rows").fetchone()[0] >= want:
            break
        if time.monotonic() - committed > 30:
            raise SystemExit("row %d not in the replica after 30s" % want)
        time.sleep(0.05)
    lags.append(time.monotonic() - committed)
print(json.dumps(lags))
"""

# Runs on the host as the app's user: inserts rows for `seconds`, prints the final count.
WRITER = r"""
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA busy_timeout=5000")
db.execute("PRAGMA synchronous=FULL")
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    db.execute("INSERT INTO rows (what, at) VALUES ('during kill', ?)", (time.time(),))
    time.sleep(0.01)
print(db.execute("SELECT count(*) FROM rows").fetchone()[0])
"""

COUNT = r"""
import json, sqlite3, sys
db = sqlite3.connect(sys.argv[1])
print(json.dumps({"rows": db.execute("SELECT count(*) FROM rows").fetchone()[0],
                  "integrity": db.execute("PRAGMA integrity_check").fetchone()[0]}))
"""


def restore_until(host, want: int, within: float) -> dict:
    code = RESTORE_UNTIL.replace("'", "'\"'\"'")
    result = host.run(f"python3 -c '{code}' {DB} {want} {within}")
    assert result.rc == 0, result.stderr
    return json.loads(result.stdout)


def count_on_host(host) -> dict:
    """Rows in the live database, read as the app's user (root would leave root-owned -shm)."""
    code = COUNT.replace("'", "'\"'\"'")
    result = host.run(f"runuser -u digitalme -- python3 -c '{code}' {DB}")
    assert result.rc == 0, result.stderr
    return json.loads(result.stdout)


def wait_for_rows(host, rows: int, within: float = 15) -> dict:
    """The live database's row count once it reaches `rows` (the stand-in app inserts its
    start mark just after systemd reports it started)."""
    deadline = time.monotonic() + within
    while True:
        found = count_on_host(host)
        if found["rows"] >= rows or time.monotonic() > deadline:
            return found
        time.sleep(0.3)


def show(host, unit: str, *properties: str) -> dict:
    out = host.check_output(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in properties))
    return dict(line.split("=", 1) for line in out.splitlines())


# --- installation -----------------------------------------------------------


def test_binary_is_the_pinned_static_build_out_of_users_path(host):
    binary = host.file(BINARY)
    assert (binary.user, binary.group, binary.mode) == ("root", "root", 0o755)
    assert host.check_output(f"{BINARY} version") == "0.5.17"
    assert binary.sha256sum == "200e4248a4cc83da2ca52babe66774f1a71afa993d31373adb0ce0fe12154647"
    assert f"path={BINARY} ;" in show(host, "litestream", "ExecStart")["ExecStart"]
    # What users find in their PATH is the command that runs it the way the units do.
    command = host.file("/usr/local/bin/litestream")
    assert (command.user, command.group, command.mode) == ("root", "root", 0o755)
    assert command.content_string.startswith("#!/bin/sh")
    assert host.check_output("runuser -u nobody -- /usr/local/bin/litestream version") == "0.5.17"


def test_service_user_is_the_app_user(host):
    user = host.user("digitalme")
    assert user.exists and user.group == "digitalme"
    assert user.home == "/var/lib/digitalme" and user.shell == "/usr/sbin/nologin"
    assert user.uid < 1000
    folder = host.file("/var/lib/digitalme")
    assert (folder.user, folder.group, folder.mode) == ("digitalme", "digitalme", 0o750)


def test_configuration_is_valid_and_secrets_are_root_only(host, name):
    config = host.file("/etc/litestream.yml")
    assert (config.user, config.mode) == ("root", 0o644)
    listed = host.check_output("litestream databases -config /etc/litestream.yml")
    assert re.search(rf"^{re.escape(DB)}\s+{REPLICA[name]}$", listed, re.M), listed
    secrets = host.file("/etc/litestream")
    assert (secrets.user, secrets.mode) == ("root", 0o700)
    key = host.file("/etc/litestream/sftp-key")
    assert not host.file("/etc/litestream/s3.env").exists
    if name == "app-sftp":
        assert (key.user, key.group, key.mode) == ("root", "root", 0o600)
        assert "PRIVATE KEY" not in config.content_string
        assert 'host-key: "ssh-ed25519 AAAA' in config.content_string
    else:
        assert not key.exists
        replica = host.file("/var/backups/digitalme/litestream")
        assert (replica.user, replica.mode) == ("digitalme", 0o750)
    admin = host.file("/usr/local/sbin/litestream-admin")
    assert (admin.user, admin.mode) == ("root", 0o750)


def test_units_are_enabled_ordered_and_running_hardened(host, journal):
    assert host.service("litestream").is_enabled
    assert host.service("litestream").is_running, journal()
    assert host.service("litestream-restore").is_enabled
    props = show(host, "litestream", "User", "Restart", "Before", "After", "Wants", "MainPID")
    assert props["User"] == "digitalme" and props["Restart"] == "always"
    assert "digitalme.service" in props["Before"].split()
    assert "litestream-restore.service" in props["After"].split()
    assert "litestream-restore.service" in props["Wants"].split()
    restore = show(
        host,
        "litestream-restore",
        "Type",
        "RemainAfterExit",
        "Before",
        "RequiredBy",
        "ConditionResult",
    )
    assert restore["Type"] == "oneshot" and restore["RemainAfterExit"] == "no"
    assert {"litestream.service", "digitalme.service"} <= set(restore["Before"].split())
    assert "digitalme.service" in restore["RequiredBy"].split()
    assert host.file(
        "/etc/systemd/system/digitalme.service.requires/litestream-restore.service"
    ).is_symlink
    status = host.file(f"/proc/{props['MainPID']}/status").content_string
    fields = {k: v.strip() for k, v in (line.split(":", 1) for line in status.splitlines())}
    assert int(fields["Uid"].split()[0]) == host.user("digitalme").uid
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapBnd"], 16) == 0
    assert fields["NoNewPrivs"] == "1" and fields["Seccomp"] == "2"


def test_listens_on_its_control_socket_and_its_metrics_on_loopback_only(host, name):
    """app-file has litestream_metrics_address "" (molecule.yml): no network port at all;
    app-sftp the default, 127.0.0.1:9098, for the monitoring role's scrape."""
    pid = show(host, "litestream", "MainPID")["MainPID"]
    sockets = host.check_output("ss -H -tulpn")
    ours = [line.split()[4] for line in sockets.splitlines() if f"pid={pid}," in line]
    assert ours == ([] if name == "app-file" else ["127.0.0.1:9098"]), sockets
    if name == "app-sftp":
        metrics = host.check_output(
            "python3 -c 'import urllib.request; print(urllib.request.urlopen("
            '"http://127.0.0.1:9098/metrics", timeout=10).read().decode())\''
        )
        assert f'litestream_sync_count{{db="{DB}"}}' in metrics
        assert 'addr: "127.0.0.1:9098"' in host.file("/etc/litestream.yml").content_string
    sock = host.file(SOCKET)
    assert sock.is_socket and (sock.user, sock.mode) == ("digitalme", 0o600)
    info = host.check_output(f"litestream info -socket {SOCKET}")
    assert "Litestream 0.5.17" in info and "Databases:  1" in info
    if name == "app-file":  # a file replica has no network at all
        assert host.check_output(f"nsenter -t {pid} -n ip -o link | wc -l") == "1"


def test_exposure_scores_are_at_most_4(host, name):
    for unit in ("litestream.service", "litestream-restore.service"):
        report = host.check_output(f"systemd-analyze security {unit} --no-pager")
        score = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", report).group(1))
        record(REPORT, (name, f"exposure {unit}"), score)
        assert score <= 4.0, report


# --- replication ------------------------------------------------------------


def test_litestream_waits_for_a_database_that_does_not_exist_yet(host, journal):
    assert not host.file(DB).exists
    assert host.service("litestream").is_running, journal()
    assert "initialized db" in host.check_output("journalctl -u litestream --no-pager -o cat"), (
        journal()
    )


def test_replication_starts_when_the_app_creates_the_database(host, name, journal):
    started = time.monotonic()
    host.check_output("systemctl start digitalme.service")
    found = restore_until(host, 1, within=30)
    record(
        REPORT,
        (name, "seconds from app start to first replicated row"),
        round(time.monotonic() - started, 2),
    )
    assert found.get("rows") == 1 and found["integrity"] == "ok", (found, journal())
    db = host.file(DB)
    assert (db.user, db.group) == ("digitalme", "digitalme")
    assert host.file("/var/lib/digitalme/.digitalme.db-litestream").is_directory


def test_replication_lag_is_about_the_sync_interval(host, name, journal):
    code = LAG.replace("'", "'\"'\"'")
    result = host.run(f"python3 -c '{code}' {DB} 6")
    assert result.rc == 0, result.stderr + journal()
    lags = json.loads(result.stdout)
    record(
        REPORT,
        (name, "replication lag seconds (commit to restorable; sync-interval 1s)"),
        {
            "median": round(statistics.median(lags), 2),
            "max": round(max(lags), 2),
            "all": [round(x, 2) for x in lags],
        },
    )
    assert max(lags) < 5, lags


def test_no_row_is_lost_when_litestream_is_killed_during_writes(host, name, journal):
    before = show(host, "litestream", "MainPID", "NRestarts")
    code = WRITER.replace("'", "'\"'\"'")
    host.check_output(
        f"systemd-run --unit=litestream-test-writer --uid=digitalme --gid=digitalme --collect "
        f"python3 -c '{code}' {DB} 6"
    )
    time.sleep(2)
    host.check_output("systemctl kill --signal=KILL litestream.service")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = show(host, "litestream", "MainPID", "NRestarts", "ActiveState")
        if after["ActiveState"] == "active" and after["MainPID"] not in ("0", before["MainPID"]):
            break
        time.sleep(0.5)
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1, (after, journal())
    while host.run("systemctl is-active litestream-test-writer").stdout.strip() in (
        "active",
        "activating",
    ):
        time.sleep(0.5)
    committed = count_on_host(host)["rows"]
    found = restore_until(host, committed, within=30)
    record(
        REPORT,
        (name, "rows committed around a SIGKILL / found in the replica"),
        [committed, found.get("rows")],
    )
    assert found.get("rows") == committed and found["integrity"] == "ok", (
        committed,
        found,
        journal(),
    )


def test_admin_command_runs_litestream_as_the_app_user_with_the_secrets(host, name):
    out = "/tmp/litestream-admin-check.db"
    host.check_output(f"rm -f {out} && litestream-admin restore -o {out} {DB}")
    restored = host.file(out)
    assert (restored.user, restored.group, restored.mode) == ("digitalme", "digitalme", 0o640)
    listed = host.check_output(f"litestream-admin list -socket {SOCKET}")
    assert f"{DB} [replicating]" in listed, listed
    failed = host.run("litestream-admin restore -o /tmp/nowhere.db /no/such.db")
    assert failed.rc == 1 and "database not found in config" in failed.stderr
    host.check_output(f"rm -f {out}")


def test_litestream_works_as_an_operator_types_it(host, name):
    """What an operator reaches for first, typed as is: sudo's PATH finds the command,
    which runs the commands that need the replica through litestream-admin (as the app's
    user, with the units' secrets) and points the control socket commands at ours."""
    for path in ("/tmp/typed.db", "/var/lib/digitalme/typed-relative.db"):
        host.check_output(f"rm -f {path} {path}-wal {path}-shm")
    synced = host.run(f"sudo litestream sync -wait {DB}")  # the control socket
    assert synced.rc == 0, synced.stderr
    restored = host.run(f"sudo litestream restore -o /tmp/typed.db {DB}")
    assert restored.rc == 0, restored.stderr
    copy = host.file("/tmp/typed.db")
    assert (copy.user, copy.group, copy.mode) == ("digitalme", "digitalme", 0o640)
    check = json.loads(
        host.check_output(
            'python3 -c \'import json, sqlite3; c = sqlite3.connect("/tmp/typed.db");'
            ' print(json.dumps([c.execute("PRAGMA integrity_check").fetchone()[0],'
            ' c.execute("SELECT count(*) FROM rows").fetchone()[0]]))\''
        )
    )
    assert check == ["ok", count_on_host(host)["rows"]], check
    # A relative output path is the caller's folder when the app's user may enter it...
    relative = host.run(
        f"cd /var/lib/digitalme && sudo litestream restore -o typed-relative.db {DB}"
    )
    assert relative.rc == 0, relative.stderr
    assert host.file("/var/lib/digitalme/typed-relative.db").user == "digitalme"
    # ...else the command says what to do instead of failing obscurely.
    hidden = host.run(f"cd /root && sudo litestream restore -o typed-relative.db {DB}")
    assert hidden.rc != 0 and "give absolute paths" in hidden.stderr, hidden.stderr
    ltx = host.run(f"sudo litestream ltx -level all {DB}")
    assert ltx.rc == 0, ltx.stderr
    assert ltx.stdout.splitlines()[0].split()[:3] == ["level", "min_txid", "max_txid"], ltx.stdout
    assert re.search(r"^9\s+[0-9a-f]{16}\s", ltx.stdout, re.M), ltx.stdout  # a snapshot
    databases = host.run("sudo litestream databases")
    assert databases.rc == 0 and re.search(
        rf"^{re.escape(DB)}\s+{REPLICA[name]}$", databases.stdout, re.M
    )
    status = host.run("sudo litestream status")
    assert status.rc == 0 and re.search(rf"^{re.escape(DB)}\s+ok\s", status.stdout, re.M), (
        status.stdout
    )
    assert "Litestream 0.5.17" in host.check_output("sudo litestream info")
    assert f"{DB} [replicating]" in host.check_output("sudo litestream list")
    for typed in (f"restore -o /tmp/x.db {DB}", f"ltx {DB}", "databases", "info"):
        refused = host.run(f"runuser -u nobody -- /usr/local/bin/litestream {typed}")
        assert refused.rc == 1 and f"sudo litestream {typed}" in refused.stderr, refused.stderr
    second = host.run("sudo litestream replicate")
    assert second.rc == 2 and "litestream.service" in second.stderr, second.stderr
    # The binary itself, as typed before, without the secrets: what the command avoids.
    if name == "app-sftp":
        bare = host.run(f"{BINARY} restore -o /tmp/bare.db {DB}")
        assert bare.rc != 0 and "sftp key" in bare.stderr, bare.stderr
    host.check_output("rm -f /tmp/typed.db* /var/lib/digitalme/typed-relative.db*")


def test_a_removed_database_comes_back_before_the_app_starts(host, name, journal):
    # Stop the app first; stopping Litestream ships what is left of the WAL.
    host.check_output("systemctl stop digitalme.service litestream.service")
    before = count_on_host(host)
    assert before["integrity"] == "ok"
    host.check_output(f"rm -f {DB} {DB}-wal {DB}-shm")
    # What a boot does: the app requires the restore and Litestream wants it; both are
    # ordered after it. The stand-in app would create an empty database if it ran first.
    host.check_output("systemctl start litestream.service digitalme.service")
    after = wait_for_rows(host, before["rows"] + 1)
    assert after == {"rows": before["rows"] + 1, "integrity": "ok"}, (before, after, journal())
    db = host.file(DB)
    assert (db.user, db.group, db.mode) == ("digitalme", "digitalme", 0o640)
    ran = show(host, "litestream-restore", "ConditionResult", "Result", "ActiveState")
    assert ran == {"ConditionResult": "yes", "Result": "success", "ActiveState": "inactive"}, (
        ran,
        journal(),
    )
    assert host.service("litestream").is_running and host.service("digitalme").is_running, journal()
    # The restored database replicates again.
    found = restore_until(host, after["rows"], within=30)
    assert found.get("rows") == after["rows"], (found, journal())
    record(
        REPORT,
        (name, "rows after removing the database and starting the app"),
        [before["rows"], after["rows"]],
    )


def test_sftp_replica_pins_the_host_key(host, name):
    if name != "app-sftp":
        pytest.skip("SFTP replica only")
    log = host.check_output("journalctl -u litestream -u litestream-restore --no-pager -o cat")
    assert "type=sftp" in log
    assert "not verified" not in log and "insecure" not in log.lower(), log[-3000:]


def test_litestream_keeps_retrying_while_the_target_is_unreachable(host, name, journal):
    """Litestream 0.5 exits at start when the SFTP target cannot be reached: systemd must
    keep restarting it (no start limit) until the target is back."""
    if name != "app-sftp":
        pytest.skip("SFTP replica only")
    target = address("replica")
    host.check_output(f"ip route add blackhole {target}/32")
    try:
        host.check_output("systemctl restart litestream.service")
        time.sleep(12)
        down = show(host, "litestream", "NRestarts", "ActiveState", "SubState")
        log = host.check_output("journalctl -u litestream --no-pager -o cat -n 30")
    finally:
        host.check_output(f"ip route del blackhole {target}/32")
    assert int(down["NRestarts"]) >= 1 and down["SubState"] != "failed", (down, journal())
    assert "cannot open store" in log, log
    deadline = time.monotonic() + 30  # the next restart (RestartSec=5s) finds the target
    while (
        show(host, "litestream", "SubState")["SubState"] != "running"
        and time.monotonic() < deadline
    ):
        time.sleep(1)
    assert host.service("litestream").is_running, journal()
    before = count_on_host(host)["rows"]
    host.check_output("systemctl restart digitalme.service")  # one more row: its start mark
    rows = wait_for_rows(host, before + 1)["rows"]
    assert rows == before + 1
    found = restore_until(host, rows, within=30)
    assert found.get("rows") == rows, (found, journal())


def test_a_fresh_host_converge_restores_the_database(host, name, journal):
    """As if the host were rebuilt: no database, no Litestream state; converge brings it back."""
    if name != "app-sftp":
        pytest.skip("one host is enough: the same tasks run on both")
    host.check_output("systemctl stop digitalme.service litestream.service")
    before = count_on_host(host)
    host.check_output(f"rm -rf {DB} {DB}-wal {DB}-shm /var/lib/digitalme/.digitalme.db-litestream")
    # The installation is unchanged on a rebuilt host (same binary): only the configure
    # part runs, to keep the scenario short. The replica's facts pin its host key.
    returncode, output = ansible_playbook(
        "--limit", "app-sftp,replica", "--tags", "litestream_configure"
    )
    assert returncode == 0, output[-6000:]
    assert re.search(
        r"TASK \[litestream : Report whether a database was restored\][^\n]*\nchanged: \[app-sftp\]",
        output,
    ), output[-4000:]
    assert count_on_host(host) == before, journal()
    assert host.service("litestream").is_running, journal()
    host.check_output("systemctl start digitalme.service")
    assert wait_for_rows(host, before["rows"] + 1)["rows"] == before["rows"] + 1
