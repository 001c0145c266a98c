"""Testinfra checks of the digitalme role on a sandbox host (run by `molecule verify`)."""

import json
from pathlib import Path

import pytest
from verifier import ansible_playbook

# The migrations in the checkout the release is built from (the role's default source).
BUNDLED_MIGRATIONS = sorted(
    p.stem
    for p in (Path(__file__).resolve().parents[5] / "app" / "digitalme" / "migrations").glob(
        "0*.sql"
    )
)

SECRET = "sk-molecule-secret-0123456789"


@pytest.fixture
def journal(host):
    return lambda: host.run("journalctl -u digitalme --no-pager -n 60").stdout


def main_pid(host):
    return host.run("systemctl show -p MainPID --value digitalme").stdout.strip()


def test_service_is_enabled_running_and_ready(host, journal):
    service = host.service("digitalme")
    assert service.is_enabled
    assert service.is_running, journal()
    ready = host.run("curl -fsS http://127.0.0.1:8080/health/ready")
    assert ready.rc == 0, ready.stdout + ready.stderr + journal()
    body = json.loads(ready.stdout)
    assert body["status"] == "ready"
    assert body["checks"]["persona"]["detail"].startswith("Mara Lindqvist")


def test_listens_on_loopback_only(host):
    assert host.socket("tcp://127.0.0.1:8080").is_listening
    assert not host.socket("tcp://0.0.0.0:8080").is_listening


def test_runs_as_the_service_user_without_capabilities(host):
    status = host.file(f"/proc/{main_pid(host)}/status").content_string
    fields = dict(line.split(":", 1) for line in status.splitlines())
    uid = fields["Uid"].split()[0]
    assert host.user("digitalme").uid == int(uid)
    assert int(fields["CapEff"].strip(), 16) == 0
    assert fields["NoNewPrivs"].strip() == "1"


def test_release_is_a_versioned_virtualenv(host):
    current = host.file("/opt/digitalme/current")
    assert current.is_symlink
    assert current.linked_to.startswith("/opt/digitalme/releases/0.")
    info = json.loads(host.check_output("curl -fsS http://127.0.0.1:8080/info"))
    assert info["environment"] == "molecule"
    assert current.linked_to.endswith("/" + info["release"]["release"])
    assert info["commit"] and info["commit"] == info["release"]["commit"]
    assert host.file(f"{current.linked_to}/.complete").exists
    # The docs travel with the release and are where the unit's Documentation= points.
    assert (
        host.file("/usr/share/doc/digitalme/operations/README.md").exists
        or host.file("/usr/share/doc/digitalme/configuration.md").exists
    )


def test_settings_file_has_no_secret(host):
    env = host.file("/etc/digitalme/digitalme.env")
    assert env.user == "root" and env.group == "digitalme" and env.mode == 0o640
    assert "DIGITALME_RATE_LIMIT_PER_MINUTE=120" in env.content_string
    assert SECRET not in env.content_string


def test_secret_is_a_root_only_credential_and_nowhere_else(host):
    folder = host.file("/etc/digitalme/credentials")
    assert folder.user == "root" and folder.mode == 0o700
    secret = host.file("/etc/digitalme/credentials/ANTHROPIC_API_KEY")
    assert secret.user == "root" and secret.mode == 0o600
    assert secret.content_string == SECRET
    # Not in the unit, its environment, the process environment, the journal or ps.
    assert SECRET not in host.check_output("systemctl cat digitalme")
    assert SECRET not in host.check_output("systemctl show digitalme")
    environ = host.run(f"tr '\\0' '\\n' < /proc/{main_pid(host)}/environ").stdout
    assert "CREDENTIALS_DIRECTORY=" in environ
    assert SECRET not in environ
    assert SECRET not in host.run("journalctl --no-pager").stdout
    assert SECRET not in host.check_output("ps auxww")


