"""Runs first (file order), before the other tests touch the hosts."""

import re

from verifier import ansible_playbook, changed_tasks

testinfra_hosts = ["mon"]


def test_check_mode_reports_no_change_on_the_converged_hosts():
    rc, output = ansible_playbook("--check", "--diff")
    assert rc == 0, output[-6000:]
    recap = re.findall(r"^\S+\s+: ok=\d+\s+changed=(\d+)", output, re.MULTILINE)
    assert len(recap) == 2 and recap == ["0", "0"], f"{changed_tasks(output)}\n{output[-6000:]}"
