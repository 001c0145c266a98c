"""The monitoring role's Alertmanager configuration, rendered and run: every receiver delivers.

The role's template (roles/monitoring/templates/etc/prometheus/alertmanager.yml.j2) is
rendered by Ansible with the role's defaults and an owner who wants e-mail, Telegram and a
webhook; checked with amtool as the role's `validate:` does; then Debian's Alertmanager
(unpacked by scripts/bootstrap.sh) runs it on loopback against stand-ins: an SMTP server
that requires the login (aiosmtpd), the Telegram Bot API (standins/telegram_api.py)
and a webhook receiver. Alerts posted to Alertmanager's API must arrive at all three, the
SMTP password being read from its file (smtp_auth_password_file), and a host that is down
must hold back its other alerts (inhibition).

The Molecule scenario and the e2e test use the webhook only: this is where e-mail and
Telegram are proven.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from email import message_from_bytes
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

from standins.alertmanager_webhook import AlertReceiver
from standins.telegram_api import TelegramStandin
from tests.support.process import die_with_parent, free_port

REPO = Path(__file__).resolve().parents[2]
ROLE = REPO / "roles/monitoring"
AMTOOL = REPO / ".cache/prometheus-tools/usr/bin/amtool"
ALERTMANAGER = REPO / ".cache/prometheus-tools/usr/bin/prometheus-alertmanager"
BOT_TOKEN = "654321:AAtest-alert-bot-token"
SMTP_USER, SMTP_PASSWORD = "alerts@example.com", "smtp-password-from-the-vault"
# Debian's Alertmanager reads its notification templates from the fixed path
# /usr/share/prometheus/alertmanager/. Unpacked, not installed, they are elsewhere: run it in
# a mount namespace of its own where /usr/share also shows the unpacked tree (a read-only
# overlay; the machine's /usr/share is untouched). Needs root, as CI has.
WITH_DEBIAN_SHARE = [
    "unshare",
    "--mount",
    "--propagation",
    "private",
    "--",
    "sh",
    "-c",
    'mount -t overlay overlay -o "lowerdir=$0:/usr/share" /usr/share && exec "$@"',
    str(REPO / ".cache/prometheus-tools/usr/share"),
]

RENDER = """
- name: Render the role's Alertmanager configuration
  hosts: localhost
  gather_facts: false
  vars_files:
    - {role}/defaults/main.yml
    - {role}/vars/main.yml
  tasks:
    - name: Render it
      ansible.builtin.template:
        src: {role}/templates/etc/prometheus/alertmanager.yml.j2
        dest: {dest}
        mode: "0600"
"""


class Mailbox:
    """aiosmtpd handler and authenticator: keeps messages and the logins presented."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.logins: list[tuple[bytes, bytes]] = []

    def __call__(
        self, server: Any, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        self.logins.append((data.login, data.password))
        ok = (data.login, data.password) == (SMTP_USER.encode(), SMTP_PASSWORD.encode())
        return AuthResult(success=ok, handled=False)

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 OK"


def render(tmp_path: Path, settings: dict[str, Any]) -> Path:
    playbook = tmp_path / "render.yml"
    config = tmp_path / "alertmanager.yml"
    playbook.write_text(RENDER.format(role=ROLE, dest=config))
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps(settings))
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "ansible-playbook"),
            "-i",
            "localhost,",
            "-c",
            "local",
            "-e",
            f"ansible_python_interpreter={sys.executable}",
            "-e",
            f"@{extra}",
            str(playbook),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return config


async def post_alerts(
    session: aiohttp.ClientSession, url: str, alerts: list[dict[str, str]]
) -> None:
    body = [
        {"labels": labels, "annotations": {"summary": f"{labels['alertname']} test"}}
        for labels in alerts
    ]
    async with session.post(f"{url}/api/v2/alerts", json=body) as posted:
        assert posted.status == 200, await posted.text()


