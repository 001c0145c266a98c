"""digitalme-deploy's parts that need no systemd: the lock, the snapshot and what a data
rollback would lose, release bookkeeping, the record and its metrics. The switch, the
health gate and rollbacks run end to end in tests/e2e/test_upgrade.py."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tools import digitalme_deploy as deploy


@pytest.fixture
def settings(tmp_path: Path) -> deploy.Settings:
    (tmp_path / "textfile").mkdir()  # node-exporter's folder (written only when it exists)
    return deploy.Settings(
        root=tmp_path / "opt",
        db_path=tmp_path / "var" / "digitalme.db",
        user=None,
        state_dir=tmp_path / "state",
        snapshot_dir=tmp_path / "var" / "snapshots",
        lock_file=tmp_path / "run" / "lock.json",
        textfile_dir=str(tmp_path / "textfile"),
        group="nogroup",
        keep_releases=3,
    )


def install_release(settings: deploy.Settings, name: str, migrations: list[str]) -> None:
    release = settings.releases_dir / name
    folder = release / "venv" / "lib" / "python3.11" / "site-packages" / "digitalme" / "migrations"
    folder.mkdir(parents=True)
    for migration in migrations:
        (folder / f"{migration}.sql").write_text("-- test\n")
    (release / "release.json").write_text(json.dumps({"release": name, "commit": "c0ffee"}))
    (release / ".complete").touch()


def live_database(path: Path, messages: int) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript("""
        CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY);
        INSERT INTO schema_migrations VALUES (1), (2);
        CREATE TABLE conversations (id TEXT PRIMARY KEY);
        CREATE TABLE messages (id INTEGER PRIMARY KEY, conversation_id TEXT, text TEXT);
        INSERT INTO conversations VALUES ('c1');
    """)
    db.executemany(
        "INSERT INTO messages (conversation_id, text) VALUES ('c1', ?)",
        [(f"m{i}",) for i in range(messages)],
    )
    return db


# --- the lock ---------------------------------------------------------------------------------


def test_a_second_deploy_is_refused_naming_the_holder_and_how_to_break_it(
    settings: deploy.Settings,
) -> None:
    token = deploy.acquire_lock(settings, "alice@laptop: upgrade.yml", wait=0)
    with pytest.raises(deploy.Failure) as refused:
        deploy.acquire_lock(settings, "bob@desk: upgrade.yml", wait=0)
    message = str(refused.value)
    assert "another deploy holds the lock of this host: alice@laptop: upgrade.yml since" in message
    assert "sudo digitalme-deploy lock break" in message
    assert "digitalme_deploy_break_lock=true" in message
    assert settings.lock_file.stat().st_mode & 0o777 == 0o600
    deploy.release_lock(settings, token)
    assert deploy.lock_holder(settings) is None


def test_a_waiting_deploy_goes_on_when_the_holder_is_done(settings: deploy.Settings) -> None:
    token = deploy.acquire_lock(settings, "alice@laptop", wait=0)
    timer = threading.Timer(1.0, deploy.release_lock, (settings, token))
    timer.start()
    started = time.monotonic()
    mine = deploy.acquire_lock(settings, "bob@desk", wait=30)
    timer.join()
    assert time.monotonic() - started >= 0.9
    assert deploy.lock_holder(settings)["token"] == mine  # type: ignore[index]


def test_only_its_holder_releases_a_lock_and_a_broken_lock_stops_its_run(
    settings: deploy.Settings,
) -> None:
    token = deploy.acquire_lock(settings, "alice@laptop", wait=0)
    with pytest.raises(deploy.Failure, match="held by someone else"):
        deploy.release_lock(settings, "not-the-token")
    settings.lock_file.unlink()  # `lock break`
    other = deploy.acquire_lock(settings, "bob@desk", wait=0)
    with pytest.raises(deploy.Failure, match=r"no longer holds the deploy lock \(held by bob"):
        deploy.check_lock(settings, token)
    deploy.check_lock(settings, other)


def test_a_command_without_the_plays_lock_takes_its_own(settings: deploy.Settings) -> None:
    with deploy.locked(settings, None, "carol@host", "rollback"):
        holder = deploy.lock_holder(settings)
        assert holder is not None and holder["holder"] == "carol@host: digitalme-deploy rollback"
        with pytest.raises(deploy.Failure, match="carol@host"):
            deploy.acquire_lock(settings, "dave@host", wait=0)
    assert deploy.lock_holder(settings) is None


# --- the data ---------------------------------------------------------------------------------


def test_the_snapshot_is_consistent_private_and_says_what_it_holds(
    settings: deploy.Settings,
) -> None:
    live = live_database(settings.db_path, messages=5)
    snapshot = deploy.internal_snapshot(str(settings.db_path), str(settings.snapshot_dir / "d1.db"))
    assert snapshot["applied"] == [1, 2]
    assert snapshot["highest_rowids"] == {"messages": 5, "conversations": 1, "inbox": 0}
    path = Path(snapshot["path"])
    assert path.stat().st_mode & 0o777 == 0o600
    assert sqlite3.connect(path).execute("SELECT count(*) FROM messages").fetchone() == (5,)
    # What a data rollback to it would lose: the rows written since.
    live.executemany(
        "INSERT INTO messages (conversation_id, text) VALUES ('c2', ?)", [("late",)] * 3
    )
    live.execute("INSERT INTO conversations VALUES ('c2')")
    lost = deploy.internal_newer_rows(str(settings.db_path), json.dumps(snapshot["highest_rowids"]))
    assert lost == {"messages": 3, "conversations": 1, "inbox": 0}


def test_a_release_knows_its_migrations_and_a_missing_one_is_named(
    settings: deploy.Settings,
) -> None:
    install_release(settings, "0.1.0-aaa", ["0001_initial", "0002_channels"])
    assert deploy.release_migrations(settings, "0.1.0-aaa") == {
        1: "0001_initial",
        2: "0002_channels",
    }
    with pytest.raises(
        deploy.Failure,
        match=r"release 0.1.0-bbb is not installed on this host "
        r"\(installed: 0.1.0-aaa\)",
    ):
        deploy.release_migrations(settings, "0.1.0-bbb")
    with pytest.raises(deploy.Failure, match="is not a release name"):
        deploy.check_release_name("../../etc")


def test_the_refusal_says_what_each_choice_does_to_the_data(settings: deploy.Settings) -> None:
    install_release(settings, "old", ["0001_initial", "0002_channels"])
    install_release(settings, "new", ["0001_initial", "0002_channels", "0003_probe"])
    live = live_database(settings.db_path, messages=4)
    snapshot = deploy.internal_snapshot(str(settings.db_path), str(settings.snapshot_dir / "d1.db"))
    live.execute("INSERT INTO schema_migrations VALUES (3)")
    live.executemany("INSERT INTO messages (conversation_id, text) VALUES ('c1', 'x')", [()] * 2)
    text = deploy.refusal(
        settings,
        "old",
        "new",
        [3],
        dict(snapshot, taken_before="new", taken_at="2026-12-06T03:00:00Z"),
    )
    assert "release new applied migrations (0003_probe) that release old does not know" in text
    assert "rollback_data=false: keep it; old runs on the newer schema" in text
    assert "this LOSES what was written since: 2 messages, 0 conversations and 0 webhook" in text
    without = deploy.refusal(settings, "old", "new", [3], None)
    assert "rollback_data=true: not possible, no snapshot" in without


# --- releases and records ---------------------------------------------------------------------


def record(
    settings: deploy.Settings, kind: str, to: str, result: str = "success", **fields: object
) -> dict[str, object]:
    entry = deploy.new_record(settings, kind, to, "tester@host")
    entry.update(result=result, **fields)
    deploy.save_record(settings, entry)
    return entry


def test_prune_keeps_the_current_and_the_recently_used_releases(settings: deploy.Settings) -> None:
    for name in ("r1", "r2", "r3", "r4", "r5"):
        install_release(settings, name, ["0001_initial"])
    settings.snapshot_dir.mkdir(parents=True)
    for name, previous in (("r1", None), ("r2", "r1"), ("r3", "r2"), ("r4", "r3"), ("r5", "r4")):
        deploy.point_current_at(settings, name)
        snap = settings.snapshot_dir / f"{name}.db"
        snap.touch()
        record(settings, "upgrade", name, from_release=previous, snapshot={"path": str(snap)})
    assert deploy.prune(settings) == ["r1", "r2"]
    assert deploy.installed_releases(settings) == ["r3", "r4", "r5"]
    # The snapshots taken when leaving the releases kept (a rollback to them may want one).
    assert sorted(p.name for p in settings.snapshot_dir.iterdir()) == ["r4.db", "r5.db"]


def test_the_record_is_kept_shown_and_exported_as_metrics(settings: deploy.Settings) -> None:
    install_release(settings, "r1", [])
    record(settings, "install", "r1", gate_seconds=1.5)
    last = record(settings, "upgrade", "r2", result="rolled_back", reason="never ready")
    assert deploy.last_success(settings)["to_release"] == "r1"  # type: ignore[index]
    shown = json.loads(settings.last_file.read_text())
    assert shown["id"] == last["id"] and shown["result"] == "rolled_back"
    assert settings.last_file.stat().st_mode & 0o777 == 0o640
    families = {
        f.name: f
        for f in text_string_to_metric_families(
            (Path(settings.textfile_dir) / "digitalme_deploy.prom").read_text()
        )
    }
    assert families["digitalme_deploy_last_success"].samples[0].value == 0
    info = families["digitalme_deploy_info"].samples[0].labels
    assert info == {
        "kind": "upgrade",
        "result": "rolled_back",
        "release": "r2",
        "from_release": "",
        "commit": "",
    }
    totals = {
        s.labels["result"]: s.value
        for s in families["digitalme_deploys"].samples
        if s.name == "digitalme_deploys_total"
    }
    assert totals == {"success": 1, "rolled_back": 1}
    assert not settings.pending_file.exists()


def test_the_fingerprint_follows_settings_and_secrets(
    settings: deploy.Settings, tmp_path: Path
) -> None:
    env, secrets = tmp_path / "digitalme.env", tmp_path / "credentials"
    secrets.mkdir()
    env.write_text("DIGITALME_ENV=production\n")
    (secrets / "ANTHROPIC_API_KEY").write_text("one")
    settings.fingerprint_paths = [str(env), str(secrets), str(tmp_path / "absent.conf")]
    first = deploy.fingerprint(settings)
    assert deploy.fingerprint(settings) == first
    (secrets / "ANTHROPIC_API_KEY").write_text("two")
    second = deploy.fingerprint(settings)
    assert second != first
    env.write_text("DIGITALME_ENV=staging\n")
    assert deploy.fingerprint(settings) not in (first, second)


def test_settings_come_from_the_roles_file_and_a_typo_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "deploy.json"
    path.write_text(json.dumps({"_comment": "x", "root": "/srv/dm", "keep_releases": 7}))
    loaded = deploy.Settings.load(str(path))
    assert loaded.root == Path("/srv/dm") and loaded.keep_releases == 7
    path.write_text(json.dumps({"keep_relases": 7}))
    with pytest.raises(deploy.Failure, match="unknown setting 'keep_relases'"):
        deploy.Settings.load(str(path))


def test_the_command_line_says_why_it_refused(
    settings: deploy.Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "deploy.json"
    path.write_text(json.dumps({"lock_file": str(settings.lock_file)}))
    assert deploy.main(["--settings", str(path), "lock", "acquire", "--holder", "a@b"]) == 0
    token = json.loads(capsys.readouterr().out)["token"]
    assert deploy.main(["--settings", str(path), "lock", "acquire", "--holder", "c@d"]) == 1
    assert (
        "digitalme-deploy: another deploy holds the lock of this host: a@b"
        in capsys.readouterr().err
    )
    assert deploy.main(["--settings", str(path), "lock", "show"]) == 0
    assert capsys.readouterr().out.startswith("held by a@b since")
    assert deploy.main(["--settings", str(path), "lock", "release", "--token", token]) == 0
    assert deploy.main(["--settings", str(path), "lock", "show"]) == 0
    assert capsys.readouterr().out.strip() == "not held"


# --- the container runtime --------------------------------------------------------------------


def install_container_release(settings: deploy.Settings, name: str, migrations: list[str]) -> None:
    """A release of the container runtime: no virtualenv, the wheels its image came from."""
    import zipfile

    release = settings.releases_dir / name
    (release / "wheels").mkdir(parents=True)
    with zipfile.ZipFile(release / "wheels" / "digitalme-0.1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("digitalme/__init__.py", "")
        for migration in migrations:
            wheel.writestr(f"digitalme/migrations/{migration}.sql", "-- test\n")
        wheel.writestr("digitalme-0.1.0.dist-info/RECORD", "")
    (release / "wheels" / "aiohttp-3.14.5-cp311-cp311-manylinux_2_17_x86_64.whl").touch()
    (release / "image.env").write_text(f"RELEASE_IMAGE=localhost/digitalme:{name}\n")
    (release / ".complete").touch()


def test_a_container_release_knows_its_migrations_from_its_wheel(settings: deploy.Settings) -> None:
    install_container_release(settings, "0.1.0-ccc", ["0001_initial", "0002_channels"])
    assert deploy.release_migrations(settings, "0.1.0-ccc") == {
        1: "0001_initial",
        2: "0002_channels",
    }


def test_prune_removes_the_images_of_container_releases(
    settings: deploy.Settings, tmp_path: Path
) -> None:
    calls = tmp_path / "engine-calls"
    engine = tmp_path / "podman"
    engine.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    engine.chmod(0o755)
    settings.container_engine, settings.container_image = str(engine), "localhost/digitalme"
    for name in ("r1", "r2", "r3", "r4"):
        install_container_release(settings, name, ["0001_initial"])
        deploy.point_current_at(settings, name)
        record(settings, "upgrade", name)
    assert deploy.prune(settings) == ["r1"]
    assert calls.read_text() == "image rm --ignore localhost/digitalme:r1\n"
    assert deploy.installed_releases(settings) == ["r2", "r3", "r4"]


def test_on_postgresql_the_schema_is_read_through_the_releases_own_command(
    settings: deploy.Settings, tmp_path: Path
) -> None:
    # The admin command as the role installs it runs the release named by
    # DIGITALME_RELEASE_DIR; this one answers like `digitalme migrate --status` would.
    admin = tmp_path / "digitalme"
    admin.write_text(
        "#!/bin/sh\n"
        '[ "$1 $2" = \'migrate --status\' ] || { echo "bad: $*" >&2; exit 2; }\n'
        "case $DIGITALME_RELEASE_DIR in */r1) ;; *) echo 'server down' >&2;"
        " exit 1;; esac\n"
        'echo \'{"database": "postgresql://app@db/app", "applied": [1, 2],'
        ' "pending": []}\'\n'
    )
    admin.chmod(0o755)
    settings.admin_command = str(admin)
    settings.database_engine = "postgresql"
    install_release(settings, "r1", ["0001_initial", "0002_more"])
    install_release(settings, "r2", ["0001_initial", "0002_more", "0003_new"])
    # No SQLite file on this host, yet the database exists: its schema comes from the server.
    assert not settings.db_path.exists()
    assert deploy.database_schema(settings) is None  # no release installed as current yet
    assert deploy.database_schema(settings, "r1") == [1, 2]
    with pytest.raises(
        deploy.Failure, match="cannot read the schema of the PostgreSQL database: server down"
    ):
        deploy.database_schema(settings, "r2")
