"""Webhook deliveries signed exactly the way each platform signs them.

Each function returns ``(headers, body)`` ready to POST to the service.

* Telegram: no body signature; the secret given to setWebhook comes back in
  ``X-Telegram-Bot-Api-Secret-Token``.
* Slack: ``X-Slack-Signature: v0=<hex HMAC-SHA256 of "v0:{timestamp}:{body}">`` with the
  signing secret, and ``X-Slack-Request-Timestamp``.
* GitHub: ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>`` with the webhook
  secret, ``X-GitHub-Event`` and ``X-GitHub-Delivery`` (a GUID).
* ClickUp: ``X-Signature: <hex HMAC-SHA256 of the body>`` with the webhook's secret.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import urllib.parse
import uuid
from typing import Any


def _hmac_hex(secret: str, data: bytes) -> str:
    return hmac.new(secret.encode(), data, hashlib.sha256).hexdigest()


def telegram(secret: str, update: dict[str, Any]) -> tuple[dict[str, str], bytes]:
    return (
        {"Content-Type": "application/json", "X-Telegram-Bot-Api-Secret-Token": secret},
        json.dumps(update).encode(),
    )


def slack_signature(secret: str, timestamp: str, body: bytes) -> str:
    return "v0=" + _hmac_hex(secret, b"v0:" + timestamp.encode() + b":" + body)


def slack_event(
    secret: str,
    payload: dict[str, Any],
    *,
    timestamp: float | None = None,
    retry_num: int | None = None,
) -> tuple[dict[str, str], bytes]:
    body = json.dumps(payload).encode()
    ts = str(int(timestamp if timestamp is not None else time.time()))
    headers = {
        "Content-Type": "application/json",
        "X-Slack-Request-Timestamp": ts,
        "X-Slack-Signature": slack_signature(secret, ts, body),
    }
    if retry_num is not None:
        headers["X-Slack-Retry-Num"] = str(retry_num)
        headers["X-Slack-Retry-Reason"] = "http_timeout"
    return headers, body


def slack_command(
    secret: str,
    fields: dict[str, str],
    *,
    timestamp: float | None = None,
) -> tuple[dict[str, str], bytes]:
    body = urllib.parse.urlencode(fields).encode()
    ts = str(int(timestamp if timestamp is not None else time.time()))
    return (
        {
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Slack-Request-Timestamp": ts,
            "X-Slack-Signature": slack_signature(secret, ts, body),
        },
        body,
    )


def github(
    secret: str, event: str, payload: dict[str, Any], *, delivery: str | None = None
) -> tuple[dict[str, str], bytes]:
    body = json.dumps(payload).encode()
    return (
        {
            "Content-Type": "application/json",
            "X-GitHub-Event": event,
            "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
            "X-GitHub-Hook-ID": "123456",
            "User-Agent": "GitHub-Hookshot/test",
            "X-Hub-Signature-256": "sha256=" + _hmac_hex(secret, body),
        },
        body,
    )


def clickup(secret: str, payload: dict[str, Any]) -> tuple[dict[str, str], bytes]:
    body = json.dumps(payload).encode()
    return {"Content-Type": "application/json", "X-Signature": _hmac_hex(secret, body)}, body
