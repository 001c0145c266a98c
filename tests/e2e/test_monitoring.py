"""Monitoring end to end: real faults on sandbox hosts, alerts at a stand-in receiver.

It runs on the session's shared deployment of site.yml (tests/e2e/conftest.py
``shared_site``: an app host in `digitalme` and `monitoring`, so Prometheus, Alertmanager
and the blackbox exporter run beside the app as in the example inventory, and a backup
target whose node-exporter the app host scrapes over TLS), and adds no deployment of its
own. Alertmanager's webhook (inventory/sandbox/group_vars) goes to the shared site's
receiver on the controller (standins/alertmanager_webhook.py), listening from the
deployment on; the app's Claude is the shared Anthropic stand-in, which fails on demand.

**Shortened for the tests** (MONITORING_TEST_SETTINGS in tests/e2e/deployments.py, group
variables of the shared sandbox): scrapes and rule evaluations every 5 s, every rule's
`for:` at 10 s (`monitoring_rules_for_override`; production keeps the rules' own, 1 to 30
minutes), Alertmanager's group_wait 5 s and group_interval 10 s (production: 30 s and 5 min).
The rules' range windows and the app's breaker (30 s) are the production ones.

The faults, several at once so that their alerts are awaited together:

1. the app stopped (socket and service), Litestream stopped, a 16 MB tmpfs filled to 94%,
   the replica made unreadable and a restore drill run: TargetDown (app), AppNotReady,
   LitestreamDown, DiskAlmostFull, BackupDrillFailed;
2. everything fixed (and a passing drill): each resolves; meanwhile Claude fails (the
   stand-in answers 500): ClaudeBreakerOpen;
3. Claude back: it resolves.

The deployment is left as found (the module's teardown undoes every fault, whatever
failed), for the modules that share it after this one. Time from each fault (or fix) to
its notification goes to artifacts/monitoring-timings.json.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest

from standins.alertmanager_webhook import AlertReceiver, Arrival
from standins.anthropic_api import Behaviour, Error
from tests.e2e.deployments import DOMAIN, Deployment, SharedSite, prometheus
from tests.e2e.sandboxes import REPO

pytestmark = pytest.mark.e2e

TIMINGS = REPO / "artifacts" / "monitoring-timings.json"
FILL = "/srv/e2e-fill"  # not under /tmp: node-exporter has its own (PrivateTmp)
REPLICA_FOLDER = "/srv/litestream/replicas/digitalme"  # on the backup target
ALERT_TIMEOUT = 150  # seconds from a fault or fix to its notification
APP_UNITS = (
    "units=digitalme.service; systemctl cat digitalme.socket >/dev/null 2>&1 "
    '&& units="digitalme.socket $units"; '
)
START_APP = APP_UNITS + "systemctl start $units"
READY = (
    "curl -fsS --retry 30 --retry-delay 1 --retry-all-errors "
    "http://127.0.0.1:8080/health/ready >/dev/null"
)
REPLICA_MODE: list[str] = []  # the replica folder's mode before the fault, for the fix
TIMES: dict[str, float] = {}


def record(name: str, seconds: float) -> None:
    TIMES[name] = round(seconds, 2)
    TIMINGS.parent.mkdir(exist_ok=True)
    TIMINGS.write_text(json.dumps(TIMES, indent=2) + "\n")


def claude(site: SharedSite, method: str, *args: Behaviour) -> None:
    """fail_all(behaviour) / recover() on the shared stand-in, in its loop's thread."""
    site.loop.loop.call_soon_threadsafe(getattr(site.anthropic, method), *args)


@pytest.fixture(scope="module")
def site(shared_site: SharedSite) -> Iterator[SharedSite]:
    """The shared deployment, a passing drill first (as the daily timer would have run),
    and every fault of this module undone at the end."""
    deployment = shared_site.deployment
    deployment.on_app("systemctl start digitalme-backup-drill.service", timeout=600)
    try:
        yield shared_site
    finally:
        claude(shared_site, "recover")
        if REPLICA_MODE:
            deployment.on("replica", f"chmod {REPLICA_MODE[0]} {REPLICA_FOLDER}", check=False)
        deployment.on_app(
            f"if mountpoint -q {FILL}; then umount {FILL}; fi; rm -rf {FILL}", check=False
        )
        deployment.on_app(f"systemctl start litestream.service; {START_APP}; {READY}", check=False)
        deployment.on_app(
            "systemctl start digitalme-backup-drill.service", check=False, timeout=600
        )


@pytest.fixture(scope="module")
def deployment(site: SharedSite) -> Deployment:
    return site.deployment


@pytest.fixture(scope="module")
def receiver(site: SharedSite) -> AlertReceiver:
    receiver: AlertReceiver = site.receiver
    return receiver


