"""`ansible-playbook --check --diff` of the scenario's converge.yml on the converged hosts.

Runs first (file order), before the other tests touch the hosts.
"""

import re

from verifier import ansible_playbook


def test_check_mode_reports_no_change_on_the_converged_hosts():
    returncode, output = ansible_playbook("--check", "--diff")
    assert returncode == 0, output[-6000:]
    recap = re.findall(
        r"^(\S+)\s+:\s+ok=\d+\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", output, re.M
    )
    assert len(recap) == 3, output[-6000:]
    for _host, changed, unreachable, failed in recap:
        assert (changed, unreachable, failed) == ("0", "0", "0"), output[-6000:]
    # The secrets never show in a diff.
    assert "PRIVATE KEY" not in output
