"""Shared helpers of the monitoring scenario's testinfra checks (hosts mon and target)."""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).parents[4])).parents[1]
REPORT = "monitoring-measurements"  # artifacts/<REPORT>.json (verifier.record)
RULES = REPO / "roles/monitoring/files/etc/prometheus/rules/digitalme.rules.yml"
UNITS = ("prometheus", "prometheus-alertmanager", "prometheus-blackbox-exporter")
PASSWORD = "molecule-scrape-password-not-a-secret"  # group_vars of molecule.yml
WEBHOOK_LOG = "/var/log/molecule-webhook.jsonl"


def alert_names() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}


# GET a URL on the host with its own Python (no curl on a bare sandbox host).
_GET = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"


def api(host, path: str, port: int = 9090):
    """GET a JSON API on the host's loopback (Prometheus by default)."""
    url = f"http://127.0.0.1:{port}{path}"
    return json.loads(host.check_output(f"python3 -c {shlex.quote(_GET)} {shlex.quote(url)}"))


def query(host, expr: str) -> list[dict]:
    return api(host, "/api/v1/query?query=" + _quote(expr))["data"]["result"]


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


def wait_for(predicate, timeout: float, interval: float = 2.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}", pytrace=False)
        time.sleep(interval)


def exposure(host, unit: str) -> float:
    line = host.check_output(f"systemd-analyze security {unit}.service --no-pager | tail -1")
    return float(re.search(r"exposure level for \S+: ([\d.]+)", line)[1])


@pytest.fixture
def journal(host):
    def read(*units: str) -> str:
        names = " ".join(f"-u {u}" for u in (units or UNITS))
        return host.run(f"journalctl {names} -n 80 --no-pager").stdout

    return read
