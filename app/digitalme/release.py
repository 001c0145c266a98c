"""What runs and how it got here: the installed release's description and the record of
the last deploy, both JSON files written by the deployment (the digitalme role and
/usr/local/sbin/digitalme-deploy, docs/operations/upgrades.md), shown in ``/info``.

The release's file is read once, at start: ``/opt/digitalme/current/release.json`` names
the release the process started from, even after ``current`` moved on. The deploy record
changes under a running process (it is written after the health gate passed), so it is
read when asked; it is a few hundred bytes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# What /info shows of each file (the files may hold more).
RELEASE_FIELDS = ("release", "version", "commit", "dirty", "built_at")
DEPLOY_FIELDS = (
    "id",
    "kind",
    "result",
    "from_release",
    "to_release",
    "commit",
    "by",
    "started_at",
    "finished_at",
    "duration_seconds",
    "gate_seconds",
    "migrations",
    "snapshot",
    "reason",
)


def read_json_object(path: Path | None, fields: tuple[str, ...]) -> dict[str, Any] | None:
    """The named fields of the JSON object in ``path``; None when the setting is empty or
    the file is missing, a short error when it cannot be used (never an exception)."""
    if path is None:
        return None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return {"error": f"cannot read {path}: {exc}"}
    if not isinstance(document, dict):
        return {"error": f"{path} is not a JSON object"}
    return {name: document[name] for name in fields if name in document}
