"""Testinfra checks of the monitoring host `mon` (Prometheus, Alertmanager, blackbox)."""

from __future__ import annotations

import json
import re
import socket
import time

import pytest
from conftest import (
    PASSWORD,
    REPORT,
    UNITS,
    WEBHOOK_LOG,
    alert_names,
    api,
    exposure,
    query,
    wait_for,
)
from verifier import address, ansible_playbook, record

testinfra_hosts = ["mon"]

LISTENERS = {
    "prometheus": 9090,
    "prometheus-alertmanager": 9093,
    "prometheus-blackbox-exporter": 9115,
}


def test_packages_without_recommends_and_units_running(host, journal):
    for package in ("prometheus", "prometheus-alertmanager", "prometheus-blackbox-exporter"):
        assert host.package(package).is_installed
    # prometheus recommends node-exporter's collectors package and more: not pulled in.
    assert not host.package("prometheus-node-exporter-collectors").is_installed
    for unit in UNITS:
        service = host.service(unit)
        assert service.is_enabled and service.is_running, journal(unit)
    failed = host.run("systemctl --failed --plain --no-legend").stdout
    assert failed.strip() == "", failed


def test_listeners_are_on_loopback_only(host):
    listening = host.check_output("ss -Htln | awk '{print $4}'").split()
    for port in (*LISTENERS.values(), 9100):
        assert f"127.0.0.1:{port}" in listening
        assert [a for a in listening if a.endswith(f":{port}")] == [f"127.0.0.1:{port}"]
    # Alertmanager's cluster listener is off.
    assert not [a for a in listening if a.endswith(":9094")]
    mon = address("mon")
    for port in LISTENERS.values():
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((mon, port), timeout=5).close()


def test_flags_configuration_files_and_secrets(host):
    args = host.file("/etc/default/prometheus").content_string
    assert "--web.listen-address=127.0.0.1:9090" in args
    assert (
        "--storage.tsdb.retention.time=30d" in args and "--storage.tsdb.retention.size=2GB" in args
    )
    assert re.search(
        r'--cluster\.listen-address=[\s"]',
        host.file("/etc/default/prometheus-alertmanager").content_string,
    )
    # Each file passes its own tool's check on the host.
    host.check_output("promtool check config /etc/prometheus/prometheus.yml")
    host.check_output("amtool check-config /etc/prometheus/alertmanager.yml")
    host.check_output(
        "prometheus-blackbox-exporter --config.check --config.file=/etc/prometheus/blackbox.yml"
    )
    for path in (
        "/etc/prometheus/alertmanager.yml",
        "/etc/prometheus/prometheus.yml",
        "/etc/prometheus/secrets/node-exporter-password",
        "/etc/prometheus/secrets/digitalme-metrics-token",
    ):
        f = host.file(path)
        assert (f.user, f.group, f.mode) == ("root", "prometheus", 0o640), path
    secrets = host.file("/etc/prometheus/secrets")
    assert (secrets.user, secrets.group, secrets.mode) == ("root", "prometheus", 0o750)
    assert host.file("/etc/prometheus/secrets/node-exporter-password").content_string == PASSWORD
    # The password is not in Prometheus' configuration, only its file's name.
    assert PASSWORD not in host.file("/etc/prometheus/prometheus.yml").content_string
    # Nor the app's metrics token (molecule.yml), which the app's scrape sends from its file.
    token = host.file("/etc/prometheus/secrets/digitalme-metrics-token").content_string
    assert token == "molecule-metrics-token-not-a-secret-0123456789"
    config = host.file("/etc/prometheus/prometheus.yml").content_string
    assert token not in config
    assert re.search(
        r"job_name: digitalme\n\s+authorization:\n\s+credentials_file: "
        r"/etc/prometheus/secrets/digitalme-metrics-token\n",
        config,
    ), config


