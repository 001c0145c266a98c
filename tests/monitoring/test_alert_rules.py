"""The alert rules the monitoring role installs: valid, unit-tested, and documented.

- ``promtool check rules`` accepts the rule file, and ``promtool test rules`` passes every
  unit test in tests/monitoring/rules/ (Debian's promtool, unpacked by scripts/bootstrap.sh
  into .cache/prometheus-tools);
- every alert is tested both firing and not firing (the Watchdog only firing: it always
  fires), carries ``for:``, a known severity, a summary, a description and a runbook link;
- every runbook link points at a section of docs/operations/monitoring.md that says what
  the alert means, what to check and how to fix it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "roles/monitoring/files/etc/prometheus/rules/digitalme.rules.yml"
TESTS = sorted((REPO / "tests/monitoring/rules").glob("*.test.yml"))
RUNBOOK = REPO / "docs/operations/monitoring.md"
RUNBOOK_PREFIX = "docs/operations/monitoring.md#"
SEVERITIES = {"critical", "warning", "none"}
ALWAYS_FIRING = {"Watchdog"}


def prometheus_tool(name: str) -> str:
    """promtool / amtool: the copy bootstrap.sh unpacked, else one on PATH."""
    unpacked = REPO / ".cache/prometheus-tools/usr/bin" / name
    if unpacked.is_file():
        return str(unpacked)
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"{name} not found: run scripts/bootstrap.sh (it unpacks Debian's "
            f"prometheus and prometheus-alertmanager into .cache/prometheus-tools)",
            pytrace=False,
        )
    return found


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def runbook_sections() -> dict[str, str]:
    """Anchor -> text of each '### ' section of the monitoring doc."""
    sections: dict[str, str] = {}
    current = None
    for line in RUNBOOK.read_text().splitlines():
        if line.startswith("### "):
            current = github_anchor(line[4:])
            sections[current] = ""
        elif line.startswith("## "):
            current = None
        elif current is not None:
            sections[current] += line + "\n"
    return sections


def test_promtool_accepts_the_rule_file() -> None:
    proc = subprocess.run(
        [prometheus_tool("promtool"), "check", "rules", str(RULES)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in proc.stdout


def test_promtool_unit_tests_pass() -> None:
    assert TESTS, "no promtool unit tests in tests/monitoring/rules"
    proc = subprocess.run(
        [prometheus_tool("promtool"), "test", "rules", *map(str, TESTS)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("SUCCESS") == len(TESTS), proc.stdout


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - firing == set(), "alerts never tested firing"
    assert names - quiet - ALWAYS_FIRING == set(), "alerts never tested staying quiet"
    assert (firing | quiet) - names == set(), "tests of alerts that do not exist"


def test_every_alert_has_for_severity_summary_and_runbook() -> None:
    problems = []
    for rule in alert_rules():
        name = rule["alert"]
        annotations = rule.get("annotations", {})
        if "for" not in rule:
            problems.append(f"{name}: no for:")
        if rule.get("labels", {}).get("severity") not in SEVERITIES:
            problems.append(f"{name}: severity not one of {sorted(SEVERITIES)}")
        for key in ("summary", "description"):
            if not str(annotations.get(key, "")).strip():
                problems.append(f"{name}: no {key}")
        if annotations.get("runbook_url") != RUNBOOK_PREFIX + name.lower():
            problems.append(f"{name}: runbook_url should be {RUNBOOK_PREFIX}{name.lower()}")
    assert problems == []


def test_every_alert_has_a_runbook_section() -> None:
    sections = runbook_sections()
    problems = []
    for rule in alert_rules():
        anchor = rule["annotations"]["runbook_url"].partition("#")[2]
        text = sections.get(anchor)
        if text is None:
            problems.append(f"{rule['alert']}: no '### {rule['alert']}' section in {RUNBOOK}")
            continue
        for part in ("What it means", "What to check", "How to fix"):
            if f"**{part}**" not in text:
                problems.append(f"{rule['alert']}: its section lacks **{part}**")
    assert problems == []
