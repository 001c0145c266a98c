"""Testinfra checks of `target`: node-exporter scraped from mon over TLS with basic auth."""

from __future__ import annotations

import re
import ssl
import urllib.error
import urllib.request
from base64 import b64encode

import pytest
from conftest import PASSWORD
from verifier import address

testinfra_hosts = ["target"]

UNIT = "prometheus-node-exporter"
TLS_DIR = "/etc/prometheus/node-exporter-tls"
WEB_CONFIG = "/etc/prometheus/node-exporter-web.yml"


def scrape(host, password: str | None, scheme: str = "https"):
    """GET /metrics from the controller, trusting exactly the host's certificate."""
    target = address("target")
    certificate = host.check_output(f"cat {TLS_DIR}/{target}.crt")
    context = ssl.create_default_context(cadata=certificate)
    request = urllib.request.Request(f"{scheme}://{target}:9100/metrics")
    if password is not None:
        token = b64encode(f"prometheus:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    with opener.open(request, timeout=10) as response:
        return response.status, response.read().decode()


def test_node_exporter_listens_with_tls_on_its_address(host):
    target = address("target")
    listening = host.check_output("ss -Htln 'sport = :9100' | awk '{print $4}'").split()
    assert sorted(listening) == sorted(["127.0.0.1:9100", f"{target}:9100"])
    args = host.file("/etc/default/prometheus-node-exporter").content_string
    assert f"--web.listen-address={target}:9100" in args
    assert f"--web.config.file={WEB_CONFIG}" in args


def test_key_certificate_and_hash_on_the_host(host):
    target = address("target")
    key = host.file(f"{TLS_DIR}/{target}.key")
    assert (key.user, key.group, key.mode) == ("root", "prometheus", 0o640)
    web = host.file(WEB_CONFIG)
    assert (web.user, web.group, web.mode) == ("root", "prometheus", 0o640)
    assert PASSWORD not in web.content_string
    assert re.search(r'"prometheus": "\$2b\$10\$[./A-Za-z0-9]{53}"', web.content_string)
    text = host.check_output(f"openssl x509 -in {TLS_DIR}/{target}.crt -noout -text")
    assert f"IP Address:{target}" in text


def test_scrape_with_the_password_over_tls_succeeds(host):
    status, body = scrape(host, PASSWORD)
    assert status == 200 and "node_exporter_build_info" in body


def test_scrape_without_or_with_a_wrong_password_is_refused(host):
    for password in (None, "wrong-password"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            scrape(host, password)
        assert refused.value.code == 401


def test_plain_http_is_not_served(host):
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        scrape(host, PASSWORD, scheme="http")


def test_the_password_is_in_no_process_argument(host):
    cmdlines = host.check_output("cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' ' || true")
    assert PASSWORD not in cmdlines


def test_pending_reboot_metric(host):
    host.check_output(
        "touch /run/reboot-required && systemctl start node-exporter-reboot-required.service"
    )
    try:
        assert "node_reboot_required 1" in scrape(host, PASSWORD)[1]
    finally:
        host.check_output(
            "rm -f /run/reboot-required && systemctl start node-exporter-reboot-required.service"
        )
    assert "node_reboot_required 0" in scrape(host, PASSWORD)[1]
    written = host.file("/var/lib/prometheus/node-exporter/node_reboot_required.prom")
    assert written.group == "node-exporter-textfile" and written.mode == 0o640
    timer = host.service("node-exporter-reboot-required.timer")
    assert timer.is_enabled and timer.is_running


def test_unit_is_still_hardened(host):
    line = host.check_output(f"systemd-analyze security {UNIT}.service --no-pager | tail -1")
    assert float(re.search(r"exposure level for \S+: ([\d.]+)", line)[1]) <= 2.5
