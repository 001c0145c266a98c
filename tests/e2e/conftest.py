"""Booted sandbox hosts for end-to-end tests (sandbox/sandbox.py; see docs/sandbox.md).

Fixture API
-----------
``sandbox_hosts`` (module scope) is a factory. Call it with host specs, as for
``make sandbox HOSTS=...``: ``"app"``, or ``"app:digitalme"`` / ``"replica:backup_targets,extra"``
to choose the Ansible groups (by default the first host is in ``digitalme`` and the others
in ``backup_targets``); ``suite="trixie"`` boots Debian 13 hosts (Debian 12, ``bookworm``,
by default). It boots the hosts (or keeps them, if the module already has them)
and returns a :class:`Sandbox`; at the end of the module every host is removed::

    @pytest.mark.e2e
    def test_backup_reaches_the_replica(sandbox_hosts):
        sandbox = sandbox_hosts("app", "replica")
        sandbox.ansible_playbook("playbooks/site.yml")        # uses sandbox.inventory
        app = sandbox.hosts["app"]
        assert app.run("systemctl is-active litestream").stdout.strip() == "active"
        server = MyStandIn(host=sandbox.controller_address)   # hosts reach the controller

Each module gets its own sandbox (own bridge, /24 and hosts), so modules never share
state. Calling the factory again with other hosts makes the module's sandbox have exactly
those hosts (hosts not named are removed; another ``suite`` boots them all fresh);
``name=`` gives a module a second sandbox.

- :class:`Sandbox`: ``name``, ``suite``, ``hosts`` (dict name -> :class:`SandboxHost`),
  ``inventory`` (a directory usable as ``ansible -i``: the generated ``hosts.yml`` plus links
  to ``inventory/sandbox/group_vars`` and ``host_vars`` when they exist), ``controller_address``
  (the controller as the hosts see it; also the name ``sandbox-controller`` on the hosts),
  ``subnet``, ``private_key``, ``known_hosts``, ``apt_proxy``; methods ``ansible()``,
  ``ansible_playbook()`` (run from the repository root, so ``ansible.cfg`` applies),
  ``down()`` and ``leftovers()`` (what a teardown failed to remove: should be ``[]``).
- :class:`SandboxHost`: ``name``, ``address``, ``groups``, ``ssh_command`` (argv prefix,
  host key pinned) and ``run(command)`` (a shell command as root over SSH).

The tests need root (network namespaces, mounts, systemd-nspawn): they fail, not skip,
without it, since CI runs them as root.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from standins.alertmanager_webhook import AlertReceiver
from standins.anthropic_api import AnthropicStandin
from tests.e2e.deployments import (
    ALERT_RECEIVER_PORT,
    MONITORING_TEST_SETTINGS,
    SHARED_SANDBOX_HOSTS,
    SITE_TIMINGS,
    STANDIN_PORT,
    TELEGRAM_TOKEN,
    Deployment,
    SharedSite,
    app_test_settings,
    recap,
)
from tests.e2e.load import BackgroundLoop, start_telegram
from tests.e2e.sandboxes import (
    REPO,
    SUITES,
    Sandbox,
    add_group_vars,
    boot_sandbox,
    module_sandbox_name,
    require_root,
    run_tool,
)


@pytest.fixture(scope="module")
def sandbox_hosts(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Sandbox]]:
    """Factory: ``sandbox_hosts("app", "replica:backup_targets", name=None, suite=None)
    -> Sandbox``."""
    require_root()
    default_name = module_sandbox_name(request.module.__name__)
    booted: dict[str, Sandbox] = {}
    inventories: dict[str, Path] = {}

    def factory(*specs: str, name: str | None = None, suite: str | None = None) -> Sandbox:
        sandbox_name = name or default_name
        if sandbox_name not in inventories:
            inventories[sandbox_name] = tmp_path_factory.mktemp(f"inventory-{sandbox_name}")
        booted[sandbox_name] = boot_sandbox(
            sandbox_name, specs or ("app",), inventories[sandbox_name], suite or SUITES[0]
        )
        return booted[sandbox_name]

    yield factory
    for sandbox_name in booted:
        run_tool("down", "--name", sandbox_name, timeout=300, check=False)


@pytest.fixture(scope="session")
def shared_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedSite]:
    """site.yml on fresh hosts (tests/e2e/deployments.py, SharedSite), made once for the
    modules that can share it; its first run is timed as the fresh site.yml."""
    require_root()
    name = module_sandbox_name("shared-site")
    workdir = tmp_path_factory.mktemp("shared-site")
    inventory = workdir / "inventory"
    with BackgroundLoop() as loop, contextlib.ExitStack() as stack:
        anthropic, telegram = AnthropicStandin(), None
        try:
            sandbox = boot_sandbox(name, SHARED_SANDBOX_HOSTS, inventory)
            loop.run(anthropic.start(host=sandbox.controller_address, port=STANDIN_PORT))
            telegram = loop.run(start_telegram(sandbox.controller_address, TELEGRAM_TOKEN))
            receiver = stack.enter_context(
                AlertReceiver(host=sandbox.controller_address, port=ALERT_RECEIVER_PORT)
            )
            # The floor host is a bare host for a measurement (test_site), not part of the
            # deployment: nothing scrapes it.
            add_group_vars(
                inventory,
                {
                    "digitalme": app_test_settings(telegram.base_url),
                    "monitoring": {
                        **MONITORING_TEST_SETTINGS,
                        "monitoring_node_hosts": ["app", "replica"],
                    },
                },
            )
            deployment = Deployment(sandbox, workdir, SITE_TIMINGS)
            started = time.monotonic()
            result = sandbox.ansible_playbook("playbooks/site.yml", "--limit", "app,replica")
            deployment.record("site_fresh_seconds", time.monotonic() - started)
            (REPO / "artifacts" / "site-first-run.log").write_text(result.stdout)
            counts = recap(result.stdout)
            assert counts["app"]["failed"] == 0 and counts["app"]["changed"] > 0, result.stdout[
                -3000:
            ]
            yield SharedSite(deployment, loop, anthropic, telegram, receiver)
        finally:
            run_tool("down", "--name", name, timeout=300, check=False)
            if telegram is not None:
                loop.run(telegram.close())
            loop.run(anthropic.close())
