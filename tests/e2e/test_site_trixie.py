"""`playbooks/site.yml` end to end on Debian 13 (trixie) hosts.

The shared deployment of test_site.py runs on Debian 12 (bookworm); this module deploys the
same site on Debian 13, lean: an app host (`digitalme`) and a replica host (`backup_targets`
and `monitoring`: the layout where the monitoring host is another host than the app's),
the Claude stand-in on the controller. site.yml on fresh hosts succeeds; the app answers
`/health/ready` over HTTPS through Caddy; a chat turn is stored and reaches the replica;
the restore drill passes; the monitoring host scrapes the app host's node-exporter, app,
Litestream and Caddy over HTTPS (pinned certificates, the app's token or basic auth; the
firewall lets no one else in) and hears when Litestream stops there; a second run changes
nothing. Every role's Molecule scenario also runs on both releases (test_roles.py; most of
them include a check-mode run).

Logs: artifacts/trixie-site-*.log; durations: artifacts/trixie-timings.json.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest

from tests.e2e.deployments import (
    ADMIN,
    DB,
    DOMAIN,
    METRICS_TOKEN,
    MONITORING_TEST_SETTINGS,
    STANDIN_PORT,
    Deployment,
    chat_turn,
    count_messages,
    port_open,
    run_drill,
    site_yml,
    wait_for,
    wait_replicated,
)
from tests.e2e.deployments import prometheus as prometheus_api
from tests.e2e.sandboxes import REPO, add_group_vars
from tests.support.process import StandinProcess

pytestmark = pytest.mark.e2e

SUITE = "trixie"
HOSTS = ("app:digitalme", "replica:backup_targets,monitoring")
TIMINGS = REPO / "artifacts" / "trixie-timings.json"
METRICS_SITE_PORT = 9444  # caddy_metrics_remote_listen_address's default
PINNED_CADDY_ROOT = "/etc/prometheus/scrape-tls/app-caddy.crt"  # on the monitoring host
SCRAPE_LOGIN = "prometheus:sandbox-scrape-password-not-a-secret"  # the sandbox group_vars'


def prometheus(deployment: Deployment, path: str) -> Any:
    return prometheus_api(deployment, path, host="replica")


@pytest.fixture(scope="module")
def deployment(
    sandbox_hosts,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Deployment]:
    sandbox = sandbox_hosts(*HOSTS, suite=SUITE)
    add_group_vars(sandbox.inventory, {"monitoring": MONITORING_TEST_SETTINGS})
    workdir = tmp_path_factory.mktemp("trixie")
    standin = StandinProcess(workdir, host=sandbox.controller_address, port=STANDIN_PORT)
    standin.start()
    try:
        TIMINGS.unlink(missing_ok=True)
        deployment = Deployment(sandbox, workdir, TIMINGS)
        counts = site_yml(deployment, "trixie-site-fresh")
        assert counts["app"]["changed"] > 0 and counts["replica"]["changed"] > 0, counts
        yield deployment
    finally:
        standin.stop()


def test_the_hosts_run_debian_13(deployment: Deployment) -> None:
    for name in ("app", "replica"):
        release = deployment.on(name, "cat /etc/os-release").stdout
        assert 'VERSION_ID="13"' in release and "VERSION_CODENAME=trixie" in release, release
    # The release the app runs from was built for the host's Python (3.13 on Debian 13).
    python = deployment.on_app("/opt/digitalme/current/venv/bin/python --version").stdout
    assert python.startswith("Python 3.13."), python


def test_the_app_is_ready_over_https_through_caddy(deployment: Deployment) -> None:
    ready = deployment.curl(f"https://{DOMAIN}/health/ready", "--fail")
    assert ready.returncode == 0, ready.stdout + ready.stderr
    assert json.loads(ready.stdout)["status"] == "ready", ready.stdout


def test_a_chat_turn_is_stored_and_reaches_the_replica(deployment: Deployment) -> None:
    chat_turn(deployment, "Hello from Debian 13", token_name="e2e-trixie")
    assert count_messages(deployment, DB, "Hello from Debian 13") == 2  # question and reply
    wait_replicated(deployment, "Hello from Debian 13")
    files = (
        deployment.sandbox.hosts["replica"]
        .run("find /srv/litestream/replicas/digitalme -type f | head -5", login=ADMIN)
        .stdout
    )
    assert files.strip(), "no replica files on the backup target"


def test_the_restore_drill_passes(deployment: Deployment) -> None:
    returncode, journal = run_drill(deployment)
    assert returncode == 0, journal
    # Its result reaches the monitoring host (the app host's node-exporter, scraped over TLS).
    query = "/api/v1/query?query=" + quote('digitalme_backup_drill_success{host="app"}')
    wait_for(
        lambda: [r for r in prometheus(deployment, query)["result"] if r["value"][1] == "1"],
        60,
        "the drill's success on the monitoring host",
    )


def test_the_monitoring_host_scrapes_the_app_host_over_https(deployment: Deployment) -> None:
    app = deployment.app.address
    expected = {
        ("node", "app"): f"https://{app}:9100/metrics",
        ("digitalme", "app"): f"https://{app}:{METRICS_SITE_PORT}/digitalme/metrics",
        ("litestream", "app"): f"https://{app}:{METRICS_SITE_PORT}/litestream/metrics",
        ("caddy", "app"): f"https://{app}:{METRICS_SITE_PORT}/caddy/metrics",
    }

    def app_targets() -> dict[tuple[str, str], dict[str, Any]]:
        targets = prometheus(deployment, "/api/v1/targets")["activeTargets"]
        found = {
            (t["labels"]["job"], t["labels"]["host"]): t
            for t in targets
            if t["labels"].get("host") == "app"
        }
        return found if all(t["health"] == "up" for t in found.values()) else {}

    found = wait_for(app_targets, 90, "the app host's targets up on the monitoring host")
    assert {key: t["scrapeUrl"] for key, t in found.items() if key in expected} == expected, found
    # The app's own series, through the site (the rules read them by job and host).
    build = prometheus(
        deployment,
        "/api/v1/query?query=" + quote('digitalme_build_info{host="app",job="digitalme"}'),
    )["result"]
    assert build and build[0]["value"][1] == "1", build


def test_the_metrics_site_admits_the_monitoring_host_only(deployment: Deployment) -> None:
    app = deployment.app.address
    # From the controller the firewall drops it; the public site does not serve metrics.
    assert not port_open(app, METRICS_SITE_PORT)
    assert (
        deployment.curl(
            f"https://{DOMAIN}/caddy/metrics",
            "--write-out",
            "%{http_code}",
            "--output",
            "/dev/null",
        ).stdout
        != "200"
    )
    base = f"https://{app}:{METRICS_SITE_PORT}"

    def status(path: str, *options: str) -> str:
        return deployment.on(
            "replica",
            shlex.join(
                [
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--max-time",
                    "10",
                    "--cacert",
                    PINNED_CADDY_ROOT,
                    *options,
                    base + path,
                ]
            ),
            check=False,
        ).stdout

    # TLS the monitoring host trusts through the pinned root, and a login for each path.
    assert status("/litestream/metrics") == "401"
    assert status("/caddy/metrics", "--user", "prometheus:wrong") == "401"
    assert status("/litestream/metrics", "--user", SCRAPE_LOGIN) == "200"
    assert status("/caddy/metrics", "--user", SCRAPE_LOGIN) == "200"
    assert status("/digitalme/metrics") == "401"  # the app's own check: its bearer token
    assert (
        status("/digitalme/metrics", "--header", f"Authorization: Bearer {METRICS_TOKEN}") == "200"
    )
    assert status("/anything-else", "--user", SCRAPE_LOGIN) == "404"
    # Without the pinned root the certificate is not trusted (Caddy's own CA, not public).
    untrusted = deployment.on("replica", f"curl -s --max-time 10 {base}/caddy/metrics", check=False)
    assert untrusted.returncode == 60, untrusted


def test_litestream_stopped_on_the_app_host_alerts_the_monitoring_host(
    deployment: Deployment,
) -> None:
    def alert() -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = prometheus(
            deployment,
            "/api/v1/query?query="
            + quote('ALERTS{alertname="LitestreamDown",host="app",alertstate="firing"}'),
        )["result"]
        return result

    assert not alert()
    started = time.monotonic()
    deployment.on_app("systemctl stop litestream.service")
    try:
        wait_for(alert, 120, "LitestreamDown firing for the app host")
        deployment.record("remote_litestream_down_alert_seconds", time.monotonic() - started)
    finally:
        deployment.on_app("systemctl start litestream.service")
    wait_for(lambda: not alert(), 120, "LitestreamDown resolved once Litestream runs again")


def test_a_second_run_changes_nothing(deployment: Deployment) -> None:
    counts = site_yml(deployment, "trixie-site-rerun")
    assert all(c["changed"] == 0 for c in counts.values()), counts
