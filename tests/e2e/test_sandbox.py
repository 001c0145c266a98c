"""The sandbox hosts themselves: boot, reach, isolate, tear down; and Molecule on them.

One two-host sandbox serves the module's tests in order; the last of them takes it down
and checks that nothing is left. Needs root (CI runs as root).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.e2e.sandboxes import REPO, RUN_ROOT, Sandbox, boot_sandbox, run_tool, tool_env

pytestmark = pytest.mark.e2e

OUTSIDE = ("1.1.1.1", 443)  # only a connection attempt from inside a host: the firewall refuses it


@pytest.fixture(scope="module")
def pair(sandbox_hosts) -> Sandbox:
    return sandbox_hosts("app", "replica")


def python_on(host, code: str, check: bool = True):
    return host.run(f"python3 -c {shlex.quote(code)}", check=check, timeout=60)


def test_hosts_boot_with_systemd_as_pid_1(pair):
    assert set(pair.hosts) == {"app", "replica"}
    for host in pair.hosts.values():
        state = host.run("systemctl is-system-running", check=False).stdout.strip()
        failed = host.run("systemctl --failed --plain --no-legend", check=False).stdout
        assert state == "running", f"{host.name}: {state}; failed units:\n{failed}"
        assert host.run("ps -o comm= -p 1").stdout.strip() == "systemd"
        assert host.run("hostname").stdout.strip() == host.name
        os_release = host.run("cat /etc/os-release").stdout
        assert "VERSION_CODENAME=bookworm" in os_release
        assert host.run("python3 -c 'import apt_pkg; print(1)'").stdout.strip() == "1"


def test_each_host_has_its_own_namespace_address_and_machine_id(pair):
    app, replica = pair.hosts["app"], pair.hosts["replica"]
    assert app.address != replica.address
    for host in (app, replica):
        assert f"inet {host.address}/24" in host.run("ip -4 -o addr show dev eth0").stdout
    ids = {h.run("cat /etc/machine-id").stdout.strip() for h in (app, replica)}
    assert len(ids) == 2 and all(len(i) == 32 for i in ids)
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"dmsb{pair.slot}-app" in netns and f"dmsb{pair.slot}-replica" in netns


def test_inventory_has_groups_hosts_and_connection_vars(pair):
    inventory = yaml.safe_load((pair.inventory / "hosts.yml").read_text())["all"]
    assert set(inventory["hosts"]) == {"app", "replica"}
    pinned = pair.known_hosts.read_text()
    for name, host_vars in inventory["hosts"].items():
        assert host_vars["ansible_host"] == pair.hosts[name].address
        # The host's own public key (what the sftp replica target pins), as in known_hosts.
        key_type, key = host_vars["sandbox_host_key"].split()
        assert key_type == "ssh-ed25519"
        assert f"{pair.hosts[name].address} {key_type} {key}" in pinned
    assert inventory["children"]["digitalme"]["hosts"] == {"app": None}
    assert inventory["children"]["backup_targets"]["hosts"] == {"replica": None}
    variables = inventory["vars"]
    assert variables["ansible_user"] == "root"
    assert variables["ansible_ssh_private_key_file"] == str(pair.private_key)
    assert "StrictHostKeyChecking=yes" in variables["ansible_ssh_common_args"]
    assert f"UserKnownHostsFile={pair.known_hosts}" in variables["ansible_ssh_common_args"]
    assert variables["sandbox_controller_address"] == pair.controller_address


def test_ansible_reaches_every_host_through_the_inventory(pair):
    result = pair.ansible("all", "-m", "ansible.builtin.ping")
    assert result.stdout.count("SUCCESS") == 2, result.stdout
    facts = pair.ansible(
        "digitalme", "-m", "ansible.builtin.setup", "-a", "filter=ansible_service_mgr"
    )
    assert '"ansible_service_mgr": "systemd"' in facts.stdout


def test_host_keys_are_pinned_and_checked(pair, tmp_path):
    app = pair.hosts["app"]
    pinned = pair.known_hosts.read_text()
    assert f"{app.address} ssh-ed25519 " in pinned
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    argv = [
        a if not a.startswith("UserKnownHostsFile=") else f"UserKnownHostsFile={empty}"
        for a in app.ssh_command
    ]
    refused = subprocess.run([*argv, "true"], capture_output=True, text=True, timeout=30)
    assert refused.returncode == 255
    assert "Host key verification failed" in refused.stderr


def test_apt_get_install_works_through_the_mirror_proxy(pair):
    app = pair.hosts["app"]
    app.run("DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends hello")
    assert app.run("hello").stdout.strip() == "Hello, world!"


def test_hosts_reach_each_other_and_the_controller(pair):
    app, replica = pair.hosts["app"], pair.hosts["replica"]
    banner = python_on(
        app, "import socket; print(socket.create_connection(('replica', 22), 5).recv(7).decode())"
    )
    assert banner.stdout.strip() == "SSH-2.0"
    banner = python_on(
        replica,
        f"import socket; print(socket.create_connection(('{app.address}', 22), 5)"
        ".recv(7).decode())",
    )
    assert banner.stdout.strip() == "SSH-2.0"

    # A stand-in server on the controller, as e2e tests run them.
    with socket.create_server((pair.controller_address, 0)) as server:
        port = server.getsockname()[1]

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"hello from the controller\n")

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        reply = python_on(
            app,
            f"import socket; print(socket.create_connection(('sandbox-controller', {port}), 5)"
            ".recv(64).decode().strip())",
        )
        thread.join(5)
    assert reply.stdout.strip() == "hello from the controller"


def test_nothing_outside_is_reachable_but_the_mirror(pair):
    app = pair.hosts["app"]
    direct = python_on(
        app,
        "import socket\n"
        "try:\n"
        f"    socket.create_connection({OUTSIDE!r}, 5); print('open')\n"
        "except OSError as exc:\n"
        "    print('refused', exc.errno)",
        check=True,
    )
    assert direct.stdout.startswith("refused"), direct.stdout
    # The proxy only forwards to the mirror: other names are refused without a connection.
    via_proxy = python_on(
        app,
        "import urllib.request, urllib.error\n"
        f"opener = urllib.request.build_opener(urllib.request.ProxyHandler("
        f"{{'http': '{pair.apt_proxy}'}}))\n"
        "try:\n"
        "    opener.open('http://example.org/', timeout=10); print('open')\n"
        "except urllib.error.HTTPError as exc:\n"
        "    print(exc.code)",
    )
    assert via_proxy.stdout.strip() == "403"
    resolv = app.run("getent hosts deb.debian.org", check=False)
    assert resolv.returncode != 0, "hosts have no DNS: names outside the sandbox do not resolve"


def test_up_again_changes_nothing(pair):
    before = json.loads(run_tool("status", "--json", "--name", pair.name).stdout)[0]
    inventory_before = (pair.inventory / "hosts.yml").read_text()
    again = boot_sandbox(pair.name, ("app", "replica"), pair.inventory)
    after = json.loads(run_tool("status", "--json", "--name", pair.name).stdout)[0]
    assert again.hosts == pair.hosts
    assert before["hosts"] == after["hosts"]
    assert (pair.inventory / "hosts.yml").read_text() == inventory_before
    state = json.loads((RUN_ROOT / pair.name / "state.json").read_text())
    pids = {name: host["nspawn"]["pid"] for name, host in state["hosts"].items()}
    assert all(Path(f"/proc/{pid}").exists() for pid in pids.values())
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert netns.count(f"dmsb{pair.slot}-") == 2


def test_kill_cuts_a_host_off_and_up_boots_it_fresh(pair):
    """`kill` is a power cut (no shutdown); `up` then brings a fresh host back under the same
    name and address, and leaves the other hosts alone."""
    app, replica = pair.hosts["app"], pair.hosts["replica"]
    app.run("echo written-before-the-kill > /var/tmp/marker && sync")
    state = json.loads((RUN_ROOT / pair.name / "state.json").read_text())
    old_pid = state["hosts"]["app"]["nspawn"]["pid"]
    old_key = state["hosts"]["app"]["host_key"]
    replica_pid = state["hosts"]["replica"]["nspawn"]["pid"]
    started = time.monotonic()
    run_tool("kill", "--name", pair.name, "app")
    assert time.monotonic() - started < 30
    assert not Path(f"/proc/{old_pid}").exists()
    cgroup = state["hosts"]["app"]["nspawn"]["cgroup"]
    assert not any(
        (root / cgroup).exists()
        for root in (
            Path("/sys/fs/cgroup/systemd"),
            Path("/sys/fs/cgroup/unified"),
            Path("/sys/fs/cgroup"),
        )
    )
    status = run_tool("status", "--name", pair.name).stdout
    assert re.search(r"^  app\s.*NOT HEALTHY$", status, re.M), status
    assert app.run("true", check=False, timeout=60).returncode == 255
    assert replica.run("systemctl is-system-running").stdout.strip() == "running"

    again = boot_sandbox(pair.name, ("app", "replica"), pair.inventory)
    fresh = again.hosts["app"]
    assert fresh.address == app.address
    after = json.loads((RUN_ROOT / pair.name / "state.json").read_text())
    assert after["hosts"]["app"]["host_key"] != old_key
    assert after["hosts"]["replica"]["nspawn"]["pid"] == replica_pid
    assert fresh.run("systemctl is-system-running --wait").stdout.strip() == "running"
    assert fresh.run("test -e /var/tmp/marker", check=False).returncode == 1
    # The inventory and known_hosts follow: Ansible reaches the new host, key checked.
    again.ansible("app", "-m", "ansible.builtin.ping")


def test_up_on_another_release_boots_every_host_fresh_on_it(pair):
    """All hosts of a sandbox run one Debian release: `up --suite trixie` replaces them with
    Debian 13 hosts (new host keys, the inventory and known_hosts follow), and back."""
    keys = {
        h: r["host_key"]
        for h, r in json.loads((RUN_ROOT / pair.name / "state.json").read_text())["hosts"].items()
    }
    for suite, codename, version in (("trixie", "trixie", "13"), ("bookworm", "bookworm", "12")):
        again = boot_sandbox(pair.name, ("app", "replica"), pair.inventory, suite)
        assert again.suite == suite
        assert f"sandbox {pair.name} ({suite})" in run_tool("status", "--name", pair.name).stdout
        state = json.loads((RUN_ROOT / pair.name / "state.json").read_text())
        for name, host in again.hosts.items():
            release = host.run("cat /etc/os-release").stdout
            assert f"VERSION_CODENAME={codename}" in release, release
            assert f'VERSION_ID="{version}"' in release, release
            assert host.run("systemctl is-system-running --wait").stdout.strip() == "running"
            assert (
                f"Suites: {codename} {codename}-updates"
                in host.run("cat /etc/apt/sources.list.d/debian.sources").stdout
            )
            assert state["hosts"][name]["host_key"] != keys[name]
            keys[name] = state["hosts"][name]["host_key"]
        again.ansible("all", "-m", "ansible.builtin.ping")


def test_a_boot_timeout_names_its_step_and_shows_the_console():
    name = "e2e-timeout-check"
    try:
        proc = run_tool("up", "--name", name, "--timeout", "0.001", "lonely", check=False)
        assert proc.returncode == 1
        assert "timeout after 0.001s in step 'lonely: wait for sshd on" in proc.stderr
        assert "--- lonely: console" in proc.stderr
    finally:
        run_tool("down", "--name", name)
    assert not (RUN_ROOT / name).exists()


def test_down_removes_everything_it_created(pair):
    # Leave an Ansible ControlPersist master behind on purpose: down must end it too.
    pair.ansible("all", "-m", "ansible.builtin.ping")
    started = time.monotonic()
    pair.down()
    assert time.monotonic() - started < 60
    assert pair.leftovers() == []
    assert not (pair.inventory / "hosts.yml").exists()


def test_molecule_test_of_the_sample_scenario_passes():
    """The shared Molecule config drives a role on a fresh sandbox host, end to end."""
    log = REPO / "artifacts" / "molecule-sandbox_sample.log"
    log.parent.mkdir(exist_ok=True)
    started = time.monotonic()
    proc = subprocess.run(
        ["molecule", "test"],
        cwd=REPO / "sandbox" / "roles" / "sandbox_sample",
        env=dict(tool_env(), NO_COLOR="1", ANSIBLE_FORCE_COLOR="0"),
        capture_output=True,
        text=True,
        timeout=900,
        stdin=subprocess.DEVNULL,
    )
    log.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (
        f"molecule test failed ({log}):\n{(proc.stdout + proc.stderr)[-6000:]}"
    )
    output = proc.stdout + proc.stderr
    for step in ("create", "converge", "idempotence", "verify", "destroy"):
        assert f"{step}: Executed: Successful" in output, step
    print(f"molecule test of sandbox/roles/sandbox_sample: {time.monotonic() - started:.0f}s")
    name = f"mol-sandbox-sample-bookworm-{hashlib.sha1(str(REPO).encode()).hexdigest()[:6]}"
    assert "Take the sandbox down" in output
    status = json.loads(run_tool("status", "--json").stdout)
    assert not [s for s in status if s["name"] == name]
    assert not os.path.exists(RUN_ROOT / name)


def test_a_stale_or_broken_image_cache_is_detected(tmp_path, monkeypatch):
    """What makes `up` rebuild the base image by itself (checked without building one)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sandbox_tool", REPO / "sandbox" / "sandbox.py")
    tool = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, tool)  # dataclasses look it up
    spec.loader.exec_module(tool)
    image = tmp_path / "abc.20260101000000"
    assert "incomplete" in tool._image_problem(image, "abc")
    (image / "rootfs").mkdir(parents=True)
    for marker in tool.IMAGE_MARKERS:
        (image / "rootfs" / marker).parent.mkdir(parents=True, exist_ok=True)
        (image / "rootfs" / marker).touch()
    (image / "image.json").write_text(json.dumps({"key": "abc", "built_at": time.time()}))
    assert tool._image_problem(image, "abc") is None
    assert "another recipe" in tool._image_problem(image, "def")
    (image / "rootfs" / "usr/sbin/sshd").unlink()
    assert "broken (missing /usr/sbin/sshd)" == tool._image_problem(image, "abc")
    (image / "rootfs" / "usr/sbin/sshd").touch()
    old = time.time() - 86400 * (tool.IMAGE_MAX_AGE_DAYS + 1)
    (image / "image.json").write_text(json.dumps({"key": "abc", "built_at": old}))
    assert tool._image_problem(image, "abc").startswith("stale")
    (image / "image.json").write_text("{not json")
    assert tool._image_problem(image, "abc") == "broken image.json"