async def test_email_telegram_and_webhook_receive_alerts_and_down_hosts_inhibit(
    tmp_path: Path,
) -> None:
    if not ALERTMANAGER.is_file():
        pytest.fail("run scripts/bootstrap.sh (it unpacks Debian's Alertmanager)", pytrace=False)
    if os.geteuid() != 0:
        pytest.fail(
            "needs root (a mount namespace for Debian's template path); CI runs as root",
            pytrace=False,
        )
    mailbox = Mailbox()
    # PLAIN only: aiosmtpd's LOGIN challenges ("User Name") are not the usual "Username:"
    # that Alertmanager's LOGIN expects; Go sends PLAIN without TLS to 127.0.0.1 only.
    smtp = Controller(
        mailbox,
        hostname="127.0.0.1",
        port=free_port(),
        authenticator=mailbox,
        auth_require_tls=False,
        auth_exclude_mechanism=["LOGIN"],
    )
    smtp.start()
    telegram = TelegramStandin(BOT_TOKEN)
    await telegram.start()
    webhook = AlertReceiver("127.0.0.1", 0).start()
    password_file = tmp_path / "smtp-password"
    password_file.write_text(SMTP_PASSWORD)
    port = free_port()
    process = None
    try:
        config = await asyncio.to_thread(
            render,
            tmp_path,
            {
                "monitoring_email_to": "owner@example.com",
                "monitoring_smtp_smarthost": f"127.0.0.1:{smtp.port}",
                "monitoring_smtp_from": SMTP_USER,
                "monitoring_smtp_auth_username": SMTP_USER,
                "monitoring_smtp_auth_password": SMTP_PASSWORD,
                "monitoring_smtp_require_tls": False,  # the sink speaks no TLS
                "monitoring_telegram_chat_id": 424242,
                "monitoring_telegram_bot_token": BOT_TOKEN,
                "monitoring_telegram_api_url": telegram.base_url,
                "monitoring_webhook_urls": [webhook.url],
                "monitoring_group_wait": "1s",
                "monitoring_group_interval": "2s",
                # Where the role would put the password file, here.
                "_monitoring_smtp_password_file": str(password_file),
            },
        )
        text = config.read_text()
        assert SMTP_PASSWORD not in text  # only the file's name
        assert f"smtp_auth_password_file: {password_file}" in text
        checked = subprocess.run(
            [str(AMTOOL), "check-config", str(config)], capture_output=True, text=True, timeout=60
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        with (tmp_path / "alertmanager.log").open("wb") as log:
            process = subprocess.Popen(
                [
                    *WITH_DEBIAN_SHARE,
                    str(ALERTMANAGER),
                    f"--config.file={config}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    f"--storage.path={tmp_path / 'data'}",
                    "--cluster.listen-address=",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,
            )
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, url, tmp_path)
            await post_alerts(
                session,
                url,
                [
                    {"alertname": "HostDown", "host": "replica", "severity": "critical"},
                    {
                        "alertname": "TargetDown",
                        "host": "replica",
                        "job": "node-extra",
                        "severity": "warning",
                    },
                    {"alertname": "LitestreamDown", "host": "app", "severity": "critical"},
                    {"alertname": "PostgreSQLDown", "host": "db", "severity": "critical"},
                    {"alertname": "WALArchivingFailing", "host": "db", "severity": "critical"},
                ],
            )
            for name in ("HostDown", "LitestreamDown", "PostgreSQLDown"):
                assert await asyncio.to_thread(
                    webhook.wait_for, "firing", alertname=name, timeout=30
                ), webhook.summary()
            await wait(
                lambda: len(telegram.sent) >= 2 and len(mailbox.messages) >= 2,
                "two messages by Telegram and e-mail",
                tmp_path,
                lambda: [(r.method, r.path, r.status) for r in telegram.requests],
            )
            # The down host's other alert is held back, not sent.
            async with session.get(
                f"{url}/api/v2/alerts", params={"filter": 'alertname="TargetDown"'}
            ) as listed:
                target_down = (await listed.json())[0]
            assert target_down["status"]["state"] == "suppressed"
            assert target_down["status"]["inhibitedBy"], target_down
            # So is a consequence whose cause fires on the same host.
            async with session.get(
                f"{url}/api/v2/alerts", params={"filter": 'alertname="WALArchivingFailing"'}
            ) as listed:
                archiving = (await listed.json())[0]
            assert archiving["status"]["state"] == "suppressed", archiving
        assert webhook.find("firing", alertname="TargetDown") is None, webhook.summary()
        assert webhook.find("firing", alertname="WALArchivingFailing") is None, webhook.summary()

        texts = [message["text"] for message in telegram.sent]
        assert {str(message["chat_id"]) for message in telegram.sent} == {"424242"}
        assert any("LitestreamDown" in t for t in texts) and any("HostDown" in t for t in texts)
        assert not any("TargetDown" in t for t in texts)
        assert mailbox.logins and set(mailbox.logins) == {
            (SMTP_USER.encode(), SMTP_PASSWORD.encode())
        }
        mails = [message_from_bytes(content) for _, _, content in mailbox.messages]
        assert {tuple(rcpts) for _, rcpts, _ in mailbox.messages} == {("owner@example.com",)}
        subjects = " ".join(str(mail["Subject"]) for mail in mails)
        assert "LitestreamDown" in subjects and "HostDown" in subjects
    finally:
        if process is not None:
            process.terminate()
            process.wait(10)
        webhook.stop()
        await telegram.close()
        smtp.stop()


async def wait_ready(session: aiohttp.ClientSession, url: str, tmp_path: Path) -> None:
    async def ready() -> bool:
        try:
            async with session.get(f"{url}/-/ready") as answer:
                return answer.status == 200
        except aiohttp.ClientError:
            return False

    deadline = time.monotonic() + 30
    while not await ready():
        if time.monotonic() > deadline:
            pytest.fail(
                "Alertmanager did not start:\n" + (tmp_path / "alertmanager.log").read_text(),
                pytrace=False,
            )
        await asyncio.sleep(0.2)


async def wait(
    condition: Any, what: str, tmp_path: Path, detail: Any = None, timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(
                f"timed out waiting for {what} ({detail() if detail else ''}); "
                "Alertmanager's log:\n" + (tmp_path / "alertmanager.log").read_text()[-3000:],
                pytrace=False,
            )
        await asyncio.sleep(0.2)