def test_every_rule_is_loaded_with_the_overrides(host):
    groups = api(host, "/api/v1/rules")["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    loaded = {rule["name"]: rule for rule in rules if rule["type"] == "alerting"}
    assert set(loaded) == alert_names()
    assert all(rule["health"] == "ok" for rule in rules), [r for r in rules if r["health"] != "ok"]
    # monitoring_rules_for_override and monitoring_runbook_base_url of molecule.yml.
    assert {rule["duration"] for rule in loaded.values()} == {10}
    assert (
        loaded["HostDown"]["annotations"]["runbook_url"]
        == "https://example.org/digitalme/docs/operations/monitoring.md#hostdown"
    )
    # The budget as a recording rule (monitoring_daily_token_budget).
    assert query(host, "digitalme:claude_daily_token_budget")[0]["value"][1] == "1000000"


def test_both_node_exporters_are_scraped_the_other_over_tls(host):
    def node_targets():
        found = {
            r["metric"]["host"]: r["value"][1] for r in query(host, 'up{job="node", host!=""}')
        }
        return found if found == {"mon": "1", "target": "1"} else None

    wait_for(node_targets, 60, what='up{job="node"} == 1 for mon and target')
    targets = api(host, "/api/v1/targets")["data"]["activeTargets"]
    remote = [t for t in targets if t["labels"]["host"] == "target"]
    assert remote[0]["scrapeUrl"] == f"https://{address('target')}:9100/metrics"


def test_loopback_targets_that_nothing_serves_are_down(host):
    down = {r["metric"]["job"] for r in query(host, 'up{host!=""} == 0')}
    assert down == {"digitalme", "litestream", "caddy"}


def test_alerts_reach_the_webhook_receiver(host, journal):
    """TargetDown for the app (nothing on 127.0.0.1:8080) and the Watchdog reach the
    receiver prepare.yml started; then the receiver itself goes away and Alertmanager
    counts failed notifications (what AlertmanagerNotificationsFailing watches)."""
    started = time.monotonic()

    def notifications():
        text = host.file(WEBHOOK_LOG).content_string if host.file(WEBHOOK_LOG).exists else ""
        return [json.loads(line) for line in text.splitlines()]

    def delivered():
        names = {
            (alert["labels"]["alertname"], alert["labels"].get("job"))
            for n in notifications()
            for alert in n["payload"]["alerts"]
            if alert["status"] == "firing"
        }
        return names if {("TargetDown", "digitalme"), ("Watchdog", None)} <= names else None

    wait_for(delivered, 180, what="TargetDown and Watchdog at the webhook")
    record(REPORT, ("webhook_wait_seconds_after_converge",), round(time.monotonic() - started, 1))
    payload = next(
        n["payload"]
        for n in notifications()
        if any(a["labels"]["alertname"] == "TargetDown" for a in n["payload"]["alerts"])
    )
    alert = next(a for a in payload["alerts"] if a["labels"]["alertname"] == "TargetDown")
    assert alert["labels"]["severity"] == "warning" and alert["labels"]["host"] == "mon"
    assert alert["annotations"]["runbook_url"].endswith("#targetdown")
    assert payload["externalURL"] == "http://localhost:9093"
    # Alerts as amtool sees them.
    firing = host.check_output(
        "amtool --alertmanager.url=http://127.0.0.1:9093 alert query -o json"
    )
    assert "TargetDown" in firing


# The failure runs below run only the tasks they need (the scenario's time counts in the
# e2e suite): configuration (node-exporter's publishes target's scrape details), or
# preflight, whose checks of the listeners and receivers come before the other hosts'.
CONFIGURE_ONLY = ("--tags", "node_exporter_configure,monitoring_configure")
PREFLIGHT_ON_MON = ("--check", "--limit", "mon", "--tags", "monitoring")


def test_a_rule_file_promtool_rejects_never_reaches_the_host(host, tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text(
        "groups:\n  - name: broken\n    rules:\n      - alert: Broken\n        expr: rate(up[5m]\n"
    )
    rc, output = ansible_playbook(
        *CONFIGURE_ONLY, "-e", json.dumps({"monitoring_extra_rule_files": [str(broken)]})
    )
    assert rc != 0 and "failed to validate" in output, output[-3000:]
    assert "unclosed left parenthesis" in output
    assert not host.file("/etc/prometheus/rules/extra-broken.yml").exists
    assert re.findall(r"^mon\s+: ok=\d+\s+changed=(\d+)", output, re.M) == ["0"], output[-3000:]


def test_preflight_refuses_a_public_listener_and_no_receiver():
    rc, output = ansible_playbook(
        *PREFLIGHT_ON_MON, "-e", "monitoring_prometheus_listen_address=0.0.0.0:9090"
    )
    assert rc != 0 and "is not a loopback host:port" in output, output[-3000:]
    rc, output = ansible_playbook(
        *PREFLIGHT_ON_MON, "-e", json.dumps({"monitoring_webhook_urls": []})
    )
    assert rc != 0 and "Configure at least one receiver" in output, output[-3000:]
    rc, output = ansible_playbook(*PREFLIGHT_ON_MON, "-e", "monitoring_app_metrics_token=")
    assert rc != 0 and "set DIGITALME_METRICS_TOKEN in digitalme_secrets" in output, output[-3000:]


def test_units_run_hardened(host):
    scores = {}
    for unit in UNITS:
        pid = host.check_output(f"systemctl show -p MainPID --value {unit}")
        status = dict(
            line.split(":\t", 1)
            for line in host.check_output(f"cat /proc/{pid}/status").splitlines()
            if ":\t" in line
        )
        assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2", unit
        assert int(status["CapEff"], 16) == 0, unit
        scores[unit] = exposure(host, unit)
        record(REPORT, (f"exposure_{unit}",), scores[unit])
    print(f"systemd-analyze security: {scores}")
    assert all(score <= 2.5 for score in scores.values()), scores