def _load_tool(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("sandbox_tool", REPO / "sandbox" / "sandbox.py")
    tool = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, tool)
    spec.loader.exec_module(tool)
    return tool


def test_host_specs_name_the_containers_kind(monkeypatch):
    """HOST@containers asks for a host that can run container engines (checked without
    booting one: tests/e2e/test_container_runtime.py boots them)."""
    tool = _load_tool(monkeypatch)
    specs = ["app@containers:digitalme,monitoring", "replica", "spare@containers"]
    assert tool.parse_host_specs(specs) == {
        "app": ["digitalme", "monitoring"],
        "replica": ["backup_targets"],
        "spare": ["backup_targets"],
    }
    assert tool.parse_host_kinds(specs) == {
        "app": "containers",
        "replica": "plain",
        "spare": "containers",
    }
    with pytest.raises(tool.SandboxError, match="bad host kind 'vm'"):
        tool.parse_host_specs(["app@vm"])


def test_a_stale_or_broken_container_base_is_detected(tmp_path, monkeypatch):
    """What makes `container-base` rebuild the container image base by itself."""
    tool = _load_tool(monkeypatch)
    base = tmp_path / "abc.20260101000000"
    base.mkdir()
    assert "incomplete" in tool._container_base_problem(base, "abc")
    meta = {"key": "abc", "built_at": time.time(), "markers": list(tool.CONTAINER_BASE_MARKERS)}
    (base / "image.json").write_text(json.dumps(meta))
    assert tool._container_base_problem(base, "abc") == "broken (no rootfs.tar)"
    (base / "rootfs.tar").touch()
    assert tool._container_base_problem(base, "abc") is None
    assert "another recipe" in tool._container_base_problem(base, "def")
    old = time.time() - 86400 * (tool.IMAGE_MAX_AGE_DAYS + 1)
    (base / "image.json").write_text(json.dumps({**meta, "built_at": old}))
    assert tool._container_base_problem(base, "abc").startswith("stale")


