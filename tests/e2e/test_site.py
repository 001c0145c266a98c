"""`ansible-playbook playbooks/site.yml` end to end on fresh sandbox hosts.

The session's shared deployment (tests/e2e/deployments.py: an app host in `digitalme` and
`monitoring`, a replica host in `backup_targets`, and a bare host for the package-install
floor); stand-ins of Claude and Telegram run on the controller, where the app reaches
them. The fixture's first run of site.yml is the fresh one; the tests look at what the
deployment left, the way an owner would: over HTTPS through Caddy, from outside the host,
and on it.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.deployments import (
    ADMIN,
    DOMAIN,
    METRICS_CURL,
    UNITS,
    Deployment,
    SharedSite,
    port_open,
    recap,
)

pytestmark = pytest.mark.e2e

# What the roles install, for the floor measurement: the same packages, straight from apt.
ROLE_PACKAGES = (
    "caddy prometheus-node-exporter nftables unattended-upgrades "
    "systemd-timesyncd python3-venv sqlite3 curl jq acl sudo openssh-server "
    "prometheus prometheus-alertmanager prometheus-blackbox-exporter"
)


@pytest.fixture(scope="module")
def deployment(shared_site: SharedSite) -> Deployment:
    # The shared deployment (tests/e2e/deployments.py): its app host also monitors, as in
    # the example inventory, so the second run and the check mode cover the monitoring play
    # too (its alerts: test_monitoring.py).
    return shared_site.deployment


def test_second_run_changes_nothing(deployment: Deployment) -> None:
    started = time.monotonic()
    result = deployment.sandbox.ansible_playbook("playbooks/site.yml", "--limit", "app,replica")
    deployment.record("site_rerun_seconds", time.monotonic() - started)
    counts = recap(result.stdout)
    changed = [line for line in result.stdout.splitlines() if line.startswith("changed:")]
    assert counts["app"]["changed"] == 0 and counts["replica"]["changed"] == 0, (
        f"{counts}\n{changed}\n{result.stdout[-4000:]}"
    )


def test_check_mode_reports_no_change(deployment: Deployment) -> None:
    result = deployment.sandbox.ansible_playbook(
        "playbooks/site.yml", "--limit", "app,replica", "--check", "--diff"
    )
    counts = recap(result.stdout)
    assert counts["app"]["changed"] == 0 and counts["replica"]["changed"] == 0, result.stdout[
        -4000:
    ]


def test_root_may_no_longer_log_in(deployment: Deployment) -> None:
    denied = deployment.app.run("true", check=False)
    assert denied.returncode == 255
    assert "Permission denied" in denied.stderr
    assert deployment.on_app("id -un").stdout.strip() == "root"  # admin + sudo works


def test_https_health_with_hsts_and_security_headers(deployment: Deployment) -> None:
    result = deployment.curl(f"https://{DOMAIN}/health", "--include", "--fail")
    assert result.returncode == 0, result.stderr
    head, _, body = result.stdout.partition("\n\n")  # text=True folds \r\n
    headers = {k.lower(): v for k, v in re.findall(r"^([\w-]+): (.*?)\r?$", head, re.MULTILINE)}
    assert head.startswith("HTTP/2 200")
    assert json.loads(body) == {"status": "ok"}
    assert headers["strict-transport-security"].startswith("max-age=31536000")
    assert "includeSubDomains" in headers["strict-transport-security"]
    assert headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"
    assert "server" not in headers


def test_certificate_comes_from_caddys_internal_ca(deployment: Deployment) -> None:
    # Without Caddy's root the certificate is not trusted; with it, it is (above).
    untrusted = subprocess.run(
        [
            "curl",
            "--silent",
            "--noproxy",
            "*",
            "--max-time",
            "20",
            "--resolve",
            f"{DOMAIN}:443:{deployment.app.address}",
            f"https://{DOMAIN}/health",
        ],
        capture_output=True,
        text=True,
    )
    assert untrusted.returncode == 60  # peer certificate cannot be authenticated
    issuer = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"{deployment.app.address}:443",
            "-servername",
            DOMAIN,
            "-CAfile",
            str(deployment.ca_file),
        ],
        input="",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "Caddy Local Authority" in issuer.stdout
    assert "Verify return code: 0 (ok)" in issuer.stdout


def test_plain_http_redirects_to_https(deployment: Deployment) -> None:
    result = deployment.curl(f"http://{DOMAIN}/health?x=1", "--include")
    assert result.stdout.startswith("HTTP/1.1 308"), result.stdout
    assert f"Location: https://{DOMAIN}/health?x=1" in result.stdout


def test_metrics_are_not_public(deployment: Deployment) -> None:
    result = deployment.curl(f"https://{DOMAIN}/metrics", "--include")
    assert " 404" in result.stdout.splitlines()[0]
    assert "digitalme_http_requests_total" in deployment.on_app(METRICS_CURL).stdout
    # On the host, only the holder of the metrics token: not any local user.
    anyone = deployment.on_app(
        "runuser -u nobody -- curl -sS -o /dev/null -w '%{http_code}' "
        "http://127.0.0.1:8080/metrics",
        check=False,
    )
    assert anyone.stdout == "401", anyone.stdout + anyone.stderr


def test_chat_turn_through_caddy_reaches_the_claude_standin(deployment: Deployment) -> None:
    token = deployment.chat_token("e2e")
    auth = ["--header", f"Authorization: Bearer {token}", "--fail"]
    created = deployment.curl(f"https://{DOMAIN}/api/v1/conversations", *auth, "--request", "POST")
    assert created.returncode == 0, created.stderr
    conversation = json.loads(created.stdout)["id"]
    said = deployment.curl(
        f"https://{DOMAIN}/api/v1/conversations/{conversation}/messages",
        *auth,
        "--json",
        json.dumps({"text": "Hello from the e2e test"}),
    )
    assert said.returncode == 0, said.stderr
    reply = json.loads(said.stdout)["reply"]
    assert reply["text"] == "Stand-in reply to: Hello from the e2e test"
    assert reply["usage"]["input_tokens"] > 0
    streamed = deployment.curl(
        f"https://{DOMAIN}/api/v1/conversations/{conversation}/messages",
        *auth,
        "--header",
        "Accept: text/event-stream",
        "--no-buffer",
        "--json",
        json.dumps({"text": "And streamed?"}),
    )
    assert "event: delta" in streamed.stdout and "event: done" in streamed.stdout


def test_only_ssh_http_and_https_are_reachable_from_outside(deployment: Deployment) -> None:
    listening = deployment.on_app("ss -Hltn | awk '{print $4}'").stdout.split()
    ports = (
        {int(a.rsplit(":", 1)[1]) for a in listening}
        | set(range(1, 1025))
        | {2019, 3000, 8080, 8443, 9090, 9100}
    )
    with ThreadPoolExecutor(max_workers=64) as pool:
        results = dict(
            zip(ports, pool.map(lambda p: port_open(deployment.app.address, p), ports), strict=True)
        )
    assert {port for port, is_open in results.items() if is_open} == {22, 80, 443}, listening
    # Things listen on those other ports, on loopback only.
    assert {8080, 9100, 2019} <= {int(a.rsplit(":", 1)[1]) for a in listening}


def test_node_exporter_answers_on_the_host_only(deployment: Deployment) -> None:
    metrics = deployment.on_app("curl -fsS http://127.0.0.1:9100/metrics").stdout
    assert 'node_systemd_unit_state{name="digitalme.service",state="active"' in metrics
    assert not port_open(deployment.app.address, 9100)


def test_units_are_active_and_hardened(deployment: Deployment) -> None:
    active = deployment.on_app(f"systemctl is-active {' '.join(UNITS)}").stdout.split()
    assert active == ["active"] * len(UNITS)
    scores = {}
    for unit in UNITS:
        line = deployment.on_app(
            f"systemd-analyze security {unit}.service --no-pager | tail -1"
        ).stdout
        scores[unit] = float(re.search(r"exposure level for \S+: ([\d.]+)", line)[1])
        deployment.record(f"exposure_{unit}", scores[unit])
    print(f"systemd-analyze security: {scores}")
    assert scores["digitalme"] <= 2.0
    assert scores["litestream"] <= 4.0
    # Debian's units with the roles' drop-ins (8.8 and 9.2 without them).
    assert scores["caddy"] <= 2.0
    assert scores["prometheus-node-exporter"] <= 2.5


def test_writes_reach_the_replica_and_restore_intact(deployment: Deployment) -> None:
    marker = f"replica check {uuid.uuid4()}"
    token = deployment.chat_token("e2e-replica")
    auth = ["--header", f"Authorization: Bearer {token}", "--fail"]
    conversation = json.loads(
        deployment.curl(f"https://{DOMAIN}/api/v1/conversations", *auth, "--request", "POST").stdout
    )["id"]
    for i in range(5):
        said = deployment.curl(
            f"https://{DOMAIN}/api/v1/conversations/{conversation}/messages",
            *auth,
            "--json",
            json.dumps({"text": f"{marker} #{i}"}),
        )
        assert said.returncode == 0, said.stderr
    acknowledged = time.monotonic()
    query = shlex.quote(
        f"PRAGMA integrity_check; SELECT count(*) FROM messages WHERE text LIKE '%{marker}%';"
    )
    deadline = acknowledged + 30
    while True:
        restore = deployment.on_app(
            "rm -f /var/lib/digitalme/e2e-restore.db* && "
            "litestream-admin restore -o /var/lib/digitalme/e2e-restore.db "
            "/var/lib/digitalme/digitalme.db && "
            f"sqlite3 /var/lib/digitalme/e2e-restore.db {query}",
            check=False,
        )
        if restore.returncode == 0 and restore.stdout.split() == ["ok", "10"]:
            break
        assert time.monotonic() < deadline, restore.stdout + restore.stderr
        time.sleep(1)
    deployment.record("replica_visible_seconds", time.monotonic() - acknowledged)
    deployment.on_app("rm -f /var/lib/digitalme/e2e-restore.db*")
    # The replica lives on the other host.
    files = (
        deployment.sandbox.hosts["replica"]
        .run("find /srv/litestream/replicas/digitalme -type f | head -5", login=ADMIN)
        .stdout
    )
    assert files.strip(), "no replica files on the backup target"


def test_package_install_floor(deployment: Deployment) -> None:
    """The time apt alone takes to install what the roles install, on a fresh host."""
    floor = deployment.sandbox.hosts["floor"]
    started = time.monotonic()
    floor.run(
        "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "
        f"{ROLE_PACKAGES} >/dev/null",
        timeout=900,
    )
    seconds = time.monotonic() - started
    deployment.record("package_install_floor_seconds", seconds)
    fresh = deployment.timings.get("site_fresh_seconds")
    if fresh:
        deployment.record("site_fresh_over_floor", fresh / seconds)
        print(f"site.yml fresh {fresh:.0f}s, apt floor {seconds:.0f}s, ratio {fresh / seconds:.1f}")