def test_admin_command_runs_as_the_service_user(host):
    created = host.run(
        "/usr/local/sbin/digitalme token create --name molecule --scope chat --quiet"
    )
    assert created.rc == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("dm_")
    me = host.run(f"curl -fsS -H 'Authorization: Bearer {token}' http://127.0.0.1:8080/api/v1/me")
    assert json.loads(me.stdout)["clone"]["name"] == "Mara Lindqvist"
    db = host.file("/var/lib/digitalme/digitalme.db")
    assert db.user == "digitalme"
    assert db.mode & 0o007 == 0


def test_exposure_score(host):
    line = host.check_output("systemd-analyze security digitalme.service --no-pager | tail -1")
    score = float(line.split("exposure level for digitalme.service:")[1].split()[0])
    print(f"systemd-analyze security digitalme.service: {score}")
    assert score <= 2.0, host.check_output("systemd-analyze security digitalme.service --no-pager")


def test_the_socket_is_systemds_and_outlives_a_restart(host):
    socket_unit = host.service("digitalme.socket")
    assert socket_unit.is_enabled and socket_unit.is_running
    listening = "ss -Hltne 'sport = :8080' | grep -o 'ino:[0-9]*'"
    before = host.check_output(listening)
    pid = main_pid(host)
    assert host.run("systemctl restart digitalme").rc == 0
    assert main_pid(host) != pid
    # The same listening socket (inode) before and after: it was never closed.
    assert host.check_output(listening) == before
    assert host.run("curl -fsS http://127.0.0.1:8080/health/ready").rc == 0


def test_the_deploy_is_recorded_and_shown_in_info(host):
    info = json.loads(host.check_output("curl -fsS http://127.0.0.1:8080/info"))
    deploy = info["last_deploy"]
    assert deploy["kind"] == "install" and deploy["result"] == "success"
    assert deploy["to_release"] == info["release"]["release"]
    # A first install applies every migration the release ships, in order.
    assert deploy["migrations"] == BUNDLED_MIGRATIONS
    assert deploy["gate_seconds"] > 0
    status = host.check_output("digitalme-deploy status")
    assert f"current release: {deploy['to_release']} (service active, socket active)" in status
    record = host.file("/var/lib/digitalme-deploy/last.json")
    assert record.user == "root" and record.group == "digitalme" and record.mode == 0o640


def test_migrations_unit_is_hardened_and_has_no_network(host):
    release = host.file("/opt/digitalme/current").linked_to.rsplit("/", 1)[1]
    unit = f"digitalme-migrate@{release}.service"
    shown = host.check_output(f"systemctl show -p PrivateNetwork -p User {unit}")
    assert "PrivateNetwork=yes" in shown and "User=digitalme" in shown
    line = host.check_output(f"systemd-analyze security {unit} --no-pager | tail -1")
    score = float(line.split(f"exposure level for {unit}:")[1].split()[0])
    print(f"systemd-analyze security {unit}: {score}")
    assert score <= 1.5
    # Run again, it finds nothing to do.
    assert host.run(f"systemctl start {unit}").rc == 0
    assert "is up to date" in host.check_output(f"journalctl -u {unit} -n 5 -o cat --no-pager")


def test_a_misspelt_setting_fails_the_play_and_the_settings_stay(host):
    """The release's `digitalme check-config --strict` is the settings file's validate:."""
    env = "/etc/digitalme/digitalme.env"
    before, pid = host.file(env).sha256sum, main_pid(host)
    typo = json.dumps(
        {
            "digitalme_settings": {
                "DIGITALME_RATE_LIMIT_PER_MINUTE": 120,
                "DIGITALME_RATE_LIMT_PER_MINUTE": 5,
            }
        }
    )
    rc, output = ansible_playbook("-e", typo)
    said = " ".join(output.split())
    assert rc != 0, output[-4000:]
    assert "TASK [digitalme : Write the settings]" in output
    assert "DIGITALME_RATE_LIMT_PER_MINUTE is set but is not a DigitalMe setting" in said, output[
        -4000:
    ]
    assert host.file(env).sha256sum == before
    assert main_pid(host) == pid
