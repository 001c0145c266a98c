"""Ansible's linear strategy over Mitogen: the strategy ansible.cfg names.

Mitogen (requirements/deploy.txt pins it) keeps one Python interpreter per host for the
whole run and sends modules to it over the SSH connection, instead of a new SSH command,
temporary files and a Python start for every task. site.yml runs the same tasks in the
same order with the same results, several times faster (docs/deployment.md,
"Measurements"). ``ANSIBLE_STRATEGY=linear ansible-playbook ...`` runs without it.

Without mitogen installed (a controller set up by hand), the plain linear strategy runs,
with a warning.
"""

from __future__ import annotations

try:
    from ansible_mitogen.plugins.strategy.mitogen_linear import StrategyModule
except ImportError as missing:
    from ansible.plugins.strategy.linear import StrategyModule
    from ansible.utils.display import Display

    Display().warning(
        f"mitogen is not installed ({missing}): running with Ansible's linear strategy, "
        "which is slower; `pip install -r requirements/deploy.txt` installs it")

__all__ = ["StrategyModule"]
