"""`playbooks/site.yml` end to end on Debian 13 (trixie) hosts.

The shared deployment of test_site.py runs on Debian 12 (bookworm); this module deploys the
same site on Debian 13, lean: an app host (`digitalme`, and `monitoring` as in the example
inventory, so that every play of site.yml has work) and a replica host (`backup_targets`),
the Claude stand-in on the controller. site.yml on fresh hosts succeeds; the app answers
`/health/ready` over HTTPS through Caddy; a chat turn is stored and reaches the replica;
the restore drill passes; a second run changes nothing. Every role's Molecule scenario
also runs on both releases (test_roles.py; most of them include a check-mode run).

Logs: artifacts/trixie-site-*.log; durations: artifacts/trixie-timings.json.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.e2e.deployments import (
    ADMIN,
    DB,
    DOMAIN,
    MONITORING_TEST_SETTINGS,
    STANDIN_PORT,
    Deployment,
    chat_turn,
    count_messages,
    metric,
    run_drill,
    site_yml,
    wait_replicated,
)
from tests.e2e.sandboxes import REPO, add_group_vars
from tests.support.process import StandinProcess

pytestmark = pytest.mark.e2e

SUITE = "trixie"
HOSTS = ("app:digitalme,monitoring", "replica:backup_targets")
TIMINGS = REPO / "artifacts" / "trixie-timings.json"
NODE_EXPORTER = "http://127.0.0.1:9100/metrics"


@pytest.fixture(scope="module")
def deployment(sandbox_hosts, tmp_path_factory: pytest.TempPathFactory,
               ) -> Iterator[Deployment]:
    sandbox = sandbox_hosts(*HOSTS, suite=SUITE)
    add_group_vars(sandbox.inventory, {"monitoring": {
        **MONITORING_TEST_SETTINGS, "monitoring_node_hosts": ["app", "replica"]}})
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
    files = deployment.sandbox.hosts["replica"].run(
        "find /srv/litestream/replicas/digitalme -type f | head -5", login=ADMIN).stdout
    assert files.strip(), "no replica files on the backup target"


def test_the_restore_drill_passes(deployment: Deployment) -> None:
    returncode, journal = run_drill(deployment)
    assert returncode == 0, journal
    metrics = deployment.on_app(f"curl -fsS {NODE_EXPORTER}").stdout
    assert metric(metrics, "digitalme_backup_drill_success") == 1, metrics[-2000:]


def test_a_second_run_changes_nothing(deployment: Deployment) -> None:
    counts = site_yml(deployment, "trixie-site-rerun")
    assert all(c["changed"] == 0 for c in counts.values()), counts
