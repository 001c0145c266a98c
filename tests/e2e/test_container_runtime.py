"""The container runtime end to end (docs/docker.md): `site.yml` with
`digitalme_runtime: docker` on fresh sandbox hosts of the containers kind.

One deployment, made once for the module: an app host of the containers kind (`digitalme`)
replicating over SFTP to a plain host (`backup_targets`); the container base comes from
`sandbox.py container-base` (no registry here), the Claude stand-in runs on the controller.
Four playbook runs in all, each timed into artifacts/container-timings.json:

1. site.yml on the fresh hosts. Then, without a playbook: HTTPS chat through Caddy, the
   container's hardening and limits (seen by the kernel, not only in `podman inspect`),
   the image (no pip, reproducible layers, its size), the exposure (a port scan, and no
   firewall rule from the engine), replication to the other host.
2. upgrade.yml to a changed release under a steady load through Caddy: no request fails,
   every acknowledged chat turn is stored; then rollback.yml puts the previous image back.
3. site.yml again: nothing changes (the container runtime is idempotent).
4. The app host lost (`sandbox.py kill`) and booted fresh: site.yml restores the database
   from the replica and the same data answers over HTTPS.

The sandbox's own checks of the containers kind close the module: a container's memory and
PID limits are enforced, its cgroups sit below the host's own cgroup in every controller
of the machine, and `down` leaves nothing.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from standins.anthropic_api import AnthropicStandin
from tests.e2e.deployments import (
    CLAUDE_KEY,
    DB,
    DOMAIN,
    STANDIN_PORT,
    Deployment,
    chat_turn,
    copy_of_checkout,
    port_open,
    recap,
)
from tests.e2e.load import BackgroundLoop, SteadyLoad, Target
from tests.e2e.sandboxes import (
    REPO,
    Sandbox,
    add_group_vars,
    boot_sandbox,
    module_sandbox_name,
    require_root,
    run_tool,
)

pytestmark = pytest.mark.e2e

HOSTS = ("app@containers:digitalme", "replica:backup_targets")
TIMINGS = REPO / "artifacts" / "container-timings.json"
PODMAN = "/usr/bin/podman"
DEPLOY = "/usr/local/sbin/digitalme-deploy"
IMAGE = "localhost/digitalme"
MIN_REQUESTS_DURING_UPGRADE = 1000


@dataclass
class Site:
    deployment: Deployment
    loop: BackgroundLoop
    name: str
    workdir: Path

    @property
    def sandbox(self) -> Sandbox:
        return self.deployment.sandbox

    def playbook(self, name: str, *args: str, label: str) -> subprocess.CompletedProcess[str]:
        started = time.monotonic()
        result = self.sandbox.ansible_playbook(f"playbooks/{name}", *args, check=False)
        self.deployment.record(f"{label}_seconds", time.monotonic() - started)
        (REPO / "artifacts" / f"container-{label}.log").write_text(result.stdout + result.stderr)
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
        return result

    def podman(self, command: str, **kwargs: object) -> str:
        return self.deployment.on_app(f"{PODMAN} {command}", **kwargs).stdout  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    require_root()
    name = module_sandbox_name(__name__)
    workdir = tmp_path_factory.mktemp("container-site")
    inventory = workdir / "inventory"
    base = run_tool("container-base", timeout=900).stdout.strip().splitlines()[-1]
    with BackgroundLoop() as loop:
        anthropic = AnthropicStandin()
        try:
            sandbox = boot_sandbox(name, HOSTS, inventory)
            loop.run(anthropic.start(host=sandbox.controller_address, port=STANDIN_PORT))
            add_group_vars(
                inventory,
                {
                    "digitalme": {
                        "digitalme_runtime": "docker",
                        "digitalme_container_base_archive": base,
                        # The load comes from one address.
                        "digitalme_settings": {"DIGITALME_RATE_LIMIT_PER_MINUTE": 0},
                    }
                },
            )
            deployment = Deployment(sandbox, workdir, TIMINGS)
            TIMINGS.unlink(missing_ok=True)
            deployment.timings.clear()
            site = Site(deployment, loop, name, workdir)
            result = site.playbook("site.yml", label="site_fresh")
            assert recap(result.stdout)["app"]["failed"] == 0
            yield site
        finally:
            run_tool("down", "--name", name, timeout=300, check=False)
            loop.run(anthropic.close())


def app_container(site: Site) -> dict[str, object]:
    inspected = json.loads(site.podman("container inspect digitalme"))
    assert len(inspected) == 1
    return inspected[0]


# --- 1. the fresh deployment ------------------------------------------------------------------


def test_chat_through_caddy_reaches_the_claude_standin(site: Site) -> None:
    deployment = site.deployment
    health = deployment.curl(f"https://{DOMAIN}/health", "--fail")
    assert health.returncode == 0 and json.loads(health.stdout) == {"status": "ok"}
    said = chat_turn(deployment, "Hello from the container", token_name="ctr-e2e")
    assert said["reply"]["text"] == "Stand-in reply to: Hello from the container"
    info = json.loads(deployment.curl(f"https://{DOMAIN}/info", "--fail").stdout)
    current = deployment.on_app("readlink /opt/digitalme/current").stdout.strip()
    assert info["release"]["release"] == Path(current).name, info


def test_the_service_is_one_hardened_container_behind_the_kept_socket(site: Site) -> None:
    deployment = site.deployment
    assert (
        deployment.on_app(
            "systemctl is-active digitalme.socket digitalme.service "
            "litestream caddy prometheus-node-exporter"
        ).stdout.split()
        == ["active"] * 5
    )
    names = site.podman("ps --format '{{.Names}}'").split()
    assert names == ["digitalme"], names  # one app container: one writer
    container = app_container(site)
    config, host = container["Config"], container["HostConfig"]
    release = Path(deployment.on_app("readlink /opt/digitalme/current").stdout.strip()).name
    assert config["Image"] == f"{IMAGE}:{release}"
    uid, gid = deployment.on_app("id -u digitalme; id -g digitalme").stdout.split()
    assert config["User"] == f"{uid}:{gid}"
    assert host["ReadonlyRootfs"] is True
    assert "no-new-privileges" in host["SecurityOpt"]
    # Nothing published (EXPOSE lists 8080 without a host port): the socket is the way in.
    assert [port for port, bound in (host["PortBindings"] or {}).items() if bound] == []
    assert host["NetworkMode"] == "slirp4netns"
    assert host["Memory"] == 768 * 1024 * 1024 and host["PidsLimit"] == 256
    # What the kernel enforces on the app process, not only what the engine recorded.
    pid = int(site.podman("inspect --format '{{.State.Pid}}' digitalme").strip())
    status = dict(
        line.split(":", 1)
        for line in deployment.on_app(f"cat /proc/{pid}/status").stdout.splitlines()
    )
    assert status["Uid"].split()[0] == uid
    assert status["CapEff"].strip() == "0000000000000000"
    assert status["CapBnd"].strip() == "0000000000000000"
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2"
    cgroups = deployment.on_app(f"cat /proc/{pid}/cgroup").stdout
    memory = re.search(r"^\d+:memory:(.*)$", cgroups, re.MULTILINE)[1]
    pids = re.search(r"^\d+:pids:(.*)$", cgroups, re.MULTILINE)[1]
    assert "digitalme.service" in memory, cgroups  # under the unit (--cgroups split)
    assert deployment.on_app(
        f"cat /sys/fs/cgroup/memory{memory}/memory.limit_in_bytes"
    ).stdout.strip() == str(768 * 1024 * 1024)
    assert deployment.on_app(f"cat /sys/fs/cgroup/pids{pids}/pids.max").stdout.strip() == "256"
    # The socket is systemd's, handed over: the app does not listen on its own.
    assert (
        "socket passed by systemd"
        in deployment.on_app(
            "journalctl -u digitalme --no-pager -o cat | grep 'listening on' | tail -1"
        ).stdout
    )
    # Its secret is a file only it can read, in no argument and no environment.
    secret = deployment.on_app(
        f"{PODMAN} exec digitalme stat -c '%a %u' /run/secrets/ANTHROPIC_API_KEY"
    ).stdout.split()
    assert secret == ["400", uid]
    assert CLAUDE_KEY not in json.dumps(container)
    assert CLAUDE_KEY not in deployment.on_app(f"cat /proc/{pid}/environ | tr '\\0' '\\n'").stdout
    assert CLAUDE_KEY not in deployment.on_app("ps -eo args").stdout
    assert CLAUDE_KEY not in deployment.on_app("journalctl --no-pager -o cat").stdout
    deployment.record(
        "exposure_digitalme_unit",
        float(
            re.search(
                r"exposure level for \S+: ([\d.]+)",
                deployment.on_app(
                    "systemd-analyze security digitalme.service --no-pager | tail -1"
                ).stdout,
            )[1]
        ),
    )


def test_the_image_has_no_pip_and_its_layers_are_reproducible(site: Site) -> None:
    deployment = site.deployment
    release = Path(deployment.on_app("readlink /opt/digitalme/current").stdout.strip()).name
    image = f"{IMAGE}:{release}"
    probe = (
        "import importlib.util as u, shutil; "
        "print(u.find_spec('pip'), u.find_spec('ensurepip'), shutil.which('pip'), "
        "shutil.which('gcc'), shutil.which('cc'))"
    )
    found = deployment.on_app(
        f"{PODMAN} run --rm --network none --entrypoint python3 {image} -c {shlex.quote(probe)}"
    ).stdout.split()
    assert found == ["None"] * 5
    inspected = json.loads(site.podman(f"image inspect {image}"))[0]
    assert inspected["Config"]["User"] == "10001:10001"
    assert inspected["Config"]["Entrypoint"] == ["digitalme"]
    assert inspected["Config"]["Cmd"] == ["serve"]
    assert "/health" in " ".join(inspected["Healthcheck"]["Test"])  # Podman's key
    assert "/var/lib/digitalme" in inspected["Config"]["Volumes"]
    deployment.record("image_megabytes", inspected["Size"] / 1e6)
    # The same release built again from nothing gives the same layers.
    context = f"/opt/digitalme/releases/{release}"
    base = site.podman(
        "image ls --filter reference=localhost/digitalme-base --format '{{.Repository}}:{{.Tag}}'"
    ).split()[0]
    epoch = inspected["Created"]
    started = time.monotonic()
    rebuilt = deployment.on_app(
        f"{PODMAN} build --quiet --no-cache --format docker --network none "
        f"--build-arg BASE_IMAGE={base} --build-arg WHEELS=package "
        f"--timestamp $(date -d {shlex.quote(epoch)} +%s) --file /opt/digitalme/Dockerfile "
        f"--tag localhost/digitalme-rebuild:test {context} && {PODMAN} image inspect "
        "--format '{{json .RootFS.Layers}}' localhost/digitalme-rebuild:test",
        timeout=600,
    )
    deployment.record("image_build_no_cache_seconds", time.monotonic() - started)
    layers = json.loads(rebuilt.stdout.strip().splitlines()[-1])
    assert layers == inspected["RootFS"]["Layers"]
    site.podman("rmi localhost/digitalme-rebuild:test")
    site.podman("image prune --force")


def test_only_ssh_http_and_https_are_reachable_and_the_engine_adds_no_rule(site: Site) -> None:
    deployment = site.deployment
    listening = deployment.on_app("ss -Hltn | awk '{print $4}'").stdout.split()
    ports = (
        {int(a.rsplit(":", 1)[1]) for a in listening}
        | set(range(1, 1025))
        | {2019, 3000, 5000, 8000, 8080, 8443, 9090, 9100}
    )
    with ThreadPoolExecutor(max_workers=64) as pool:
        results = dict(
            zip(ports, pool.map(lambda p: port_open(deployment.app.address, p), ports), strict=True)
        )
    assert {port for port, is_open in results.items() if is_open} == {22, 80, 443}, listening
    assert 8080 in {int(a.rsplit(":", 1)[1]) for a in listening}  # the socket, on loopback
    # No NAT, no forwarding rule, no table of the engine's: only the base role's firewall.
    ruleset = deployment.on_app("nft list ruleset").stdout
    tables = re.findall(r"^table (\S+ \S+)", ruleset, re.MULTILINE)
    assert not [t for t in tables if re.search(r"nat|docker|podman|cni|netavark", t)], tables
    assert "masquerade" not in ruleset and "dnat" not in ruleset


def test_writes_reach_the_replica_host(site: Site) -> None:
    deployment = site.deployment
    marker = f"container replica {uuid.uuid4()}"
    said = chat_turn(deployment, marker, token_name="ctr-replica")
    acknowledged = time.monotonic()
    query = shlex.quote(f"SELECT count(*) FROM messages WHERE text LIKE '%{marker}%';")
    while True:
        restored = deployment.on_app(
            "rm -f /var/lib/digitalme/e2e-restore.db* && litestream-admin restore -o "
            f"/var/lib/digitalme/e2e-restore.db {DB} && "
            f"sqlite3 /var/lib/digitalme/e2e-restore.db {query}",
            check=False,
        )
        if restored.returncode == 0 and restored.stdout.strip() == "2":
            break
        assert time.monotonic() < acknowledged + 30, restored.stdout + restored.stderr
        time.sleep(1)
    deployment.record("replica_visible_seconds", time.monotonic() - acknowledged)
    deployment.on_app("rm -f /var/lib/digitalme/e2e-restore.db*")
    assert said["conversation"]


# --- 2. an upgrade under load, and a rollback -------------------------------------------------


def test_an_upgrade_under_load_fails_no_request_and_rollback_puts_the_image_back(
    site: Site, tmp_path: Path
) -> None:
    deployment = site.deployment
    before = Path(deployment.on_app("readlink /opt/digitalme/current").stdout.strip()).name
    source = copy_of_checkout(tmp_path / "next")
    (source / "docs" / "container-upgrade-probe.md").write_text(f"{uuid.uuid4()}\n")
    token = deployment.chat_token("ctr-load")
    target = Target(deployment.app.address, DOMAIN, deployment.ca_file)
    load = SteadyLoad(
        target,
        chat_token=token,
        telegram_secret="",
        workers={"health": 4, "chat": 3},
        label="ctr-upgrade",
    )
    with load.running(site.loop):
        started = time.time()
        site.playbook("upgrade.yml", "-e", f"digitalme_source_dir={source}", label="upgrade")
        finished = time.time()
        time.sleep(2)
    during = load.between(started, finished)
    deployment.record("upgrade_requests_during", len(during))
    deployment.record("upgrade_requests_failed", len(load.failed(during)))
    assert len(during) >= MIN_REQUESTS_DURING_UPGRADE
    assert load.failed() == [], load.failed()[:10]
    after = Path(deployment.on_app("readlink /opt/digitalme/current").stdout.strip()).name
    assert after != before
    assert app_container(site)["Config"]["Image"] == f"{IMAGE}:{after}"
    last = json.loads(deployment.on_app("cat /var/lib/digitalme-deploy/last.json").stdout)
    assert (last["kind"], last["result"], last["from_release"], last["to_release"]) == (
        "upgrade",
        "success",
        before,
        after,
    )
    deployment.record("upgrade_restart_seconds", last["restart"]["seconds"])
    deployment.record("upgrade_gate_seconds", last["gate_seconds"])
    # Every acknowledged chat turn is in the database.
    keys = load.acknowledged("chat")
    stored = deployment.on_app(
        f"sqlite3 {DB} \"SELECT count(*) FROM messages WHERE text LIKE 'ctr-upgrade chat %' "
        "AND role = 'user'\""
    ).stdout.strip()
    assert int(stored) >= len(keys)
    # Back to the previous release: its image runs again, through the same gate.
    site.playbook("rollback.yml", label="rollback")
    assert Path(deployment.on_app("readlink /opt/digitalme/current").stdout.strip()).name == before
    assert app_container(site)["Config"]["Image"] == f"{IMAGE}:{before}"
    assert deployment.curl(f"https://{DOMAIN}/health/ready", "--fail").returncode == 0
    # Both images stay for the next rollback; nothing else of ours is left.
    images = site.podman("image ls --format '{{.Repository}}:{{.Tag}}'").split()
    assert {f"{IMAGE}:{before}", f"{IMAGE}:{after}"} <= set(images)
    assert "<none>:<none>" not in images


# --- 3. idempotence ---------------------------------------------------------------------------


def test_a_second_run_changes_nothing(site: Site) -> None:
    # After the rollback, the checkout's release runs again: site.yml is back where it was.
    result = site.playbook("site.yml", label="site_rerun")
    counts = recap(result.stdout)
    changed = [line for line in result.stdout.splitlines() if line.startswith("changed:")]
    assert counts["app"]["changed"] == 0 and counts["replica"]["changed"] == 0, (
        f"{counts}\n{changed}"
    )


# --- 4. the app host lost ---------------------------------------------------------------------


def test_a_fresh_host_restores_the_data_from_the_replica(site: Site) -> None:
    deployment = site.deployment
    marker = f"before the loss {uuid.uuid4()}"
    chat_turn(deployment, marker, token_name="ctr-loss")
    deployment.on_app(f"litestream-admin sync -wait {DB} >/dev/null 2>&1 || true", check=False)
    time.sleep(2)
    run_tool("kill", "--name", site.name, "app")
    sandbox = boot_sandbox(site.name, HOSTS, site.sandbox.inventory)
    deployment.rebooted(sandbox)
    site.playbook("site.yml", "--limit", "app,replica", label="site_fresh_host")
    count = deployment.on_app(
        f"sqlite3 {DB} \"SELECT count(*) FROM messages WHERE text = '{marker}'\""
    ).stdout
    assert count.strip() == "1"
    said = chat_turn(deployment, "After the restore", token_name="ctr-after")
    assert said["reply"]["text"] == "Stand-in reply to: After the restore"


# --- the sandbox's containers kind ------------------------------------------------------------


def test_limits_are_enforced_and_cgroups_stay_below_the_hosts_own(site: Site) -> None:
    deployment = site.deployment
    image = deployment.on_app("cat /opt/digitalme/current/image.env").stdout.split("=", 1)[1]
    allocate = deployment.on_app(
        f"{PODMAN} run --rm --network none --memory 64m --memory-swap 64m --entrypoint python3 "
        f"{image.strip()} -c 'bytearray(200 * 1024 * 1024)'",
        check=False,
    )
    assert allocate.returncode == 137  # killed by the memory limit
    forks = deployment.on_app(
        f"{PODMAN} run --rm --network none --pids-limit 20 --entrypoint python3 "
        f"{image.strip()} -c {shlex.quote(FORK_PROBE)}",
        check=False,
    )
    assert "refused" in forks.stdout, forks.stdout + forks.stderr
    # On the machine: the app container's cgroup is below the host's own, in every
    # controller; nothing of it at the top of the machine's hierarchies.
    host_cgroup = Path("/sys/fs/cgroup/memory/dmsb") / site.name / "app"
    found = subprocess.run(
        ["find", str(host_cgroup), "-type", "d", "-name", "libpod-payload-*"],
        capture_output=True,
        text=True,
    ).stdout.split()
    assert found, f"no container cgroup below {host_cgroup}"
    for controller in ("memory", "pids", "cpu", "blkio"):
        top = [
            p.name
            for p in Path(f"/sys/fs/cgroup/{controller}").iterdir()
            if p.is_dir() and ("libpod" in p.name or p.name in ("machine.slice", "docker"))
        ]
        assert top == [], f"{controller}: {top}"


FORK_PROBE = """
import os, time
children = []
try:
    for _ in range(100):
        pid = os.fork()
        if pid == 0:
            time.sleep(5)
            os._exit(0)
        children.append(pid)
    print("all forked")
except OSError:
    print(f"refused after {len(children)}")
"""


def test_down_leaves_nothing_of_the_container_hosts(site: Site) -> None:
    sandbox = site.sandbox
    sandbox.down()
    assert sandbox.leftovers() == []
    assert not (REPO / ".cache" / "sandbox" / "hosts" / site.name).exists()
