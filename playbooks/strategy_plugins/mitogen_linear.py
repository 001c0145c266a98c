"""Ansible's linear strategy over Mitogen: the strategy ansible.cfg names.

Mitogen (requirements/deploy.txt pins it) keeps one Python interpreter per host for the
whole run and sends modules to it over the SSH connection, instead of a new SSH command,
temporary files and a Python start for every task. site.yml runs the same tasks in the
same order with the same results, several times faster (docs/deployment.md,
"Measurements"). ``ANSIBLE_STRATEGY=linear ansible-playbook ...`` runs without it.

Two pieces of work Mitogen repeats are done once per run here (`remember_per_run`); what
they return is the same, only not recomputed:

- Before running a module of a collection, each task's worker process lists the installed
  collections (``ansible.collections.list.list_collection_dirs``), which imports every
  collection package and parses its meta/runtime.yml: about 100 collections with the
  ``ansible`` bundle, in a process forked per task that keeps nothing for the next. The
  list is made once in the controller process, before any worker is forked.
- Finding what a module imports compiles each file it imports, again for every module
  (``ansible_mitogen.module_finder``): ``ansible.module_utils.basic`` and its imports once
  per module the run uses. Each file's code is compiled once per run.

Measured on the postgresql scenario's converged hosts (two hosts, no change; `time`
of ``ansible-playbook converge.yml``): 12.5-13.0 s and 8.8 CPU-seconds without,
9.5-10.7 s and 5.9-6.8 CPU-seconds with. ``python -m bench.deploy_bench`` compares
site.yml with Mitogen's own strategy.

Without mitogen installed (a controller set up by hand), the plain linear strategy runs,
with a warning.
"""

from __future__ import annotations

import builtins
import functools
from collections.abc import Iterator
from types import CodeType
from typing import Any

try:
    from ansible_mitogen.plugins.strategy.mitogen_linear import StrategyModule
except ImportError as missing:
    from ansible.plugins.strategy.linear import StrategyModule
    from ansible.utils.display import Display

    Display().warning(
        f"mitogen is not installed ({missing}): running with Ansible's linear strategy, "
        "which is slower; `pip install -r requirements/deploy.txt` installs it"
    )
    MITOGEN = False
else:
    MITOGEN = True

__all__ = ["StrategyModule"]


def remember_per_run() -> None:
    """Make the collection list once, and compile each file once, for this run.

    Runs in the controller process when Ansible loads this strategy, before it forks the
    workers and Mitogen's multiplexer: both inherit what is set here. Loaded outside
    Ansible (no collection loader installed yet), it leaves everything as it is."""
    import ansible.collections.list as collections_list
    import ansible_mitogen.module_finder as module_finder
    from ansible.utils.collection_loader import AnsibleCollectionConfig

    if AnsibleCollectionConfig.collection_finder is None or getattr(
        collections_list.list_collection_dirs, "remembered", False
    ):
        return
    list_all = collections_list.list_collection_dirs
    installed = list(list_all())

    @functools.wraps(list_all)
    def list_collection_dirs(*args: Any, **kwargs: Any) -> Iterator[bytes]:
        # Mitogen asks without arguments; anything narrower is answered by Ansible.
        if args or kwargs:
            return list_all(*args, **kwargs)
        return iter(installed)

    list_collection_dirs.remembered = True  # type: ignore[attr-defined]
    collections_list.list_collection_dirs = list_collection_dirs

    compiled: dict[tuple[bytes | str, str, str], CodeType] = {}

    def compile_once(source: bytes | str, filename: str, mode: str) -> CodeType:
        key = (source, filename, mode)
        if key not in compiled:
            compiled[key] = builtins.compile(source, filename, mode)
        return compiled[key]

    # module_finder calls the bare name `compile`: a module global comes before builtins.
    module_finder.compile = compile_once


if MITOGEN:
    remember_per_run()
