"""A DigitalMe deployed by site.yml on sandbox hosts, seen from the controller.

Shared by the end-to-end modules that deploy the whole site (test_site.py,
test_recovery.py): the names the sandbox inventory gives things, commands on the app host
through its admin user (root may not log in after the base role), curl over HTTPS through
Caddy trusting its internal CA, ansible-playbook's recap, and timings kept as an artifact.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.e2e.sandboxes import REPO, Sandbox, SandboxHost

DOMAIN = "digitalme.sandbox.test"
ADMIN = "admin"  # base_admin_user in inventory/sandbox/group_vars/all/main.yml
CADDY_ROOT = "/var/lib/caddy/.local/share/caddy/pki/authorities/local/root.crt"
STANDIN_PORT = 8765  # digitalme_anthropic_base_url in the sandbox group_vars
ALERT_RECEIVER_PORT = 8766  # monitoring_webhook_urls in the sandbox group_vars
UNITS = ("digitalme", "caddy", "litestream", "prometheus-node-exporter")
DB = "/var/lib/digitalme/digitalme.db"  # digitalme_db_path's default
SITE_TIMINGS = REPO / "artifacts" / "site-timings.json"


@dataclass
class Deployment:
    sandbox: Sandbox
    workdir: Path
    timings_file: Path
    # Prefix of the playbook logs' names in artifacts/ (the module's, e.g. "acme-").
    log_prefix: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def app(self) -> SandboxHost:
        return self.sandbox.hosts["app"]

    def on_app(self, command: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        """A command on the app host, as root through the admin user (root may not log in)."""
        return self.app.run(command, login=ADMIN, **kwargs)  # type: ignore[arg-type]

    def on(self, host: str, command: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        """A command on another host of the deployment, as root through the admin user."""
        return self.sandbox.hosts[host].run(command, login=ADMIN, **kwargs)  # type: ignore[arg-type]

    def rebooted(self, sandbox: Sandbox) -> None:
        """The sandbox after hosts were replaced: new addresses' keys, a new Caddy CA."""
        self.sandbox = sandbox
        self.ca_file.unlink(missing_ok=True)

    @property
    def ca_file(self) -> Path:
        return self.workdir / "caddy-root.crt"

    def curl(self, url: str, *args: str, max_time: float = 30) -> subprocess.CompletedProcess[str]:
        """curl from the controller to the app host, by name, trusting Caddy's root."""
        if not self.ca_file.exists():
            self.ca_file.write_text(self.on_app(f"cat {CADDY_ROOT}").stdout)
        port = "443" if url.startswith("https") else "80"
        return subprocess.run(
            [
                "curl",
                "--silent",
                "--show-error",
                "--max-time",
                f"{max_time:g}",
                "--noproxy",
                "*",
                "--resolve",
                f"{DOMAIN}:{port}:{self.app.address}",
                "--cacert",
                str(self.ca_file),
                *args,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=max_time + 30,
        )

    def chat_token(self, name: str) -> str:
        return self.on_app(
            f"/usr/local/sbin/digitalme token create --name {name} --scope chat --quiet"
        ).stdout.strip()

    def playbook(
        self,
        name: str,
        label: str,
        *args: str,
        timeout: float = 3600,
    ) -> subprocess.CompletedProcess[str]:
        """``playbooks/<name>`` (``args`` after it) on the deployment, whatever its outcome:
        its output kept in artifacts/<log_prefix><label>.log, its duration recorded as
        <label>_seconds."""
        started = time.monotonic()
        result = self.sandbox.ansible_playbook(
            f"playbooks/{name}", *args, check=False, timeout=timeout
        )
        self.record(f"{label}_seconds", time.monotonic() - started)
        (REPO / "artifacts" / f"{self.log_prefix}{label}.log").write_text(
            result.stdout + result.stderr
        )
        return result

    def record(self, name: str, value: float) -> None:
        self.timings[name] = round(value, 2)
        self.timings_file.parent.mkdir(exist_ok=True)
        self.timings_file.write_text(json.dumps(self.timings, indent=2) + "\n")


def chat_turn(
    deployment: Deployment,
    text: str,
    token_name: str = "e2e-chat",
) -> dict[str, Any]:
    """One chat turn through Caddy, in a new conversation, with a new token: its question and
    the stand-in's reply are stored (two new messages rows in the live database). The API's
    answer, with ``conversation`` (its id)."""
    return api_chat_turn(
        lambda path, *args: deployment.curl(f"https://{DOMAIN}{path}", *args),
        deployment.chat_token(token_name),
        text,
    )


def api_chat_turn(
    curl: Callable[..., subprocess.CompletedProcess[str]], token: str, text: str
) -> dict[str, Any]:
    """One chat turn in a new conversation through the API, ``curl(path, *arguments)``
    reaching it (through Caddy, wherever it runs): the API's answer, with ``conversation``
    (its id)."""
    auth = ("--fail", "--header", f"Authorization: Bearer {token}")
    created = curl("/api/v1/conversations", *auth, "--request", "POST")
    assert created.returncode == 0, created.stderr
    conversation = json.loads(created.stdout)["id"]
    said = curl(
        f"/api/v1/conversations/{conversation}/messages",
        *auth,
        "--json",
        json.dumps({"text": text}),
    )
    assert said.returncode == 0, said.stderr
    return {"conversation": conversation, **json.loads(said.stdout)}


def count_messages(deployment: Deployment, path: str, text: str) -> int:
    """Messages holding ``text`` in a database file on the app host (read-only)."""
    found = deployment.on_app(
        f"sqlite3 -readonly {shlex.quote(path)} "
        + shlex.quote(f"SELECT count(*) FROM messages WHERE text LIKE '%{text}%'")
    )
    return int(found.stdout)


def wait_replicated(deployment: Deployment, text: str, timeout: float = 120) -> None:
    """Until a restore of the replica's latest state holds ``text`` (question and reply)."""
    copy = "/var/lib/digitalme/e2e-replica-check.db"
    deadline = time.monotonic() + timeout
    while True:
        deployment.on_app(f"rm -f {copy}*")
        restored = deployment.on_app(
            f"litestream-admin restore -o {copy} {DB}", check=False, timeout=300
        )
        if restored.returncode == 0 and count_messages(deployment, copy, text) == 2:
            deployment.on_app(f"rm -f {copy}*")
            return
        assert time.monotonic() < deadline, (restored.stdout, restored.stderr)
        time.sleep(2)


def run_drill(deployment: Deployment) -> tuple[int, str]:
    """Start a restore drill as the timer does; its exit status and the drill's journal."""
    ran = deployment.on_app(
        "systemctl start digitalme-backup-drill.service", check=False, timeout=1200
    )
    journal = deployment.on_app(
        "journalctl -u digitalme-backup-drill -o cat --no-pager -n 30"
    ).stdout
    return ran.returncode, journal


PROMETHEUS = "http://127.0.0.1:9090"  # the monitoring role's, on the monitoring host's loopback


def prometheus(deployment: Deployment, path: str, host: str = "app") -> Any:
    """GET ``path`` of Prometheus' API on the monitoring host ``host``; its ``data``."""
    answer = deployment.on(host, f"curl -fsS --max-time 10 {shlex.quote(PROMETHEUS + path)}")
    return json.loads(answer.stdout)["data"]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """``predicate()``'s first true value, asked every 2 s; fails the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s: {what}"
        time.sleep(2)
    return value


def metric(text: str, name: str) -> float | None:
    """An unlabelled sample's value in a Prometheus text page, or None."""
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(found[1]) if found else None


def port_open(address: str, port: int) -> bool:
    """Whether a TCP connection from the controller to ``address:port`` is accepted."""
    try:
        with socket.create_connection((address, port), timeout=1.0):
            return True
    except OSError:
        return False


def free_port(address: str) -> int:
    """A TCP port free on ``address`` now (for a server the test starts on the controller)."""
    with socket.socket() as probe:
        probe.bind((address, 0))
        port: int = probe.getsockname()[1]
        return port


def copy_of_checkout(into: Path) -> Path:
    """What the digitalme role builds a release from, copied from the checkout (to make a
    changed release of it)."""
    into.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, into / name)
    for name in ("app", "docs", "requirements"):
        shutil.copytree(
            REPO / name, into / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
    return into


def site_yml(deployment: Deployment, label: str, *args: str) -> dict[str, dict[str, int]]:
    """``playbooks/site.yml`` (``args`` after it) on the deployment, its output kept in
    artifacts/<label>.log and its duration recorded as <label>_seconds; fails the test
    unless it succeeded on every host. Returns the recap."""
    result = deployment.playbook("site.yml", label, *args)
    counts = recap(result.stdout)
    assert (
        result.returncode == 0
        and counts
        and all(c["failed"] == 0 and c["unreachable"] == 0 for c in counts.values())
    ), result.stdout[-5000:] + result.stderr[-2000:]
    return counts


def recap(output: str) -> dict[str, dict[str, int]]:
    """ansible-playbook's PLAY RECAP: host -> {"ok": .., "changed": .., "failed": ..}."""
    found = {}
    for host, counters in re.findall(r"^(\S+)\s+:\s+(ok=.*)$", output, re.MULTILINE):
        found[host] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", counters)}
    return found


# --- the shared deployment --------------------------------------------------------------------
# One site.yml deployment for the end-to-end modules that can share it (test_site,
# test_upgrade, test_monitoring): booting and converging fresh hosts is the costliest step
# of the suite, and these modules leave the deployment as they found it. It is made the
# first time a module asks for it and removed at the end of the session. test_recovery
# keeps its own (it destroys its app host).

SHARED_SANDBOX_HOSTS = ("app:digitalme,monitoring", "replica:backup_targets", "floor:floor")
TELEGRAM_TOKEN = "123456:sandbox-telegram-bot-token"  # the stand-in's
TELEGRAM_SECRET = "sandbox-telegram-webhook-secret"
CLAUDE_KEY = "sandbox-standin-key-not-a-secret"  # the sandbox group_vars' ANTHROPIC_API_KEY
# The sandbox group_vars' DIGITALME_METRICS_TOKEN: /metrics answers only it.
METRICS_TOKEN = "sandbox-metrics-token-not-a-secret-0123456789"
METRICS_CURL = f"curl -fsS -H 'Authorization: Bearer {METRICS_TOKEN}' http://127.0.0.1:8080/metrics"
# Shortened for the tests (docs/operations/monitoring.md says what production uses).
MONITORING_TEST_SETTINGS = {
    "monitoring_scrape_interval": "5s",
    "monitoring_scrape_timeout": "4s",
    "monitoring_evaluation_interval": "5s",
    "monitoring_rules_for_override": "10s",
    "monitoring_group_wait": "5s",
    "monitoring_group_interval": "10s",
    "monitoring_repeat_interval": "1h",
}


def app_test_settings(telegram_api_base: str) -> dict[str, object]:
    """The test environment's app settings: Telegram on (its stand-in on the controller),
    no per-client rate limit (the load of test_upgrade comes from one address)."""
    return {
        "digitalme_settings": {
            "DIGITALME_RATE_LIMIT_PER_MINUTE": 0,
            "DIGITALME_TELEGRAM_API_BASE": telegram_api_base,
        },
        "digitalme_secrets": {
            "ANTHROPIC_API_KEY": CLAUDE_KEY,
            "DIGITALME_METRICS_TOKEN": METRICS_TOKEN,
            "DIGITALME_TELEGRAM_BOT_TOKEN": TELEGRAM_TOKEN,
            "DIGITALME_TELEGRAM_SECRET_TOKEN": TELEGRAM_SECRET,
        },
    }


@dataclass
class SharedSite:
    """The shared deployment and the stand-ins it talks to, on the controller: Claude
    (``anthropic``, scriptable to fail) and Telegram, both on ``loop``."""

    deployment: Deployment
    loop: Any  # tests.e2e.load.BackgroundLoop
    anthropic: Any  # standins.anthropic_api.AnthropicStandin
    telegram: Any  # standins.telegram_api.TelegramStandin
    # standins.alertmanager_webhook.AlertReceiver: Alertmanager's webhook, listening
    # from before the deployment on (a notification that found nobody would raise
    # AlertmanagerNotificationsFailing in whichever module runs next).
    receiver: Any
    site_log: str = ""

    def playbook(
        self,
        name: str,
        *args: str,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        return self.deployment.sandbox.ansible_playbook(f"playbooks/{name}", *args, check=check)
