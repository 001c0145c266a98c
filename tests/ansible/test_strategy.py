"""The strategy ansible.cfg names (playbooks/strategy_plugins/mitogen_linear.py): Mitogen's
linear strategy, with the work Mitogen repeats per task or per module done once per run.
What it remembers must be what Ansible and Mitogen would have computed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / ".venv" / "bin"
SHIM = REPO / "playbooks" / "strategy_plugins" / "mitogen_linear.py"


def _run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def test_playbooks_run_over_mitogen() -> None:
    # ansible.cfg names the strategy, and the shim resolves to Mitogen's (not the fallback
    # to plain linear that a controller without mitogen gets, with a warning).
    config = _run(str(BIN / "ansible-config"), "dump", "--only-changed")
    assert re.search(r"^DEFAULT_STRATEGY\(.*\) = mitogen_linear$", config.stdout, re.M), (
        config.stdout
    )
    shim = _run(
        str(BIN / "python"),
        "-c",
        (
            "import importlib.util as u; "
            f"s = u.spec_from_file_location('shim', {str(SHIM)!r}); "
            "m = u.module_from_spec(s); s.loader.exec_module(m); "
            "print(m.StrategyModule.__module__, [c.__module__ for c in m.StrategyModule.__mro__])"
        ),
    )
    assert shim.returncode == 0, shim.stderr
    assert shim.stdout.startswith("ansible_mitogen."), shim.stdout
    assert "ansible.plugins.strategy.linear" in shim.stdout, shim.stdout


# Loads the shim the way Ansible does (plugin loader ready), then compares what it remembers
# with Ansible's own collection list and Mitogen's own scan of a collection module.
_PROBE = """
import builtins, importlib.util, json, os, sys
from ansible.plugins.loader import init_plugin_loader
init_plugin_loader()
import ansible.collections.list as collections_list
import ansible.module_utils
import ansible_mitogen.module_finder as module_finder
listed_by_ansible = list(collections_list.list_collection_dirs())
spec = importlib.util.spec_from_file_location("shim", sys.argv[1])
spec.loader.exec_module(importlib.util.module_from_spec(spec))
import ansible_collections.community.crypto.plugins.modules.openssl_privatekey as module
args = ("ansible_module_openssl_privatekey", module.__file__,
        (os.path.dirname(ansible.module_utils.__file__),))
compiled = []
real_compile = builtins.compile
builtins.compile = lambda *a, **k: compiled.append(a[1]) or real_compile(*a, **k)
first = module_finder.scan(*args)
compiles_first = len(compiled)
second = module_finder.scan(*args)
compiles_second = len(compiled) - compiles_first
module_finder.compile = real_compile  # Mitogen's own scan, for comparison
own = module_finder.scan(*args)
print(json.dumps({
    "listed": [p.decode() for p in collections_list.list_collection_dirs()],
    "listed_by_ansible": [p.decode() for p in listed_by_ansible],
    "remembered": getattr(collections_list.list_collection_dirs, "remembered", False),
    "narrower": [p.decode() for p in
                 collections_list.list_collection_dirs(coll_filter="community.crypto")],
    "scan": first, "scan_again": second, "scan_by_mitogen": own,
    "compiles_first": compiles_first, "compiles_second": compiles_second,
}))
"""


def test_what_the_strategy_remembers_is_what_ansible_and_mitogen_compute() -> None:
    probe = _run(str(BIN / "python"), "-c", _PROBE, str(SHIM))
    assert probe.returncode == 0, probe.stderr
    seen = json.loads(probe.stdout)
    assert seen["remembered"]
    assert seen["listed"] == seen["listed_by_ansible"] and len(seen["listed"]) > 10
    crypto = [p for p in seen["listed"] if p.endswith("/community/crypto")]
    assert seen["narrower"] == crypto and len(crypto) == 1, seen["narrower"]
    # The module imports dozens of module_utils files: compiled once, not at each scan.
    assert seen["scan"] == seen["scan_by_mitogen"] == seen["scan_again"]
    assert len(seen["scan"]) > 10
    assert seen["compiles_first"] > 10 and seen["compiles_second"] == 0, seen


def test_collection_modules_run_over_the_strategy(tmp_path: Path) -> None:
    """Two modules of a collection that share module_utils, on this machine over Mitogen
    (a local connection, the venv's Python): they run, the second run changes nothing."""
    playbook = tmp_path / "play.yml"
    playbook.write_text("""
- hosts: localhost
  gather_facts: false
  tasks:
    - community.crypto.openssl_privatekey:
        path: "{{ dest }}/key.pem"
        type: Ed25519
        mode: "0600"
    - community.crypto.openssl_privatekey_info:
        path: "{{ dest }}/key.pem"
      register: info
    - ansible.builtin.assert:
        that: info.type == "Ed25519"
""")
    argv = (
        str(BIN / "ansible-playbook"),
        "-i",
        "localhost,",
        "-c",
        "local",
        "-e",
        f"ansible_python_interpreter={sys.executable}",
        "-e",
        f"dest={tmp_path}",
        str(playbook),
    )
    first = _run(*argv)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
    assert re.search(r"localhost\s+: ok=3\s+changed=1 .*failed=0", first.stdout), first.stdout
    assert (tmp_path / "key.pem").stat().st_mode & 0o777 == 0o600
    again = _run(*argv)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    assert re.search(r"localhost\s+: ok=3\s+changed=0 .*failed=0", again.stdout), again.stdout