def test_hosts_of_each_release_get_the_machines_mirror_for_it(monkeypatch):
    """`up --suite trixie` on a machine whose apt sources list only bookworm: the hosts get
    the same mirror and keyring for trixie (checked without booting one)."""
    tool = _load_tool(monkeypatch)
    machine = tool._parse_sources(
        "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n"
        "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
        deb822=True,
    )
    renamed = tool._entries_for_suite(machine, "trixie", "bookworm")
    assert [(e.uri, e.suite) for e in renamed] == [
        ("http://deb.debian.org/debian", "trixie"),
        ("http://deb.debian.org/debian", "trixie-updates"),
        ("http://deb.debian.org/debian-security", "trixie-security"),
    ]
    assert tool._entries_for_suite(machine, "bookworm", "bookworm") == machine
    # A machine that lists both releases: each host gets its own release's entries only.
    both = machine + tool._parse_sources(
        "deb [signed-by=/k.gpg] http://mirror.example/debian trixie main contrib\n", deb822=False
    )
    assert [e.suite for e in tool._entries_for_suite(both, "bookworm", "bookworm")] == [
        "bookworm",
        "bookworm-updates",
        "bookworm-security",
    ]
    (listed,) = tool._entries_for_suite(both, "trixie", "bookworm")
    assert (listed.uri, listed.components, listed.signed_by) == (
        "http://mirror.example/debian",
        ("main", "contrib"),
        "/k.gpg",
    )
    sources = tool.AptSources(
        suite="trixie",
        entries=tuple(renamed),
        mirror=renamed[0].uri,
        hosts=frozenset({"deb.debian.org"}),
        upstream_proxy=None,
    )
    text = sources.sources_file()
    assert "Suites: trixie trixie-updates\n" in text and "Suites: trixie-security\n" in text
    assert "bookworm" not in text
    assert tool.image_key(sources).startswith("trixie-")