# --- helpers ---------------------------------------------------------------------------


def instant(deployment: Deployment, expr: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = prometheus(deployment, "/api/v1/query?query=" + quote(expr))[
        "result"
    ]
    return result


def firing(deployment: Deployment) -> set[str]:
    return {r["metric"]["alertname"] for r in instant(deployment, 'ALERTS{alertstate="firing"}')}


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 2.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s: {what}", pytrace=False)
        time.sleep(interval)


def await_alerts(
    deployment: Deployment,
    receiver: AlertReceiver,
    status: str,
    expected: dict[str, tuple[float, dict[str, str]]],
    label: str,
) -> dict[str, Arrival]:
    """Wait for each expected alert (name -> (since, labels)) to arrive with ``status``;
    record the seconds from its cause to its arrival."""
    arrived: dict[str, Arrival] = {}
    deadline = time.monotonic() + ALERT_TIMEOUT
    for name, (since, labels) in expected.items():
        arrival = receiver.wait_for(
            status,
            after=since,
            alertname=name,
            timeout=max(1.0, deadline - time.monotonic()),
            **labels,
        )
        if arrival is None:
            pytest.fail(
                f"{name} {labels} never arrived {status} (waited {ALERT_TIMEOUT}s).\n"
                f"Firing in Prometheus: {sorted(firing(deployment))}\n"
                f"Arrived:\n{receiver.summary()}",
                pytrace=False,
            )
        arrived[name] = arrival
        record(f"{label}_{name}_seconds", arrival.received_at - since)
    print(
        f"{status}: "
        + ", ".join(
            f"{name} {arrival.received_at - expected[name][0]:.0f}s"
            for name, arrival in arrived.items()
        )
    )
    return arrived


def connectable(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=3):
            return True
    except OSError:
        return False


def chat(deployment: Deployment, token: str, conversation: str, text: str) -> int:
    said = deployment.curl(
        f"https://{DOMAIN}/api/v1/conversations/{conversation}/messages",
        "--header",
        f"Authorization: Bearer {token}",
        "--output",
        "/dev/null",
        "--write-out",
        "%{http_code}",
        "--json",
        json.dumps({"text": text}),
    )
    return int(said.stdout or 0)


# --- the tests, in order -----------------------------------------------------------------


def test_everything_is_scraped_and_only_the_heartbeat_is_active(
    deployment: Deployment, receiver: AlertReceiver
) -> None:
    expected = {
        ("prometheus", "app"),
        ("alertmanager", "app"),
        ("node", "app"),
        ("node", "replica"),
        ("digitalme", "app"),
        ("litestream", "app"),
        ("caddy", "app"),
        ("blackbox_https", "app"),
    }

    def all_up() -> bool:
        up = {
            (r["metric"]["job"], r["metric"]["host"]): r["value"][1]
            for r in instant(deployment, 'up{host!=""}')
        }
        return set(up) == expected and set(up.values()) == {"1"}

    wait_until(all_up, 90, "every target up")
    assert instant(deployment, "probe_success")[0]["value"][1] == "1"
    assert instant(deployment, "probe_http_status_code")[0]["value"][1] == "200"
    # The backup target's node-exporter is scraped over TLS.
    targets = prometheus(deployment, "/api/v1/targets")["activeTargets"]
    replica_address = deployment.sandbox.hosts["replica"].address
    assert [t["scrapeUrl"] for t in targets if t["labels"]["host"] == "replica"] == [
        f"https://{replica_address}:9100/metrics"
    ]
    assert receiver.wait_for("firing", alertname="Watchdog", timeout=60), receiver.summary()
    # A rule whose condition holds is pending from the next evaluation (every 5 s) on.
    time.sleep(8)
    active = {r["metric"]["alertname"] for r in instant(deployment, "ALERTS")}
    assert active == {"Watchdog"}, receiver.summary()


def test_the_backup_targets_node_exporter_answers_the_monitoring_host_only(
    deployment: Deployment,
) -> None:
    replica = deployment.sandbox.hosts["replica"].address
    # From the controller: the firewall drops it. From the app host: TLS, and a password.
    assert not connectable(replica, 9100)
    status = deployment.on_app(
        f"curl -s -o /dev/null -w '%{{http_code}}' --max-time 10 -k https://{replica}:9100/metrics",
        check=False,
    ).stdout
    assert status == "401"
    plain = deployment.on_app(f"curl -s --max-time 10 http://{replica}:9100/metrics", check=False)
    assert "node_exporter_build_info" not in plain.stdout


def test_faults_raise_their_alerts(deployment: Deployment, receiver: AlertReceiver) -> None:
    started: dict[str, float] = {}
    deployment.on_app(APP_UNITS + "systemctl stop $units")
    started["app"] = time.time()
    deployment.on_app("systemctl stop litestream.service")
    started["litestream"] = time.time()
    deployment.on_app(
        f"mkdir -p {FILL} && mount -t tmpfs -o size=16m e2e-fill {FILL} "
        f"&& fallocate -l 15m {FILL}/ballast"
    )
    started["disk"] = time.time()
    REPLICA_MODE.append(deployment.on("replica", f"stat -c %a {REPLICA_FOLDER}").stdout.strip())
    deployment.on("replica", f"chmod 000 {REPLICA_FOLDER}")
    drill = deployment.on_app(
        "systemctl start digitalme-backup-drill.service", check=False, timeout=600
    )
    started["drill"] = time.time()
    assert drill.returncode != 0, "the drill passed with an unreadable replica"
    await_alerts(
        deployment,
        receiver,
        "firing",
        {
            "TargetDown": (started["app"], {"job": "digitalme", "host": "app"}),
            "AppNotReady": (started["app"], {"host": "app"}),
            "LitestreamDown": (started["litestream"], {"host": "app"}),
            "DiskAlmostFull": (started["disk"], {"host": "app", "mountpoint": FILL}),
            "BackupDrillFailed": (started["drill"], {"host": "app"}),
        },
        "fault_to_firing",
    )


def test_fixes_resolve_them_and_a_claude_outage_opens_the_breaker(
    deployment: Deployment, receiver: AlertReceiver, site: SharedSite
) -> None:
    fixed: dict[str, float] = {}
    deployment.on_app(START_APP)
    fixed["app"] = time.time()
    deployment.on_app(READY)
    deployment.on_app("systemctl start litestream.service")
    fixed["litestream"] = time.time()
    deployment.on_app(f"umount {FILL} && rmdir {FILL}")
    fixed["disk"] = time.time()
    deployment.on("replica", f"chmod {REPLICA_MODE[0]} {REPLICA_FOLDER}")
    deployment.on_app("systemctl start digitalme-backup-drill.service", timeout=600)
    fixed["drill"] = time.time()

    # Meanwhile, Claude fails: every call gets a 500 the SDK does not retry.
    token = deployment.chat_token("e2e-monitoring")
    conversation = json.loads(
        deployment.curl(
            f"https://{DOMAIN}/api/v1/conversations",
            "--fail",
            "--request",
            "POST",
            "--header",
            f"Authorization: Bearer {token}",
        ).stdout
    )["id"]
    claude(site, "fail_all", Error(status=500, should_retry=False))
    claude_failing = time.time()
    statuses = [chat(deployment, token, conversation, f"are you there? {i}") for i in range(4)]
    assert set(statuses) == {503}, statuses

    await_alerts(
        deployment,
        receiver,
        "resolved",
        {
            "TargetDown": (fixed["app"], {"job": "digitalme", "host": "app"}),
            "AppNotReady": (fixed["app"], {"host": "app"}),
            "LitestreamDown": (fixed["litestream"], {"host": "app"}),
            "DiskAlmostFull": (fixed["disk"], {"host": "app", "mountpoint": FILL}),
            "BackupDrillFailed": (fixed["drill"], {"host": "app"}),
        },
        "fix_to_resolved",
    )
    await_alerts(
        deployment,
        receiver,
        "firing",
        {
            "ClaudeBreakerOpen": (claude_failing, {"host": "app"}),
        },
        "fault_to_firing",
    )


def test_claude_back_resolves_the_breaker_alert(
    deployment: Deployment, receiver: AlertReceiver, site: SharedSite
) -> None:
    claude(site, "recover")
    token = deployment.chat_token("e2e-monitoring-2")

    def a_turn_succeeds() -> bool:
        # A conversation per attempt: a turn refused by the breaker leaves its question
        # without an answer, and the next one would not alternate.
        conversation = json.loads(
            deployment.curl(
                f"https://{DOMAIN}/api/v1/conversations",
                "--fail",
                "--request",
                "POST",
                "--header",
                f"Authorization: Bearer {token}",
            ).stdout
        )["id"]
        return chat(deployment, token, conversation, "back?") == 201

    # The breaker lets a trial call through once its reset delay (30 s) has passed.
    wait_until(a_turn_succeeds, 90, "a chat turn succeeds again", interval=5)
    closed = time.time()
    wait_until(
        lambda: instant(deployment, "digitalme_claude_breaker_state")[0]["value"][1] == "0",
        30,
        "the breaker's gauge back at 0 (closed)",
    )
    await_alerts(
        deployment,
        receiver,
        "resolved",
        {
            "ClaudeBreakerOpen": (closed, {"host": "app"}),
        },
        "fix_to_resolved",
    )
