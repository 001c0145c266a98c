"""Upgrades and rollbacks end to end (docs/operations/upgrades.md), on the shared deployment.

In order, each test starting from where the previous one left the deployment:

1. An older commit of this repository (UPGRADE_FROM, built from a git worktree) is
   deployed, then upgraded to the checkout with `playbooks/upgrade.yml` under a steady load
   through Caddy (health checks, chat turns, streamed chat turns, Telegram deliveries): no
   request may fail or stream end early, every acknowledged chat turn must be stored and
   every acknowledged delivery answered exactly once. Timings and the latency the restart
   added go to artifacts/upgrade-timings.json.
2. A second run changes nothing.
3. A release that never becomes ready is rolled back automatically, under load: the play
   fails with the reason and the release's journal, no request fails.
4. A release whose migration fails half-way: the play fails, the database is as it was.
5. A release with a migration: the snapshot and the replica's position are recorded; then
   `playbooks/rollback.yml` refuses (saying what would be lost), rolls back the code alone,
   and, after the release is deployed again, the code and the data; replication and the
   restore drill go on.
6. The deploy lock: a second deploy fails naming the holder, waits for it when asked, and
   breaks a stale one when asked.

The test releases (3 to 5) are the checkout's sources with one change each, built by the
role like any release (digitalme_source_dir).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.deployments import (
    CADDY_ROOT,
    DB,
    DOMAIN,
    TELEGRAM_SECRET,
    Deployment,
    SharedSite,
    copy_of_checkout,
    recap,
)
from tests.e2e.load import SteadyLoad, Target, percentile, wait_until_answered
from tests.e2e.sandboxes import REPO

pytestmark = pytest.mark.e2e

# The oldest release a zero-downtime upgrade starts from: the first whose service takes
# its listening socket from systemd (digitalme.socket), runs on a newer schema and has
# `digitalme smoke-test`. Older releases upgrade too, but their one restart into the
# socket-activated service refuses connections for a second or two (docs/operations/
# upgrades.md).
UPGRADE_FROM = "f8a3b6f2921be7149628889cb21b45ce1e4395d6"
TIMINGS = REPO / "artifacts" / "upgrade-timings.json"
DEPLOY = "/usr/local/sbin/digitalme-deploy"
MIN_REQUESTS_DURING_UPGRADE = 5000
# The test releases' migration comes after the checkout's own.
PROBE_VERSION = len(list((REPO / "app" / "digitalme" / "migrations").glob("0*.sql"))) + 1
PROBE = f"{PROBE_VERSION:04d}_upgrade_probe"
PROBE_MIGRATION = """-- A test release's migration (tests/e2e/test_upgrade.py): a new table.
CREATE TABLE upgrade_probe (id INTEGER PRIMARY KEY, note TEXT NOT NULL);
INSERT INTO upgrade_probe (note) VALUES ('added by the probe');
"""
BROKEN_MIGRATION = PROBE_MIGRATION + "INSERT INTO no_such_table VALUES (1);\n"


@dataclass
class Sources:
    previous: Path  # UPGRADE_FROM, a git worktree
    never_ready: Path  # /health/ready always 503
    broken_migration: Path  # PROBE fails after its first statements
    migrating: Path  # PROBE adds a table


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sources]:
    base = tmp_path_factory.mktemp("releases")
    previous = base / "previous"
    found = subprocess.run(
        ["git", "-C", str(REPO), "cat-file", "-e", f"{UPGRADE_FROM}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    assert found.returncode == 0, (
        f"commit {UPGRADE_FROM} (the release upgraded from) is not in this clone; clone the "
        "repository with its history"
    )
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(previous), UPGRADE_FROM],
        check=True,
        capture_output=True,
    )
    never_ready = copy_of_checkout(base / "never-ready")
    ops = never_ready / "app" / "digitalme" / "handlers" / "ops.py"
    text = ops.read_text()
    assert "status=200 if is_ready else 503," in text
    ops.write_text(text.replace("status=200 if is_ready else 503,", "status=503,"))
    broken = copy_of_checkout(base / "broken-migration")
    migrating = copy_of_checkout(base / "migrating")
    for source, sql in ((broken, BROKEN_MIGRATION), (migrating, PROBE_MIGRATION)):
        (source / "app" / "digitalme" / "migrations" / f"{PROBE}.sql").write_text(sql)
    try:
        yield Sources(previous, never_ready, broken, migrating)
    finally:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(previous)],
            capture_output=True,
        )


@pytest.fixture(scope="module")
def site(shared_site: SharedSite) -> SharedSite:
    return shared_site


@pytest.fixture(scope="module")
def timings(site: SharedSite) -> Deployment:
    return Deployment(site.deployment.sandbox, site.deployment.workdir, TIMINGS)


def play(
    site: SharedSite, playbook: str, *extra: str, source: Path | None = None, check: bool = True
) -> tuple[subprocess.CompletedProcess[str], float]:
    args = list(extra) + (["-e", f"digitalme_source_dir={source}"] if source else [])
    started = time.monotonic()
    result = site.playbook(playbook, *args, check=False)
    seconds = time.monotonic() - started
    (REPO / "artifacts" / f"upgrade-{playbook.removesuffix('.yml')}.log").write_text(
        result.stdout + result.stderr
    )
    if check:
        assert result.returncode == 0, result.stdout[-6000:]
    return result, seconds


def on_app(site: SharedSite, command: str, **kwargs: Any) -> str:
    return site.deployment.on_app(command, **kwargs).stdout


def info(site: SharedSite) -> dict[str, Any]:
    answer: dict[str, Any] = json.loads(on_app(site, "curl -fsS http://127.0.0.1:8080/info"))
    return answer


def last_record(site: SharedSite) -> dict[str, Any]:
    line = on_app(site, "tail -n 1 /var/lib/digitalme-deploy/deploys.jsonl")
    record: dict[str, Any] = json.loads(line)
    return record


def sql(site: SharedSite, query: str) -> list[str]:
    return on_app(site, f"sqlite3 -readonly {DB} {shlex.quote(query)}").split("\n")[:-1]


def schema(site: SharedSite) -> list[int]:
    return [int(v) for v in sql(site, "SELECT version FROM schema_migrations ORDER BY 1")]


def load_on(site: SharedSite, label: str, **workers: int) -> SteadyLoad:
    deployment = site.deployment
    if not deployment.ca_file.exists():
        deployment.ca_file.write_text(on_app(site, f"cat {CADDY_ROOT}"))
    token = deployment.chat_token(f"load-{label}")
    load = SteadyLoad(
        Target(deployment.app.address, DOMAIN, deployment.ca_file),
        token,
        TELEGRAM_SECRET,
        label=f"{label}-{uuid.uuid4().hex[:6]}",
    )
    if workers:
        load.workers = workers
    return load


def test_upgrade_from_the_previous_release_fails_no_request(
    site: SharedSite, sources: Sources, timings: Deployment
) -> None:
    _, seconds = play(site, "upgrade.yml", source=sources.previous)
    assert info(site)["release"]["commit"] == UPGRADE_FROM
    timings.record("deploy_previous_release_seconds", seconds)

    load = load_on(site, "upgrade")
    with load.running(site.loop):
        time.sleep(5)  # the steady state, before
        started = time.time()
        _, seconds = play(site, "upgrade.yml")
        ended = time.time()
        time.sleep(3)  # and after
    record = last_record(site)
    assert record["kind"] == "upgrade" and record["result"] == "success", record
    assert record["from_release"] != record["to_release"]
    assert info(site)["release"]["release"] == record["to_release"]

    during = load.between(started, ended)
    assert load.failed() == [], load.failed()[:10]
    assert len(during) >= MIN_REQUESTS_DURING_UPGRADE, len(during)
    restart = record["restart"]
    held = load.between(restart["at"], restart["at"] + restart["seconds"])
    before = [o.seconds for o in load.outcomes if o.finished < started]
    median, p99_before = percentile(before, 0.5), percentile(before, 0.99)
    p99_during = percentile([o.seconds for o in during], 0.99)
    added = [o.seconds - median for o in held]
    assert held, "no request was in flight while the service restarted: nothing was proved"
    print(
        f"upgrade: {len(during)} requests during the play ({seconds:.0f}s), 0 failed; "
        f"deploy {record['duration_seconds']}s, restart {restart['seconds']}s, gate "
        f"{record['gate_seconds']}s; {len(held)} requests in flight across the restart, "
        f"added latency p99 {percentile(added, 0.99):.2f}s max {max(added):.2f}s; "
        f"p99 {p99_before:.3f}s before, {p99_during:.3f}s during"
    )
    for name, value in (
        ("upgrade_play_seconds", seconds),
        ("upgrade_deploy_seconds", record["duration_seconds"]),
        ("upgrade_restart_seconds", restart["seconds"]),
        ("upgrade_gate_seconds", record["gate_seconds"]),
        ("upgrade_requests_during", len(during)),
        ("upgrade_requests_failed", len(load.failed())),
        ("upgrade_requests_held", len(held)),
        ("upgrade_held_added_p99_seconds", percentile(added, 0.99)),
        ("upgrade_held_added_max_seconds", max(added)),
        ("upgrade_p99_before_seconds", p99_before),
        ("upgrade_p99_during_seconds", p99_during),
    ):
        timings.record(name, value)

    # Every acknowledged write is there: each chat turn stored, each delivery answered once.
    chats = set(load.acknowledged("chat")) | set(load.acknowledged("stream"))
    stored = set(
        sql(site, f"SELECT text FROM messages WHERE role = 'user' AND text LIKE '{load.label} %'")
    )
    assert load.acknowledged("stream"), "no streamed turn finished"
    assert chats and chats <= stored, f"{len(chats - stored)} acknowledged turns missing"
    wait_until_answered(site.telegram, load)


def test_a_run_with_nothing_new_changes_nothing(site: SharedSite, timings: Deployment) -> None:
    result, seconds = play(site, "upgrade.yml")
    counts = recap(result.stdout)
    changed = [line for line in result.stdout.splitlines() if line.startswith("changed:")]
    assert counts["app"]["changed"] == 0, changed
    timings.record("upgrade_nothing_new_seconds", seconds)


def test_a_release_that_never_becomes_ready_is_rolled_back(
    site: SharedSite, sources: Sources, timings: Deployment
) -> None:
    running = info(site)["release"]["release"]
    load = load_on(site, "never-ready", health=3, chat=2, webhook=1)
    with load.running(site.loop):
        result, _ = play(
            site,
            "upgrade.yml",
            "-e",
            "digitalme_upgrade_gate_timeout_seconds=20",
            source=sources.never_ready,
            check=False,
        )
        time.sleep(2)
    assert result.returncode != 0
    output = result.stdout
    assert "failed its health gate: /health/ready did not answer 200 in time" in output
    assert f"Rolled back to {running}, ready again in" in output
    assert "Journal of digitalme.service since the switch" in output
    assert load.failed() == [], load.failed()[:10]
    assert info(site)["release"]["release"] == running
    record = last_record(site)
    assert record["result"] == "rolled_back" and record["rolled_back_to"] == running
    assert "digitalme_deploy_last_success 0" in on_app(
        site, "cat /var/lib/prometheus/node-exporter/digitalme_deploy.prom"
    )
    timings.record("automatic_rollback_seconds", record["rollback_seconds"])
    print(
        f"never ready: rolled back in {record['rollback_seconds']}s, "
        f"{len(load.outcomes)} requests meanwhile, 0 failed"
    )
    wait_until_answered(site.telegram, load)


def test_a_migration_that_fails_half_way_changes_nothing(
    site: SharedSite, sources: Sources
) -> None:
    running = info(site)["release"]["release"]
    tables = "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
    counts = "SELECT (SELECT count(*) FROM messages), (SELECT count(*) FROM inbox)"
    before = (sql(site, tables), sql(site, counts), schema(site))
    result, _ = play(site, "upgrade.yml", source=sources.broken_migration, check=False)
    assert result.returncode != 0
    assert f"({PROBE}) failed; the database is as it was" in result.stdout
    assert "no such table: no_such_table" in result.stdout
    assert sql(site, "PRAGMA integrity_check") == ["ok"]
    assert (sql(site, tables), sql(site, counts), schema(site)) == before
    assert info(site)["release"]["release"] == running  # it never stopped serving
    # Its snapshot went too: the database it was taken from is unchanged.
    assert on_app(site, "ls -A /var/lib/digitalme/snapshots 2>/dev/null | wc -l").strip() == "0"


def chat_turns(site: SharedSite, label: str, count: int) -> None:
    deployment = site.deployment
    token = deployment.chat_token(label)
    auth = ["--header", f"Authorization: Bearer {token}", "--fail"]
    conversation = json.loads(
        deployment.curl(f"https://{DOMAIN}/api/v1/conversations", *auth, "--request", "POST").stdout
    )["id"]
    for i in range(count):
        said = deployment.curl(
            f"https://{DOMAIN}/api/v1/conversations/{conversation}/messages",
            *auth,
            "--json",
            json.dumps({"text": f"{label} #{i}"}),
        )
        assert said.returncode == 0, said.stderr


def test_rollback_after_a_migrating_upgrade(
    site: SharedSite, sources: Sources, timings: Deployment
) -> None:
    previous = info(site)["release"]["release"]
    play(site, "upgrade.yml", source=sources.migrating)
    upgrade = last_record(site)
    assert upgrade["migrations"] == [PROBE] and schema(site)[-1] == PROBE_VERSION
    assert upgrade["litestream"]["txid"] == upgrade["litestream"]["replica_txid"] > 0
    snapshot = upgrade["snapshot"]["path"]
    assert on_app(site, f"stat -c '%U %a' {snapshot}").split() == ["digitalme", "600"]
    assert info(site)["last_deploy"]["migrations"] == [PROBE]

    label = f"after-upgrade-{uuid.uuid4().hex[:6]}"
    chat_turns(site, label, 3)  # what a data rollback loses: at least these 6 messages
    highest = upgrade["snapshot"]["highest_rowids"]
    written = {
        table: int(sql(site, f"SELECT count(*) FROM {table} WHERE rowid > {n}")[0])
        for table, n in highest.items()
    }
    assert written["messages"] >= 6 and written["conversations"] >= 1

    refused, _ = play(site, "rollback.yml", check=False)
    assert refused.returncode != 0
    assert f"applied migrations ({PROBE}) that release" in refused.stdout
    assert "rollback_data=false: keep it" in refused.stdout
    assert (
        f"this LOSES what was written since: {written['messages']} messages, "
        f"{written['conversations']} conversations and {written['inbox']} webhook "
        "deliveries"
    ) in refused.stdout, refused.stdout[-3000:]
    assert schema(site)[-1] == PROBE_VERSION
    assert info(site)["release"]["release"] == upgrade["to_release"]

    _, seconds = play(site, "rollback.yml", "-e", "rollback_data=false")
    assert info(site)["release"]["release"] == previous
    assert schema(site)[-1] == PROBE_VERSION  # the data stayed: the older release runs on it
    ready = json.loads(on_app(site, "curl -fsS http://127.0.0.1:8080/health/ready"))
    assert ready["checks"]["migrations"]["newer"] == [PROBE_VERSION]
    timings.record("rollback_code_play_seconds", seconds)
    timings.record("rollback_code_seconds", last_record(site)["duration_seconds"])

    play(site, "upgrade.yml", source=sources.migrating)
    assert last_record(site)["migrations"] == []  # nothing left to migrate: no snapshot

    _, seconds = play(site, "rollback.yml", "-e", "rollback_data=true")
    rollback = last_record(site)
    assert rollback["kind"] == "rollback" and rollback["data"] == "restore"
    assert rollback["lost_rows"]["messages"] >= written["messages"]
    assert info(site)["release"]["release"] == previous
    assert schema(site)[-1] == PROBE_VERSION - 1
    assert sql(site, f"SELECT count(*) FROM messages WHERE text LIKE '{label}%'") == ["0"]
    assert "upgrade_probe" not in sql(site, "SELECT name FROM sqlite_master")
    aside = rollback["replaced_database"]
    assert on_app(site, f"ls {aside}").split()[0] == "digitalme.db"
    timings.record("rollback_data_play_seconds", seconds)
    timings.record("rollback_data_seconds", rollback["duration_seconds"])

    # Replication goes on from the restored database: a new turn reaches the replica.
    later = f"after-rollback-{uuid.uuid4().hex[:6]}"
    chat_turns(site, later, 1)
    deadline = time.monotonic() + 60
    while True:
        drill = site.deployment.on_app(
            "systemctl start digitalme-backup-drill.service", check=False, timeout=600
        )
        on_app(site, "rm -f /var/lib/digitalme/e2e-upgrade.db*")
        restored = site.deployment.on_app(
            "litestream-admin restore -o /var/lib/digitalme/e2e-upgrade.db " + DB, check=False
        )
        # The turn's two messages: the question and the stand-in's reply quoting it.
        found = (
            on_app(
                site,
                "sqlite3 -readonly /var/lib/digitalme/e2e-upgrade.db "
                f"\"SELECT count(*) FROM messages WHERE text LIKE '%{later}%'\"",
                check=False,
            ).strip()
            if restored.returncode == 0
            else ""
        )
        if drill.returncode == 0 and found == "2":
            break
        assert time.monotonic() < deadline, (drill.stdout, drill.stderr, restored.stderr)
        time.sleep(2)
    on_app(site, "rm -f /var/lib/digitalme/e2e-upgrade.db*")


def test_a_second_deploy_fails_on_the_lock_or_waits_for_it(site: SharedSite) -> None:
    holder = "alice@laptop: playbooks/upgrade.yml"
    token = json.loads(on_app(site, f"{DEPLOY} lock acquire --holder {shlex.quote(holder)}"))
    refused, _ = play(site, "upgrade.yml", check=False)
    assert refused.returncode != 0
    assert f"another deploy holds the lock of this host: {holder} since" in refused.stdout
    assert "sudo digitalme-deploy lock break" in refused.stdout

    # Asked to wait, the play waits until the holder is done, then goes on.
    waited: dict[str, Any] = {}

    def upgrade_waiting() -> None:
        waited["result"], waited["seconds"] = play(
            site, "upgrade.yml", "-e", "digitalme_deploy_lock_wait_seconds=300"
        )

    worker = threading.Thread(target=upgrade_waiting)
    worker.start()
    deadline = time.monotonic() + 600
    while "lock acquire" not in on_app(site, "ps -eo args", check=False):
        assert worker.is_alive() and time.monotonic() < deadline, waited
        time.sleep(0.5)
    time.sleep(3)
    assert worker.is_alive()  # still waiting for alice
    on_app(site, f"{DEPLOY} lock release --token {token['token']}")
    worker.join(timeout=600)
    assert recap(waited["result"].stdout)["app"]["failed"] == 0

    # A lock whose run is gone (its controller crashed) is broken when asked.
    on_app(site, f"{DEPLOY} lock acquire --holder {shlex.quote(holder)}")
    broken, _ = play(site, "upgrade.yml", "-e", "digitalme_deploy_break_lock=true")
    assert task_status(broken.stdout, "Break a stale deploy lock") == "changed"
    assert "not held" in on_app(site, f"{DEPLOY} lock show")


def task_status(output: str, task: str) -> str:
    """ok, changed, skipping... of the first task whose name starts with ``task``."""
    after = output.split(f"TASK [digitalme : {task}", 1)[1]
    found = re.search(r"^(ok|changed|skipping|fatal|failed):", after, re.MULTILINE)
    assert found, after[:500]
    return found[1]