def test_a_new_image_replaces_only_this_checkouts_image_of_its_release(tmp_path, monkeypatch):
    """The image cache keeps one image per release, and the current images of other
    checkouts that share it (SANDBOX_CACHE_DIR); stale ones go whoever built them."""
    tool = _load_tool(monkeypatch)
    monkeypatch.setattr(tool, "CACHE", tmp_path)
    monkeypatch.setattr(tool, "RUN_ROOT", tmp_path / "run")
    now, old = time.time(), time.time() - 86400 * (tool.IMAGE_MAX_AGE_DAYS + 1)
    images = {
        "new": ("trixie", str(tool.REPO), now),
        "mine-before": ("trixie", str(tool.REPO), now - 60),
        "mine-bookworm": ("bookworm", str(tool.REPO), now - 60),
        "other-checkout": ("trixie", "/elsewhere", now - 60),
        "other-checkout-stale": ("trixie", "/elsewhere", old),
        "no-owner": ("trixie", None, now - 60),
    }
    for name, (suite, owner, built_at) in images.items():
        (tmp_path / "images" / name).mkdir(parents=True)
        meta = {"suite": suite, "built_at": built_at, **({"owner": owner} if owner else {})}
        (tmp_path / "images" / name / "image.json").write_text(json.dumps(meta))
    (tmp_path / "images" / ".build-trixie-0-999999999").mkdir()  # a dead build's leftovers
    tool._gc_images(keep=tmp_path / "images" / "new")
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        "mine-bookworm",
        "new",
        "no-owner",
        "other-checkout",
    ]
